"""Recipes: the legs of a multi-leg bundle run as one resumable command
(``python -m metarl_tf train --recipe NAME``; the recipes are data in :mod:`metarl_tf.config`).

A recipe run directory holds one run directory per leg::

    <run dir>/leg0-<name>/run/      checkpoint, metrics.jsonl, TensorBoard of leg 0
    <run dir>/leg0-<name>/bundle/   leg 0's bundle, which leg 1 continues (--init-from)
    ...
    <out>                           the last leg's bundle: the recipe's

Every leg's bundle records the recipe and its place in it (``meta.json`` →
``training.recipe``). Resuming (``resume=True``) goes through the legs in order: a leg with a
checkpoint resumes it (a finished leg only rewrites its bundle), the first leg without one starts
from the previous leg's bundle. A stop (SIGTERM/SIGINT) ends the recipe after the current
iteration with everything saved, as :func:`metarl_tf.training.fit` does for one run.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from metarl_tf.bundle import BundleError, check_bundle_destination
from metarl_tf.checkpoint import checkpoint_exists
from metarl_tf.config import Recipe, get_recipe
from metarl_tf.training.run import CHECKPOINT_DIR, FitResult, RunError, fit


def default_recipe_out(recipe: Recipe) -> Path:
    """``saved_models/<recipe>-recipe``: a recipe does not replace a shipped bundle unless its
    path is given as ``out``."""
    return Path("saved_models") / f"{recipe.name}-recipe"


def leg_dir(run_dir: str | os.PathLike, recipe: Recipe, index: int) -> Path:
    """The folder of leg ``index``: ``<run_dir>/leg<index>-<leg name>``."""
    return Path(run_dir) / f"leg{index}-{recipe.legs[index].name}"


def run_recipe(
    recipe: str | Recipe,
    run_dir: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = print,
    handle_signals: bool = True,
    tensorboard: bool = True,
) -> FitResult:
    """Runs every leg of ``recipe`` and writes the last leg's bundle to ``out``.

    Args:
        recipe: a recipe or its name (``metarl_tf.config.RECIPES``).
        run_dir: the recipe's run directory (one sub-directory per leg).
        out: the final bundle (default :func:`default_recipe_out`); new, empty or a bundle.
        resume: continue a recipe run in ``run_dir``; without it, a ``run_dir`` that holds a
            leg's checkpoint is refused.
        progress, log, handle_signals, tensorboard: as :func:`metarl_tf.training.fit`.

    Returns:
        the last leg's :class:`FitResult`, or the stopped leg's when a signal ended the run
        (its ``exit_code`` is then non-zero).

    Raises:
        RunError: as :func:`metarl_tf.training.fit`, for the leg concerned.
    """
    recipe = get_recipe(recipe) if isinstance(recipe, str) else recipe
    say = log or (lambda _: None)
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else default_recipe_out(recipe)
    legs_with_checkpoints = [
        i
        for i in range(len(recipe.legs))
        if checkpoint_exists(leg_dir(run_dir, recipe, i) / "run" / CHECKPOINT_DIR)
    ]
    if legs_with_checkpoints and not resume:
        raise RunError(
            f"{run_dir} already holds recipe {recipe.name!r} legs "
            f"{', '.join(map(str, legs_with_checkpoints))}; pass --resume to continue, or choose "
            "another --run-dir"
        )
    if resume and not legs_with_checkpoints:
        raise RunError(
            f"--resume: no leg of recipe {recipe.name!r} to continue in {run_dir}; give the "
            "--run-dir of the recipe run, or drop --resume to start it"
        )
    try:  # refuse a destination that is not a bundle before hours of training
        check_bundle_destination(out)
    except BundleError as err:
        raise RunError(str(err)) from None

    previous: Path | None = None
    result: FitResult | None = None
    for i, leg in enumerate(recipe.legs):
        here = leg_dir(run_dir, recipe, i)
        last = i == len(recipe.legs) - 1
        leg_out = out if last else here / "bundle"
        leg_resume = checkpoint_exists(here / "run" / CHECKPOINT_DIR)
        say(
            f"recipe {recipe.name}, leg {i} ({leg.name}): preset {leg.preset} to iteration "
            f"{leg.iterations}" + (" (resuming)" if leg_resume else "")
        )
        result = fit(
            leg.config(),
            here / "run",
            leg_out,
            resume=leg_resume,
            init_from=None if leg_resume else previous,
            select=leg.select,
            progress=progress,
            log=log,
            handle_signals=handle_signals,
            tensorboard=tensorboard,
            recipe={**recipe.to_dict(), "leg": i},
        )
        if result.stopped_by:
            return result
        previous = leg_out
    assert result is not None  # a recipe has at least one leg
    return result
