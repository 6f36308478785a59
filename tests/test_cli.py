"""``python -m metarl_tf``: train (fresh, refuse to overwrite, resume), evaluate, export."""

import json
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
from numerics import assert_close, assert_exact

from metarl_tf.bundle import load_bundle
from metarl_tf.cli import main


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """``train --preset tiny`` (2 iterations) into a fresh run dir."""
    tmp = tmp_path_factory.mktemp("cli")
    out, run = tmp / "b", tmp / "run"
    code = main(
        ["train", "--preset", "tiny", "--out", str(out), "--run-dir", str(run), "--no-progress"]
    )
    return {"code": code, "out": out, "run": run, "tmp": tmp}


def read_metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]


@pytest.mark.slow
def test_train_writes_a_loadable_bundle_and_one_metrics_line_per_iteration(cli_run):
    assert cli_run["code"] == 0
    run, out = cli_run["run"], cli_run["out"]
    metrics = read_metrics(run)
    assert [m["iteration"] for m in metrics] == [1, 2]
    assert (run / "checkpoint" / "checkpoint.npz").is_file()
    assert json.loads((run / "config.json").read_text())["hidden_sizes"] == [8]
    bundle = load_bundle(out)
    assert bundle.meta["training"]["iterations"] == 2
    assert bundle.policy.parameter_shapes[0] == (2, 8)
    assert "metrics.jsonl" in bundle.meta["files"]
    assert (out / "metrics.jsonl").read_text() == (run / "metrics.jsonl").read_text()


@pytest.mark.slow
def test_train_refuses_to_overwrite_a_run_without_resume(cli_run, capsys):
    run, out = cli_run["run"], cli_run["out"]
    before = (run / "metrics.jsonl").read_text()
    code = main(["train", "--preset", "tiny", "--out", str(out), "--run-dir", str(run)])
    assert code == 2
    err = capsys.readouterr().err
    assert "already holds a checkpoint" in err and "--resume" in err
    assert (run / "metrics.jsonl").read_text() == before


@pytest.mark.slow
def test_evaluate_writes_the_documented_json(cli_run, tmp_path, capsys):
    path = tmp_path / "eval" / "result.json"
    steps = 2
    code = main(
        ["evaluate", str(cli_run["out"]), "--tasks", "3", "--episodes", "2",
         "--steps", str(steps), "--seed", "5", "--json", str(path)]
    )  # fmt: skip
    assert code == 0
    result = json.loads(path.read_text())
    assert {"bundle", "tasks", "episodes", "seed", "methods"} <= set(result)
    assert result["bundle"] == str(cli_run["out"])
    assert (result["tasks"], result["episodes"], result["seed"]) == (3, 2, 5)
    maml = result["methods"]["maml"]
    assert len(maml["mean_return"]) == steps + 1 and len(maml["ci95"]) == steps + 1
    assert all(np.isfinite(maml["mean_return"])) and all(np.isfinite(maml["ci95"]))
    assert all(-5 * 1.5 <= r <= 0 for r in maml["mean_return"])  # horizon 5, distance < 1.5
    assert not any(k.startswith("_") for k in result)
    assert "mean return" in capsys.readouterr().out
    # same seed, same numbers
    again = tmp_path / "again.json"
    main(["evaluate", str(cli_run["out"]), "--tasks", "3", "--episodes", "2",
          "--steps", str(steps), "--seed", "5", "--json", str(again)])  # fmt: skip
    assert json.loads(again.read_text())["methods"] == result["methods"]


@pytest.mark.slow
def test_evaluate_rejects_bad_arguments(cli_run, tmp_path, capsys):
    assert main(["evaluate", str(cli_run["out"]), "--tasks", "1"]) == 2
    assert "--tasks >= 2" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "missing")]) == 2
    assert "not a directory" in capsys.readouterr().err


@pytest.mark.slow
def test_export_writes_the_checkpoint_as_a_bundle(cli_run, tmp_path):
    out = tmp_path / "exported"
    assert main(["export", str(cli_run["run"]), "--out", str(out)]) == 0
    exported, trained = load_bundle(out), load_bundle(cli_run["out"])
    for a, b in zip(exported.policy.get_parameters(), trained.policy.get_parameters(), strict=True):
        assert_exact(a, b)
    assert main(["export", str(tmp_path / "no-run"), "--out", str(tmp_path / "x")]) == 2


@pytest.mark.slow
def test_resume_continues_the_run(cli_run, capsys):
    # Last in this module: it advances the shared run to 3 iterations.
    run, out = cli_run["run"], cli_run["out"]
    first_two = read_metrics(run)
    code = main(
        ["train", "--preset", "tiny", "--out", str(out), "--run-dir", str(run),
         "--resume", "--iterations", "3", "--no-progress"]
    )  # fmt: skip
    assert code == 0
    assert "resumed from" in capsys.readouterr().out
    metrics = read_metrics(run)
    assert [m["iteration"] for m in metrics] == [1, 2, 3]
    assert metrics[:2] == first_two
    assert load_bundle(out).meta["training"]["iterations"] == 3


