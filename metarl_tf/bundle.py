"""The meta-initialization bundle: ``saved_models/<name>/`` (DESIGN.md, "The bundle").

Files:
    policy.keras     Keras 3 model holding θ (loads with ``safe_mode=True``).
    meta.json        format version, task distribution, specs, policy and adaptation config
                     (with ``adaptation.log_std_shift``, a list of ``action_dim`` floats, when
                     trained with ``--log-std-shift``), training summary, and the sha256 of every
                     other file.
    step_sizes.npz   Meta-SGD step sizes, when learned (``allow_pickle=False``).

No pickle anywhere; a bundle whose files do not match their checksums is refused.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import keras
import numpy as np
import tensorflow as tf

from metarl_tf.episodes import pad_episodes
from metarl_tf.maml import Adapter, StepRule, step_size_blocks
from metarl_tf.policy import LOG_STD, CategoricalMLPPolicy, GaussianMLPPolicy
from metarl_tf.specs import spec_from_json, spec_to_json

if TYPE_CHECKING:  # a bundle builds its task distribution only when asked
    from metarl_tf.envs import TaskDistribution

FORMAT_VERSION = 1
# Version 2: the adaptation rule has per-step step sizes (``step_sizes.blocks``) or a log σ shift
# (``adaptation.log_std_shift``). Written only for such bundles, so that a reader of version 1,
# which would ignore them and adapt differently, refuses the bundle instead.
FORMAT_VERSION_STEP_RULES = 2
POLICY_FILE = "policy.keras"
META_FILE = "meta.json"
STEP_SIZES_FILE = "step_sizes.npz"


class BundleError(ValueError):
    """A bundle is missing, incomplete, tampered with, or of an unknown format."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Bundle:
    """A loaded bundle.

    Attributes:
        path: the bundle directory.
        name: the directory name.
        meta: the parsed ``meta.json``.
        policy: the Keras policy holding the meta-initialization θ.
        step_sizes: scalar α, or Meta-SGD step sizes (one float32 array per parameter, or per-step
            blocks of them: :class:`metarl_tf.maml.StepRule`).

    The specs and the horizon come from ``meta.json``; the task distribution it was trained on
    is built only when asked (:meth:`make_task_distribution`, :attr:`task_distribution`), so
    loading a bundle to adapt or act (the service) imports no environment.
    """

    path: Path
    name: str
    meta: dict[str, Any]
    policy: GaussianMLPPolicy | CategoricalMLPPolicy
    step_sizes: float | list[np.ndarray]

    @property
    def observation_spec(self):
        """The ``tf.TensorSpec`` of one observation (``meta.json``)."""
        return spec_from_json(self.meta["observation_spec"], "observation")

    @property
    def action_spec(self):
        """The ``BoundedTensorSpec`` of one action (``meta.json``)."""
        return spec_from_json(self.meta["action_spec"], "action")

    @property
    def horizon(self) -> int:
        """The maximum episode length of the task distribution (``meta.json``)."""
        return _horizon(self.meta)

    def make_task_distribution(self) -> TaskDistribution:
        """A new instance of the task distribution the bundle was trained on
        (``meta.json``'s ``task_distribution``): this imports the environments."""
        from metarl_tf.envs import make_task_distribution

        td = self.meta["task_distribution"]
        return make_task_distribution(td["name"], **td.get("config", {}))

    @functools.cached_property
    def task_distribution(self) -> TaskDistribution:
        """This bundle's :meth:`make_task_distribution`, built on first use."""
        return self.make_task_distribution()

    @property
    def adaptation(self) -> dict[str, Any]:
        """``steps``, ``gamma``, ``gae_lambda``, ``baseline`` used to adapt this bundle."""
        return self.meta["adaptation"]

    @property
    def learned_step_sizes(self) -> bool:
        return not isinstance(self.step_sizes, float)

    @property
    def log_std_shift(self) -> np.ndarray | None:
        """The learned shift of ``log σ`` the first inner step adds (``train --log-std-shift``),
        or ``None``."""
        shift = self.adaptation.get("log_std_shift")
        return None if shift is None else np.asarray(shift, np.float32)

    def make_adapter(self):
        """The compiled :class:`metarl_tf.maml.Adapter` with this bundle's settings."""
        a = self.adaptation
        sizes = self.step_sizes
        if self.learned_step_sizes:
            sizes = [tf.constant(s) for s in sizes]
        shift = self.log_std_shift
        if shift is not None:
            shift = tf.constant(shift)
        return Adapter(self.policy, sizes, a["gamma"], a["gae_lambda"], a["baseline"], shift)

    @property
    def checksum(self) -> str:
        """sha256 of ``meta.json``, which holds the sha256 of every other file: one digest that
        identifies the whole bundle (recorded in exported SavedModels)."""
        return _sha256(self.path / META_FILE)

    @property
    def step_rule(self) -> StepRule:
        """The bundle's inner step rule (step sizes, per-step blocks, log σ shift)."""
        return StepRule(self.step_sizes, len(self.policy.parameter_shapes), self.log_std_shift)

    @property
    def default_steps(self) -> int:
        """Inner steps one :meth:`adapt` takes by default: the bundle's ``adaptation.steps``, or
        1 for a bundle with a log σ shift (:meth:`StepRule.default_steps`)."""
        return self.step_rule.default_steps(self.adaptation.get("steps", 1))

    @functools.cached_property
    def adapter(self) -> Adapter:
        """This bundle's :meth:`make_adapter`, built once (it compiles once per input shape)."""
        return self.make_adapter()

    def adapt(
        self,
        episodes: Sequence[tuple],
        steps: int | None = None,
        parent: AdaptedPolicy | None = None,
    ) -> AdaptedPolicy:
        """``steps`` inner steps on one task's episodes, from the meta-initialization or from
        ``parent`` (a previous :meth:`adapt`, continuing its chain of steps): the service's
        ``/adapt`` in-process (the same compiled :class:`~metarl_tf.maml.Adapter`; padding does
        not change the result).

        Args:
            episodes: ``(observations [T_e, obs_dim], actions [T_e, act_dim], rewards [T_e])``
                per episode; actions as the sampler records them (the raw, unclipped Gaussian
                sample, or a categorical action's index as a float, ``act_dim == 1``).
            steps: inner steps (default :attr:`default_steps`).
            parent: adapt further from this adapted policy instead of the meta-initialization.

        Raises:
            ValueError: episodes of the wrong shape or with NaN/inf, or ``steps > 1`` from the
                meta-initialization of a bundle with a log σ shift.
        """
        obs_dim = int(self.meta["observation_spec"]["shape"][0])
        act_dim = int(self.policy.act_dim)
        episodes = [_checked_episode(e, i, obs_dim, act_dim) for i, e in enumerate(episodes)]
        if not episodes:
            raise ValueError("adaptation needs at least one episode of the new task")
        steps = self.default_steps if steps is None else int(steps)
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        depth = 0 if parent is None else parent.depth
        if self.step_rule.needs_adapted_episodes(depth, steps):
            raise ValueError(
                f"bundle {self.name!r} adds a log σ shift in its first inner step, so its later "
                f"steps need episodes of the adapted policy: adapt with steps=1, collect episodes "
                f"with the result, then adapt(..., parent=result)"
            )
        if parent is not None and parent.bundle.checksum != self.checksum:
            raise ValueError(
                f"parent was adapted from another bundle ({parent.bundle.name!r}); adapt it "
                "with that bundle"
            )
        start = self.policy.get_parameters() if parent is None else parent.parameters
        params, losses, _ = self.adapter(start, pad_episodes(episodes), steps, first_step=depth)
        return AdaptedPolicy(
            bundle=self,
            parameters=[np.asarray(p)[0] for p in params],
            parent="meta" if parent is None else (parent.policy_id or "in-process"),
            steps=steps,
            depth=depth + steps,
            num_episodes=len(episodes),
            num_transitions=int(sum(len(r) for _, _, r in episodes)),
            inner_losses=[float(x) for x in np.asarray(losses)[:, 0]],
        )


