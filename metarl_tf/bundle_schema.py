"""What a valid bundle directory is: the one check of ``meta.json`` and the files it names.

:func:`validate_bundle` is called by :func:`metarl_tf.bundle.load_bundle` (hence ``evaluate``,
``train --init-from``, ``export``, ``export-savedmodel``) and by the service at start-up, before any
worker runs. It imports no TensorFlow and builds no environment, so it takes well under a second.

It checks, and refuses with a :class:`BundleError` naming the file and the field:

- ``meta.json``: a regular file of at most :data:`MAX_META_BYTES`, a JSON object of a known
  ``format_version``, with every required key of the right type (:data:`REQUIRED`);
- ranges: ``adaptation.steps`` in ``[1, MAX_STEPS]``, ``gamma`` and ``gae_lambda`` in ``[0, 1]``,
  finite step sizes (scalar, or every value in the step-size file) and log σ shift, a horizon in
  ``[1, MAX_HORIZON]``, finite action bounds with ``minimum <= maximum``, parameter shapes of
  positive sizes (at most :data:`MAX_PARAMETERS` numbers) that agree with the specs;
- files: ``files`` maps names to sha256 digests; every name is a relative path inside the
  bundle (no absolute path, no ``..``, no symbolic link leading out of it) of a regular file whose
  digest matches; ``policy.keras`` and the step-size file are among them.

What needs the task distribution itself (the specs and action bounds the distribution defines)
is cross-checked by :func:`check_against_distribution`, which ``load_bundle`` calls after building
it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_VERSION = 1
# Version 2: the adaptation rule has per-step step sizes (``step_sizes.blocks``) or a log σ shift
# (``adaptation.log_std_shift``). Written only for such bundles, so that a reader of version 1,
# which would ignore them and adapt differently, refuses the bundle instead.
FORMAT_VERSION_STEP_RULES = 2
FORMAT_VERSIONS = (FORMAT_VERSION, FORMAT_VERSION_STEP_RULES)
POLICY_FILE = "policy.keras"
META_FILE = "meta.json"
STEP_SIZES_FILE = "step_sizes.npz"
POLICY_CLASSES = ("GaussianMLPPolicy", "CategoricalMLPPolicy")

MAX_META_BYTES = 1 << 20  # a real meta.json is a few KB
MAX_STEPS = 100  # inner steps of one adaptation
MAX_HORIZON = 10_000  # steps per episode (the families here use 5 to 500)
MAX_PARAMETERS = 50_000_000  # numbers in the policy's parameters
MAX_FILES = 64

# key: (type, ...) of the top-level and nested required entries
REQUIRED: dict[str, tuple[type, ...]] = {
    "task_distribution": (dict,),
    "task_distribution.name": (str,),
    "observation_spec": (dict,),
    "observation_spec.shape": (list,),
    "observation_spec.dtype": (str,),
    "action_spec": (dict,),
    "action_spec.shape": (list,),
    "action_spec.dtype": (str,),
    "policy": (dict,),
    "policy.class": (str,),
    "policy.config": (dict,),
    "policy.parameter_names": (list,),
    "policy.parameter_shapes": (list,),
    "adaptation": (dict,),
    "adaptation.step_sizes": (int, float, dict),
    "adaptation.gamma": (int, float),
    "adaptation.gae_lambda": (int, float),
    "files": (dict,),
}
_HEX64 = re.compile(r"[0-9a-f]{64}")


class BundleError(ValueError):
    """A bundle is missing, incomplete, tampered with, or of an unknown format."""


def sha256_of(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _type_names(types: tuple[type, ...]) -> str:
    names = {dict: "an object", list: "a list", str: "a string", int: "a number", float: "a number"}
    return " or ".join(dict.fromkeys(names[t] for t in types))


def _lookup(meta: dict, dotted: str) -> Any:
    value: Any = meta
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _finite_numbers(values: Any) -> bool:
    flat = values if isinstance(values, list) else [values]
    out = []
    for v in flat:
        if isinstance(v, list):
            if not _finite_numbers(v):
                return False
        else:
            out.append(v)
    return all(_is_number(v) and math.isfinite(v) for v in out)


def _positive_ints(values: Any) -> bool:
    return isinstance(values, list) and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values
    )


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``meta.json`` of the bundle directory ``path`` (size and JSON checked only)."""
    path = Path(path)
    if not path.is_dir():
        raise BundleError(
            f"bundle {str(path)!r} is not a directory (expected saved_models/<name>/)"
        )
    meta_path = path / META_FILE
    if not meta_path.is_file():
        raise BundleError(f"bundle {str(path)!r} has no {META_FILE}; is it a metarl-tf bundle?")
    size = meta_path.stat().st_size
    if size > MAX_META_BYTES:
        raise BundleError(
            f"{meta_path}: {size} bytes, more than the {MAX_META_BYTES} a bundle's {META_FILE} may "
            "have; the file is not one this project wrote"
        )
    try:
        meta = json.loads(meta_path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BundleError(f"{meta_path}: not valid JSON ({err})") from None
    if not isinstance(meta, dict):
        raise BundleError(f"{meta_path}: expected a JSON object, got {type(meta).__name__}")
    return meta


def is_project_bundle(path: str | os.PathLike) -> bool:
    """Whether ``path`` looks like a bundle this project wrote (a ``meta.json`` of a known
    format version with the bundle's keys); nothing else may be replaced by a new bundle."""
    try:
        meta = read_meta(path)
    except (BundleError, OSError):
        return False
    return meta.get("format_version") in FORMAT_VERSIONS and all(
        isinstance(meta.get(k), dict) for k in ("files", "policy", "adaptation")
    )


def validate_meta(meta: dict[str, Any], where: str = META_FILE) -> None:
    """Checks the keys, types, ranges and internal consistency of a parsed ``meta.json``
    (everything but the files); ``where`` names it in the error."""

    def fail(field: str, expected: str, got: Any) -> BundleError:
        text = repr(got)
        if len(text) > 80:
            text = text[:77] + "..."
        return BundleError(f"{where}: {field} must be {expected}, got {text}")

    version = meta.get("format_version")
    if version not in FORMAT_VERSIONS:
        raise BundleError(
            f"{where}: format_version {version!r} is not supported (expected "
            f"{' or '.join(map(str, FORMAT_VERSIONS))})"
        )
    for key, types in REQUIRED.items():
        value = _lookup(meta, key)
        if value is None:
            raise BundleError(f"{where}: missing key {key!r}; the bundle is incomplete")
        if not isinstance(value, types) or isinstance(value, bool):
            raise fail(key, _type_names(types), value)

    config = meta["task_distribution"].get("config", {})
    if not isinstance(config, dict):
        raise fail("task_distribution.config", "an object", config)
    horizon = config.get("horizon")
    if horizon is not None and not (
        isinstance(horizon, int) and not isinstance(horizon, bool) and 1 <= horizon <= MAX_HORIZON
    ):
        raise fail("task_distribution.config.horizon", f"an integer in [1, {MAX_HORIZON}]", horizon)

    for name in ("observation_spec", "action_spec"):
        spec = meta[name]
        if not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in spec["shape"]
        ):
            raise fail(f"{name}.shape", "a list of sizes", spec["shape"])
        bounds = [spec.get("minimum"), spec.get("maximum")]
        if (bounds[0] is None) != (bounds[1] is None):
            raise fail(name, "an object with both minimum and maximum, or neither", spec)
        if bounds[0] is not None:
            if not all(_finite_numbers(b) for b in bounds):
                raise fail(f"{name}.minimum/maximum", "finite numbers", bounds)
            low, high = (np.asarray(b, np.float64) for b in bounds)
            if low.shape != high.shape or not np.all(low <= high):
                raise fail(
                    f"{name}.minimum/maximum", "equal shapes with minimum <= maximum", bounds
                )
            if low.shape not in ((), tuple(spec["shape"])):
                raise fail(f"{name}.minimum", f"of shape {spec['shape']}", bounds[0])

    policy = meta["policy"]
    if policy["class"] not in POLICY_CLASSES:
        raise fail("policy.class", " or ".join(POLICY_CLASSES), policy["class"])
    shapes = policy["parameter_shapes"]
    names = policy["parameter_names"]
    if not shapes or not all(_positive_ints(s) for s in shapes):
        raise fail("policy.parameter_shapes", "a list of shapes of positive sizes", shapes)
    if len(names) != len(shapes) or not all(isinstance(n, str) for n in names):
        raise fail("policy.parameter_names", f"{len(shapes)} strings", names)
    count = sum(math.prod(s) for s in shapes)
    if count > MAX_PARAMETERS:
        raise fail("policy.parameter_shapes", f"at most {MAX_PARAMETERS} numbers", count)
    obs = meta["observation_spec"]["shape"]
    first = shapes[0]
    if len(obs) != 1 or first[0] != obs[0]:
        raise fail(
            "policy.parameter_shapes[0]",
            f"[{obs[0] if obs else '?'}, ...] (the observation size)",
            first,
        )
    cfg = policy["config"]
    for key, expected in (("obs_dim", obs[0]),):
        if key in cfg and cfg[key] != expected:
            raise fail(f"policy.config.{key}", str(expected), cfg[key])
    if policy["class"] == "GaussianMLPPolicy":
        act = meta["action_spec"]["shape"]
        if len(act) != 1 or names[-1] != "log_std" or shapes[-1] != act:
            raise fail(
                "policy", f"a Gaussian policy whose last parameter is log_std of shape {act}",
                {"last": names[-1], "shape": shapes[-1]},
            )  # fmt: skip
        if "act_dim" in cfg and cfg["act_dim"] != act[0]:
            raise fail("policy.config.act_dim", str(act[0]), cfg["act_dim"])

    adaptation = meta["adaptation"]
    steps = adaptation.get("steps", 1)
    if not (isinstance(steps, int) and not isinstance(steps, bool) and 1 <= steps <= MAX_STEPS):
        raise fail("adaptation.steps", f"an integer in [1, {MAX_STEPS}]", steps)
    for key in ("gamma", "gae_lambda"):
        value = adaptation[key]
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise fail(f"adaptation.{key}", "a number in [0, 1]", value)
    if adaptation.get("baseline", "linear") not in ("linear", "none"):
        raise fail("adaptation.baseline", "'linear' or 'none'", adaptation.get("baseline"))
    sizes = adaptation["step_sizes"]
    if isinstance(sizes, dict):
        if not isinstance(sizes.get("file"), str):
            raise fail("adaptation.step_sizes.file", "a file name", sizes.get("file"))
        if sizes["file"] not in meta["files"]:
            raise BundleError(
                f"{where}: step size file {sizes['file']!r} is not checksummed in files"
            )
        blocks = sizes.get("blocks", 1)
        if not (isinstance(blocks, int) and not isinstance(blocks, bool) and blocks >= 1):
            raise fail("adaptation.step_sizes.blocks", "a positive integer", blocks)
        if blocks > MAX_STEPS:
            raise fail("adaptation.step_sizes.blocks", f"at most {MAX_STEPS}", blocks)
    elif not math.isfinite(sizes):
        raise fail("adaptation.step_sizes", "a finite number", sizes)
    shift = adaptation.get("log_std_shift")
    if shift is not None:
        act = meta["action_spec"]["shape"]
        if (
            policy["class"] != "GaussianMLPPolicy"
            or not isinstance(shift, list)
            or not _finite_numbers(shift)
            or [len(shift)] != act
        ):
            raise fail(
                "adaptation.log_std_shift",
                f"a list of {act} finite floats (a Gaussian policy's log_std)",
                shift,
            )
    training = meta.get("training", {})
    if not isinstance(training, dict):
        raise fail("training", "an object", training)

    files = meta["files"]
    if len(files) > MAX_FILES:
        raise fail("files", f"at most {MAX_FILES} entries", len(files))
    if POLICY_FILE not in files:
        raise BundleError(f"{where}: files does not list {POLICY_FILE}")
    for name, digest in files.items():
        if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
            raise fail(f"files[{name!r}]", "a sha256 hex digest", digest)


