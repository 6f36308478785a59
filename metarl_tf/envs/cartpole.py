"""CartPole with task-varied physics (registry id ``cartpole``).

The dynamics are those of gymnasium's ``CartPoleEnv`` (Barto, Sutton & Anderson, 1983; Euler
integration, ``tau = 0.02`` s, force ±10 N, gravity 9.8), vectorized in numpy over ``tasks x
episodes`` sub-envs. A task sets the pole's half-length, the pole's mass and the cart's mass:
each is its gymnasium default (0.5 m, 0.1 kg, 1.0 kg) times a factor drawn uniformly from
``[0.5, 2.0]`` independently (``{"length": ..., "masspole": ..., "masscart": ...}``).

As in gymnasium: the observation is ``[x, x_dot, theta, theta_dot]``, the start state is uniform
in ``[-0.05, 0.05]^4`` (from the batch's seeded generator), action 0 pushes left and 1 right, the
reward is +1 for every step including the one that ends the episode, and the episode terminates
when ``|x| > 2.4`` or ``|theta| > 12°``; it is also cut at ``horizon`` steps (default 200).
``tests/test_cartpole.py`` checks the dynamics step for step against ``gymnasium.make("CartPole-v1")``
with the same parameters.
"""

from __future__ import annotations

import math
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

GRAVITY = 9.8
FORCE_MAG = 10.0
TAU = 0.02
THETA_LIMIT = 12 * 2 * math.pi / 360
X_LIMIT = 2.4
DEFAULTS = {"length": 0.5, "masspole": 0.1, "masscart": 1.0}
SCALE_LOW, SCALE_HIGH = 0.5, 2.0


class CartPoleBatch(BatchedEnv):
    """``num_envs`` cart-poles stepped together, each with its own ``length`` (half the pole's
    length), ``masspole`` and ``masscart`` (arrays ``[num_envs]``). The state is float64
    ``[num_envs, 4]``; a sub-env whose episode has ended keeps its state and reports reward 0."""

    def __init__(self, length, masspole, masscart, horizon: int, seed: int | None = 0):
        self.length = np.asarray(length, np.float64).reshape(-1)
        self.masspole = np.asarray(masspole, np.float64).reshape(-1)
        self.masscart = np.asarray(masscart, np.float64).reshape(-1)
        self.num_envs = len(self.length)
        if not (len(self.masspole) == len(self.masscart) == self.num_envs):
            raise ValueError("length, masspole and masscart must have one entry per sub-env")
        self.horizon = int(horizon)
        self.seed(seed)
        self.reset()

    def seed(self, seed: int | None, offset: int = 0, total: int | None = None) -> None:
        self.rng = np.random.default_rng(seed)
        self._total, self._rows = slice_of_batch(offset, total, self.num_envs)

    def reset(self) -> np.ndarray:
        self.state = self.rng.uniform(-0.05, 0.05, size=(self._total, 4))[self._rows]
        self.t = 0
        self.done = np.zeros(self.num_envs, bool)
        self.terminated = np.zeros(self.num_envs, bool)
        return self.state.astype(np.float32)

    def step(self, actions: np.ndarray) -> TimeStep:
        push = discrete_actions(actions, self.num_envs, 2)
        force = np.where(push == 1, FORCE_MAG, -FORCE_MAG)
        x, x_dot, theta, theta_dot = self.state.T
        cos, sin = np.cos(theta), np.sin(theta)
        total_mass = self.masspole + self.masscart
        polemass_length = self.masspole * self.length
        temp = (force + polemass_length * np.square(theta_dot) * sin) / total_mass
        theta_acc = (GRAVITY * sin - cos * temp) / (
            self.length * (4.0 / 3.0 - self.masspole * np.square(cos) / total_mass)
        )
        x_acc = temp - polemass_length * theta_acc * cos / total_mass
        new_state = np.stack(
            [
                x + TAU * x_dot,
                x_dot + TAU * x_acc,
                theta + TAU * theta_dot,
                theta_dot + TAU * theta_acc,
            ],
            axis=1,
        )
        active = ~self.done
        self.state = np.where(active[:, None], new_state, self.state)
        x, theta = self.state[:, 0], self.state[:, 2]
        failed = (x < -X_LIMIT) | (x > X_LIMIT) | (theta < -THETA_LIMIT) | (theta > THETA_LIMIT)
        reward = active.astype(np.float32)
        self.t += 1
        self.terminated = self.terminated | (active & failed)
        self.done = self.done | failed | (self.t >= self.horizon)
        return TimeStep(self.state.astype(np.float32), reward, self.done.copy())


class CartPoleVaried(TaskDistribution):
    """CartPole tasks with pole length, pole mass and cart mass each scaled by ``U[0.5, 2]``.

    Args:
        horizon: maximum episode length (default 200).
    """

    name = "cartpole"

    def __init__(self, horizon: int = 200):
        self.horizon = int(horizon)

    def config(self) -> dict[str, Any]:
        return {"horizon": self.horizon}

    @property
    def observation_spec(self):
        return tensor_spec((4,), np.float32, name="observation")

    @property
    def action_spec(self):
        return bounded_spec((), np.int32, minimum=0, maximum=1, name="action")

    def sample_tasks(self, n: int, seed: int | None) -> list[Task]:
        scales = np.random.default_rng(seed).uniform(SCALE_LOW, SCALE_HIGH, size=(n, 3))
        names = ("length", "masspole", "masscart")
        return [
            {k: float(DEFAULTS[k] * s) for k, s in zip(names, row, strict=True)} for row in scales
        ]

    def make_batched_env(self, tasks: list[Task], episodes_per_task: int) -> CartPoleBatch:
        def column(key):
            try:
                values = [float(t[key]) for t in tasks]
            except KeyError:
                raise ValueError(
                    f"every cartpole task needs {key!r}; got keys {list(tasks[0])}"
                ) from None
            return np.repeat(np.array(values), episodes_per_task)

        return CartPoleBatch(column("length"), column("masspole"), column("masscart"), self.horizon)


class CartPoleVariedEnv(gymnasium.Env):
    """Single-task gymnasium view: ``gymnasium.make("metarl_tf/CartPoleVaried-v0",
    task={"length": 0.7, "masspole": 0.1, "masscart": 1.5})``; without a task, one is sampled at
    each ``reset(seed=...)``."""

    metadata = {"render_modes": []}

    def __init__(self, task: Task | None = None, horizon: int = 200):
        self.task = task
        self.horizon = int(horizon)
        high = np.array([X_LIMIT * 2, np.inf, THETA_LIMIT * 2, np.inf], np.float32)
        self.observation_space = gymnasium.spaces.Box(-high, high, dtype=np.float32)
        self.action_space = gymnasium.spaces.Discrete(2)
        self._batch: CartPoleBatch | None = None

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        task = self.task
        if task is None:
            task = CartPoleVaried().sample_tasks(1, int(self.np_random.integers(2**31)))[0]
        self._batch = CartPoleVaried(self.horizon).make_batched_env([task], 1)
        self._batch.seed(int(self.np_random.integers(2**31)))
        return self._batch.reset()[0], {"task": task}

    def step(self, action):
        if self._batch is None:
            raise RuntimeError("call reset() before step()")
        ts = self._batch.step(np.array([int(action)]))
        terminated = bool(self._batch.terminated[0])
        truncated = bool(ts.done[0]) and not terminated
        return ts.observation[0], float(ts.reward[0]), terminated, truncated, {}
