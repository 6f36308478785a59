"""The sampler: (weights per task, tasks) -> a padded ``EpisodeBatch``.

All ``tasks x episodes`` sub-environments step together (on Ray: those of each actor's block of
tasks); at every time step the policy runs ONE batched computation for all of them, each task
with its own weights (``[tasks, ...]`` parameters, a batched matmul). That per-step forward pass
is numpy (the policy's picklable :class:`~metarl_tf.numpy_policy.NumpyActor`,
``policy.numpy_actor()``): for a few hundred observations a TensorFlow call costs ~1 ms of fixed
overhead, 10x the arithmetic, and nothing is differentiated here (the losses recompute
log-probabilities in TensorFlow from the stored actions). The policy draws its own per-step noise (``sample_noise``: Gaussian noise, or uniform
numbers for inverse-CDF sampling of a categorical policy) from the sampler's seeded RNG up front,
so the actions of a batch depend only on its inputs, not on where it runs.

Where the episodes run is the *backend*'s business (``run_episodes``): :class:`LocalBackend`
steps the task distribution's own batched env in this process (the embedded default);
:class:`metarl_tf.envs.ray_backend.RayBackend` gives each Ray actor a block of whole tasks, with
their weights and noise, and the actor runs those tasks' episodes to the end with the same loop
(:func:`metarl_tf.envs.base.run_episodes`) and the same numpy actor (:func:`make_backend`). The
batch is the same either way. A backend that loses a worker mid-batch raises
:class:`RecoverableSamplingError`; the sampler then samples the whole batch again (the same seed
gives the same batch) and counts the retry.

Discrete actions are stored float-encoded (``[..., 1]`` float32 holding the index, see
:mod:`metarl_tf.policy`) and handed to the env as integers ``[num_envs]``.
"""

from __future__ import annotations

import logging
import weakref
from typing import Protocol

import numpy as np

from metarl_tf.envs.base import (
    BatchedEnv,
    EpisodeArrays,
    RecoverableSamplingError,
    Task,
    TaskDistribution,
    run_episodes,
)
from metarl_tf.episodes import EpisodeBatch
from metarl_tf.numpy_policy import NumpyActor
from metarl_tf.policy import GaussianMLPPolicy

BACKENDS = ("local", "ray")
__all__ = [
    "BACKENDS",
    "EpisodeBatch",
    "LocalBackend",
    "RecoverableSamplingError",
    "Sampler",
    "SamplingBackend",
    "make_backend",
]
_log = logging.getLogger(__name__)


class SamplingBackend(Protocol):
    """Where the episodes of a batch run: ``run_episodes`` as :meth:`LocalBackend.run_episodes`;
    ``close`` releases the backend's workers."""

    name: str

    def run_episodes(
        self,
        dist: TaskDistribution,
        tasks: list[Task],
        episodes_per_task: int,
        env_seed: int,
        actor: NumpyActor,
        params: list[np.ndarray],
        noise: np.ndarray,
        deterministic: bool = False,
    ) -> EpisodeArrays: ...

    def close(self) -> None: ...


class LocalBackend:
    """The task distribution's own batched env, in this process. It holds the distribution's
    :meth:`~TaskDistribution.in_process` copy, so gymnasium envs are reused from batch to batch
    (one batched env of a backend in use at a time)."""

    name = "local"

    def __init__(self):
        self._workers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def make_batched_env(
        self, dist: TaskDistribution, tasks: list[Task], episodes_per_task: int
    ) -> BatchedEnv:
        """:meth:`TaskDistribution.make_batched_env` of the distribution's in-process copy."""
        if dist not in self._workers:
            self._workers[dist] = dist.in_process()
        return self._workers[dist].make_batched_env(tasks, episodes_per_task)

    def run_episodes(
        self,
        dist: TaskDistribution,
        tasks: list[Task],
        episodes_per_task: int,
        env_seed: int,
        actor: NumpyActor,
        params: list[np.ndarray],
        noise: np.ndarray,
        deterministic: bool = False,
    ) -> EpisodeArrays:
        """Every sub-env's episode (task-major, ``len(tasks) * episodes_per_task`` of them),
        time-major :class:`~metarl_tf.envs.base.EpisodeArrays` over ``noise.shape[0]`` steps.

        Args:
            env_seed: ``BatchedEnv.seed`` of the whole batch.
            actor: the policy's numpy action rule.
            params: per-task weights ``[tasks, *shape]``.
            noise: the policy's noise ``[horizon, tasks, episodes, ...]``.
            deterministic: the mean (or most likely) action instead of a sample.
        """
        env = self.make_batched_env(dist, tasks, episodes_per_task)
        env.seed(env_seed)
        choose = actor.stepper(params, noise, episodes_per_task, deterministic)
        return run_episodes(env, choose, noise.shape[0], actor.discrete)

    def close(self) -> None:
        for worker in list(self._workers.values()):
            close = getattr(worker, "close", None)
            if close is not None:
                close()
        self._workers.clear()


