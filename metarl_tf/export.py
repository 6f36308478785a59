"""SavedModel export: a bundle's meta-initialization or an adapted policy as a TensorFlow
SavedModel that runs with plain TensorFlow (``tf.saved_model.load``, TF Serving), without this
package.

    bundle = load_bundle("saved_models/nav2d-maml")
    export_saved_model(bundle, "exported/meta")                     # the meta-initialization
    export_saved_model(bundle.adapt(episodes), "exported/adapted")  # an adapted policy

    m = tf.saved_model.load("exported/adapted")
    m.mean_action(observations)["actions"]        # [N, act_dim] (categorical: [N] indices)
    m.action(observations, seed=3)                # {"actions", "raw_actions"}, reproducible
    m.action(observations)                        # fresh noise

Signatures (``m.signatures[...]``, the TF Serving names; inputs ``observation [N, obs_dim]``
float32 and as listed; every output is ``{"actions", "raw_actions"}``):

    serving_default, mean_action   the mean action (categorical: the most likely action)
    action                         a sample, fresh noise
    action_seeded                  seed (int64 scalar): a sample, the same for the same seed
    action_from_noise              noise: the sample of the given noise (see below)

Gaussian policy: ``raw_actions = mean + exp(log_std) * z`` (``z = 0`` for the mean action) and
``actions = clip(raw_actions, action_spec.minimum, action_spec.maximum)``. Categorical policy:
``actions`` are action indices ``[N]`` of the action spec's integer dtype, drawn by inverse CDF
from a uniform ``u`` (the first ``i`` with ``CDF(i) > u``, as the trainer's sampler draws them),
and ``raw_actions`` the same index as float32 ``[N, 1]``, the form ``/adapt`` episodes record.
These are the service's ``/act`` rules (``actions`` to step the environment with, ``raw_actions``
to record).

Noise: ``action_seeded`` draws ``z = tf.random.stateless_normal([N, act_dim], seed=[seed, 0],
alg="philox")`` (categorical: ``u = tf.random.stateless_uniform([N], seed=[seed, 0],
dtype=tf.float64, alg="philox")``): the same numbers on every machine and every load. ``action``
draws fresh numbers (a TensorFlow random op with op seeds 0, 0: seeded nondeterministically).
``action_from_noise`` takes ``z`` (``[N, act_dim]`` float32) or ``u`` (``[N]`` float64). The
service's ``/act`` draws its seeded noise with NumPy, through the policy's own sampler
(``policy.sample_noise(numpy.random.default_rng(seed), (N,))``: PCG64 and a ziggurat sampler,
which TensorFlow has no op for), so ``action_seeded`` and ``/act`` give different samples for the same
seed; ``action_from_noise`` with NumPy's numbers gives ``/act``'s sample.

Attributes (tracked variables, read after loading, e.g. ``m.action_spec.maximum.numpy()``):
``parameters`` (the weights, canonical order), ``observation_spec`` and ``action_spec``
(``shape``, ``dtype``; ``minimum``/``maximum`` for a bounded spec: the action clipping),
``bundle_name`` and ``bundle_sha256`` (the sha256 of the bundle's ``meta.json``, which holds
the sha256 of its other files), ``provenance`` (``kind``, ``policy_id``, ``parent``, ``steps``,
``depth``, ``num_episodes``, ``num_transitions``), and ``metadata_json``: all of it as JSON, also
written to ``assets/metarl_policy.json``.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from metarl_tf.atomic_files import (
    fsync_tree,
    recover_directory,
    replace_directory,
    temporary_sibling,
)
from metarl_tf.bundle import AdaptedPolicy, Bundle, load_bundle
from metarl_tf.policy import gaussian_mlp_forward, mlp_forward
from metarl_tf.version import __version__

EXPORT_FORMAT = "metarl-tf-policy"
EXPORT_FORMAT_VERSION = 1
METADATA_ASSET = "metarl_policy.json"
SIGNATURES = {
    "serving_default": "observation [N, obs_dim] float32 -> actions, raw_actions of the mean "
    "action (categorical: the most likely action)",
    "mean_action": "the same as serving_default",
    "action": "observation -> actions (clipped), raw_actions (unclipped) of a sample; fresh noise",
    "action_seeded": "observation, seed (int64 scalar) -> a sample; the same seed gives the same "
    "sample",
    "action_from_noise": "observation, noise -> the sample of the given noise: standard normal "
    "[N, act_dim] float32 (categorical: uniform [0, 1) [N] float64)",
}
NOISE = (
    "action_seeded: tf.random.stateless_normal([N, act_dim], seed=[seed, 0], alg='philox') "
    "(categorical: tf.random.stateless_uniform([N], seed=[seed, 0], dtype=float64, "
    "alg='philox')); action: a nondeterministically seeded TensorFlow random op; the service's "
    "/act: numpy.random.default_rng(seed) (give its numbers to action_from_noise for /act's sample)"
)


def _provenance(source: Bundle | AdaptedPolicy) -> dict[str, Any]:
    if isinstance(source, Bundle):
        return {
            "kind": "meta-initialization", "policy_id": "meta", "parent": None, "steps": 0,
            "depth": 0, "num_episodes": 0, "num_transitions": 0, "inner_losses": [],
        }  # fmt: skip
    return {
        "kind": "adapted",
        "policy_id": source.policy_id,
        "parent": source.parent,
        "steps": int(source.steps),
        "depth": int(source.depth),
        "num_episodes": int(source.num_episodes),
        "num_transitions": int(source.num_transitions),
        "inner_losses": [float(x) for x in source.inner_losses],
    }


def export_metadata(source: Bundle | AdaptedPolicy) -> dict[str, Any]:
    """What an exported SavedModel records about itself (its ``metadata_json``)."""
    bundle = source if isinstance(source, Bundle) else source.bundle
    meta = bundle.meta
    return {
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_FORMAT_VERSION,
        "exported_by": f"metarl-tf {__version__}",
        "bundle": {
            "name": bundle.name,
            "sha256": bundle.checksum,
            "format_version": meta.get("format_version"),
            "files": meta.get("files", {}),
            "task_distribution": meta["task_distribution"],
        },
        "observation_spec": meta["observation_spec"],
        "action_spec": meta["action_spec"],
        "policy": {
            "class": meta["policy"].get("class"),
            "distribution": bundle.policy.distribution_type,
            "config": meta["policy"]["config"],
            "parameter_names": list(bundle.policy.parameter_names),
            "parameter_shapes": [list(s) for s in bundle.policy.parameter_shapes],
        },
        "provenance": _provenance(source),
        "signatures": SIGNATURES,
        "noise": NOISE,
    }


class _Spec(tf.Module):
    """A tensor spec as variables: ``shape`` (int64), ``dtype`` (string) and, when bounded,
    ``minimum``/``maximum`` (of the spec's dtype, broadcast to its shape)."""

    def __init__(self, spec: dict[str, Any], name: str):
        super().__init__(name=name)
        self.shape = tf.Variable(np.asarray(spec["shape"], np.int64), trainable=False)
        self.dtype = tf.Variable(spec["dtype"], trainable=False)
        if "minimum" in spec:
            dtype = np.dtype(spec["dtype"])
            self.minimum = tf.Variable(np.asarray(spec["minimum"], dtype), trainable=False)
            self.maximum = tf.Variable(np.asarray(spec["maximum"], dtype), trainable=False)


class _Record(tf.Module):
    """Scalar facts as variables (strings, integers); ``None`` becomes ``""``."""

    def __init__(self, values: dict[str, Any], name: str):
        super().__init__(name=name)
        for key, value in values.items():
            if isinstance(value, bool) or not isinstance(value, (int, str, type(None))):
                continue  # lists (inner losses) are in metadata_json only
            value = "" if value is None else value
            dtype = tf.int64 if isinstance(value, int) else tf.string
            setattr(self, key, tf.Variable(value, dtype=dtype, trainable=False))


def _philox_seed(seed):
    seed = tf.cast(seed, tf.int64)
    return tf.stack([seed, tf.zeros_like(seed)])


class _ExportedPolicy(tf.Module):
    """The policy as a ``tf.Module``: weights and facts as variables, the forward pass and the
    sampler as ``tf.function`` s (traced from :mod:`metarl_tf.policy`'s forward pass)."""

    def __init__(self, bundle: Bundle, parameters: list[np.ndarray], metadata: dict, asset: str):
        super().__init__(name="metarl_policy")
        self._activation = bundle.meta["policy"]["config"]["activation"]
        self._categorical = bundle.policy.distribution_type == "categorical"
        self._act_dim = int(bundle.policy.act_dim)
        names = [n.replace("/", "__") for n in bundle.policy.parameter_names]
        self.parameters = [
            tf.Variable(np.asarray(p, np.float32), trainable=False, name=n)
            for p, n in zip(parameters, names, strict=True)
        ]
        self.observation_spec = _Spec(bundle.meta["observation_spec"], "observation_spec")
        self.action_spec = _Spec(bundle.meta["action_spec"], "action_spec")
        self._action_dtype = tf.as_dtype(bundle.meta["action_spec"]["dtype"])
        self.bundle_name = tf.Variable(metadata["bundle"]["name"], trainable=False)
        self.bundle_sha256 = tf.Variable(metadata["bundle"]["sha256"], trainable=False)
        self.provenance = _Record(metadata["provenance"], "provenance")
        self.metadata_json = tf.Variable(json.dumps(metadata), trainable=False)
        self.metadata_file = tf.saved_model.Asset(asset)

    # -- the policy's action rule, given its noise ---------------------------------------------

    def _apply(self, observation, noise):
        """``{"actions", "raw_actions"}`` from ``noise`` (Gaussian: standard normal
        ``[N, act_dim]``; categorical: uniform ``[0, 1)`` ``[N]`` float64), or the mean/most likely
        action when ``noise`` is ``None``."""
        if self._categorical:
            logits = mlp_forward(self.parameters, observation, self._activation)
            if noise is None:
                index = tf.argmax(logits, axis=-1)
            else:  # inverse CDF: the first i with CDF(i) > u (policy.numpy_categorical_sample)
                z = tf.cast(logits, tf.float64)
                cdf = tf.cumsum(tf.exp(z - tf.reduce_max(z, axis=-1, keepdims=True)), axis=-1)
                cdf = cdf / cdf[:, -1:]
                index = tf.reduce_sum(tf.cast(cdf <= noise[:, None], tf.int64), axis=-1)
                index = tf.minimum(index, tf.cast(tf.shape(logits)[-1] - 1, tf.int64))
            return {
                "actions": tf.cast(index, self._action_dtype),
                "raw_actions": tf.cast(index, tf.float32)[:, None],
            }
        mean, log_std = gaussian_mlp_forward(self.parameters, observation, self._activation)
        raw = mean if noise is None else mean + tf.exp(log_std) * noise
        low, high = self.action_spec.minimum, self.action_spec.maximum
        return {"actions": tf.clip_by_value(raw, low, high), "raw_actions": raw}

    def _draw_noise(self, n, seed):
        """The noise of :meth:`_apply` for ``n`` observations: stateless Philox numbers of
        ``seed``, or fresh ones (a TensorFlow random op seeded nondeterministically: op seeds
        0, 0) when ``seed`` is ``None``."""
        if self._categorical:
            if seed is None:
                return tf.raw_ops.RandomUniform(shape=[n], dtype=tf.float64, seed=0, seed2=0)
            return tf.random.stateless_uniform(
                [n], _philox_seed(seed), dtype=tf.float64, alg="philox"
            )
        shape = tf.stack([n, self._act_dim])
        if seed is None:
            return tf.raw_ops.RandomStandardNormal(shape=shape, dtype=tf.float32, seed=0, seed2=0)
        return tf.random.stateless_normal(shape, _philox_seed(seed), alg="philox")

    # -- the exported functions ----------------------------------------------------------------

    @tf.function
    def mean_action(self, observation):
        """``{"actions", "raw_actions"}`` of the mean action (categorical: the most likely)."""
        return self._apply(observation, None)

    @tf.function
    def action(self, observation, seed=None):
        """``{"actions", "raw_actions"}``: a sample; reproducible when ``seed`` is given."""
        return self._apply(observation, self._draw_noise(tf.shape(observation)[0], seed))

    @tf.function
    def action_from_noise(self, observation, noise):
        """``{"actions", "raw_actions"}`` of the given noise (see :meth:`_apply`)."""
        return self._apply(observation, noise)


def _source(policy_or_bundle) -> Bundle | AdaptedPolicy:
    if isinstance(policy_or_bundle, (Bundle, AdaptedPolicy)):
        return policy_or_bundle
    if isinstance(policy_or_bundle, (str, os.PathLike)):
        return load_bundle(policy_or_bundle)
    raise TypeError(
        "export_saved_model takes a bundle (load_bundle(...) or its directory) or an adapted "
        f"policy (Bundle.adapt(...)), got {type(policy_or_bundle).__name__}"
    )


def _is_exported_savedmodel(path: Path) -> bool:
    """A directory :func:`export_saved_model` wrote (the only kind it replaces)."""
    return (
        not path.is_symlink()
        and (path / "saved_model.pb").is_file()
        and (path / "assets" / METADATA_ASSET).is_file()
    )


def export_saved_model(
    policy_or_bundle: Bundle | AdaptedPolicy | str | os.PathLike,
    path: str | os.PathLike,
    overwrite: bool = False,
) -> Path:
    """Writes ``policy_or_bundle`` as a SavedModel directory at ``path`` (see the module
    docstring for its signatures and attributes).

    Args:
        policy_or_bundle: a :class:`~metarl_tf.bundle.Bundle` (its meta-initialization) or a
            bundle directory, or an :class:`~metarl_tf.bundle.AdaptedPolicy`
            (:meth:`Bundle.adapt`, or a policy the service stored).
        path: the SavedModel directory to write (written beside it, then renamed into place).
        overwrite: replace a SavedModel this function wrote at ``path`` (anything else there is
            refused and left as it is); without it a non-empty ``path`` is an error.

    Returns:
        ``path``.
    """
    source = _source(policy_or_bundle)
    path = Path(path)
    occupied = os.path.lexists(path) and not (path.is_dir() and not any(path.iterdir()))
    if occupied and not overwrite:
        raise FileExistsError(
            f"{path} exists and is not an empty directory; choose another path or pass "
            "overwrite=True (--overwrite)"
        )
    if occupied and not _is_exported_savedmodel(path):
        raise FileExistsError(
            f"refusing to overwrite {path}: it is not a SavedModel this project exported (no "
            f"saved_model.pb with assets/{METADATA_ASSET}); nothing was changed - choose another "
            "path"
        )
    bundle = source if isinstance(source, Bundle) else source.bundle
    if isinstance(source, Bundle):
        parameters = bundle.policy.get_parameters()
    else:
        parameters = [np.asarray(p, np.float32) for p in source.parameters]
    metadata = export_metadata(source)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_directory(path)  # what an interrupted earlier write left beside it
    work = Path(tempfile.mkdtemp(prefix=temporary_sibling(path), dir=path.parent))
    try:
        asset = work / "asset" / METADATA_ASSET
        asset.parent.mkdir()
        asset.write_text(json.dumps(metadata, indent=2) + "\n")
        module = _ExportedPolicy(bundle, parameters, metadata, str(asset))
        obs_dim = int(bundle.meta["observation_spec"]["shape"][0])
        observation = tf.TensorSpec([None, obs_dim], tf.float32, name="observation")
        seed = tf.TensorSpec([], tf.int64, name="seed")
        if module._categorical:  # uniform numbers in [0, 1), one per observation
            noise = tf.TensorSpec([None], tf.float64, name="noise")
        else:  # standard normal numbers
            noise = tf.TensorSpec([None, module._act_dim], tf.float32, name="noise")
        mean_action = module.mean_action.get_concrete_function(observation)
        signatures = {
            "serving_default": mean_action,
            "mean_action": mean_action,
            "action": module.action.get_concrete_function(observation),
            "action_seeded": module.action.get_concrete_function(observation, seed),
            "action_from_noise": module.action_from_noise.get_concrete_function(observation, noise),
        }
        tf.saved_model.save(module, str(work / "model"), signatures=signatures)
        fsync_tree(work / "model")
        replace_directory(work / "model", path)  # the old SavedModel or the new, never neither
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return path


def saved_model_archive(policy_or_bundle: Bundle | AdaptedPolicy | str | os.PathLike) -> bytes:
    """:func:`export_saved_model` as the bytes of a ``.tar.gz`` whose members are the
    SavedModel's files at the archive's root (``saved_model.pb``, ``variables/``, ``assets/``):
    ``mkdir m && tar -xzf archive.tar.gz -C m`` gives the SavedModel directory ``m``. Regular files
    and directories only, owned by uid/gid 0, mtime 0."""
    with tempfile.TemporaryDirectory(prefix="metarl-export-") as tmp:
        root = export_saved_model(policy_or_bundle, Path(tmp) / "model")
        buffer = io.BytesIO()
        with (
            gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0) as gz,
            tarfile.open(fileobj=gz, mode="w") as tar,
        ):
            for file in sorted(root.rglob("*")):
                info = tar.gettarinfo(str(file), arcname=file.relative_to(root).as_posix())
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                info.mtime = 0
                info.mode = 0o755 if file.is_dir() else 0o644
                if file.is_dir():
                    tar.addfile(info)
                else:
                    with open(file, "rb") as f:
                        tar.addfile(info, f)
        return buffer.getvalue()
