"""Faults a run and a bundle must survive: signals and kills at every moment of an iteration and of
the bundle write, full disks, read-only paths, destinations that are not bundles, and damaged or
hostile bundles. Nothing is lost or mislabelled, a resumed run equals the uninterrupted one
exactly, every refusal is one line naming the path, and the exit code says what happened."""

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from fault_injection import MOMENTS, install
from numerics import assert_exact

import metarl_tf.atomic_files as atomic_files
import metarl_tf.bundle as bundle_module
import metarl_tf.checkpoint as checkpoint
import metarl_tf.training.run as run_module
from metarl_tf.bundle import BundleError, load_bundle
from metarl_tf.bundle_schema import sha256_of
from metarl_tf.checkpoint import read_checkpoint
from metarl_tf.cli import main
from serving.launch import SERVICE_TARGET, free_port

TESTS = Path(__file__).resolve().parent
# an older bundle at --out, for the moments of the swap that replaces it
EARLIER_BUNDLE = TESTS.parent / "saved_models" / "nav2d-pretrained"
ITERATIONS = 4


def train(run, out, *extra, iterations=ITERATIONS):
    return main(
        ["train", "--preset", "tiny", "--iterations", str(iterations), "--run-dir", str(run),
         "--out", str(out), "--no-progress", *extra]
    )  # fmt: skip


def rows_of(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line]


def comparable(rows):
    """Metrics rows without wall-clock and memory figures."""
    return [
        {k: v for k, v in r.items() if not k.startswith("time/") and k != "charts/peak_rss_mb"}
        for r in rows
    ]


def parameters(bundle_dir):
    return load_bundle(bundle_dir).policy.get_parameters()


def assert_same_run(run, out, reference):
    """``run``/``out`` ended where the uninterrupted ``reference`` run did, bit for bit."""
    for got, expected in zip(parameters(out), reference["params"], strict=True):
        assert_exact(got, expected)
    assert comparable(rows_of(run / "metrics.jsonl")) == reference["rows"]
    assert comparable(rows_of(out / "metrics.jsonl")) == reference["rows"]
    arrays, manifest = read_checkpoint(run / "checkpoint")
    assert manifest["iteration"] == reference["iteration"]
    for key, expected in reference["arrays"].items():
        assert_exact(arrays[key], expected, err_msg=key)
    meta = load_bundle(out).meta["training"]
    for key in ("iterations", "selection", "final_pre_adaptation_return"):
        assert meta[key] == reference["training"][key], key
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    assert leftovers == []


def assert_consistent(run, out, iteration):
    """The checkpoint, the metrics and the bundle all describe iteration ``iteration``."""
    arrays, manifest = read_checkpoint(run / "checkpoint")
    assert manifest["iteration"] == iteration
    assert rows_of(run / "metrics.jsonl")[-1]["iteration"] == iteration
    bundle = load_bundle(out)
    assert bundle.meta["training"]["iterations"] == iteration
    for i, got in enumerate(bundle.policy.get_parameters()):
        assert_exact(got, arrays[f"param_{i}"])


