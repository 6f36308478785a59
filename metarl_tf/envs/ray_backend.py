"""Sampling on Ray: each actor runs the episodes of a block of whole tasks.

:class:`RayBackend` keeps ``num_workers`` Ray actors. For a batch of ``tasks x episodes``
sub-environments, every actor gets a contiguous block of whole tasks with their weights and their
steps' noise, builds those sub-envs with the task distribution's own ``make_batched_env`` (for
gymnasium families: the same :class:`~metarl_tf.envs.workers.EnvGroup` as in this process; the
actor holds the distribution's :meth:`~TaskDistribution.in_process` copy, so its envs are reused
from batch to batch) and runs them to the end with the sampler's own loop
(:func:`~metarl_tf.envs.base.run_episodes`) and the policy's numpy action rule (a picklable
:class:`~metarl_tf.numpy_policy.NumpyActor`; the actors import numpy, not TensorFlow). Each actor
seeds its block as sub-envs ``offset ..`` of the whole batch (``BatchedEnv.seed(seed, offset,
total)``), and the noise was drawn for the whole batch: a batch is the same on any number of
actors, and the same as in this process. There is no round trip per time step: the learner waits
once per batch.

Faults: actors restart (``max_restarts``) when their process dies; a call to a dead, restarting or
unresponsive actor (``timeout_s``) raises :class:`RecoverableSamplingError`, and the sampler
samples the batch again on the restarted actors. ``ray`` is an optional dependency
(``pip install -e ".[ray]"``); this module imports it on first use. Starting or joining Ray keeps
the process's SIGTERM/SIGINT handlers (``ray.init`` installs its own, which end the process at
once): a stopped ``train --backend ray`` still finishes its iteration and writes its checkpoint and
bundle.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
import uuid
import weakref
from typing import Any

import numpy as np

from metarl_tf.envs.base import (
    EpisodeArrays,
    RecoverableSamplingError,
    Task,
    TaskDistribution,
    run_episodes,
)

INSTALL_HINT = 'the ray backend needs Ray: pip install -e ".[ray]"'
CONNECT_TIMEOUT_S = 5.0
START_TIMEOUT_S = 120.0  # actors placed and started
_SHARED: dict[tuple[str, int], RayBackend] = {}


def import_ray():
    """``ray``, or ``ImportError`` saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ImportError(INSTALL_HINT, name="ray") from None
    return ray


def _check_reachable(address: str) -> None:
    """``ray.init`` waits minutes for an address nobody listens on; fail in seconds instead."""
    hostport = address.removeprefix("ray://")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(
            f"--ray-address must be 'auto', 'host:port' or 'ray://host:port', got {address!r}"
        )
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as err:
        raise ConnectionError(
            f"no Ray cluster answers at {address} ({err}); start one with `ray start --head` "
            "or omit --ray-address to start Ray on this machine"
        ) from None


def connect(address: str | None = None, num_cpus: int | None = None) -> None:
    """Starts Ray on this machine (``address=None``: ``num_cpus``, default all its cores; no
    dashboard) or joins a cluster (``auto``, ``host:port``, ``ray://host:port``); nothing if Ray
    is already running in this process. Errors are one line: ``ConnectionError`` (nothing there, or ``ray.init``
    failed) or ``ImportError`` (Ray not installed)."""
    ray = import_ray()
    if ray.is_initialized():
        return
    # The actors import this package: ship the driver's copy, so every node runs the same code.
    import metarl_tf

    options: dict[str, Any] = {
        "include_dashboard": False,
        "log_to_driver": False,
        "runtime_env": {"py_modules": [metarl_tf]},
    }
    if address is None:
        options.update(
            address="local", num_cpus=num_cpus or os.cpu_count(), _node_ip_address="127.0.0.1"
        )
    elif address != "auto":
        _check_reachable(address)
        options["address"] = address
    else:
        options["address"] = "auto"
    kept = _stop_handlers()
    try:
        ray.init(**options)
    except Exception as err:  # ray raises ConnectionError, RuntimeError, ValueError, ...
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        where = address or "this machine"
        raise ConnectionError(f"could not start or join Ray ({where}): {first}") from None
    finally:
        for sig, handler in kept.items():
            signal.signal(sig, handler)


