"""Any gymnasium environment with a task parameter as a task distribution.

Give :class:`GymTaskDistribution` a factory ``make_env(task) -> gymnasium.Env`` and a task
sampler ``sample_tasks(n, rng) -> list[dict]``; it builds one gymnasium env per sub-environment
and steps them in a loop in this process (:mod:`metarl_tf.envs.workers`); sampling on Ray
actors splits a batch's tasks into blocks across processes and machines
(:mod:`metarl_tf.envs.ray_backend`). ``docs/environments.md`` has the recipe.

Episodes end when the env terminates or truncates, or after ``horizon`` steps. Actions are clipped
to the action space's bounds before they reach the env. Observations are flattened to float32.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import numpy as np

from metarl_tf.envs.base import BatchedEnv, Task, TaskDistribution, TimeStep, slice_of_batch
from metarl_tf.envs.workers import EnvGroup, MakeEnv, WorkerError
from metarl_tf.specs import bounded_spec, tensor_spec

SampleTasks = Callable[[int, np.random.Generator], list[Task]]


def _sub_env_seeds(seed: int | None, n: int) -> list[int | None]:
    """Seed of sub-env ``i``'s reset: independent streams derived from ``(seed, i)``."""
    if seed is None:
        return [None] * n
    return [int(s) for s in np.random.SeedSequence(seed).generate_state(n, np.uint32)]


class GymBatchedEnv(BatchedEnv):
    """``len(tasks)`` gymnasium envs stepped together (sub-env ``i`` runs ``tasks[i]``).

    Args:
        make_env: ``make_env(task) -> gymnasium.Env``.
        tasks: one task per sub-env.
        horizon: maximum episode length.
        low, high: action bounds; actions are clipped to them.
        group: an :class:`EnvGroup` to reuse (its envs are reconfigured for ``tasks``; the group
            then serves this batched env only), or ``None``: a new one.
    """

    def __init__(
        self,
        make_env: MakeEnv,
        tasks: list[Task],
        horizon: int,
        low: np.ndarray,
        high: np.ndarray,
        group: EnvGroup | None = None,
    ):
        self.num_envs = len(tasks)
        self.horizon = int(horizon)
        self.low, self.high = np.asarray(low, np.float32), np.asarray(high, np.float32)
        self._seed: int | None = None
        self._total, self._rows = slice_of_batch(0, None, self.num_envs)
        self._group = group if group is not None else EnvGroup()
        self.obs_dim = self._group.configure(make_env, tasks)
        self._group.owner = self
        self._active = np.zeros(self.num_envs, bool)
        self.t = 0

    def seed(self, seed: int | None, offset: int = 0, total: int | None = None) -> None:
        """Seeds the initial states of the next :meth:`reset` (sub-env ``i`` from ``(seed, i)``,
        ``i`` counted in the whole batch of ``total``, see :meth:`BatchedEnv.seed`)."""
        self._seed = seed
        self._total, self._rows = slice_of_batch(offset, total, self.num_envs)

    def _check_owner(self) -> None:
        if self._group.owner is not self:
            raise WorkerError(
                "this batched env's envs now serve a newer make_batched_env(); "
                "step one batched env of a distribution at a time"
            )

    def reset(self) -> np.ndarray:
        seeds = _sub_env_seeds(self._seed, self._total)[self._rows]
        self._seed = None  # the next reset without seed() continues the envs' own streams
        self._active[:] = True
        self.t = 0
        self._check_owner()
        return self._group.reset(seeds)

    def get_attr(self, name: str) -> list:
        """``getattr(env, name)`` of every sub-env's gymnasium env, in sub-env order."""
        self._check_owner()
        return self._group.get_attr(name)

    def step(self, actions: np.ndarray) -> TimeStep:
        actions = np.clip(np.asarray(actions, np.float32), self.low, self.high)
        if actions.shape[0] != self.num_envs:
            raise ValueError(f"expected actions for {self.num_envs} sub-envs, got {actions.shape}")
        self._check_owner()
        obs, reward, done = self._group.step(actions, self._active)
        self.t += 1
        done = done | (self.t >= self.horizon)
        self._active &= ~done
        return TimeStep(obs, reward.astype(np.float32), done)


