"""``metarl_tf.training``: train, resume and export from Python, without the command line."""

import json

import pytest
from numerics import assert_exact

from metarl_tf.bundle import load_bundle
from metarl_tf.config import get_preset
from metarl_tf.training import FitResult, RunError, export_run, fit


def _params(path):
    return load_bundle(path).policy.get_parameters()


@pytest.mark.slow
def test_fit_resume_and_export_from_python(tmp_path):
    config = get_preset("tiny").replace(iterations=3)
    straight = fit(config, tmp_path / "straight", tmp_path / "straight-bundle", log=None)
    assert isinstance(straight, FitResult)
    assert (straight.iteration, straight.trained_iterations, straight.exit_code) == (3, 3, 0)
    assert straight.bundle == tmp_path / "straight-bundle"
    assert [m["iteration"] for m in straight.last_metrics] == [1, 2, 3]

    # two iterations, then a resume to three: the same bundle as the straight run
    run = tmp_path / "run"
    first = fit(config.replace(iterations=2), run, log=None)
    assert first.bundle == run / "bundle" and first.iteration == 2
    resumed = fit(config, run, resume=True, log=None, progress=False)
    assert resumed.resumed_from == 2 and resumed.iteration == 3
    for got, expected in zip(_params(resumed.bundle), _params(straight.bundle), strict=True):
        assert_exact(got, expected)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2, 3]

    exported = export_run(run, tmp_path / "exported")
    assert exported.iteration == 3
    for got, expected in zip(_params(tmp_path / "exported"), _params(straight.bundle), strict=True):
        assert_exact(got, expected)
    assert (tmp_path / "exported" / "metrics.jsonl").read_text() == (
        run / "metrics.jsonl"
    ).read_text()


def test_fit_refuses_bad_requests_before_training(tmp_path):
    config = get_preset("tiny")
    with pytest.raises(RunError, match="exclude each other") as err:
        fit(config, tmp_path / "r", resume=True, init_from="saved_models/nav2d-maml", log=None)
    assert err.value.exit_code == 2
    with pytest.raises(RunError, match="no checkpoint in"):
        fit(config, tmp_path / "r", resume=True, log=None)
    with pytest.raises(RunError, match="select must be 'last' or 'best'"):
        fit(config, tmp_path / "r", select="first", log=None)
    with pytest.raises(RunError, match="no checkpoint in"):
        export_run(tmp_path / "r", tmp_path / "b")
    assert not (tmp_path / "b").exists()
