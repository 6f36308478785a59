"""Navigation2D: the 2D point-robot task family of the MAML paper (Finn et al., 2017, Sec. 5.3).

A point starts at the origin and moves by its (clipped) velocity action; the reward is minus the
Euclidean distance to the task's goal *after* the move. Goals are uniform in ``[-0.5, 0.5]^2``.
An episode ends when the point is within 0.01 of the goal, or after ``horizon`` steps (100).

``action_scale`` multiplies the action before the clip: the paper's reference code (cbfinn/maml_rl,
``maml_examples/maml_trpo_point.py``) wraps the point env in rllab's ``normalize``, which maps a
policy action in ``[-1, 1]`` to the velocity ``0.1 * a`` (clipped to ``[-0.1, 0.1]``), i.e.
``action_scale=0.1``. The default ``1.0`` is pytorch-maml-rl's: the action is the velocity.
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
    check_action_scale,
)
from metarl_tf.specs import bounded_spec, tensor_spec

MAX_SPEED = 0.1  # per axis, per step
GOAL_RADIUS = 0.01  # success distance
GOAL_LOW, GOAL_HIGH = -0.5, 0.5


class Navigation2DBatch(BatchedEnv):
    """``len(goals)`` point robots stepped together; ``goals`` is ``[num_envs, 2]``.

    A sub-env whose episode has ended keeps its position and reports reward 0 until ``reset``;
    samplers mask those steps out anyway.
    """

    def __init__(
        self,
        goals: np.ndarray,
        horizon: int,
        include_goal: bool = False,
        action_scale: float = 1.0,
    ):
        self.goals = np.asarray(goals, dtype=np.float32).reshape(-1, 2)
        self.num_envs = len(self.goals)
        self.horizon = horizon
        self.include_goal = include_goal
        self.action_scale = np.float32(action_scale)
        self.reset()

    def _observation(self) -> np.ndarray:
        if self.include_goal:
            return np.concatenate([self.position, self.goals], axis=1)
        return self.position.copy()

    def reset(self) -> np.ndarray:
        self.position = np.zeros((self.num_envs, 2), dtype=np.float32)
        self.done = np.zeros(self.num_envs, dtype=bool)
        self.t = 0
        return self._observation()

    def step(self, actions: np.ndarray) -> TimeStep:
        velocity = np.asarray(actions, dtype=np.float32) * self.action_scale
        velocity = np.clip(velocity, -MAX_SPEED, MAX_SPEED)
        active = ~self.done
        self.position = np.where(active[:, None], self.position + velocity, self.position)
        offset = self.position - self.goals
        distance = np.sqrt(np.einsum("ij,ij->i", offset, offset))  # 2x faster than linalg.norm
        reward = np.where(active, -distance, 0.0).astype(np.float32)
        self.t += 1
        self.done = self.done | (distance < GOAL_RADIUS) | (self.t >= self.horizon)
        return TimeStep(self._observation(), reward, self.done.copy())


class Navigation2D(TaskDistribution):
    """Goals uniform in ``[-0.5, 0.5]^2``; a task is ``{"goal": [x, y]}``.

    Args:
        horizon: maximum episode length (the paper uses 100).
        include_goal: append the goal to the observation (the *oracle* variant).
        action_scale: velocity = clip(action_scale * action, ±0.1); 0.1 = the paper's reference
            code (actions normalized to [-1, 1]), 1.0 = pytorch-maml-rl's.
    """

    name = "nav2d"

    def __init__(self, horizon: int = 100, include_goal: bool = False, action_scale: float = 1.0):
        self.horizon = int(horizon)
        self.include_goal = bool(include_goal)
        self.action_scale = check_action_scale(action_scale)

    def config(self) -> dict[str, Any]:
        config = {"horizon": self.horizon, "include_goal": self.include_goal}
        if self.action_scale != 1.0:  # bundles written before the option keep their config
            config["action_scale"] = self.action_scale
        return config

    @property
    def observation_spec(self):
        dim = 4 if self.include_goal else 2
        return tensor_spec((dim,), np.float32, name="observation")

    @property
    def action_spec(self):
        bound = MAX_SPEED / self.action_scale
        return bounded_spec((2,), np.float32, minimum=-bound, maximum=bound, name="action")

    def sample_tasks(self, n: int, seed: int | None) -> list[Task]:
        rng = np.random.default_rng(seed)
        goals = rng.uniform(GOAL_LOW, GOAL_HIGH, size=(n, 2))
        return [{"goal": [float(x), float(y)]} for x, y in goals]

    def make_batched_env(self, tasks: list[Task], episodes_per_task: int) -> Navigation2DBatch:
        goals = np.repeat(np.array([t["goal"] for t in tasks], np.float32), episodes_per_task, 0)
        return Navigation2DBatch(goals, self.horizon, self.include_goal, self.action_scale)


class Navigation2DEnv(gymnasium.Env):
    """Single-task gymnasium view of Navigation2D: ``gymnasium.make("metarl_tf/Navigation2D-v0",
    task={"goal": [0.3, -0.2]})``. Without a task, one is sampled at each ``reset(seed=...)``."""

    metadata = {"render_modes": []}

    def __init__(self, task: Task | None = None, horizon: int = 100, action_scale: float = 1.0):
        self.task = task
        self.horizon = horizon
        self.action_scale = check_action_scale(action_scale)
        bound = MAX_SPEED / self.action_scale
        self.observation_space = gymnasium.spaces.Box(-np.inf, np.inf, (2,), np.float32)
        self.action_space = gymnasium.spaces.Box(-bound, bound, (2,), np.float32)
        self._batch: Navigation2DBatch | None = None

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        task = self.task
        if task is None:
            task = Navigation2D().sample_tasks(1, int(self.np_random.integers(2**31)))[0]
        self._batch = Navigation2DBatch(
            np.array([task["goal"]]), self.horizon, action_scale=self.action_scale
        )
        return self._batch.reset()[0], {"task": task}

    def step(self, action):
        if self._batch is None:
            raise RuntimeError("call reset() before step()")
        ts = self._batch.step(np.asarray(action, np.float32)[None])
        distance = -float(ts.reward[0])
        terminated = distance < GOAL_RADIUS
        truncated = bool(ts.done[0]) and not terminated
        return ts.observation[0], float(ts.reward[0]), terminated, truncated, {}