def _stop_handlers() -> dict[int, Any]:
    """The main thread's SIGTERM/SIGINT handlers, to put back after ``ray.init`` (whose own end
    the process without the run's checkpoint and bundle); none off the main thread."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    return {sig: h for sig, h in handlers.items() if h is not None}


class EnvWorker:
    """The body of a sampling actor: one block of a batch's tasks (see the module docstring).

    Plain Python (no Ray in it), so it can be tested, and run, in this process too."""

    def __init__(self):
        self._key: str | None = None
        self._dist: TaskDistribution | None = None

    def run_episodes(self, key: str, dist: TaskDistribution, tasks: list[Task], episodes: int,
                     offset: int, total: int, env_seed: int, actor, params: list[np.ndarray],
                     noise: np.ndarray, deterministic: bool) -> EpisodeArrays:  # fmt: skip
        """The episodes of sub-envs ``offset .. offset + len(tasks) * episodes - 1`` of a batch of
        ``total`` seeded with ``env_seed``: ``tasks`` with their weights ``params``
        (``[len(tasks), *shape]``) and noise (``[horizon, len(tasks), episodes, ...]``), as
        :meth:`metarl_tf.rollout.LocalBackend.run_episodes`; ``key`` names the distribution (a
        new one replaces the envs)."""
        if key != self._key:
            self.close()
            self._key, self._dist = key, dist.in_process()
        env = self._dist.make_batched_env(list(tasks), int(episodes))
        env.seed(env_seed, int(offset), int(total))
        choose = actor.stepper(params, noise, int(episodes), deterministic)
        return run_episodes(env, choose, noise.shape[0], actor.discrete)

    def placement(self) -> tuple[str, int]:
        """``(Ray node id, process id)`` of this actor."""
        import ray

        return ray.get_runtime_context().get_node_id(), os.getpid()

    def close(self) -> None:
        close = getattr(self._dist, "close", None)
        if close is not None:
            close()
        self._key = self._dist = None


class RayBackend:
    """Sub-environments stepped by Ray actors (``make_backend("ray", ...)``).

    Args:
        address: ``None`` starts Ray on this machine; ``auto``, ``host:port`` or
            ``ray://host:port`` join a cluster (:func:`connect`).
        num_workers: actors (0 = one per CPU of the cluster). They are spread over the
            cluster's nodes (``SPREAD`` scheduling).
        max_restarts: times Ray restarts an actor whose process died.
        timeout_s: an actor whose block of a batch (building its envs included) takes longer
            counts as lost (it is killed and restarted, and the batch sampled again).
    """

    name = "ray"

    def __init__(
        self,
        address: str | None = None,
        num_workers: int = 0,
        max_restarts: int = 5,
        timeout_s: float = 600.0,
    ):
        if int(num_workers) < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        connect(address)
        ray = import_ray()
        self._ray = ray
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        self.num_workers = int(num_workers) or cpus
        self.timeout_s = float(timeout_s)
        self._actor_class = ray.remote(EnvWorker).options(
            num_cpus=min(1.0, cpus / self.num_workers),
            max_restarts=int(max_restarts),
            max_task_retries=0,  # a lost block is not replayed: the sampler re-samples the batch
            scheduling_strategy="SPREAD",
        )
        self.actors = [self._actor_class.remote() for _ in range(self.num_workers)]
        ready, _ = ray.wait(
            [a.placement.remote() for a in self.actors],
            num_returns=self.num_workers,
            timeout=START_TIMEOUT_S,
        )
        if len(ready) < self.num_workers:
            self.close()
            raise ConnectionError(
                f"only {len(ready)} of {self.num_workers} Ray actors started within "
                f"{START_TIMEOUT_S:g} s (the cluster has {cpus} CPUs, "
                f"{ray.available_resources().get('CPU', 0):g} free); ask for fewer with "
                "--num-env-workers"
            )
        self._dists: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    @classmethod
    def shared(cls, address: str | None = None, num_workers: int = 0) -> RayBackend:
        """One backend per Ray cluster and ``num_workers`` in this process (a trainer and its
        evaluations share the actors instead of asking the cluster for more CPUs)."""
        connect(address)
        key = (import_ray().get_runtime_context().gcs_address, int(num_workers))
        backend = _SHARED.get(key)
        if backend is None or not backend.actors:
            backend = _SHARED[key] = cls(address, num_workers)
        return backend

    def _dist_ref(self, dist: TaskDistribution) -> tuple[str, Any]:
        """``(key, object ref)`` of the distribution's worker copy, put in Ray's store once."""
        if dist not in self._dists:
            self._dists[dist] = (uuid.uuid4().hex, self._ray.put(dist.in_process()))
        return self._dists[dist]

    def split(self, n: int) -> list[slice]:
        """Contiguous slices of ``n`` tasks, one per actor (sizes differ by at most 1)."""
        workers = max(1, min(self.num_workers, n))  # no empty slices
        bounds = np.linspace(0, n, workers + 1).round().astype(int)
        return [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]

    def call(self, method: str, per_actor_args: list[tuple], timeout_s: float | None = None):
        """``EnvWorker.method(*args)`` on the first ``len(per_actor_args)`` actors at once;
        their results, in actor order.

        Raises:
            RecoverableSamplingError: an actor died, is restarting, or did not answer in time
                (it is then killed, and Ray restarts it).
        """
        ray = self._ray
        actors = self.actors[: len(per_actor_args)]
        refs = [
            getattr(a, method).remote(*args) for a, args in zip(actors, per_actor_args, strict=True)
        ]
        try:
            return ray.get(refs, timeout=timeout_s or self.timeout_s)
        except ray.exceptions.GetTimeoutError:
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
            for actor, ref in zip(actors, refs, strict=True):
                if ref not in ready:
                    ray.kill(actor, no_restart=False)
            self._wait_for_actors()
            raise RecoverableSamplingError(
                f"a Ray actor did not finish {method!r} within {timeout_s or self.timeout_s:g} s "
                "(killed; Ray restarts it)"
            ) from None
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            self._wait_for_actors()
            raise RecoverableSamplingError(
                f"a Ray actor was lost during {method!r}: {first}"
            ) from None

    def _wait_for_actors(self) -> None:
        """Returns once every actor answers again: restarting ones are waited for, dead ones
        (restarts used up) replaced by new actors. ``ConnectionError`` after ``START_TIMEOUT_S``."""
        ray = self._ray
        deadline = time.monotonic() + START_TIMEOUT_S
        pending = list(range(len(self.actors)))
        while pending:
            still = []
            for i in pending:
                try:
                    ray.get(self.actors[i].placement.remote(), timeout=START_TIMEOUT_S)
                except ray.exceptions.ActorUnavailableError:  # restarting
                    still.append(i)
                except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                    ray.kill(self.actors[i], no_restart=True)
                    self.actors[i] = self._actor_class.remote()
                    still.append(i)
            pending = still
            if pending and time.monotonic() > deadline:
                raise ConnectionError(
                    f"{len(pending)} Ray actor(s) did not come back within {START_TIMEOUT_S:g} s"
                )
            if pending:
                time.sleep(0.5)

    def placement(self) -> list[tuple[str, int]]:
        """``(node id, pid)`` of every actor."""
        return self.call("placement", [()] * self.num_workers)

    def run_episodes(
        self,
        dist: TaskDistribution,
        tasks: list[Task],
        episodes_per_task: int,
        env_seed: int,
        actor,
        params: list[np.ndarray],
        noise: np.ndarray,
        deterministic: bool = False,
    ) -> EpisodeArrays:
        """:meth:`metarl_tf.rollout.LocalBackend.run_episodes` on the actors: each runs a
        contiguous block of whole tasks (:meth:`split` of the tasks); the blocks' episodes are
        joined in task order."""
        key, ref = self._dist_ref(dist)
        total = len(tasks) * int(episodes_per_task)
        blocks = self.split(len(tasks))
        parts = self.call(
            "run_episodes",
            [
                (
                    key,
                    ref,
                    tasks[b],
                    episodes_per_task,
                    b.start * episodes_per_task,
                    total,
                    env_seed,
                    actor,
                    [p[b] for p in params],
                    noise[:, b],
                    deterministic,
                )  # fmt: skip
                for b in blocks
            ],
        )
        return EpisodeArrays(
            *(np.concatenate(arrays, axis=1) for arrays in zip(*parts, strict=True))
        )

    def close(self) -> None:
        """Stops the actors (Ray itself keeps running until ``ray.shutdown()``)."""
        for actor in self.actors:
            self._ray.kill(actor, no_restart=True)
        self.actors = []