def reference_run(tmp, *extra, iterations=ITERATIONS):
    run, out = tmp / "run", tmp / "bundle"
    assert train(run, out, *extra, iterations=iterations) == 0
    arrays, manifest = read_checkpoint(run / "checkpoint")
    return {
        "params": parameters(out),
        "rows": comparable(rows_of(run / "metrics.jsonl")),
        "iteration": manifest["iteration"],
        "arrays": arrays,
        "training": load_bundle(out).meta["training"],
        "out": out,
        "run": run,
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """``train --preset tiny --iterations 4``, never interrupted."""
    return reference_run(tmp_path_factory.mktemp("reference"))


@pytest.fixture(scope="module")
def reference_best(tmp_path_factory):
    """``train --preset tiny --iterations 14 --select best --checkpoint-every 5``."""
    return reference_run(
        tmp_path_factory.mktemp("reference_best"),
        "--select", "best", "--checkpoint-every", "5", iterations=14,
    )  # fmt: skip


# -- signals ---------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("moment", MOMENTS)
def test_sigterm_at_any_moment_saves_a_consistent_state_and_resumes_exactly(
    moment, reference, tmp_path, monkeypatch, capsys
):
    run, out = tmp_path / "run", tmp_path / "b"
    if moment == "bundle_swap":
        shutil.copytree(EARLIER_BUNDLE, out)
    with monkeypatch.context() as patch:
        install(patch.setattr, moment, 2, signal.SIGTERM)
        assert train(run, out) == 143
    err = capsys.readouterr().err
    assert "SIGTERM: stopped after iteration" in err and "--resume" in err
    # the iteration under way finishes; the bundle swap happens after the last one
    assert_consistent(run, out, ITERATIONS if moment == "bundle_swap" else 2)
    assert train(run, out, "--resume") == 0
    assert_same_run(run, out, reference)


@pytest.mark.slow
def test_sigint_exits_130_and_a_second_signal_stops_at_once_without_writing(
    reference, tmp_path, monkeypatch, capsys
):
    run, out = tmp_path / "run", tmp_path / "b"
    with monkeypatch.context() as patch:
        install(patch.setattr, "meta_step", 2, signal.SIGINT)
        assert train(run, out) == 130
    assert_consistent(run, out, 2)
    capsys.readouterr()
    # a second SIGTERM while the first is pending: no write after the last checkpoint
    run2, out2 = tmp_path / "run2", tmp_path / "b2"
    with monkeypatch.context() as patch:
        install(patch.setattr, "meta_step", 2, signal.SIGTERM)
        sample = run_module.make_trainer

        def make(config, run_dir=None):
            trainer = sample(config, run_dir)
            original = trainer.train_iteration

            def twice():
                metrics = original()
                if trainer.iteration == 2:
                    os.kill(os.getpid(), signal.SIGTERM)
                return metrics

            trainer.train_iteration = twice
            return trainer

        patch.setattr(run_module, "make_trainer", make)
        assert train(run2, out2) == 143
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: stopped by a second SIGTERM during iteration 3")
    assert read_checkpoint(run2 / "checkpoint")[1]["iteration"] == 1
    assert not out2.exists()
    assert train(run2, out2, "--resume") == 0
    assert_same_run(run2, out2, reference)


@pytest.mark.slow
def test_a_signal_before_the_first_iteration_stops_without_writing(tmp_path, monkeypatch, capsys):
    make = run_module.make_trainer

    def make_then_signal(config, run_dir=None):
        trainer = make(config, run_dir)
        os.kill(os.getpid(), signal.SIGTERM)  # while the run is being set up
        return trainer

    monkeypatch.setattr(run_module, "make_trainer", make_then_signal)
    run, out = tmp_path / "run", tmp_path / "b"
    assert train(run, out) == 143
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: SIGTERM before the first iteration: stopped before training")
    assert not (run / "checkpoint" / "checkpoint.npz").exists() and not out.exists()


def _killed_run(tmp_path, moment, iteration, *extra, iterations=ITERATIONS):
    run, out = tmp_path / "run", tmp_path / "b"
    if moment == "bundle_swap":
        shutil.copytree(EARLIER_BUNDLE, out)
    proc = subprocess.run(
        [sys.executable, str(TESTS / "fault_injection.py"), moment, str(iteration), "SIGKILL",
         "--", "train", "--preset", "tiny", "--iterations", str(iterations), "--run-dir",
         str(run), "--out", str(out), "--no-progress", *extra],
        capture_output=True, text=True, timeout=600, cwd=TESTS.parent,
        env={**os.environ, "PYTHONPATH": str(TESTS.parent)},  # this checkout's metarl_tf
    )  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    return run, out


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["meta_step", "metrics_row", "checkpoint_write", "bundle_swap"])
def test_sigkill_at_any_moment_resumes_exactly(moment, reference, tmp_path, capsys):
    run, out = _killed_run(tmp_path, moment, 2)
    _, manifest = read_checkpoint(run / "checkpoint")  # a complete checkpoint, never a mixture
    if moment == "bundle_swap":  # killed between the swap's renames: the old bundle is aside
        assert manifest["iteration"] == ITERATIONS
        assert not out.exists() and (tmp_path / ".b.old" / "meta.json").is_file()
        with pytest.raises(BundleError, match=r"\.b\.old holds its previous version"):
            load_bundle(out)
    else:
        assert manifest["iteration"] == 1
        assert not out.exists()
    assert train(run, out, "--resume") == 0
    assert "resumed from" in capsys.readouterr().out
    assert_same_run(run, out, reference)


