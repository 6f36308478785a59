"""The training checkpoint: one file, ``<run dir>/checkpoint/checkpoint.npz``, written atomically.

It holds everything a resumed run needs to continue exactly as if it had never stopped:

- arrays: the policy parameters (``param_<i>``), Meta-SGD step sizes (``alpha_<i>``), the learned
  log σ shift, the Adam/PPO optimizer's variables (``opt_<i>``), and the best snapshot's parameters
  under ``best/...`` (``--select best``);
- a manifest (the JSON array ``__manifest__``): format and version, the iteration, training
  seconds, the configuration and its sha256, the lineage of continued bundles, the metrics of the
  last iterations (the window of ``--select best``'s moving average and of the bundle's "last 10
  iterations" summary) and the best snapshot's record.

The random state is the iteration: every iteration draws its tasks and sampling seeds from
``SeedSequence([seed, iteration])``, so restoring the counter restores the random streams.

:func:`write_checkpoint` writes a temporary file beside it, flushes it and renames it over the old
one: at any moment of a crash the directory holds the old complete checkpoint or the new one.
:func:`read_checkpoint` checks the manifest and names the file in every error; it also reads the
older two-file format (``state.npz`` + ``state.json``).
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from metarl_tf.atomic_files import write_file_atomic

CHECKPOINT_FILE = "checkpoint.npz"
CHECKPOINT_FORMAT = "metarl-tf-checkpoint"
CHECKPOINT_VERSION = 2  # version 1: state.npz + state.json
MANIFEST_KEY = "__manifest__"
BEST_PREFIX = "best/"
LEGACY_ARRAYS = "state.npz"
LEGACY_STATE = "state.json"


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupt, or belongs to another run."""


def config_sha256(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def checkpoint_exists(directory: str | os.PathLike) -> bool:
    directory = Path(directory)
    return (directory / CHECKPOINT_FILE).is_file() or (directory / LEGACY_STATE).is_file()


def write_checkpoint(
    directory: str | os.PathLike, arrays: dict[str, np.ndarray], manifest: dict[str, Any]
) -> Path:
    """Writes ``arrays`` and ``manifest`` (JSON-serializable; ``format``, ``format_version``,
    ``config_sha256`` and ``arrays`` are added) to ``directory/checkpoint.npz`` atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    manifest = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_VERSION,
        **manifest,
        "config_sha256": config_sha256(manifest["config"]),
        "arrays": sorted(arrays),
    }
    text = np.frombuffer(json.dumps(manifest).encode(), np.uint8)
    path = write_file_atomic(
        directory / CHECKPOINT_FILE, lambda f: np.savez(f, **arrays, **{MANIFEST_KEY: text})
    )
    for legacy in (LEGACY_ARRAYS, LEGACY_STATE):  # superseded by the file just written
        (directory / legacy).unlink(missing_ok=True)
    return path


def _read_manifest(path: Path, data) -> dict[str, Any]:
    if MANIFEST_KEY not in data.files:
        raise CheckpointError(f"{path}: no manifest; not a checkpoint of this project")
    try:
        manifest = json.loads(data[MANIFEST_KEY].tobytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: corrupt manifest ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a checkpoint of this project")
    if manifest.get("format_version") != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format_version {manifest.get('format_version')!r} is not "
            f"supported (expected {CHECKPOINT_VERSION})"
        )
    iteration = manifest.get("iteration")
    if (
        not isinstance(iteration, int)
        or iteration < 0
        or not isinstance(manifest.get("config"), dict)
    ):
        raise CheckpointError(f"{path}: corrupt manifest (iteration {iteration!r})")
    if manifest.get("config_sha256") != config_sha256(manifest["config"]):
        raise CheckpointError(f"{path}: the manifest's configuration does not match its sha256")
    missing = sorted(set(manifest.get("arrays", [])) - set(data.files))
    if missing:
        raise CheckpointError(f"{path}: arrays {missing[:3]} are missing")
    return manifest


def read_checkpoint(directory: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """``(arrays, manifest)`` of the checkpoint in ``directory``; raises
    :class:`CheckpointError` naming the file that is missing, truncated or corrupt."""
    directory = Path(directory)
    path = directory / CHECKPOINT_FILE
    if not path.is_file():
        if (directory / LEGACY_STATE).is_file():
            return _read_legacy(directory)
        raise CheckpointError(f"no checkpoint in {directory} (expected {CHECKPOINT_FILE})")
    try:
        with np.load(path, allow_pickle=False) as data:
            manifest = _read_manifest(path, data)
            arrays = {k: np.array(data[k]) for k in data.files if k != MANIFEST_KEY}
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as err:
        raise CheckpointError(
            f"{path}: truncated or corrupt checkpoint ({type(err).__name__}: {err}); resume from "
            "another copy or start a new run"
        ) from None
    return arrays, manifest


def _read_legacy(directory: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The two-file checkpoint (``state.npz`` + ``state.json``) of earlier versions, as
    ``(arrays, manifest)`` with the keys :func:`read_checkpoint` returns."""
    state_path, arrays_path = directory / LEGACY_STATE, directory / LEGACY_ARRAYS
    try:
        state = json.loads(state_path.read_text())
        if not isinstance(state, dict):
            raise ValueError("not a JSON object")
        iteration, elapsed = int(state["iteration"]), float(state["elapsed"])
        config = state["config"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{state_path}: corrupt checkpoint state ({err})") from None
    try:
        with np.load(arrays_path, allow_pickle=False) as data:
            arrays = {k: np.array(data[k]) for k in data.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as err:
        raise CheckpointError(
            f"{arrays_path}: truncated or corrupt checkpoint ({type(err).__name__}: {err})"
        ) from None
    manifest = {
        "iteration": iteration,
        "elapsed": elapsed,
        "config": config,
        "lineage": state.get("lineage", []),
        "history": [],
        "best": None,
    }
    return arrays, manifest
