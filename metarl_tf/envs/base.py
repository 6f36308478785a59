"""The task-distribution protocol: what a meta-RL environment family provides.

A *task distribution* samples tasks (plain, JSON-serializable parameter dicts) and builds a
*batched environment* that steps ``tasks x episodes`` sub-environments at once, each with its own
task parameters, in one vectorized numpy call (no Python loop over sub-environments).

Envs know nothing about policies: actions come in as arrays, observations go out as arrays.
"""

from __future__ import annotations

import abc
from typing import Any, NamedTuple

import numpy as np

from metarl_tf.specs import action_spec_problem, is_discrete_spec

Task = dict[str, Any]


def check_action_scale(action_scale: float) -> float:
    """``action_scale`` as a float; a ``ValueError`` unless it is finite and positive (the task
    option that multiplies a policy's action before the env's clip)."""
    action_scale = float(action_scale)
    if not (np.isfinite(action_scale) and action_scale > 0):
        raise ValueError(f"action_scale must be a positive number, got {action_scale}")
    return action_scale


class RecoverableSamplingError(RuntimeError):
    """A sampling worker was lost while stepping sub-envs (and is being restarted); sampling the
    batch again may succeed (:class:`metarl_tf.rollout.Sampler` does)."""


def discrete_actions(actions, num_envs: int, num_actions: int) -> np.ndarray:
    """Checks and converts discrete ``actions`` (``[num_envs]`` or ``[num_envs, 1]``, integer
    values, possibly float-encoded) to int64 ``[num_envs]``; ``ValueError`` otherwise."""
    a = np.asarray(actions)
    if a.size != num_envs:
        raise ValueError(f"expected {num_envs} discrete actions, got shape {a.shape}")
    a = a.reshape(num_envs)
    if not np.issubdtype(a.dtype, np.integer):
        if not np.all(np.isfinite(a)) or np.any(a != np.round(a)):
            raise ValueError("discrete actions must be integers (action indices)")
        a = np.round(a)
    a = a.astype(np.int64)
    if a.min() < 0 or a.max() >= num_actions:
        raise ValueError(
            f"discrete actions must be in [0, {num_actions - 1}], got {a.min()} .. {a.max()}"
        )
    return a


def slice_of_batch(offset: int, total: int | None, num_envs: int) -> tuple[int, slice]:
    """``(total, rows)`` of ``num_envs`` sub-envs that are sub-envs ``offset ..`` of a batch of
    ``total`` (``None``: the whole batch): a batched env that draws its randomness for the whole
    batch keeps ``rows`` of it (:meth:`BatchedEnv.seed`). ``ValueError`` when they do not fit."""
    total = num_envs if total is None else int(total)
    offset = int(offset)
    if offset < 0 or offset + num_envs > total:
        raise ValueError(
            f"sub-envs {offset} .. {offset + num_envs - 1} are not in a batch of {total}"
        )
    return total, slice(offset, offset + num_envs)


class TimeStep(NamedTuple):
    """One step of a batched environment; every field has a leading ``[num_envs]`` axis.

    Attributes:
        observation: ``[num_envs, obs_dim]`` float32, the observation after the step.
        reward: ``[num_envs]`` float32, the reward of the transition.
        done: ``[num_envs]`` bool, the episode ended with this transition (terminated or
            truncated by the horizon).
    """

    observation: np.ndarray
    reward: np.ndarray
    done: np.ndarray