@pytest.mark.slow
def test_init_from_continues_a_bundle_in_a_fresh_run_dir(cli_run, tmp_path, capsys):
    start = load_bundle(cli_run["out"]).meta["training"]["iterations"]
    out, run = tmp_path / "longer", tmp_path / "run"
    code = main(
        ["train", "--preset", "tiny", "--init-from", str(cli_run["out"]), "--out", str(out),
         "--run-dir", str(run), "--iterations", str(start + 1), "--no-progress"]
    )  # fmt: skip
    assert code == 0
    assert f"from iteration {start}" in capsys.readouterr().out
    metrics = read_metrics(run)
    assert [m["iteration"] for m in metrics] == list(range(1, start + 2))  # bundle's rows + one
    assert load_bundle(out).meta["training"]["iterations"] == start + 1
    # another preset than the bundle's, or together with --resume: refused with a reason
    assert main(["train", "--preset", "nav2d", "--init-from", str(out), "--run-dir",
                 str(tmp_path / "r2"), "--iterations", "1"]) == 2  # fmt: skip
    assert "another configuration" in capsys.readouterr().err
    assert main(["train", "--preset", "tiny", "--init-from", str(out), "--resume"]) == 2
    assert "exclude each other" in capsys.readouterr().err


def test_module_entry_point_help():
    proc = subprocess.run(
        [sys.executable, "-m", "metarl_tf", "train", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "--preset" in proc.stdout and "--resume" in proc.stdout


def test_unknown_preset_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--preset", "nope"])
    assert info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.slow
def test_plot_training_writes_a_png_of_the_run(cli_run, tmp_path, capsys):
    out = tmp_path / "plots" / "training.png"
    assert main(["plot-training", str(cli_run["run"]), str(cli_run["out"] / "metrics.jsonl"),
                 "--out", str(out), "--window", "2"]) == 0  # fmt: skip
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "iterations, last 2: post-adaptation" in printed and "wrote" in printed


def test_plot_training_names_a_bad_input(tmp_path, capsys):
    assert main(["plot-training", str(tmp_path), "--out", str(tmp_path / "x.png")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
    bad = tmp_path / "metrics.jsonl"
    bad.write_text('{"iteration": 1, "returns/post_adaptation": 1.0}\nnot json\n')
    assert main(["plot-training", str(bad), "--out", str(tmp_path / "x.png")]) == 2
    assert "metrics.jsonl:2: not a JSON line" in capsys.readouterr().err


def test_moving_average_matches_a_loop():
    from metarl_tf.evaluation.statistics import moving_average

    values = np.random.default_rng(0).normal(size=23)
    for window in (1, 4, 30):
        expected = [values[max(0, i + 1 - window) : i + 1].mean() for i in range(len(values))]
        assert_close(moving_average(values, window), expected, ulps=16)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["local", "ray"])
def test_sigterm_saves_a_checkpoint_and_a_bundle(tmp_path, backend):
    # ray: ray.init installs handlers that end the process at once; the run's are put back
    if backend == "ray":
        pytest.importorskip("ray", reason='the ray extra: pip install -e ".[ray]"')
    out, run = tmp_path / "b", tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "metarl_tf", "train", "--preset", "tiny", "--iterations", "100000",
         "--out", str(out), "--run-dir", str(run), "--no-progress", "--backend", backend,
         "--num-env-workers", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        for line in proc.stdout:  # wait for the first finished iteration
            if line.startswith("it "):
                break
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, err  # 128 + SIGTERM
    assert "SIGTERM: stopped after iteration" in err and "--resume" in err
    bundle = load_bundle(out)
    iterations = bundle.meta["training"]["iterations"]
    assert 1 <= iterations < 100000
    assert [m["iteration"] for m in read_metrics(run)][-1] == iterations


@pytest.mark.slow
def test_export_keeps_only_the_metrics_its_checkpoint_covers(cli_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(cli_run["run"], run)
    rows = read_metrics(run)
    extra = {**rows[-1], "iteration": rows[-1]["iteration"] + 1}  # logged after the checkpoint
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps(extra) + "\n")
    assert main(["export", str(run), "--out", str(tmp_path / "b")]) == 0
    exported = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in exported] == [m["iteration"] for m in rows]


def test_scratch_ppo_rejects_bad_arguments(tmp_path, capsys):
    assert main(["scratch-ppo", str(tmp_path), "--env-steps", "0"]) == 2
    assert "--env-steps >= 1" in capsys.readouterr().err
    assert main(["scratch-ppo", str(tmp_path / "missing")]) == 2
    assert "not a directory" in capsys.readouterr().err


@pytest.mark.slow
def test_scratch_ppo_compares_a_bundle_with_ppo_on_the_same_tasks(cli_run, tmp_path, capsys):
    path, plot = tmp_path / "scratch.json", tmp_path / "scratch.png"
    code = main(
        ["scratch-ppo", str(cli_run["out"]), "--tasks", "2", "--episodes", "2", "--steps", "1",
         "--env-steps", "20", "--seed", "3", "--json", str(path), "--plot", str(plot)]
    )  # fmt: skip
    assert code == 0
    result = json.loads(path.read_text())
    horizon = load_bundle(cli_run["out"]).task_distribution.horizon
    assert result["tasks"] == 2 and len(result["maml"]["mean_return"]) == 2
    for curve in result["ppo_scratch"]["per_task_curves"]:
        assert curve["env_steps"][-1] >= 20
        # episodes are as long as the bundle's (its horizon, not the gymnasium default of 100)
        assert all(-1.5 * horizon <= r <= 0 for r in curve["mean_return"])
    (row,) = result["steps_to_match_maml"]
    assert row["inner_steps"] == 1 and len(row["ppo_env_steps_per_task"]) == 2
    assert plot.read_bytes()[:4] == b"\x89PNG"
    assert "env steps to match" in capsys.readouterr().out