@pytest.mark.slow
def test_select_best_after_a_kill_and_a_stop_equals_the_uninterrupted_run(
    reference_best, tmp_path, monkeypatch
):
    args = ("--select", "best", "--checkpoint-every", "5")
    # killed after iteration 12's metrics row: the checkpoint of iteration 10 is resumed
    run, out = _killed_run(tmp_path, "metrics_row", 12, *args, iterations=14)
    assert read_checkpoint(run / "checkpoint")[1]["iteration"] == 10
    assert train(run, out, "--resume", *args, iterations=14) == 0
    assert_same_run(run, out, reference_best)
    assert load_bundle(out).meta["training"]["selection"]["select"] == "best"
    # stopped by SIGTERM at iteration 11, resumed
    run, out = tmp_path / "run2", tmp_path / "b2"
    with monkeypatch.context() as patch:
        install(patch.setattr, "sampling", 11, signal.SIGTERM)
        assert train(run, out, *args, iterations=14) == 143
    assert train(run, out, "--resume", *args, iterations=14) == 0
    assert_same_run(run, out, reference_best)


# -- refused starts --------------------------------------------------------------------------


def test_resume_without_a_checkpoint_is_an_error_not_a_new_run(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"iteration": 1}\n')
    assert train(run, tmp_path / "b", "--resume") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no checkpoint in" in err and "drop --resume" in err
    assert (run / "metrics.jsonl").read_text() == '{"iteration": 1}\n'
    assert not (tmp_path / "b").exists()


def test_checkpoint_every_must_be_positive(tmp_path, capsys):
    for value in ("0", "-2"):
        with pytest.raises(SystemExit) as exit_info:
            train(tmp_path / "run", tmp_path / "b", "--checkpoint-every", value)
        assert exit_info.value.code == 2
        assert "--checkpoint-every: must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def _user_files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("command", ["train", "export"])
def test_out_refuses_a_directory_or_file_that_is_not_a_bundle(command, tmp_path, capsys):
    mydata = tmp_path / "mydata"
    (mydata / "sub").mkdir(parents=True)
    (mydata / "notes.txt").write_text("my notes")
    (mydata / "sub" / "data.csv").write_text("1,2,3")
    (mydata / "meta.json").write_text('{"something": "else"}')  # not ours either
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    before = _user_files(tmp_path)
    for target in (mydata, a_file):
        if command == "train":
            code = train(tmp_path / f"run-{target.name}", target)
        else:
            code = main(["export", str(tmp_path / "no-run"), "--out", str(target)])
        assert code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        assert err.startswith(f"error: refusing to write a bundle to {str(target)!r}")
    assert _user_files(tmp_path) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_export_savedmodel_overwrite_refuses_what_it_did_not_write(reference, tmp_path, capsys):
    mydata = tmp_path / "mydata"
    mydata.mkdir()
    (mydata / "saved_model.pb").write_text("someone else's model")
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    before = _user_files(tmp_path)
    for target in (mydata, a_file):
        args = ["export-savedmodel", str(reference["out"]), str(target), "--overwrite"]
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: refusing to overwrite {target}")
    assert _user_files(tmp_path) == before


def _refuse_writes_under(monkeypatch, directory, code=errno.EROFS):
    """Makes every temporary file created under ``directory`` fail as on a read-only file
    system (the tests run as root, which ignores permission bits)."""
    mkstemp = atomic_files.tempfile.mkstemp

    def refused(*args, dir=None, **kwargs):
        if dir is not None and Path(dir).resolve().is_relative_to(directory.resolve()):
            raise OSError(code, os.strerror(code), str(dir))
        return mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(atomic_files.tempfile, "mkstemp", refused)


@pytest.mark.parametrize("which", ["run", "out"])
def test_read_only_run_dir_or_out_is_refused_before_training(which, tmp_path, monkeypatch, capsys):
    run, out = tmp_path / "run", tmp_path / "parent" / "b"
    readonly = run if which == "run" else out.parent
    readonly.mkdir(parents=True)
    _refuse_writes_under(monkeypatch, readonly)
    trained = []
    monkeypatch.setattr(
        run_module, "make_trainer", lambda *a: trained.append(1) or pytest.fail("trained")
    )
    assert train(run, out) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Read-only file system" in err
    assert str(readonly) in err
    assert trained == []