class BatchedEnv(abc.ABC):
    """``num_envs`` sub-environments stepped together; sub-env ``i`` runs task ``task_index[i]``."""

    num_envs: int

    @abc.abstractmethod
    def reset(self) -> np.ndarray:
        """Starts a new episode in every sub-environment; returns ``[num_envs, obs_dim]``."""

    @abc.abstractmethod
    def step(self, actions: np.ndarray) -> TimeStep:
        """Applies ``actions [num_envs, act_dim]`` (unclipped; the env clips) to every sub-env;
        for a discrete action spec (scalar integer), integer ``actions [num_envs]``."""

    def seed(  # noqa: B027 (optional hook, no-op by default)
        self, seed: int | None, offset: int = 0, total: int | None = None
    ) -> None:
        """Seeds the env's own randomness (stochastic rewards, random initial states) for the
        following episodes. Deterministic envs need not override it; the sampler calls it
        before every ``reset``.

        ``offset`` and ``total``: these ``num_envs`` sub-envs are sub-envs ``offset ..
        offset + num_envs - 1`` of a batch of ``total`` (default ``num_envs``) split across
        workers; each sub-env then draws exactly the numbers it would draw in the whole batch,
        so a batch is the same however it is split (:mod:`metarl_tf.envs.ray_backend`)."""


class EpisodeArrays(NamedTuple):
    """A batched env's episodes, time-major: ``observations [T, num_envs, obs_dim]``,
    ``actions [T, num_envs, act_dim]``, ``rewards [T, num_envs]`` and ``mask [T, num_envs]``
    (1 while the sub-env's episode runs); every entry after an episode's end is 0."""

    observations: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    mask: np.ndarray


def run_episodes(env: BatchedEnv, choose, horizon: int, discrete: bool = False) -> EpisodeArrays:
    """Resets ``env`` (seed it first) and steps every sub-env to the end of its episode or to
    ``horizon`` steps, with ``choose(t, observations [num_envs, obs_dim]) -> actions
    [num_envs, act_dim]`` float32 (integer action indices float-encoded when ``discrete``).

    The loop stops once every episode has ended; entries after an episode's end are 0, so a batch
    stepped in slices (each slice's loop stopping on its own) equals the batch stepped whole.
    """
    obs = np.asarray(env.reset(), np.float32)
    n = obs.shape[0]
    observations = actions = None
    rewards = np.zeros((horizon, n), np.float32)
    mask = np.zeros((horizon, n), np.float32)
    active = np.ones(n, bool)
    for t in range(horizon):
        act = np.asarray(choose(t, obs), np.float32)
        if observations is None:
            observations = np.zeros((horizon, n, obs.shape[1]), np.float32)
            actions = np.zeros((horizon, n, act.shape[1]), np.float32)
        step = env.step(act[:, 0].astype(np.int64) if discrete else act)
        observations[t], actions[t], mask[t] = obs, act, active
        rewards[t] = np.where(active, step.reward, 0.0)
        active = active & ~np.asarray(step.done, bool)
        obs = np.asarray(step.observation, np.float32)
        if not active.any():
            break
    ended = mask == 0.0
    observations[ended] = 0.0
    actions[ended] = 0.0
    return EpisodeArrays(observations, actions, rewards, mask)


class TaskDistribution(abc.ABC):
    """A family of tasks. Subclasses set ``name``, the specs and ``horizon``.

    Attributes:
        name: registry id, e.g. ``"nav2d"``.
        observation_spec: a ``tf.TensorSpec`` of one observation (:mod:`metarl_tf.specs`).
        action_spec: a ``BoundedTensorSpec`` of one action (bounds = clipping range), continuous
            or discrete (:mod:`metarl_tf.specs`).
        horizon: the maximum episode length.
    """

    name: str
    horizon: int

    @property
    @abc.abstractmethod
    def observation_spec(self):
        """``tf.TensorSpec`` of one observation (:func:`metarl_tf.specs.tensor_spec`)."""

    @property
    @abc.abstractmethod
    def action_spec(self):
        """``BoundedTensorSpec`` of one action (:func:`metarl_tf.specs.bounded_spec`)."""

    @abc.abstractmethod
    def sample_tasks(self, n: int, seed: int | None) -> list[Task]:
        """Samples ``n`` tasks; the same ``seed`` gives the same tasks."""

    @abc.abstractmethod
    def make_batched_env(self, tasks: list[Task], episodes_per_task: int) -> BatchedEnv:
        """A batched env of ``len(tasks) * episodes_per_task`` sub-envs, task-major order."""

    def config(self) -> dict[str, Any]:
        """Constructor arguments, JSON-serializable, so the distribution can be rebuilt."""
        return {}

    def in_process(self) -> TaskDistribution:
        """The distribution as a sampling worker holds it: it steps every sub-env in this process
        (no worker processes of its own) and may reuse its envs from one batched env to the
        next, so only one of its batched envs is in use at a time. Default: itself."""
        return self


