"""The meta-initialization bundle: ``saved_models/<name>/`` (DESIGN.md, "The bundle").

Files:
    policy.keras     Keras 3 model holding θ (loads with ``safe_mode=True``).
    meta.json        format version, task distribution, specs, policy and adaptation config
                     (with ``adaptation.log_std_shift``, a list of ``action_dim`` floats, when
                     trained with ``--log-std-shift``), training summary, and the sha256 of every
                     other file.
    step_sizes.npz   Meta-SGD step sizes, when learned (``allow_pickle=False``).

No pickle anywhere. :func:`load_bundle` validates a bundle with
:func:`metarl_tf.bundle_schema.validate_bundle` (schema, ranges, files confined to the bundle,
checksums) and refuses one that fails. :func:`save_bundle` writes beside the destination and swaps
the new bundle in atomically (:mod:`metarl_tf.atomic_files`); it replaces only a bundle, never
other files (:func:`check_bundle_target`).
"""

from __future__ import annotations

import datetime
import functools
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

from metarl_tf.atomic_files import (
    check_writable,
    fsync_tree,
    recover_directory,
    replace_directory,
    temporary_sibling,
)
from metarl_tf.bundle_schema import (
    FORMAT_VERSION,
    FORMAT_VERSION_STEP_RULES,
    META_FILE,
    POLICY_FILE,
    STEP_SIZES_FILE,
    BundleError,
    check_against_distribution,
    is_project_bundle,
    sha256_of,
    validate_bundle,
)
from metarl_tf.episodes import pad_episodes
from metarl_tf.maml import Adapter, StepRule, step_size_blocks
from metarl_tf.policy import CategoricalMLPPolicy, GaussianMLPPolicy
from metarl_tf.specs import spec_from_json, spec_to_json

if TYPE_CHECKING:  # a bundle builds its task distribution only when asked
    from metarl_tf.envs import TaskDistribution

__all__ = [
    "FORMAT_VERSION",
    "FORMAT_VERSION_STEP_RULES",
    "META_FILE",
    "POLICY_FILE",
    "STEP_SIZES_FILE",
    "AdaptedPolicy",
    "Bundle",
    "BundleError",
    "check_bundle_target",
    "load_bundle",
    "save_bundle",
]


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
        (``meta.json``'s ``task_distribution``; this imports the environments), after checking
        that ``meta.json``'s specs are its own; :class:`BundleError` if not."""
        from metarl_tf.envs import make_task_distribution

        td = self.meta["task_distribution"]
        where = str(self.path / META_FILE)
        try:
            dist = make_task_distribution(td["name"], **td.get("config", {}))
        except (TypeError, ValueError) as err:
            raise BundleError(f"{where}: task_distribution {td!r}: {err}") from None
        try:
            specs = spec_to_json(dist.observation_spec), spec_to_json(dist.action_spec)
        except ImportError:  # an optional extra (Meta-World) builds the specs: checked where it is
            specs = None
        if specs is not None:  # meta.json's specs, which the bundle uses, are the distribution's
            check_against_distribution(self.meta, *specs, where)
        return dist

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
        return sha256_of(self.path / META_FILE)

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


def check_bundle_target(path: str | os.PathLike) -> Path:
    """Refuses a bundle destination that holds anything but a bundle of this project: an
    existing file or link, or a non-empty directory without our ``meta.json``. A new bundle
    replaces the old one there; nothing else is ever deleted. Returns ``path``."""
    path = Path(path)
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise BundleError(
            f"refusing to write a bundle to {str(path)!r}: it exists and is not a directory; "
            "choose a new directory (an existing one is replaced only if it holds a bundle)"
        )
    if path.is_dir() and any(path.iterdir()) and not is_project_bundle(path):
        raise BundleError(
            f"refusing to write a bundle to {str(path)!r}: the directory is not empty and holds "
            f"no metarl-tf bundle (no valid {META_FILE}); nothing was changed - choose a new or "
            "empty directory"
        )
    return path


def check_bundle_destination(path: str | os.PathLike) -> Path:
    """:func:`check_bundle_target`, plus that its parent directory can be written (created if
    needed): what a long run checks before it starts. Raises ``OSError`` naming the directory."""
    path = check_bundle_target(path)
    check_writable(path.parent)
    return path


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
    """Writes a bundle into a temporary directory beside ``path``, then puts it in place of the
    old one in one atomic step: ``path`` always holds the old bundle or the new one. Raises
    :class:`BundleError` if ``path`` holds anything but a bundle (:func:`check_bundle_target`),
    ``OSError`` if a write fails (nothing at ``path`` changed then).

    Args:
        adaptation: ``steps``, ``gamma``, ``gae_lambda``, ``baseline`` (and anything else worth
            recording, e.g. ``first_order``).
        training: free-form training summary (config, iterations, final returns, wall-clock).
        extra_files: ``{name in bundle: source path}`` copied in and checksummed (e.g. the
            training run's ``metrics.jsonl``).
    """
    path = check_bundle_target(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_directory(path)  # what an interrupted earlier write left beside it
    tmp = Path(tempfile.mkdtemp(prefix=temporary_sibling(path), dir=path.parent))
    try:
        _write_bundle_files(
            tmp, path.name, policy, step_sizes, task_distribution, adaptation, training, extra_files
        )
        fsync_tree(tmp)
        replace_directory(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _write_bundle_files(
    tmp, name, policy, step_sizes, task_distribution, adaptation, training, extra_files
) -> None:
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
    for file_name, src in (extra_files or {}).items():
        shutil.copyfile(src, tmp / file_name)
        files.append(file_name)
    meta = {
        "format_version": FORMAT_VERSION_STEP_RULES if step_rules else FORMAT_VERSION,
        "name": name,
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
        "files": {f: sha256_of(tmp / f) for f in files},
    }
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def load_bundle(path: str | os.PathLike) -> Bundle:
    """Loads and verifies a bundle (:func:`metarl_tf.bundle_schema.validate_bundle`, then the
    policy and the step sizes); raises :class:`BundleError` saying what is wrong. The task
    distribution is not built here (:meth:`Bundle.make_task_distribution` builds it and checks
    the specs against its own), so loading a bundle imports no environment."""
    path = Path(path)
    old = path.parent / f".{path.name}.old"
    if not path.exists() and old.is_dir():
        raise BundleError(
            f"bundle {str(path)!r} is missing, but {old} holds its previous version (a write "
            "was interrupted); writing the bundle again restores it, or rename it yourself"
        )
    meta = validate_bundle(path)
    meta_path = path / META_FILE
    try:
        policy = keras.saving.load_model(path / POLICY_FILE, safe_mode=True, compile=False)
    except Exception as err:  # keras raises many types; the message is what matters
        raise BundleError(f"bundle {str(path)!r}: cannot load {POLICY_FILE}: {err}") from err
    if [list(s) for s in policy.parameter_shapes] != meta["policy"]["parameter_shapes"]:
        raise BundleError(f"bundle {str(path)!r}: policy shapes differ from meta.json")
    if type(policy).__name__ != meta["policy"]["class"]:
        raise BundleError(
            f"bundle {str(path)!r}: {POLICY_FILE} holds a {type(policy).__name__}, meta.json "
            f"says {meta['policy']['class']}"
        )
    sizes = meta["adaptation"]["step_sizes"]
    if isinstance(sizes, dict):
        fname = sizes["file"]
        blocks = sizes.get("blocks", 1)
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
