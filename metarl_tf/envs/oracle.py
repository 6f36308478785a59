"""Oracle variants of task distributions: the task parameters appended to every observation.

An *oracle* policy is told its task, so it needs no adaptation; trained jointly on all tasks
(``python -m metarl_tf train --algo pretrain --preset nav2d-oracle``) it is the upper reference of
the MAML paper's comparisons. Any task distribution gets one by a one-line registration in
``metarl_tf/envs/__init__.py``::

    TASK_DISTRIBUTIONS["nav2d-oracle"] = oracle_variant("nav2d-oracle", Navigation2D, lambda t: t["goal"])
    TASK_DISTRIBUTIONS["halfcheetah-vel-oracle"] = oracle_variant(
        "halfcheetah-vel-oracle", HalfCheetahVel, lambda t: [t["velocity"]]
    )

The variant samples exactly the tasks of its base distribution (same seed, same tasks), so an
oracle is evaluated on the very test tasks of the meta-learned policy.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from metarl_tf.envs.base import BatchedEnv, Task, TaskDistribution, TimeStep
from metarl_tf.specs import tensor_spec

TaskFeatures = Callable[[Task], Sequence[float]]


class OracleBatchedEnv(BatchedEnv):
    """Appends fixed per-sub-env features ``[num_envs, k]`` to the observations of ``env``."""

    def __init__(self, env: BatchedEnv, features: np.ndarray):
        features = np.asarray(features, np.float32)
        if features.shape[0] != env.num_envs:
            raise ValueError(
                f"features have {features.shape[0]} rows, the env has {env.num_envs} sub-envs"
            )
        self.env, self.features, self.num_envs = env, features, env.num_envs

    def _with_features(self, observation: np.ndarray) -> np.ndarray:
        return np.concatenate([np.asarray(observation, np.float32), self.features], axis=1)

    def seed(self, seed: int | None, offset: int = 0, total: int | None = None) -> None:
        self.env.seed(seed, offset, total)

    def reset(self) -> np.ndarray:
        return self._with_features(self.env.reset())

    def step(self, actions: np.ndarray) -> TimeStep:
        ts = self.env.step(actions)
        return TimeStep(self._with_features(ts.observation), ts.reward, ts.done)


class OracleObservation(TaskDistribution):
    """``dist`` with ``task_features(task)`` appended to every observation.

    Args:
        dist: the base task distribution (its tasks, horizon, actions and rewards are kept).
        task_features: maps a task to a fixed-length list of floats, e.g.
            ``lambda t: t["goal"]`` for Nav2D.
        name: registry id of the variant (default ``"<base name>-oracle"``).
    """

    def __init__(
        self, dist: TaskDistribution, task_features: TaskFeatures, name: str | None = None
    ):
        self.base = dist
        self.task_features = task_features
        self.name = name or f"{dist.name}-oracle"
        self.horizon = dist.horizon
        probe = dist.sample_tasks(1, seed=0)[0]
        self.num_features = len(self._features([probe])[0])

    def _features(self, tasks: list[Task]) -> np.ndarray:
        rows = []
        for task in tasks:
            f = np.asarray(self.task_features(task), np.float32).reshape(-1)
            if rows and f.shape != rows[0].shape:
                raise ValueError(
                    f"task_features must give the same number of values for every task: "
                    f"{rows[0].size} for the first task, {f.size} for {task!r}"
                )
            rows.append(f)
        return np.stack(rows)

    def config(self) -> dict[str, Any]:
        return self.base.config()

    def in_process(self) -> OracleObservation:
        worker = copy.copy(self)
        worker.base = self.base.in_process()
        return worker

    @property
    def observation_spec(self):
        base = self.base.observation_spec
        return tensor_spec((base.shape[0] + self.num_features,), np.float32, name="observation")

    @property
    def action_spec(self):
        return self.base.action_spec

    def sample_tasks(self, n: int, seed: int | None) -> list[Task]:
        return self.base.sample_tasks(n, seed)

    def make_batched_env(self, tasks: list[Task], episodes_per_task: int) -> OracleBatchedEnv:
        env = self.base.make_batched_env(tasks, episodes_per_task)
        features = np.repeat(self._features(tasks), episodes_per_task, axis=0)  # task-major
        return OracleBatchedEnv(env, features)


def oracle_variant(
    name: str, base: type[TaskDistribution], task_features: TaskFeatures
) -> Callable[..., OracleObservation]:
    """A registry entry: ``make_task_distribution(name, **kwargs)`` builds
    ``OracleObservation(base(**kwargs), task_features, name)``; the base's constructor arguments
    are the variant's (so a bundle's ``config()`` rebuilds it)."""

    def build(**kwargs: Any) -> OracleObservation:
        return OracleObservation(base(**kwargs), task_features, name)

    build.__name__ = f"oracle_{base.__name__}"
    build.__doc__ = f"{base.__name__} with its task parameters in the observation ({name!r})."
    return build
