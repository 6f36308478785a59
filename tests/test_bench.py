"""The benchmark scripts refuse arguments they cannot measure with (before starting anything)."""

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--act-requests", "100"], "--act-requests must be at least 16 x --rounds"),
        (["--rounds", "0"], "--act-requests must be at least 16 x --rounds"),
        (["--adapt-requests", "3"], "--adapt-requests must be at least 4"),
    ],
)
def test_serve_latency_rejects_too_few_requests(args, message):
    proc = subprocess.run(
        [sys.executable, str(BENCH / "serve_latency.py"), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert message in proc.stderr