def _confined(root: Path, name: str) -> Path | None:
    """``root / name`` if ``name`` is a plain relative path whose real location is inside
    ``root``; ``None`` otherwise."""
    if not name or "\\" in name or "\x00" in name or os.path.isabs(name):
        return None
    parts = Path(name).parts
    if any(p in ("..", "") for p in parts) or name == META_FILE:
        return None
    candidate = root / name
    real_root = os.path.realpath(root)
    real = os.path.realpath(candidate)
    if os.path.commonpath([real_root, real]) != real_root:
        return None
    return candidate


def validate_bundle(path: str | os.PathLike) -> dict[str, Any]:
    """Validates the bundle directory ``path``: :func:`validate_meta`, then every file entry
    (confined to the bundle, a regular file, sha256 as recorded) and the values of the step-size
    file. Returns the parsed ``meta.json``; raises :class:`BundleError` saying what is wrong."""
    path = Path(path)
    meta = read_meta(path)
    meta_path = path / META_FILE
    validate_meta(meta, str(meta_path))
    for name, digest in meta["files"].items():
        f = _confined(path, name)
        if f is None:
            raise BundleError(
                f"{meta_path}: files[{name!r}] is not a file inside the bundle (absolute path, "
                "'..' or a link leading out of it); the bundle was edited - re-export it"
            )
        if not f.is_file():
            raise BundleError(f"bundle {str(path)!r} is incomplete: {name} is missing")
        actual = sha256_of(f)
        if actual != digest:
            raise BundleError(
                f"bundle {str(path)!r}: checksum mismatch for {name} (meta.json says "
                f"{digest[:12]}..., file is {actual[:12]}...); the file was modified or corrupted "
                "- re-export the bundle"
            )
    sizes = meta["adaptation"]["step_sizes"]
    if isinstance(sizes, dict):
        sizes_path = path / sizes["file"]
        try:
            with np.load(sizes_path, allow_pickle=False) as data:
                for key in data.files:
                    values = data[key]
                    if values.dtype.kind != "f" or not np.all(np.isfinite(values)):
                        raise BundleError(f"{sizes_path}: step sizes {key} must be finite floats")
        except BundleError:
            raise
        except (ValueError, OSError, EOFError) as err:  # not an npz, or pickled objects
            raise BundleError(f"{sizes_path}: not a readable step-size file ({err})") from None
    return meta