class GymTaskDistribution(TaskDistribution):
    """A task distribution over gymnasium envs built by ``make_env(task)``.

    Args:
        make_env: builds the env of one task. For ``--backend ray`` it must be picklable by
            Ray (a module-level function or class, a ``functools.partial`` of one, or a closure
            cloudpickle can ship). If the env has a ``set_task(task)`` method, a sampler's envs
            are reused across batches instead of rebuilt.
        sample_tasks: ``sample_tasks(n, rng)`` returns ``n`` JSON-serializable task dicts drawn
            with the ``numpy.random.Generator`` ``rng``.
        horizon: maximum episode length.
        num_workers: ignored; accepted so that bundles written when it chose worker
            processes still load (parallel stepping is the sampler's backend: ``--backend ray``).
        name: registry id (subclasses set the class attribute instead).

    The observation and action specs come from the spaces of ``make_env(<a sampled task>)``; the
    observation space must be a ``Box`` (flattened) and the action space a ``Box`` (the policy
    is Gaussian; actions are clipped to its bounds).
    """

    name = "gym"

    def __init__(
        self,
        make_env: MakeEnv,
        sample_tasks: SampleTasks,
        horizon: int,
        num_workers: int = 0,
        name: str | None = None,
    ):
        if not callable(make_env) or not callable(sample_tasks):
            raise TypeError("make_env and sample_tasks must be callables")
        if int(horizon) < 1:
            raise ValueError(f"horizon must be >= 1, got {horizon}")
        self.make_env = make_env
        self._sample_tasks = sample_tasks
        self.horizon = int(horizon)
        if name is not None:
            self.name = name
        self._spaces: tuple[Any, Any] | None = None
        self._group: EnvGroup | None = None  # envs reused by every batched env (in_process)

    def config(self) -> dict[str, Any]:
        return {"horizon": self.horizon}

    def in_process(self) -> GymTaskDistribution:
        """A copy that reuses its envs across batched envs (one in use at a time)."""
        worker = copy.copy(self)
        worker._group = EnvGroup()
        return worker

    # -- specs --------------------------------------------------------------------------------
    def _probe_spaces(self):
        if self._spaces is None:
            import gymnasium

            env = self.make_env(self.sample_tasks(1, seed=0)[0])
            obs_space, act_space = env.observation_space, env.action_space
            env.close()
            if not isinstance(obs_space, gymnasium.spaces.Box):
                raise TypeError(
                    f"{type(self).__name__}: the observation space must be a gymnasium Box, "
                    f"got {obs_space}; wrap the env with gymnasium.wrappers.FlattenObservation"
                )
            if not isinstance(act_space, gymnasium.spaces.Box):
                raise TypeError(
                    f"{type(self).__name__}: the action space must be a gymnasium Box "
                    f"(continuous actions, Gaussian policy), got {act_space}"
                )
            if not (np.all(np.isfinite(act_space.low)) and np.all(np.isfinite(act_space.high))):
                raise ValueError(
                    f"{type(self).__name__}: the action space needs finite bounds (they are the "
                    f"clipping range), got low={act_space.low}, high={act_space.high}"
                )
            self._spaces = (obs_space, act_space)
        return self._spaces

    @property
    def observation_spec(self):
        obs_space, _ = self._probe_spaces()
        dim = int(np.prod(obs_space.shape))
        return tensor_spec((dim,), np.float32, name="observation")

    @property
    def action_spec(self):
        _, act_space = self._probe_spaces()
        return bounded_spec(
            act_space.shape,
            np.float32,
            minimum=act_space.low.astype(np.float32),
            maximum=act_space.high.astype(np.float32),
            name="action",
        )

    # -- tasks and envs -----------------------------------------------------------------------
    def sample_tasks(self, n: int, seed: int | None) -> list[Task]:
        return list(self._sample_tasks(n, np.random.default_rng(seed)))

    def make_batched_env(self, tasks: list[Task], episodes_per_task: int) -> GymBatchedEnv:
        _, act_space = self._probe_spaces()
        per_env = [task for task in tasks for _ in range(episodes_per_task)]
        return GymBatchedEnv(
            self.make_env, per_env, self.horizon, act_space.low, act_space.high, self._group
        )

    def close(self) -> None:
        """Closes the envs kept for reuse (an :meth:`in_process` copy's; rebuilt when needed)."""
        if self._group is not None:
            self._group.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