def _checked_episode(episode, index: int, obs_dim: int, act_dim: int):
    """One ``(obs, act, rew)`` episode as float32 arrays of matching shapes; ``ValueError``
    naming the episode otherwise."""
    try:
        obs, act, rew = (np.asarray(x, np.float32) for x in episode)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"episodes[{index}] must be (observations, actions, rewards) numeric arrays: {err}"
        ) from None
    length = len(rew)
    expected = {
        "observations": (obs, (length, obs_dim)),
        "actions": (act, (length, act_dim)),
        "rewards": (rew, (length,)),
    }
    for name, (array, shape) in expected.items():
        if array.shape != shape or length == 0:
            raise ValueError(
                f"episodes[{index}].{name} has shape {list(array.shape)}, expected {list(shape)} "
                f"(T >= 1 steps, observation size {obs_dim}, action size {act_dim})"
            )
        if not np.isfinite(array).all():
            raise ValueError(f"episodes[{index}].{name} holds NaN or inf")
    return obs, act, rew


@dataclass(frozen=True, eq=False)  # compared by identity: its weights are arrays
class AdaptedPolicy:
    """A policy adapted from a bundle (:meth:`Bundle.adapt`, or a stored ``/adapt`` result).

    Attributes:
        bundle: the bundle it was adapted from.
        parameters: adapted weights, unbatched ``[*shape]`` float32, canonical order.
        parent: ``"meta"`` (the meta-initialization), or the id of the policy adapted further.
        steps: inner steps taken from ``parent``.
        depth: inner steps taken from the meta-initialization in all.
        num_episodes, num_transitions: size of the episodes of the last adaptation.
        inner_losses: ``[steps]`` inner loss before each step.
        policy_id: the service's id of this policy, when it has one.
    """

    bundle: Bundle
    parameters: list[np.ndarray]
    parent: str
    steps: int
    depth: int
    num_episodes: int
    num_transitions: int
    inner_losses: list[float] = field(default_factory=list)
    policy_id: str | None = None