def check_task_distribution(dist: TaskDistribution, n_tasks: int = 3, episodes: int = 2) -> None:
    """Checks that ``dist`` follows the protocol; raises ``ValueError`` saying what to fix.

    Meant for implementers of a new task distribution (compare Stable-Baselines3's env checker).
    """
    import json

    problems: list[str] = []
    name = type(dist).__name__
    obs_spec, act_spec = dist.observation_spec, dist.action_spec
    if len(obs_spec.shape) != 1:
        problems.append(f"observation_spec must be rank 1 [obs_dim], got shape {obs_spec.shape}")
    discrete = is_discrete_spec(act_spec)
    if problem := action_spec_problem(act_spec, "action_spec"):
        problems.append(problem)
    if not isinstance(getattr(dist, "horizon", None), int) or dist.horizon < 1:
        problems.append(f"horizon must be a positive int, got {getattr(dist, 'horizon', None)!r}")
    tasks = dist.sample_tasks(n_tasks, seed=0)
    if not isinstance(tasks, list) or len(tasks) != n_tasks:
        problems.append(f"sample_tasks({n_tasks}, seed=0) must return a list of {n_tasks} tasks")
    else:
        try:
            json.dumps(tasks)
        except TypeError as err:
            problems.append(f"tasks must be JSON-serializable (plain floats/lists): {err}")
        else:  # only comparable once serializable: `!=` on numpy-array tasks would itself raise
            if tasks != dist.sample_tasks(n_tasks, seed=0):
                problems.append("sample_tasks is not reproducible: the same seed gave other tasks")
    if problems:
        raise ValueError(
            f"{name} does not follow the TaskDistribution protocol:\n- " + "\n- ".join(problems)
        )

    env = dist.make_batched_env(tasks, episodes)
    num_envs = n_tasks * episodes
    if env.num_envs != num_envs:
        problems.append(
            f"make_batched_env(tasks, {episodes}).num_envs is {env.num_envs}, expected {num_envs}"
        )
    obs = np.asarray(env.reset())
    expected_obs = (num_envs, *obs_spec.shape)
    if obs.shape != expected_obs:
        problems.append(f"reset() returned shape {obs.shape}, expected {expected_obs}")
    if obs.dtype != np.float32:
        problems.append(f"reset() returned dtype {obs.dtype}, expected float32")
    low = np.broadcast_to(act_spec.minimum, act_spec.shape)
    high = np.broadcast_to(act_spec.maximum, act_spec.shape)
    rng = np.random.default_rng(0)
    for _ in range(min(dist.horizon, 5)):
        if discrete:  # integer actions [num_envs], every action index possible
            actions = rng.integers(int(low), int(high) + 1, size=num_envs)
        else:
            actions = rng.uniform(low, high, size=(num_envs, *act_spec.shape)).astype(np.float32)
        ts = env.step(actions)
        if not isinstance(ts, TimeStep):
            problems.append(f"step() must return a TimeStep, got {type(ts).__name__}")
            break
        if ts.observation.shape != expected_obs:
            problems.append(
                f"step() observation shape {ts.observation.shape}, expected {expected_obs}"
            )
        if np.shape(ts.reward) != (num_envs,):
            problems.append(f"step() reward shape {np.shape(ts.reward)}, expected ({num_envs},)")
        if np.shape(ts.done) != (num_envs,):
            problems.append(f"step() done shape {np.shape(ts.done)}, expected ({num_envs},)")
        if not np.all(np.isfinite(ts.observation)) or not np.all(np.isfinite(ts.reward)):
            problems.append("step() returned NaN or inf in observation or reward")
        if problems:
            break
    if problems:
        raise ValueError(
            f"{name} does not follow the TaskDistribution protocol:\n- " + "\n- ".join(problems)
        )
