"""Sub-environments stepped in a loop, in this process or split across worker processes.

:class:`EnvGroup` holds gymnasium environments built by a ``make_env(task)`` factory and steps
them one after the other. :class:`WorkerPool` runs one ``EnvGroup`` per worker process (each owns
a contiguous slice of the sub-environments) and steps all slices at the same time, so a batched
env of ``tasks x episodes`` gymnasium envs uses every core while the sampler still makes one
batched policy call per time step.

Workers are started with the ``spawn`` method (the parent has TensorFlow's threads running, which
``fork`` must not copy), never import TensorFlow, exit when the parent closes the pool or dies,
and a worker that crashes or raises makes the parent raise :class:`WorkerError` (no hang).
"""

from __future__ import annotations

import atexit
import contextlib
import multiprocessing as mp
import pickle
import traceback
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

Task = dict[str, Any]
MakeEnv = Callable[[Task], Any]

_POLL_S = 0.2  # how often a waiting parent checks that its workers are alive


class WorkerError(RuntimeError):
    """A worker process died or raised while building, resetting or stepping its sub-envs."""


class EnvGroup:
    """Gymnasium envs (one per sub-env) stepped in a loop; the body of every worker.

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


def _worker_main(conn) -> None:
    """Worker loop: receives ``(method, args)``, answers ``("ok", result)`` or ``("error", tb)``."""
    group = EnvGroup()
    while True:
        try:
            method, args = conn.recv()
        except (EOFError, OSError, KeyboardInterrupt):  # parent gone
            break
        if method == "close":
            group.close()
            conn.send(("ok", None))
            break
        try:
            result = getattr(group, method)(*args)
        except Exception:
            conn.send(("error", traceback.format_exc()))
        else:
            conn.send(("ok", result))
    conn.close()


class WorkerPool:
    """``num_workers`` processes, each running an :class:`EnvGroup` on its slice of sub-envs.

    Args:
        num_workers: number of worker processes (>= 1).

    Use as a context manager or call :meth:`close`; pools still open at interpreter exit are
    closed by an ``atexit`` hook.
    """

    def __init__(self, num_workers: int):
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        ctx = mp.get_context("spawn")
        self.num_workers = num_workers
        self._conns = []
        self._procs = []
        self.closed = False
        self.owner: object | None = None  # the batched env currently using the workers
        for w in range(num_workers):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=_worker_main, args=(child,), daemon=True, name=f"metarl-env-{w}"
            )
            proc.start()
            child.close()
            self._conns.append(parent)
            self._procs.append(proc)
        self._finalizer = weakref.finalize(self, WorkerPool._shutdown, self._conns, self._procs)
        atexit.register(self._finalizer)

    @staticmethod
    def _shutdown(conns, procs) -> None:
        for conn in conns:
            with contextlib.suppress(OSError, BrokenPipeError):
                conn.send(("close", ()))
        for proc in procs:
            proc.join(timeout=2.0)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=1.0)
        for conn in conns:
            conn.close()

    def close(self) -> None:
        """Stops the workers (idempotent)."""
        if not self.closed:
            self.closed = True
            self._finalizer()

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def split(self, n: int) -> list[slice]:
        """Contiguous slices of ``n`` sub-envs, one per worker (sizes differ by at most 1)."""
        bounds = np.linspace(0, n, self.num_workers + 1).round().astype(int)
        return [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]

    def call(self, method: str, per_worker_args: Sequence[tuple]) -> list[Any]:
        """Runs ``EnvGroup.method(*args)`` in every worker at once; returns their results."""
        if self.closed:
            raise WorkerError("the worker pool is closed")
        for w, (conn, args) in enumerate(zip(self._conns, per_worker_args, strict=True)):
            try:
                conn.send((method, args))
            except (OSError, BrokenPipeError):  # a dead worker's pipe: say which, and why
                self._procs[w].join(timeout=1.0)
                code = self._procs[w].exitcode
                if code is not None:
                    self._fail(f"worker {w} died (exit code {code}) before {method!r}")
                self._fail(f"could not send {method!r} to worker {w}")
        results = []
        for w, conn in enumerate(self._conns):
            while not conn.poll(_POLL_S):
                if not self._procs[w].is_alive():
                    code = self._procs[w].exitcode
                    self._fail(f"worker {w} died (exit code {code}) during {method!r}")
            try:
                status, payload = conn.recv()
            except (EOFError, OSError):
                self._procs[w].join(timeout=1.0)
                code = self._procs[w].exitcode
                self._fail(f"worker {w} died (exit code {code}) during {method!r}")
            if status == "error":
                self._fail(f"worker {w} raised during {method!r}:\n{payload}")
            results.append(payload)
        return results

    def _fail(self, message: str):
        self.close()
        raise WorkerError(message + "\n(the worker pool was shut down; build a new batched env)")
