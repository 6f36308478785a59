"""The sampler: (weights per task, tasks) -> a padded ``EpisodeBatch``.

All ``tasks x episodes`` sub-environments step together; at every time step the policy runs ONE
batched computation for all tasks, each task with its own weights (``[tasks, ...]`` parameters,
a batched matmul). That per-step forward pass is :func:`metarl_tf.policy.numpy_forward`: for a
few hundred observations a TensorFlow call costs ~1 ms of fixed overhead, 10x the arithmetic,
and nothing is differentiated here (the losses recompute log-probabilities in TensorFlow from
the stored actions).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from metarl_tf.envs.base import Task, TaskDistribution
from metarl_tf.policy import GaussianMLPPolicy, numpy_forward


class EpisodeBatch(NamedTuple):
    """Episodes of several tasks, padded to a common length ``T``.

    Attributes:
        observations: ``[tasks, episodes, T, obs_dim]`` float32, the observation at step t.
        actions: ``[tasks, episodes, T, act_dim]`` float32, the sampled (unclipped) action.
        rewards: ``[tasks, episodes, T]`` float32.
        mask: ``[tasks, episodes, T]`` float32, 1 for real steps, 0 for padding.
    """

    observations: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    mask: np.ndarray

    @property
    def episode_returns(self) -> np.ndarray:
        """Undiscounted return of every episode, ``[tasks, episodes]``."""
        return np.sum(np.asarray(self.rewards) * np.asarray(self.mask), axis=-1)

    @property
    def num_steps(self) -> int:
        """Number of real (unpadded) environment steps."""
        return int(np.sum(self.mask))


class Sampler:
    """Collects ``episodes_per_task`` episodes per task with per-task policy weights.

    Args:
        dist: the task distribution (builds the batched env).
        policy: the policy; only its functional form and specs are used.
        episodes_per_task: episodes collected for every task.
    """

    def __init__(self, dist: TaskDistribution, policy: GaussianMLPPolicy, episodes_per_task: int):
        self.dist = dist
        self.policy = policy
        self.episodes_per_task = int(episodes_per_task)
        self.horizon = dist.horizon

    def sample(
        self, params, tasks: list[Task], seed: int, deterministic: bool = False
    ) -> EpisodeBatch:
        """Runs every sub-environment to the end of its episode (or the horizon).

        Args:
            params: per-task weights ``[tasks, *shape]``, or one shared set ``[*shape]``.
            tasks: the tasks, ``len(tasks)`` of them.
            seed: seeds the action noise; the same inputs and seed give the same batch.
            deterministic: take the mean action instead of sampling.
        """
        n_tasks, n_eps, horizon = len(tasks), self.episodes_per_task, self.horizon
        params = [np.asarray(p, np.float32) for p in params]
        if params[0].ndim == 2:  # shared weights: one copy per task
            params = [np.broadcast_to(p, (n_tasks, *p.shape)) for p in params]
        activation = self.policy.activation
        obs_dim = self.dist.observation_spec.shape[0]
        act_dim = self.dist.action_spec.shape[0]
        rng = np.random.default_rng(seed)
        noise = rng.standard_normal((horizon, n_tasks, n_eps, act_dim)).astype(np.float32)
        if deterministic:
            noise[:] = 0.0
        observations = np.zeros((horizon, n_tasks * n_eps, obs_dim), np.float32)
        actions = np.zeros((horizon, n_tasks * n_eps, act_dim), np.float32)
        rewards = np.zeros((horizon, n_tasks * n_eps), np.float32)
        mask = np.zeros((horizon, n_tasks * n_eps), np.float32)

        env = self.dist.make_batched_env(tasks, n_eps)
        env.seed(int(np.random.SeedSequence([seed, 1]).generate_state(1)[0]))  # initial states
        obs = env.reset()
        active = np.ones(n_tasks * n_eps, bool)
        for t in range(horizon):
            mean, log_std = numpy_forward(params, obs.reshape(n_tasks, n_eps, obs_dim), activation)
            act = (mean + np.exp(log_std) * noise[t]).reshape(n_tasks * n_eps, act_dim)
            step = env.step(act)
            observations[t], actions[t], mask[t] = obs, act, active
            rewards[t] = np.where(active, step.reward, 0.0)
            active = active & ~step.done
            obs = step.observation
            if not active.any():
                break

        def to_batch(x):  # [T, tasks * eps, ...] -> [tasks, eps, T, ...]
            x = x.reshape(horizon, n_tasks, n_eps, *x.shape[2:])
            return np.ascontiguousarray(np.moveaxis(x, 0, 2))

        return EpisodeBatch(
            to_batch(observations), to_batch(actions), to_batch(rewards), to_batch(mask)
        )


def pad_episodes(
    episodes, length: int | None = None, num_episodes: int | None = None
) -> EpisodeBatch:
    """Packs variable-length episodes of ONE task into an ``EpisodeBatch`` ``[1, E, T, ...]``.

    Padding (extra time steps, extra all-masked episodes) does not change any loss, baseline or
    advantage here, so callers can pad to fixed sizes and reuse one compiled function.

    Args:
        episodes: sequence of ``(observations [T_e, obs_dim], actions [T_e, act_dim],
            rewards [T_e])``.
        length: pad time to this length (default: the longest episode).
        num_episodes: pad to this many episodes (default: ``len(episodes)``).
    """
    if not episodes:
        raise ValueError("need at least one episode")
    length = length or max(len(r) for _, _, r in episodes)
    num_episodes = num_episodes or len(episodes)
    obs_dim = np.shape(episodes[0][0])[-1]
    act_dim = np.shape(episodes[0][1])[-1]
    obs = np.zeros((1, num_episodes, length, obs_dim), np.float32)
    act = np.zeros((1, num_episodes, length, act_dim), np.float32)
    rew = np.zeros((1, num_episodes, length), np.float32)
    mask = np.zeros((1, num_episodes, length), np.float32)
    for e, (o, a, r) in enumerate(episodes):
        t = len(r)
        if t > length:
            raise ValueError(f"episode {e} has {t} steps, more than the padded length {length}")
        obs[0, e, :t], act[0, e, :t], rew[0, e, :t], mask[0, e, :t] = o, a, r, 1.0
    return EpisodeBatch(obs, act, rew, mask)