def _step_size_keys(parameter_names: list[str], blocks: int) -> list[str]:
    """``step_sizes.npz`` keys: the parameter names (``/`` → ``__``), prefixed ``step<b>__`` for
    per-step blocks."""
    names = [n.replace("/", "__") for n in parameter_names]
    if blocks == 1:
        return names
    return [f"step{b}__{n}" for b in range(blocks) for n in names]


def save_bundle(
    path: str | os.PathLike,
    policy: GaussianMLPPolicy | CategoricalMLPPolicy,
    step_sizes: float | list[np.ndarray],
    task_distribution: TaskDistribution,
    *,
    adaptation: dict[str, Any],
    training: dict[str, Any] | None = None,
    extra_files: dict[str, str | os.PathLike] | None = None,
) -> Path:
    """Writes a bundle atomically (into a temporary directory, then renamed).

    Args:
        adaptation: ``steps``, ``gamma``, ``gae_lambda``, ``baseline`` (and anything else worth
            recording, e.g. ``first_order``).
        training: free-form training summary (config, iterations, final returns, wall-clock).
        extra_files: ``{name in bundle: source path}`` copied in and checksummed (e.g. the
            training run's ``metrics.jsonl``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    tmp.chmod(0o755)
    files = [POLICY_FILE]
    policy.save(tmp / POLICY_FILE)
    # per-step blocks or a log σ shift: a rule a version-1 reader would get wrong
    step_rules = adaptation.get("log_std_shift") is not None
    if isinstance(step_sizes, (int, float)):
        sizes_json: Any = float(step_sizes)
    else:
        blocks = step_size_blocks(step_sizes, len(policy.parameter_names))
        keys = _step_size_keys(policy.parameter_names, blocks)
        arrays = {k: np.asarray(s, np.float32) for k, s in zip(keys, step_sizes, strict=True)}
        np.savez(tmp / STEP_SIZES_FILE, **arrays)
        sizes_json = {"file": STEP_SIZES_FILE}
        if blocks > 1:
            sizes_json["blocks"] = blocks
            step_rules = True
        files.append(STEP_SIZES_FILE)
    for name, src in (extra_files or {}).items():
        shutil.copyfile(src, tmp / name)
        files.append(name)
    meta = {
        "format_version": FORMAT_VERSION_STEP_RULES if step_rules else FORMAT_VERSION,
        "name": path.name,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "task_distribution": {
            "name": task_distribution.name,
            "config": task_distribution.config(),
            "horizon": int(task_distribution.horizon),
        },
        "observation_spec": spec_to_json(task_distribution.observation_spec),
        "action_spec": spec_to_json(task_distribution.action_spec),
        "policy": {
            "class": type(policy).__name__,
            "config": {
                k: v
                for k, v in policy.get_config().items()
                if k
                in (
                    "obs_dim",
                    "act_dim",
                    "num_actions",
                    "hidden_sizes",
                    "activation",
                    "init_log_std",
                )
            },
            "parameter_names": policy.parameter_names,
            "parameter_shapes": [list(s) for s in policy.parameter_shapes],
        },
        "adaptation": {"step_sizes": sizes_json, **adaptation},
        "training": training or {},
        "files": {f: _sha256(tmp / f) for f in files},
    }
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    if path.exists():
        backup = path.with_name(f".{path.name}.old")
        if backup.exists():
            shutil.rmtree(backup)
        path.rename(backup)
        tmp.rename(path)
        shutil.rmtree(backup)
    else:
        tmp.rename(path)
    return path


def load_bundle(path: str | os.PathLike) -> Bundle:
    """Loads and verifies a bundle; raises :class:`BundleError` saying what is wrong."""
    path = Path(path)
    if not path.is_dir():
        raise BundleError(
            f"bundle {str(path)!r} is not a directory (expected saved_models/<name>/)"
        )
    meta_path = path / META_FILE
    if not meta_path.is_file():
        raise BundleError(f"bundle {str(path)!r} has no {META_FILE}; is it a metarl-tf bundle?")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise BundleError(f"{meta_path}: not valid JSON ({err})") from None
    version = meta.get("format_version")
    if version not in (FORMAT_VERSION, FORMAT_VERSION_STEP_RULES):
        raise BundleError(
            f"{meta_path}: format_version {version!r} is not supported (expected "
            f"{FORMAT_VERSION} or {FORMAT_VERSION_STEP_RULES})"
        )
    for key in ("files", "policy", "adaptation", "task_distribution"):
        if key not in meta:
            raise BundleError(f"{meta_path}: missing key {key!r}; the bundle is incomplete")
    for name, digest in meta["files"].items():
        f = path / name
        if not f.is_file():
            raise BundleError(f"bundle {str(path)!r} is incomplete: {name} is missing")
        actual = _sha256(f)
        if actual != digest:
            raise BundleError(
                f"bundle {str(path)!r}: checksum mismatch for {name} (meta.json says {digest[:12]}..., "
                f"file is {actual[:12]}...); the file was modified or corrupted - re-export the bundle"
            )
    if POLICY_FILE not in meta["files"]:
        raise BundleError(f"{meta_path}: files does not list {POLICY_FILE}")
    try:
        policy = keras.saving.load_model(path / POLICY_FILE, safe_mode=True, compile=False)
    except Exception as err:  # keras raises many types; the message is what matters
        raise BundleError(f"bundle {str(path)!r}: cannot load {POLICY_FILE}: {err}") from err
    if [list(s) for s in policy.parameter_shapes] != meta["policy"]["parameter_shapes"]:
        raise BundleError(f"bundle {str(path)!r}: policy shapes differ from meta.json")
    sizes = meta["adaptation"]["step_sizes"]
    if isinstance(sizes, dict):
        fname = sizes.get("file")
        if fname not in meta["files"]:
            raise BundleError(f"{meta_path}: step size file {fname!r} is not checksummed in files")
        blocks = sizes.get("blocks", 1)
        if not isinstance(blocks, int) or blocks < 1:
            raise BundleError(f"{meta_path}: step_sizes.blocks must be a positive integer")
        with np.load(path / fname, allow_pickle=False) as data:
            keys = _step_size_keys(policy.parameter_names, blocks)
            missing = [k for k in keys if k not in data]
            if missing:
                raise BundleError(f"{path / fname}: missing step sizes for {missing}")
            step_sizes: float | list[np.ndarray] = [np.asarray(data[k], np.float32) for k in keys]
        for s, shape, n in zip(step_sizes, policy.parameter_shapes * blocks, keys, strict=True):
            if tuple(s.shape) != tuple(shape):
                raise BundleError(
                    f"{path / fname}: step sizes of {n} have shape {s.shape}, expected {shape}"
                )
    else:
        step_sizes = float(sizes)
    shift = meta["adaptation"].get("log_std_shift")
    if shift is not None:
        expected = list(policy.parameter_shapes[LOG_STD])
        numeric = all(isinstance(x, (int, float)) and np.isfinite(x) for x in np.ravel(shift))
        if (
            policy.parameter_names[LOG_STD] != "log_std"
            or np.shape(shift) != tuple(expected)
            or not numeric
        ):
            raise BundleError(
                f"{meta_path}: adaptation.log_std_shift must be a list of {expected} floats for "
                f"a Gaussian policy's log_std, got {shift!r}"
            )
    for key in ("observation_spec", "action_spec"):
        if not isinstance(meta.get(key), dict) or "shape" not in meta[key]:
            raise BundleError(
                f"{meta_path}: missing {key} (shape and dtype); the bundle is incomplete"
            )
    if _horizon(meta) is None:
        raise BundleError(
            f"{meta_path}: task_distribution has no horizon (task_distribution.horizon or "
            "task_distribution.config.horizon); re-export the bundle"
        )
    return Bundle(path, path.name, meta, policy, step_sizes)


def _horizon(meta: dict[str, Any]) -> int | None:
    """The task distribution's horizon recorded in ``meta``: ``task_distribution.horizon``, or
    its ``config.horizon`` (bundles written before the horizon had its own field)."""
    td = meta["task_distribution"]
    horizon = td.get("horizon", td.get("config", {}).get("horizon"))
    return None if horizon is None else int(horizon)