def make_backend(
    backend: str = "local", address: str | None = None, num_workers: int = 0
) -> SamplingBackend:
    """The sampling backend by name.

    Args:
        backend: ``local`` (this process) or ``ray`` (Ray actors; needs the ``ray`` extra).
        address: with ``ray``: ``None`` starts a Ray instance on this machine, ``auto`` joins
            the cluster this machine belongs to, ``ray://host:port`` a remote one.
        num_workers: with ``ray``: actors stepping sub-environments (0 = one per CPU of the Ray
            cluster).

    With ``ray``, Ray starts (or is joined) and the actors start at the first batch; backends
    with the same cluster and ``num_workers`` share their actors within a process.
    """
    if backend == "local":
        return LocalBackend()
    if backend == "ray":
        from metarl_tf.envs.ray_backend import RayBackend, import_ray

        import_ray()  # ImportError saying how to install Ray, now rather than at the first batch
        return _OnFirstUse(
            "ray", lambda: RayBackend.shared(address=address, num_workers=num_workers)
        )
    raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")


class _OnFirstUse:
    """A backend built when it is first used: a trainer that only restores and exports a
    checkpoint never starts Ray. Other attributes are the built backend's."""

    def __init__(self, name: str, build):
        self.name, self._build, self._backend = name, build, None

    @property
    def backend(self) -> SamplingBackend:
        if self._backend is None:
            self._backend = self._build()
        return self._backend

    def run_episodes(self, *args, **kwargs) -> EpisodeArrays:
        return self.backend.run_episodes(*args, **kwargs)

    def close(self) -> None:
        if self._backend is not None:
            self._backend.close()

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.backend, name)


class Sampler:
    """Collects ``episodes_per_task`` episodes per task with per-task policy weights.

    Args:
        dist: the task distribution (builds the batched env).
        policy: the policy; only its functional form and specs are used.
        episodes_per_task: episodes collected for every task.
        backend: where the sub-environments step (default :class:`LocalBackend`).
        max_retries: times a batch is sampled again after a :class:`RecoverableSamplingError`.

    Attributes:
        retries: batches sampled again so far (a trainer reports it per iteration).
    """

    def __init__(
        self,
        dist: TaskDistribution,
        policy: GaussianMLPPolicy,
        episodes_per_task: int,
        backend: SamplingBackend | None = None,
        max_retries: int = 3,
    ):
        # policy: GaussianMLPPolicy or CategoricalMLPPolicy (anything with sample_noise and
        # numpy_actor)
        self.dist = dist
        self.policy = policy
        self.episodes_per_task = int(episodes_per_task)
        self.horizon = dist.horizon
        self.backend = backend if backend is not None else LocalBackend()
        self.max_retries = int(max_retries)
        self.retries = 0

    def sample(
        self, params, tasks: list[Task], seed: int, deterministic: bool = False
    ) -> EpisodeBatch:
        """Runs every sub-environment to the end of its episode (or the horizon).

        Args:
            params: per-task weights ``[tasks, *shape]``, or one shared set ``[*shape]``.
            tasks: the tasks, ``len(tasks)`` of them.
            seed: seeds the action noise and the env's own randomness (``BatchedEnv.seed``); the
                same inputs and seed give the same batch, whatever the backend.
            deterministic: take the mean (Gaussian) or most likely (categorical) action instead
                of sampling.

        Raises:
            RecoverableSamplingError: the backend failed ``max_retries + 1`` times in a row.
        """
        for attempt in range(self.max_retries + 1):
            try:
                return self._sample(params, tasks, seed, deterministic)
            except RecoverableSamplingError as err:
                if attempt == self.max_retries:
                    raise RecoverableSamplingError(
                        f"sampling failed {attempt + 1} times in a row on the "
                        f"{self.backend.name} backend; last error: {err}"
                    ) from err
                self.retries += 1
                _log.warning("sampling again (retry %d): %s", attempt + 1, err)
        raise AssertionError("unreachable")

    def _sample(self, params, tasks: list[Task], seed: int, deterministic: bool) -> EpisodeBatch:
        n_tasks, n_eps, horizon = len(tasks), self.episodes_per_task, self.horizon
        params = [np.asarray(p, np.float32) for p in params]
        if params[0].ndim == 2:  # shared weights: one (contiguous) copy per task
            params = [np.repeat(p[None], n_tasks, axis=0) for p in params]
        rng = np.random.default_rng(seed)
        noise = self.policy.sample_noise(rng, (horizon, n_tasks, n_eps))
        env_seed = int(rng.integers(2**31))  # drawn after the noise: the noise does not change
        observations, actions, rewards, mask = self.backend.run_episodes(
            self.dist, tasks, n_eps, env_seed, self.policy.numpy_actor(), params, noise,
            deterministic,
        )  # fmt: skip

        def to_batch(x):  # [T, tasks * eps, ...] -> [tasks, eps, T, ...]
            x = x.reshape(horizon, n_tasks, n_eps, *x.shape[2:])
            return np.ascontiguousarray(np.moveaxis(x, 0, 2))

        return EpisodeBatch(
            to_batch(observations), to_batch(actions), to_batch(rewards), to_batch(mask)
        )
