"""A training run: :func:`fit` trains, checkpoints, resumes and writes the bundle; :func:`export_run`
writes a bundle from a run directory. ``python -m metarl_tf train`` / ``export`` call these.

A run directory holds::

    checkpoint/checkpoint.npz   the state to resume from (metarl_tf.checkpoint; one atomic file)
    metrics.jsonl               one JSON row per iteration
    config.json                 the configuration
    tensorboard/                TensorBoard events

What a stop does (docs/training.md, "Stops, crashes and full disks"):

- SIGTERM or SIGINT (Ctrl-C) sets a flag; the iteration under way finishes with all its
  bookkeeping (metrics row, best snapshot), then the checkpoint and the bundle are written and
  :attr:`FitResult.exit_code` is 143 (SIGTERM) or 130 (SIGINT). A second signal stops at once
  without writing (the last checkpoint stays as it was).
- A kill (SIGKILL, power loss) loses the iterations since the last checkpoint, nothing else:
  ``resume=True`` truncates ``metrics.jsonl`` to the checkpoint's iteration and replays them
  exactly (the random streams are a function of the iteration).
- A failed write (full disk, read-only directory) raises :class:`RunError` naming the path; the
  last complete checkpoint is intact.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from metarl_tf.atomic_files import check_writable, write_text_atomic
from metarl_tf.bundle import BundleError, check_bundle_destination
from metarl_tf.checkpoint import CheckpointError, checkpoint_exists, read_checkpoint
from metarl_tf.config import TrainConfig
from metarl_tf.training.pretrain import PretrainTrainer
from metarl_tf.training.trainer import (
    BEST_WINDOW,
    BestSnapshot,
    MetaTrainer,
    read_metrics_rows,
    write_metrics_rows,
)

CHECKPOINT_DIR = "checkpoint"
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
LEGACY_BEST_DIR = "best"  # the best snapshot of the older two-file checkpoint format
_SIGNAL_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}


def make_trainer(config: TrainConfig, run_dir: str | Path | None = None) -> MetaTrainer:
    """The trainer of ``config.algo``: :class:`~metarl_tf.training.trainer.MetaTrainer`
    (``maml``) or :class:`~metarl_tf.training.pretrain.PretrainTrainer` (``pretrain``)."""
    if config.algo == "pretrain":
        return PretrainTrainer(config, run_dir)
    return MetaTrainer(config, run_dir)


class RunError(Exception):
    """A run that cannot start or go on; the message is one line naming what and where.

    Attributes:
        exit_code: 2 for a refused request (bad options, a destination that is not a bundle), 1
            for a failure while running (a write that failed), 128 + signal number for a run
            stopped by a second signal.
    """

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class FitResult:
    """What :func:`fit` did.

    Attributes:
        bundle: the bundle directory written.
        run_dir: the run directory.
        iteration: the iteration of the bundle's parameters (the best one with ``select="best"``).
        trained_iterations: iterations the run has trained in all (the checkpoint's).
        stopped_by: ``"SIGTERM"`` or ``"SIGINT"`` when a signal ended the run early, else ``None``.
        resumed_from: the checkpoint's iteration with ``resume=True``, else ``None``.
        selection: the bundle's ``training.selection`` record.
        last_metrics: the metrics rows the bundle's summary averages (up to the last 10).
        elapsed: training seconds in all (across resumes).
    """

    bundle: Path
    run_dir: Path
    iteration: int
    trained_iterations: int
    stopped_by: str | None = None
    resumed_from: int | None = None
    selection: dict[str, Any] = field(default_factory=dict)
    last_metrics: list[dict[str, float]] = field(default_factory=list)
    elapsed: float = 0.0

    @property
    def exit_code(self) -> int:
        """0, or 128 + the signal's number (130 SIGINT, 143 SIGTERM) for a stopped run."""
        if self.stopped_by is None:
            return 0
        return _SIGNAL_EXIT[signal.Signals[self.stopped_by]]


class _StopFlag:
    """SIGTERM/SIGINT handlers that only record the signal (checked between iterations); a second
    signal raises ``KeyboardInterrupt`` to stop at once."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt(f"second signal {signal.Signals(signum).name}")
        self.signum = signum
        name = signal.Signals(signum).name
        os.write(
            2,
            f"\n{name}: stopping after this iteration, then saving a checkpoint and the bundle "
            f"(send {name} again to stop at once without saving)\n".encode(),
        )

    @contextmanager
    def installed(self, enabled: bool) -> Iterator[_StopFlag]:
        if not enabled or threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {sig: signal.signal(sig, self.handle) for sig in _SIGNAL_EXIT}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _io_error(err: OSError, what: str) -> RunError:
    where = err.filename or what
    return RunError(f"cannot write {where}: {err.strerror or err}", exit_code=1)


def _append_row(path: Path, row: dict[str, float]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _legacy_best(best_dir: Path, rows: list[dict[str, float]]) -> BestSnapshot | None:
    """The best snapshot of a run written in the older format (``best/state.*`` +
    ``best.json``), or ``None``."""
    if not checkpoint_exists(best_dir) or not (best_dir / "best.json").is_file():
        return None
    arrays, manifest = read_checkpoint(best_dir)
    try:
        record = json.loads((best_dir / "best.json").read_text())
        value = float(record["post_return_ma10"])
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{best_dir / 'best.json'}: corrupt best record ({err})") from None
    iteration = int(manifest["iteration"])
    window = [m for m in rows if m["iteration"] <= iteration][-BEST_WINDOW:]
    arrays = {k: v for k, v in arrays.items() if not k.startswith("opt_")}
    return BestSnapshot(iteration, value, float(manifest["elapsed"]), window, arrays)


def _restore(trainer: MetaTrainer, run_dir: Path, log: Callable[[str], None]) -> int:
    """Resumes ``trainer`` from ``run_dir``'s checkpoint and truncates ``metrics.jsonl`` to it;
    returns the checkpoint's iteration."""
    ckpt_dir = run_dir / CHECKPOINT_DIR
    metrics_path = run_dir / METRICS_FILE
    try:
        trainer.restore_checkpoint(ckpt_dir)
        # rows logged after the checkpoint (the iterations a kill lost) are replayed: drop them
        rows = read_metrics_rows(metrics_path, trainer.iteration, drop_torn_tail=True)
        if not trainer.history:  # an older checkpoint without its metrics window
            trainer.history = rows[-BEST_WINDOW:]
        if trainer.best is None:
            trainer.best = _legacy_best(run_dir / LEGACY_BEST_DIR, rows)
    except ValueError as err:  # CheckpointError, another configuration, a bad metrics line
        raise RunError(f"--resume: {err}") from None
    try:
        write_metrics_rows(metrics_path, rows)
    except OSError as err:
        raise _io_error(err, str(metrics_path)) from None
    log(f"resumed from {ckpt_dir} at iteration {trainer.iteration}")
    return trainer.iteration


def fit(
    config: TrainConfig,
    run_dir: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    resume: bool = False,
    init_from: str | os.PathLike | None = None,
    select: str = "last",
    progress: bool = True,
    log: Callable[[str], None] | None = print,
    handle_signals: bool = True,
    tensorboard: bool = True,
    recipe: dict[str, Any] | None = None,
) -> FitResult:
    """Trains ``config`` in ``run_dir`` and writes the bundle to ``out``.

    Args:
        config: the training configuration (``metarl_tf.config.get_preset(...).replace(...)``).
        run_dir: checkpoint, ``metrics.jsonl``, ``config.json`` and TensorBoard events.
        out: the bundle directory (default ``run_dir/bundle``); it must be new, empty, or hold a
            bundle of this project, which is then replaced.
        resume: continue ``run_dir``'s checkpoint (an error if there is none); otherwise a
            ``run_dir`` that holds a checkpoint is refused.
        init_from: continue from a bundle's parameters and metrics instead (exclusive with
            ``resume``).
        select: ``"last"``: the bundle holds the last iteration; ``"best"``: the iteration with
            the best 10-iteration moving average of the training selection metric (the
            post-adaptation return; pre-adaptation for ``algo="pretrain"``).
        progress: a progress bar; ``False``: one log line per iteration.
        log: where messages go (``None``: nowhere).
        handle_signals: catch SIGTERM/SIGINT to stop after the current iteration (main thread
            only).
        tensorboard: write TensorBoard events.
        recipe: the recipe this run is a leg of (:mod:`metarl_tf.training.recipes`), recorded
            in the bundle's ``meta.json`` → ``training.recipe``.

    Returns:
        a :class:`FitResult`; its ``exit_code`` is non-zero when a signal stopped the run.

    Raises:
        RunError: options or paths refused before training, a checkpoint that cannot be
            resumed, or a write that failed (the last complete checkpoint is then intact).
    """
    say = log or (lambda _: None)
    if select not in ("last", "best"):
        raise RunError(f"select must be 'last' or 'best', got {select!r}")
    if resume and init_from:
        raise RunError("--resume and --init-from exclude each other")
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / "bundle"
    ckpt_dir = run_dir / CHECKPOINT_DIR
    metrics_path = run_dir / METRICS_FILE
    has_checkpoint = checkpoint_exists(ckpt_dir)
    if not resume and has_checkpoint:
        raise RunError(
            f"{run_dir} already holds a checkpoint; pass --resume to continue it, "
            "or choose another --run-dir"
        )
    if resume and not has_checkpoint:
        raise RunError(
            f"--resume: no checkpoint in {ckpt_dir} to continue; give the --run-dir of the run "
            "to resume, or drop --resume to start a new run"
        )
    try:  # before any training: a refused or unwritable destination costs nothing yet
        check_bundle_destination(out)
        check_writable(ckpt_dir)
    except BundleError as err:
        raise RunError(str(err)) from None
    except OSError as err:
        raise RunError(
            f"cannot write {err.filename or run_dir}: {err.strerror or err}; "
            "choose a writable --run-dir / --out"
        ) from None

    # From here on SIGTERM/SIGINT only set a flag: checked before training and between iterations.
    stop = _StopFlag()
    with stop.installed(handle_signals):
        trainer = make_trainer(config, run_dir)
        config = trainer.config  # pretrain switches Meta-SGD off
        trainer.recipe = recipe
        resumed_from = None
        try:
            if resume:
                resumed_from = _restore(trainer, run_dir, say)
            elif init_from:
                try:
                    rows = trainer.init_from_bundle(init_from)
                except ValueError as err:  # BundleError included
                    raise RunError(f"--init-from: {err}") from None
                trainer.history = rows
                write_metrics_rows(metrics_path, rows)
                say(f"continuing {init_from} from iteration {trainer.iteration}")
            else:
                write_metrics_rows(metrics_path, [])
            write_text_atomic(run_dir / CONFIG_FILE, json.dumps(config.to_dict(), indent=2) + "\n")
        except OSError as err:
            raise _io_error(err, str(run_dir)) from None

        what = "meta-training" if config.algo == "maml" else "pretraining"
        say(
            f"{what} {config.task_distribution}: {config.iterations} iterations, "
            f"{config.meta_batch_size} tasks x {config.episodes_per_task} episodes x "
            f"{config.horizon} steps, outer={config.outer}{' meta-sgd' if config.meta_sgd else ''}"
            f"{' first-order' if config.first_order else ''} -> {out}"
        )
        if stop.signum is not None:
            name = signal.Signals(stop.signum).name
            raise RunError(
                f"{name} before the first iteration: stopped before training ({ckpt_dir} "
                "unchanged, no bundle written)",
                exit_code=_SIGNAL_EXIT[stop.signum],
            )
        try:
            _train(trainer, run_dir, progress, say, tensorboard, stop)
        except KeyboardInterrupt:
            name = signal.Signals(stop.signum).name if stop.signum else "SIGINT"
            raise RunError(
                f"stopped by a second {name} during iteration {trainer.iteration + 1}: nothing "
                f"written after the last checkpoint in {ckpt_dir}; resume with --resume",
                exit_code=_SIGNAL_EXIT[signal.Signals[name]],
            ) from None
        except OSError as err:
            raise RunError(
                f"cannot write {err.filename or run_dir}: {err.strerror or err}; the last "
                f"complete checkpoint in {ckpt_dir} is intact - free space or fix permissions "
                "and resume with --resume",
                exit_code=1,
            ) from None
        # The bundle is written with signals still caught: a signal now is recorded, not fatal.
        trained = trainer.iteration
        if select == "best":
            if trainer.best is None:
                say(f"no best snapshot (fewer than {BEST_WINDOW} iterations): writing the last")
            else:
                trainer.select_best()
                say(
                    f"selected iteration {trainer.iteration} of {trained} (best {BEST_WINDOW}-"
                    f"iteration moving average of {trainer.selection_metric}: "
                    f"{trainer.selection['post_return_ma10']:.2f})"
                )
        try:
            trainer.export_bundle(out, extra_files={METRICS_FILE: metrics_path})
        except BundleError as err:
            raise RunError(f"{err}; the checkpoint in {ckpt_dir} is saved") from None
        except OSError as err:
            raise RunError(
                f"cannot write the bundle {err.filename or out}: {err.strerror or err}; the "
                f"checkpoint in {ckpt_dir} is saved - free space and run export",
                exit_code=1,
            ) from None
        stopped_by = signal.Signals(stop.signum).name if stop.signum else None
    last = [m for m in trainer.history if m["iteration"] <= trainer.iteration][-BEST_WINDOW:]
    return FitResult(
        bundle=out,
        run_dir=run_dir,
        iteration=trainer.iteration,
        trained_iterations=trained,
        stopped_by=stopped_by,
        resumed_from=resumed_from,
        selection=dict(trainer.selection),
        last_metrics=last,
        elapsed=trainer.elapsed,
    )


def _train(
    trainer: MetaTrainer,
    run_dir: Path,
    progress: bool,
    say: Callable[[str], None],
    tensorboard: bool,
    stop: _StopFlag,
) -> None:
    """The loop: an iteration, its metrics row, TensorBoard, the best snapshot, and every
    ``checkpoint_every`` iterations the checkpoint; the stop flag is checked between
    iterations. Ends with a checkpoint of the last iteration."""
    from tqdm import tqdm

    config = trainer.config
    ckpt_dir = run_dir / CHECKPOINT_DIR
    metrics_path = run_dir / METRICS_FILE
    writer = None
    if tensorboard:
        import tensorflow as tf

        writer = tf.summary.create_file_writer(str(run_dir / "tensorboard"))
    bar = tqdm(
        total=config.iterations, initial=trainer.iteration, unit="it", disable=not progress,
        dynamic_ncols=True, file=sys.stderr,
    )  # fmt: skip
    saved_at = trainer.iteration if checkpoint_exists(ckpt_dir) else None
    try:
        while trainer.iteration < config.iterations and stop.signum is None:
            m = trainer.train_iteration()
            _append_row(metrics_path, m)
            if writer is not None:
                with writer.as_default(step=trainer.iteration):
                    for k, v in m.items():
                        if k != "iteration":
                            tf.summary.scalar(k, v)
            trainer.track_best()
            if trainer.iteration % config.checkpoint_every == 0:
                trainer.save_checkpoint(ckpt_dir)
                saved_at = trainer.iteration
            bar.update(1)
            bar.set_postfix(
                pre=f"{m['returns/pre_adaptation']:.1f}", post=f"{m['returns/post_adaptation']:.1f}",
                kl=f"{m.get('losses/kl', 0.0):.4f}", s_it=f"{m['time/iteration_s']:.2f}",
            )  # fmt: skip
            if not progress:
                say(
                    f"it {trainer.iteration:4d} pre {m['returns/pre_adaptation']:8.2f} "
                    f"post {m['returns/post_adaptation']:8.2f} {m['time/iteration_s']:.2f}s"
                )
        if saved_at != trainer.iteration:
            trainer.save_checkpoint(ckpt_dir)
    finally:
        bar.close()
        if writer is not None:
            writer.flush()


def export_run(
    run_dir: str | os.PathLike, out: str | os.PathLike, *, select: str = "last"
) -> FitResult:
    """Writes the bundle of ``run_dir``'s checkpoint (``select="last"``) or of its best snapshot
    (``"best"``) to ``out``, with the run's metrics up to the checkpoint's iteration.

    Raises:
        RunError: no checkpoint or best snapshot, a corrupt checkpoint, a destination that is
            not a bundle, a failed write.
    """
    if select not in ("last", "best"):
        raise RunError(f"select must be 'last' or 'best', got {select!r}")
    run_dir, out = Path(run_dir), Path(out)
    ckpt_dir = run_dir / CHECKPOINT_DIR
    try:
        check_bundle_destination(out)
        _, manifest = read_checkpoint(ckpt_dir)
        config = TrainConfig.from_dict(manifest["config"])
        trainer = make_trainer(config, run_dir)
        trainer.restore_checkpoint(ckpt_dir)
        metrics_path = run_dir / METRICS_FILE
        # the run may have gone on past its last checkpoint: keep the rows the bundle covers
        rows = read_metrics_rows(metrics_path, trainer.iteration, drop_torn_tail=True)
        if rows:
            trainer.history = rows
        if trainer.best is None:
            trainer.best = _legacy_best(run_dir / LEGACY_BEST_DIR, rows)
        trained = trainer.iteration
        if select == "best":
            if trainer.best is None:
                raise RunError(
                    f"no best snapshot in {ckpt_dir}: the run has fewer than {BEST_WINDOW} "
                    "iterations; export with --select last"
                )
            trainer.select_best()
        with tempfile.TemporaryDirectory() as tmp:
            extra = None
            if metrics_path.is_file():
                kept = Path(tmp) / METRICS_FILE
                write_metrics_rows(kept, rows)
                extra = {METRICS_FILE: kept}
            trainer.export_bundle(out, extra_files=extra)
    except RunError:
        raise
    except OSError as err:
        raise _io_error(err, str(out)) from None
    except ValueError as err:  # CheckpointError, BundleError, another configuration
        raise RunError(str(err)) from None
    last = [m for m in trainer.history if m["iteration"] <= trainer.iteration][-BEST_WINDOW:]
    return FitResult(
        bundle=out,
        run_dir=run_dir,
        iteration=trainer.iteration,
        trained_iterations=trained,
        selection=dict(trainer.selection),
        last_metrics=last,
        elapsed=trainer.elapsed,
    )
