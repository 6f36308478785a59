"""One task of a task distribution as a TF-Agents environment, for TF-Agents drivers.

    env = tf_agents_environment(Navigation2D(), {"goal": [0.3, -0.2]}, parallel=4, seed=0)
    driver = DynamicEpisodeDriver(env, policy, observers=[buffer.add_batch], num_episodes=8)

:class:`TaskPyEnvironment` steps the distribution's own batched environment with one
sub-environment, so its transitions are the ones the trainer's sampler sees: the same
observations, rewards and episode ends, and the environment clips continuous actions itself
(send it raw policy samples). An episode that ends at the distribution's horizon ends as a
truncation (discount 1), any other end as a termination (discount 0).

Importing this module imports tf-agents, which builds its networks with the legacy ``tf.keras``
(tf-keras): ``TF_USE_LEGACY_KERAS=1`` is set below before TensorFlow is imported, which only takes
effect if TensorFlow's ``tf.keras`` was not used yet in this process. The environments here build
no Keras layer, so they work either way.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

# isort: split
import numpy as np
from tf_agents.environments import batched_py_environment, py_environment, tf_py_environment
from tf_agents.specs import array_spec
from tf_agents.trajectories import time_step as ts

from metarl_tf.envs.base import Task, TaskDistribution, is_discrete_spec


def array_spec_of(spec, name: str) -> array_spec.ArraySpec:
    """The ``ArraySpec`` (``BoundedArraySpec`` when bounded) of a ``TensorSpec``."""
    dtype = np.dtype(getattr(spec.dtype, "as_numpy_dtype", spec.dtype))
    if hasattr(spec, "minimum"):
        return array_spec.BoundedArraySpec(
            tuple(spec.shape), dtype, np.asarray(spec.minimum), np.asarray(spec.maximum), name
        )
    return array_spec.ArraySpec(tuple(spec.shape), dtype, name)


class TaskPyEnvironment(py_environment.PyEnvironment):
    """One task of ``dist`` as a TF-Agents ``PyEnvironment`` (auto-reset after an episode ends).

    Args:
        dist: the task distribution.
        task: the task (``dist.sample_tasks(...)[i]``).
        seed: seeds the environment's own randomness (stochastic rewards, random starts) once,
            before the first episode; deterministic environments ignore it.
    """

    def __init__(self, dist: TaskDistribution, task: Task, seed: int | None = None):
        super().__init__(handle_auto_reset=True)
        self._dist, self._task = dist, task
        self._env = dist.make_batched_env([task], 1)
        self._env.seed(seed)
        self._discrete = is_discrete_spec(dist.action_spec)
        self._observation_spec = array_spec_of(dist.observation_spec, "observation")
        self._action_spec = array_spec_of(dist.action_spec, "action")
        self._t = 0

    @property
    def task(self) -> Task:
        return self._task

    def observation_spec(self) -> array_spec.ArraySpec:
        return self._observation_spec

    def action_spec(self) -> array_spec.BoundedArraySpec:
        return self._action_spec

    def _reset(self) -> ts.TimeStep:
        self._t = 0
        return ts.restart(np.asarray(self._env.reset()[0], np.float32))

    def _step(self, action) -> ts.TimeStep:
        action = np.asarray(action)
        batch = action.reshape(1) if self._discrete else action.reshape(1, -1)
        step = self._env.step(batch)
        self._t += 1
        observation = np.asarray(step.observation[0], np.float32)
        reward = np.float32(step.reward[0])
        if not step.done[0]:
            return ts.transition(observation, reward)
        if self._t >= self._dist.horizon:
            return ts.truncation(observation, reward)
        return ts.termination(observation, reward)


def tf_agents_environment(
    dist: TaskDistribution, task: Task, parallel: int = 1, seed: int | None = None
) -> tf_py_environment.TFPyEnvironment:
    """``parallel`` copies of one task as a batched TF-Agents ``TFPyEnvironment`` (batch size
    ``parallel``); copy ``i`` is seeded ``seed + i`` (see :class:`TaskPyEnvironment`)."""
    if parallel < 1:
        raise ValueError(f"parallel must be >= 1, got {parallel}")
    envs = [
        TaskPyEnvironment(dist, task, None if seed is None else seed + i) for i in range(parallel)
    ]
    return tf_py_environment.TFPyEnvironment(
        batched_py_environment.BatchedPyEnvironment(envs, multithreading=False)
    )
