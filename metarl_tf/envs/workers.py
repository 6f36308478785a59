"""Sub-environments stepped in a loop: the body of every sampling worker.

:class:`EnvGroup` holds gymnasium environments built by a ``make_env(task)`` factory and steps
them one after the other: in this process for a :class:`~metarl_tf.envs.gym_adapter.GymBatchedEnv`,
and in each Ray actor for its block of a batch's tasks (:mod:`metarl_tf.envs.ray_backend`), which is how
sub-environments step in parallel (``--backend ray``).
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

Task = dict[str, Any]
MakeEnv = Callable[[Task], Any]


class WorkerError(RuntimeError):
    """A batched env's envs were taken over by a newer batched env of the same distribution."""


class EnvGroup:
    """Gymnasium envs (one per sub-env) stepped in a loop.

    Environments are kept across :meth:`configure` calls: when the factory is the same and an
    env has a ``set_task(task)`` method, it is reused with the new task instead of rebuilt.
    """

    def __init__(self):
        self.envs: list[Any] = []
        self._factory_key: bytes | None = None
        self.obs: np.ndarray | None = None
        self.n = self.obs_dim = 0
        self.owner: object | None = None  # the batched env currently using the envs

    def configure(self, make_env: MakeEnv, tasks: Sequence[Task]) -> int:
        """Sets up ``len(tasks)`` envs, env ``i`` running ``tasks[i]``; returns the obs size."""
        try:
            key = pickle.dumps(make_env)
        except Exception:  # an unpicklable (in-process) factory: compare by identity
            key = repr(id(make_env)).encode()
        if key != self._factory_key:
            self.close()
            self._factory_key = key
        reusable = [e for e in self.envs if hasattr(e, "set_task")]
        if len(reusable) != len(self.envs):  # no set_task: rebuild with the new tasks
            self.close()
            reusable = []
        envs = []
        for i, task in enumerate(tasks):
            if i < len(reusable):
                reusable[i].set_task(task)
                envs.append(reusable[i])
            else:
                envs.append(make_env(task))
        for extra in reusable[len(tasks) :]:
            envs.append(extra)  # kept for later, larger batches; not stepped
        self.envs = envs
        self.n = len(tasks)
        self.obs_dim = int(np.prod(envs[0].observation_space.shape)) if tasks else 0
        self.obs = None
        return self.obs_dim

    def reset(self, seeds: Sequence[int | None]) -> np.ndarray:
        obs = [
            np.asarray(self.envs[i].reset(seed=seeds[i])[0], np.float32).ravel()
            for i in range(self.n)
        ]
        self.obs = np.stack(obs) if obs else np.zeros((0, self.obs_dim), np.float32)
        return self.obs.copy()

    def step(self, actions: np.ndarray, active: np.ndarray):
        """Steps the active envs; inactive ones keep their observation and get reward 0."""
        if self.obs is None:
            raise RuntimeError("reset() must be called before step()")
        reward = np.zeros(self.n, np.float32)
        done = ~np.asarray(active, bool)
        for i in np.flatnonzero(active):
            obs, r, terminated, truncated, _ = self.envs[i].step(actions[i])
            self.obs[i] = np.asarray(obs, np.float32).ravel()
            reward[i] = r
            done[i] = terminated or truncated
        return self.obs.copy(), reward, done

    def get_attr(self, name: str) -> list:
        """``getattr(env, name)`` of every configured env (e.g. a success flag)."""
        return [getattr(self.envs[i], name) for i in range(self.n)]

    def close(self) -> None:
        for env in self.envs:
            close = getattr(env, "close", None)
            if close is not None:
                close()
        self.envs = []
