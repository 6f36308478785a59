"""Delivers a signal to the training process at a chosen moment of a chosen iteration, by wrapping
the functions that run at that moment (no test hook in the library, no timing luck).

Moments, in the order they happen within an iteration and at the end of a run:

- ``sampling``: while the iteration's first episodes are being collected;
- ``meta_step``: right after the compiled meta-step assigned the new parameters, before the
  iteration counter moves;
- ``metrics_row``: after the iteration's ``metrics.jsonl`` row was written;
- ``checkpoint_write``: inside the checkpoint write, after the temporary file is written and
  before it is renamed over the old checkpoint;
- ``bundle_swap``: at the end, with the new bundle written beside ``--out``, between the two
  renames of the swap (the one-step exchange is switched off so that the window exists).

Used in-process (``install(monkeypatch, ...)``) and in a subprocess (``python -m`` this file's
``main``: ``python tests/fault_injection.py MOMENT ITERATION SIGNAL -- train args``).
"""

from __future__ import annotations

import os
import signal
import sys

MOMENTS = ("sampling", "meta_step", "metrics_row", "checkpoint_write", "bundle_swap")


def install(patch, moment: str, iteration: int, signum: int) -> None:
    """Arms ``signum`` (to this process) at ``moment`` of iteration ``iteration`` (1-based; for
    ``bundle_swap``: the bundle written at the end). ``patch(obj, name, value)`` sets an
    attribute (``monkeypatch.setattr``, or ``setattr`` in a subprocess)."""
    import metarl_tf.atomic_files as atomic_files
    import metarl_tf.bundle as bundle
    import metarl_tf.checkpoint as checkpoint
    import metarl_tf.training.run as run

    if moment not in MOMENTS:
        raise ValueError(f"moment must be one of {MOMENTS}, got {moment!r}")
    state = {"trainer": None, "fired": False}

    def fire(now: int) -> None:
        if not state["fired"] and now == iteration:
            state["fired"] = True
            os.kill(os.getpid(), signum)

    def current() -> int:  # the iteration under way
        return state["trainer"].iteration + 1

    original_make = run.make_trainer

    def make_trainer(config, run_dir=None):
        trainer = original_make(config, run_dir)
        state["trainer"] = trainer
        if moment == "sampling":
            sample = trainer.sampler.sample

            def sampled(*args, **kwargs):
                fire(current())
                return sample(*args, **kwargs)

            trainer.sampler.sample = sampled
        elif moment == "meta_step":
            step = trainer._meta_step

            def stepped(*args, **kwargs):
                result = step(*args, **kwargs)
                fire(current())
                return result

            trainer._meta_step = stepped
        return trainer

    patch(run, "make_trainer", make_trainer)
    if moment == "metrics_row":
        append = run._append_row

        def appended(path, row):
            append(path, row)
            fire(row["iteration"])

        patch(run, "_append_row", appended)
    elif moment == "checkpoint_write":
        write = checkpoint.write_file_atomic

        def written(path, writer):
            def write_then_fire(f):
                writer(f)
                f.flush()
                fire(state["trainer"].iteration)

            return write(path, write_then_fire)

        patch(checkpoint, "write_file_atomic", written)
    elif moment == "bundle_swap":
        rename = os.rename

        def renamed(src, dst, *args, **kwargs):
            result = rename(src, dst, *args, **kwargs)
            if str(dst).endswith(atomic_files.OLD_SUFFIX):  # the old bundle is aside
                fire(iteration)
            return result

        patch(atomic_files, "exchange", lambda a, b: False)
        patch(bundle, "replace_directory", atomic_files.replace_directory)
        patch(atomic_files.os, "rename", renamed)


def main(argv: list[str]) -> int:
    moment, iteration, signame = argv[0], int(argv[1]), argv[2]
    install(setattr, moment, iteration, signal.Signals[signame])
    from metarl_tf.cli import main as cli

    return cli(argv[argv.index("--") + 1 :])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
