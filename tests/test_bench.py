"""The benchmark scripts refuse arguments they cannot measure with (before starting anything)."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from numerics import assert_close, assert_not_close

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


def _load_bench(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_eval_noise_first_row_is_evaluates_own_figure(tiny_run, tmp_path):
    """bench/eval_noise.py scores the same tasks under several noise seeds; with the task seed as
    the first noise seed that row is exactly ``evaluate``'s figure, and other seeds differ."""
    import json

    from metarl_tf.bundle import load_bundle
    from metarl_tf.evaluation.report import evaluate

    module = _load_bench("eval_noise")
    out = tmp_path / "noise.json"
    bundle = str(tiny_run["bundle_2"])
    args = [bundle, "--seed", "3", "--tasks", "3", "--episodes", "2", "--steps", "1"]
    assert module.main([*args, "--noise-seeds", "3,7", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["mean_return_by_noise_seed"]
    expected = evaluate(load_bundle(bundle), 3, 2, 1, seed=3)["methods"]["maml"]["mean_return"]
    assert_close(rows["3"], expected, ulps=8, dtype=np.float32)
    assert_not_close(rows["7"], rows["3"], dtype=np.float32)
    for bad, message in (("3,3", "must be distinct"), ("3;7", "comma-separated integers")):
        proc = subprocess.run(
            [sys.executable, str(BENCH / "eval_noise.py"), bundle, "--noise-seeds", bad],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 2 and message in proc.stderr


def test_curvature_products_counts_each_ops_bytes_and_runs(tmp_path):
    """bench/curvature_products.py: the traffic count of a known graph (one multiply of two
    4 MB tensors: 12 MB; a small add: not counted), and a run on the tiny preset."""
    import json

    import tensorflow as tf

    module = _load_bench("curvature_products")

    @tf.function
    def mul(a, b, c):
        return a * b, c + c

    big = tf.TensorSpec([1000, 1000], tf.float32)
    small = tf.TensorSpec([10, 10], tf.float32)
    assert module.graph_traffic_bytes(mul.get_concrete_function(big, big, small)) == 12_000_000
    out = tmp_path / "products.json"
    args = ["--preset", "tiny", "--products", "1", "--compare-general", "--json", str(out)]
    assert module.main(args) == 0
    rows = json.loads(out.read_text())["products"]
    assert set(rows) == {"inner-loss Hessian", "inner-loss Hessian, general path", "Fisher"}