# -- failed writes during a run --------------------------------------------------------------


def _enospc_on(monkeypatch, module, name, after=0):
    """``module.name`` raises ENOSPC from its ``after + 1``-th call on."""
    original = getattr(module, name)
    calls = []

    def full(path, *args, **kwargs):
        calls.append(path)
        if len(calls) > after:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return original(path, *args, **kwargs)

    monkeypatch.setattr(module, name, full)


@pytest.mark.slow
@pytest.mark.parametrize("where", ["checkpoint", "metrics", "bundle"])
def test_a_full_disk_stops_with_one_line_and_keeps_the_last_checkpoint(
    where, reference, tmp_path, monkeypatch, capsys
):
    run, out = tmp_path / "run", tmp_path / "b"
    with monkeypatch.context() as patch:
        if where == "checkpoint":  # the second checkpoint's temporary file cannot be written
            _enospc_on(patch, checkpoint, "write_file_atomic", after=1)
        elif where == "metrics":  # iteration 2's row
            _enospc_on(patch, run_module, "_append_row", after=1)
        else:  # the bundle's files
            _enospc_on(patch, bundle_module, "_write_bundle_files")
        code = train(run, out)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert err[-1].startswith("error: cannot write") and "No space left on device" in err[-1]
    _, manifest = read_checkpoint(run / "checkpoint")
    assert manifest["iteration"] == (ITERATIONS if where == "bundle" else 1)
    assert [p.name for p in (run / "checkpoint").iterdir()] == ["checkpoint.npz"]
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert train(run, out, "--resume") == 0
    assert_same_run(run, out, reference)


# -- damaged checkpoints ---------------------------------------------------------------------


def _legacy_copy(run):
    """Rewrites ``run``'s checkpoint in the older two-file format (state.npz + state.json)."""
    arrays, manifest = read_checkpoint(run / "checkpoint")
    own = {k: v for k, v in arrays.items() if not k.startswith("best/")}
    (run / "checkpoint" / "checkpoint.npz").unlink()
    np.savez(run / "checkpoint" / "state.npz", **own)
    state = {k: manifest[k] for k in ("iteration", "elapsed", "config", "lineage")}
    (run / "checkpoint" / "state.json").write_text(json.dumps(state))


@pytest.fixture
def stopped_run(reference, tmp_path):
    """A copy of the reference run as if it had stopped after 2 of its 4 iterations."""
    run, out = tmp_path / "run", tmp_path / "b"
    assert train(run, out, iterations=2) == 0
    return run, out


@pytest.mark.slow
def test_the_older_two_file_checkpoint_still_resumes_exactly(stopped_run, reference):
    run, out = stopped_run
    _legacy_copy(run)
    assert train(run, out, "--resume") == 0
    assert_same_run(run, out, reference)
    assert not (run / "checkpoint" / "state.json").exists()  # rewritten in the new format


