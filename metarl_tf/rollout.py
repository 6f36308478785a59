"""The sampler: (weights per task, tasks) -> a padded ``EpisodeBatch``.

All ``tasks x episodes`` sub-environments step together; at every time step the policy runs ONE
batched computation for all tasks, each task with its own weights (``[tasks, ...]`` parameters,
a batched matmul). That per-step forward pass is numpy (``policy.numpy_act``, built on
:func:`metarl_tf.policy.numpy_forward` / ``numpy_mlp``): for a few hundred observations a
TensorFlow call costs ~1 ms of fixed overhead, 10x the arithmetic, and nothing is differentiated
here (the losses recompute log-probabilities in TensorFlow from
the stored actions). The policy draws its own per-step noise (``sample_noise``: Gaussian
noise, or uniform numbers for inverse-CDF sampling of a categorical policy) from the sampler's
seeded RNG, and turns observations and noise into actions (``numpy_act``).

Discrete actions are stored float-encoded (``[..., 1]`` float32 holding the index, see
:mod:`metarl_tf.policy`) and handed to the env as integers ``[num_envs]``.
"""

from __future__ import annotations

import numpy as np

from metarl_tf.envs.base import Task, TaskDistribution
from metarl_tf.episodes import EpisodeBatch
from metarl_tf.policy import GaussianMLPPolicy
from metarl_tf.specs import is_discrete_spec


class Sampler:
    """Collects ``episodes_per_task`` episodes per task with per-task policy weights.

    Args:
        dist: the task distribution (builds the batched env).
        policy: the policy; only its functional form and specs are used.
        episodes_per_task: episodes collected for every task.
    """

    def __init__(self, dist: TaskDistribution, policy: GaussianMLPPolicy, episodes_per_task: int):
        # policy: GaussianMLPPolicy or CategoricalMLPPolicy (anything with act_dim, sample_noise,
        # numpy_act)
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
            seed: seeds the action noise and the env's own randomness (``BatchedEnv.seed``); the
                same inputs and seed give the same batch.
            deterministic: take the mean (Gaussian) or most likely (categorical) action instead
                of sampling.
        """
        n_tasks, n_eps, horizon = len(tasks), self.episodes_per_task, self.horizon
        params = [np.asarray(p, np.float32) for p in params]
        if params[0].ndim == 2:  # shared weights: one copy per task
            params = [np.broadcast_to(p, (n_tasks, *p.shape)) for p in params]
        policy = self.policy
        obs_dim = self.dist.observation_spec.shape[0]
        act_dim = policy.act_dim
        discrete = is_discrete_spec(self.dist.action_spec)
        rng = np.random.default_rng(seed)
        noise = policy.sample_noise(rng, (horizon, n_tasks, n_eps))
        env_seed = int(rng.integers(2**31))  # drawn after the noise: the noise does not change
        observations = np.zeros((horizon, n_tasks * n_eps, obs_dim), np.float32)
        actions = np.zeros((horizon, n_tasks * n_eps, act_dim), np.float32)
        rewards = np.zeros((horizon, n_tasks * n_eps), np.float32)
        mask = np.zeros((horizon, n_tasks * n_eps), np.float32)

        env = self.dist.make_batched_env(tasks, n_eps)
        env.seed(env_seed)
        obs = env.reset()
        active = np.ones(n_tasks * n_eps, bool)
        for t in range(horizon):
            act = policy.numpy_act(
                params, obs.reshape(n_tasks, n_eps, obs_dim), noise[t], deterministic
            ).reshape(n_tasks * n_eps, act_dim)
            step = env.step(act[:, 0].astype(np.int64) if discrete else act)
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
