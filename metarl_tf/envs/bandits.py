"""Multi-armed Bernoulli bandits: a discrete task family (registry id ``bandit``).

A task is a ``k``-armed bandit with arm means ``p_1 .. p_k`` drawn independently from ``U[0, 1]``
(``{"means": [p_1, ..., p_k]}``). An episode is ``horizon`` pulls (default 10); pulling arm ``a``
pays 1 with probability ``p_a`` and 0 otherwise. There is no state: every observation is the
constant ``[1.0]`` (the MAML setting, where the policy adapts by gradient steps on the pulls it
made, not through memory). The action spec is ``BoundedTensorSpec((), int32, 0, k - 1)``.

For reference on a task: an oracle that always pulls the best arm earns ``horizon · max_a p_a``
in expectation, a uniformly random policy ``horizon · mean_a p_a``.
"""

from __future__ import annotations

from typing import Any

import gymnasium
import numpy as np

from metarl_tf.envs.base import (
    BatchedEnv,
    Task,
    TaskDistribution,
    TimeStep,
    discrete_actions,
    slice_of_batch,
)
from metarl_tf.specs import bounded_spec, tensor_spec


class BernoulliBanditBatch(BatchedEnv):
    """``len(means)`` bandits pulled together; ``means`` is ``[num_envs, k]``.

    Rewards come from one seeded generator for the whole batch (:meth:`seed`). A sub-env whose
    episode has ended reports reward 0 until ``reset``.
    """

    def __init__(self, means: np.ndarray, horizon: int, seed: int | None = 0):
        self.means = np.asarray(means, np.float64)
        if self.means.ndim != 2:
            raise ValueError(f"means must be [num_envs, k], got shape {self.means.shape}")
        self.num_envs, self.k = self.means.shape
        self.horizon = int(horizon)
        self.seed(seed)
        self.reset()

    def seed(self, seed: int | None, offset: int = 0, total: int | None = None) -> None:
        self.rng = np.random.default_rng(seed)
        self._total, self._rows = slice_of_batch(offset, total, self.num_envs)

    def _observation(self) -> np.ndarray:
        return np.ones((self.num_envs, 1), np.float32)

    def reset(self) -> np.ndarray:
        self.t = 0
        self.done = np.zeros(self.num_envs, bool)
        return self._observation()

    def step(self, actions: np.ndarray) -> TimeStep:
        arms = discrete_actions(actions, self.num_envs, self.k)
        p = self.means[np.arange(self.num_envs), arms]
        pays = self.rng.random(self._total)[self._rows] < p  # this slice's draws
        reward = np.where(self.done, 0.0, pays).astype(np.float32)
        self.t += 1
        self.done = self.done | (self.t >= self.horizon)
        return TimeStep(self._observation(), reward, self.done.copy())


class BernoulliBandit(TaskDistribution):
    """``k``-armed Bernoulli bandits with arm means ``~ U[0, 1]``; a task is ``{"means": [...]}``.

    Args:
        k: number of arms (default 5).
        horizon: pulls per episode (default 10).
    """

    name = "bandit"

    def __init__(self, k: int = 5, horizon: int = 10):
        if int(k) < 2:
            raise ValueError(f"a bandit needs k >= 2 arms, got {k}")
        self.k = int(k)
        self.horizon = int(horizon)

    def config(self) -> dict[str, Any]:
        return {"k": self.k, "horizon": self.horizon}

    @property
    def observation_spec(self):
        return tensor_spec((1,), np.float32, name="observation")

    @property
    def action_spec(self):
        return bounded_spec((), np.int32, minimum=0, maximum=self.k - 1, name="action")

    def sample_tasks(self, n: int, seed: int | None) -> list[Task]:
        means = np.random.default_rng(seed).uniform(0.0, 1.0, size=(n, self.k))
        return [{"means": [float(m) for m in row]} for row in means]

    def make_batched_env(self, tasks: list[Task], episodes_per_task: int) -> BernoulliBanditBatch:
        means = np.array([t["means"] for t in tasks], np.float64)
        if means.ndim != 2 or means.shape[1] != self.k:
            raise ValueError(f"every task needs {self.k} arm means, got shape {means.shape}")
        return BernoulliBanditBatch(np.repeat(means, episodes_per_task, 0), self.horizon)

    @staticmethod
    def oracle_return(task: Task, horizon: int) -> float:
        """Expected return of always pulling the best arm."""
        return float(horizon * max(task["means"]))

    @staticmethod
    def random_return(task: Task, horizon: int) -> float:
        """Expected return of pulling uniformly at random."""
        return float(horizon * np.mean(task["means"]))


class BernoulliBanditEnv(gymnasium.Env):
    """Single-task gymnasium view: ``gymnasium.make("metarl_tf/BernoulliBandit-v0",
    task={"means": [...]})``; without a task, one is sampled at each ``reset(seed=...)``.
    Rewards use the env's ``np_random``-derived generator (seeded by ``reset(seed=...)``)."""

    metadata = {"render_modes": []}

    def __init__(self, task: Task | None = None, k: int = 5, horizon: int = 10):
        self.task = task
        self.k = len(task["means"]) if task is not None else int(k)
        self.horizon = int(horizon)
        self.observation_space = gymnasium.spaces.Box(0.0, 1.0, (1,), np.float32)
        self.action_space = gymnasium.spaces.Discrete(self.k)
        self._batch: BernoulliBanditBatch | None = None

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        task = self.task
        if task is None:
            task = BernoulliBandit(self.k).sample_tasks(1, int(self.np_random.integers(2**31)))[0]
        self._batch = BernoulliBanditBatch(
            np.array([task["means"]]), self.horizon, int(self.np_random.integers(2**31))
        )
        return self._batch.reset()[0], {"task": task}

    def step(self, action):
        if self._batch is None:
            raise RuntimeError("call reset() before step()")
        ts = self._batch.step(np.array([int(action)]))
        return ts.observation[0], float(ts.reward[0]), False, bool(ts.done[0]), {}
