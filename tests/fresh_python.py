"""A fresh Python interpreter for tests that check what a process imports or sets up: started in
the repository root, without TF_USE_LEGACY_KERAS (the test process's conftest sets it)."""

import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def run_python(args: list[str], timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    """``python *args`` in REPO_ROOT with this process's environment minus TF_USE_LEGACY_KERAS,
    plus ``env``; output captured as text."""
    clean = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    clean["TF_CPP_MIN_LOG_LEVEL"] = "2"
    return subprocess.run(
        [sys.executable, *args], cwd=REPO_ROOT, env={**clean, **env}, capture_output=True,
        text=True, timeout=timeout,
    )  # fmt: skip