def check_against_distribution(
    meta: dict[str, Any], observation_spec: dict[str, Any], action_spec: dict[str, Any], where: str
) -> None:
    """Cross-checks a validated ``meta.json`` against the specs of the task distribution it
    names (as :func:`metarl_tf.specs.spec_to_json` writes them): equal shapes and dtypes, and
    action bounds within the distribution's own."""
    for name, spec in (("observation_spec", observation_spec), ("action_spec", action_spec)):
        saved = meta[name]
        if saved["shape"] != spec["shape"] or saved["dtype"] != spec["dtype"]:
            raise BundleError(
                f"{where}: {name} {saved['shape']} {saved['dtype']} differs from the task "
                f"distribution's {spec['shape']} {spec['dtype']}; the bundle was edited"
            )
        if "minimum" in spec:
            low, high = (
                np.asarray(saved.get(k, np.nan), np.float64) for k in ("minimum", "maximum")
            )
            dist_low, dist_high = (np.asarray(spec[k], np.float64) for k in ("minimum", "maximum"))
            if not (np.all(low >= dist_low) and np.all(high <= dist_high)):
                raise BundleError(
                    f"{where}: {name} bounds [{saved.get('minimum')}, {saved.get('maximum')}] "
                    f"exceed the task distribution's [{spec['minimum']}, {spec['maximum']}]; "
                    "the bundle was edited"
                )