@pytest.mark.slow
@pytest.mark.parametrize(
    "damage",
    ["truncated", "byte-flip", "manifest-config", "legacy-truncated-npz", "legacy-bad-json"],
)
def test_damaged_checkpoints_are_refused_with_the_file_named(stopped_run, damage, capsys):
    run, out = stopped_run
    ckpt = run / "checkpoint"
    if damage.startswith("legacy"):
        _legacy_copy(run)
    target = {
        "truncated": ckpt / "checkpoint.npz",
        "byte-flip": ckpt / "checkpoint.npz",
        "manifest-config": ckpt / "checkpoint.npz",
        "legacy-truncated-npz": ckpt / "state.npz",
        "legacy-bad-json": ckpt / "state.json",
    }[damage]
    data = bytearray(target.read_bytes())
    if damage in ("truncated", "legacy-truncated-npz"):
        target.write_bytes(bytes(data[: len(data) // 2]))
    elif damage == "byte-flip":  # inside the zip's central directory
        data[-30] ^= 0xFF
        target.write_bytes(bytes(data))
    elif damage == "legacy-bad-json":
        target.write_text('{"iteration": 2, "elaps')
    else:  # an edited configuration no longer matches the manifest's sha256
        arrays, manifest = read_checkpoint(ckpt)
        manifest["config"]["seed"] = 7
        text = np.frombuffer(json.dumps(manifest).encode(), np.uint8)
        np.savez(target, **arrays, __manifest__=text)
    before = rows_of(run / "metrics.jsonl")
    assert train(run, out, "--resume") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --resume: ") and str(target) in err[0], err
    assert rows_of(run / "metrics.jsonl") == before


@pytest.mark.slow
def test_export_refuses_a_truncated_checkpoint_with_one_line(stopped_run, tmp_path, capsys):
    run, _ = stopped_run
    path = run / "checkpoint" / "checkpoint.npz"
    path.write_bytes(path.read_bytes()[:100])
    assert main(["export", str(run), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(path) in err[0] and "truncated or corrupt" in err[0]


# -- atomic files ----------------------------------------------------------------------------


def test_a_failed_atomic_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "f"
    path.write_text("old")

    def fail(f):
        f.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        atomic_files.write_file_atomic(path, fail)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["f"]
    atomic_files.write_text_atomic(path, "new")
    assert path.read_text() == "new" and os.listdir(tmp_path) == ["f"]


def test_directory_exchange_swaps_in_one_step(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("a")
    (b / "x").write_text("b")
    if not atomic_files.exchange(a, b):
        pytest.skip("no renameat2(RENAME_EXCHANGE) on this platform or file system")
    assert (a / "x").read_text() == "b" and (b / "x").read_text() == "a"


def test_a_crash_inside_the_two_rename_swap_is_repaired_at_the_next_write(tmp_path, monkeypatch):
    path = tmp_path / "b"
    path.mkdir()
    (path / "x").write_text("old")
    new = tmp_path / ".b.tmp-1"
    new.mkdir()
    (new / "x").write_text("new")
    monkeypatch.setattr(atomic_files, "exchange", lambda a, b: False)
    rename = os.rename

    def crash_after_the_first(src, dst):
        rename(src, dst)
        if str(dst).endswith(".old"):
            raise KeyboardInterrupt("killed between the renames")

    monkeypatch.setattr(atomic_files.os, "rename", crash_after_the_first)
    with pytest.raises(KeyboardInterrupt):
        atomic_files.replace_directory(new, path)
    monkeypatch.setattr(atomic_files.os, "rename", rename)
    assert not path.exists() and (tmp_path / ".b.old" / "x").read_text() == "old"
    assert atomic_files.recover_directory(path)  # the old one is back, the leftovers gone
    assert (path / "x").read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["b"]


# -- damaged and hostile bundles -------------------------------------------------------------


def _edit(meta_path, change):
    meta = json.loads(meta_path.read_text())
    change(meta)
    meta_path.write_text(json.dumps(meta))


def _flip(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _outside_file(p):
    outside = p.parent / "outside.txt"
    outside.write_text("secret")
    _edit(p / "meta.json", lambda m: m["files"].update({"../outside.txt": sha256_of(outside)}))


def _symlink_out(p):
    (p.parent / "outside.txt").write_text("secret")
    (p / "link.txt").symlink_to(p.parent / "outside.txt")
    _edit(p / "meta.json", lambda m: m["files"].update({"link.txt": sha256_of(p / "link.txt")}))


def _absolute(p):
    digest = sha256_of("/etc/hostname")
    _edit(p / "meta.json", lambda m: m["files"].update({"/etc/hostname": digest}))


def _set(path_in_meta, value):
    def change(meta):
        node = meta
        *parents, last = path_in_meta.split(".")
        for key in parents:
            node = node[key]
        node[last] = value

    return lambda p: _edit(p / "meta.json", change)


HOSTILE = {
    "policy-byte-flip": (
        lambda p: _flip(p / "policy.keras"),
        r"checksum mismatch for policy\.keras",
    ),
    "files-as-a-list": (
        lambda p: _edit(p / "meta.json", lambda m: m.update(files=list(m["files"]))),
        r"files must be an object, got \[",
    ),
    "dot-dot-path": (
        _outside_file,
        r"files\['\.\./outside\.txt'\] is not a file inside the bundle",
    ),
    "absolute-path": (_absolute, r"files\['/etc/hostname'\] is not a file inside the bundle"),
    "symlink-out": (_symlink_out, r"files\['link\.txt'\] is not a file inside the bundle"),
    "gamma-5": (_set("adaptation.gamma", 5), r"adaptation\.gamma must be a number in \[0, 1\]"),
    "gamma-nan": (_set("adaptation.gamma", float("nan")), r"adaptation\.gamma must be"),
    "lambda-string": (
        _set("adaptation.gae_lambda", "1"),
        r"adaptation\.gae_lambda must be a number",
    ),
    "steps-0": (_set("adaptation.steps", 0), r"adaptation\.steps must be an integer in \[1, 100\]"),
    "steps-negative": (_set("adaptation.steps", -3), r"adaptation\.steps must be an integer"),
    "step-size-inf": (_set("adaptation.step_sizes", 1e999), r"step_sizes must be a finite number"),
    "horizon-1e6": (
        _set("task_distribution.config.horizon", 1_000_000),
        r"horizon must be an integer in \[1, 10000\]",
    ),
    "action-bound-100": (
        _set("action_spec.maximum", [100.0, 100.0]),
        r"action_spec bounds .* exceed the task distribution's",
    ),
    "action-bound-nan": (_set("action_spec.minimum", [float("nan"), 0.0]), r"finite numbers"),
    "missing-adaptation": (
        lambda p: _edit(p / "meta.json", lambda m: m.pop("adaptation")),
        r"missing key 'adaptation'",
    ),
    "policy-not-an-object": (_set("policy", "GaussianMLPPolicy"), r"policy must be an object"),
    "meta-2mb": (
        lambda p: _edit(p / "meta.json", lambda m: m["training"].update(pad="x" * (2 << 20))),
        r"more than the 1048576 a bundle's meta\.json may have",
    ),
    "meta-not-an-object": (
        lambda p: (p / "meta.json").write_text("[1, 2]"),
        r"expected a JSON object, got list",
    ),
}


# Only the task distribution knows these: refused when the bundle builds it
# (Bundle.make_task_distribution: evaluate, train --init-from), not by load_bundle, which reads
# the specs from meta.json so that loading a bundle (the service) imports no environment.
CHECKED_AGAINST_THE_DISTRIBUTION = {"action-bound-100"}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_damaged_and_hostile_bundles_are_refused_with_one_line(case, reference, tmp_path, capsys):
    path = tmp_path / "bundle"
    shutil.copytree(reference["out"], path)
    damage, message = HOSTILE[case]
    damage(path)
    with pytest.raises(BundleError, match=message):
        if case in CHECKED_AGAINST_THE_DISTRIBUTION:  # load_bundle builds no distribution
            load_bundle(path).make_task_distribution()
        else:
            load_bundle(path)
    assert main(["evaluate", str(path), "--tasks", "2", "--episodes", "1", "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err


# -- the service on a bundle it must refuse --------------------------------------------------


def _serve(bundle, timeout=90):
    """``bentoml serve`` on ``bundle``: ``(exit status, seconds, output)``; fails the test if
    the server is still running after ``timeout`` seconds (a restart loop)."""
    start = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "bentoml", "serve", SERVICE_TARGET, "--port", str(free_port())],
        cwd=TESTS.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "METARL_BUNDLE": str(bundle), "BENTOML_DO_NOT_TRACK": "True"},
        start_new_session=True,
    )  # fmt: skip
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"the service still ran after {timeout} s:\n{output[-3000:]}")
    return proc.returncode, time.monotonic() - start, output


SERVICE_CASES = {
    "policy-byte-flip": HOSTILE["policy-byte-flip"],
    "files-as-a-list": HOSTILE["files-as-a-list"],
    "dot-dot-path": HOSTILE["dot-dot-path"],
    "meta-2mb": HOSTILE["meta-2mb"],
}  # not CHECKED_AGAINST_THE_DISTRIBUTION: the service builds no task distribution


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(SERVICE_CASES))
def test_the_service_exits_with_one_line_on_a_bundle_it_must_refuse(case, tmp_path):
    path = tmp_path / "bundle"
    shutil.copytree(TESTS.parent / "saved_models" / "nav2d-maml", path)
    damage, message = SERVICE_CASES[case]
    damage(path)
    code, _, output = _serve(path)
    assert code == 1, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, output[-3000:]
    assert errors[0].startswith(f"error: METARL_BUNDLE={str(path)!r}: ")
    assert re.search(message, errors[0]), errors[0]
    assert "Traceback" not in output
