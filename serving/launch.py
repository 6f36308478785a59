"""Start the service as a subprocess on a free loopback port, wait until it is ready, stop it.

Used by the demo, the latency benchmark and the tests. Imports no TensorFlow.

    with ServiceProcess(bundle="saved_models/nav2d-maml") as service:
        client = AdaptationClient(service.url)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from serving.settings import REPO_ROOT

SERVICE_TARGET = "serving.service:AdaptationService"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServiceProcess:
    """``bentoml serve serving.service:AdaptationService`` in its own process group.

    Args:
        bundle: bundle directory (``METARL_BUNDLE``).
        port: port to listen on (default: a free one).
        env: extra environment variables (``METARL_*`` limits, ...).
        log_path: where the server's output goes (default: a temporary file, deleted by
            :meth:`stop` unless start-up failed).
        ready_timeout: seconds to wait for ``/readyz``.
        command: run this instead of ``bentoml serve`` (e.g. the server inside a container);
            it must listen on ``host:port``.
    """

    def __init__(
        self,
        bundle: str | os.PathLike | None = None,
        port: int | None = None,
        env: dict[str, str] | None = None,
        log_path: str | os.PathLike | None = None,
        ready_timeout: float = 240.0,
        host: str = "127.0.0.1",
        command: list[str] | None = None,
    ):
        self.command = command
        self.host, self.port = host, port or free_port(host)
        self.url = f"http://{host}:{self.port}"
        self.env = {**os.environ, **(env or {})}
        if bundle is not None:
            self.env["METARL_BUNDLE"] = str(bundle)
        self.env.setdefault("BENTOML_DO_NOT_TRACK", "True")
        # A BentoML home of its own: `bentoml serve` empties its home's Prometheus directory at
        # start, and every server on the machine would otherwise count into the same files.
        self._own_home = None
        if (env or {}).get("BENTOML_HOME") is None:
            self._own_home = tempfile.mkdtemp(prefix="metarl-bentoml-home-")
            self.env["BENTOML_HOME"] = self._own_home
        self.ready_timeout = ready_timeout
        self._own_log = log_path is None
        if log_path is None:
            fd, log_path = tempfile.mkstemp(prefix="metarl-serve-", suffix=".log")
            os.close(fd)
        self.log_path = Path(log_path)
        self._failed = False
        self.process: subprocess.Popen | None = None
        self.startup_probes: list[tuple[float, int | None, int | None]] = []

    def start(self) -> ServiceProcess:
        """Starts the server and blocks until ``/readyz`` is 200 (raises if it dies or times
        out, with the end of its log). Records ``(seconds, /livez status, /readyz status)``
        probes in :attr:`startup_probes`."""
        cmd = self.command or [
            sys.executable,
            "-m",
            "bentoml",
            "serve",
            SERVICE_TARGET,
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--working-dir",
            str(REPO_ROOT),
        ]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                cmd,
                cwd=REPO_ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group: stop() ends the workers too
            )
        start = time.monotonic()
        with httpx.Client(base_url=self.url, timeout=2.0) as http:
            while True:
                elapsed = time.monotonic() - start
                if self.process.poll() is not None or self._startup_failed():
                    self._failed = True
                    self.stop()
                    raise RuntimeError(
                        f"the service failed to start (exit code {self.process.returncode}); "
                        f"log {self.log_path}:\n{self.log_tail()}"
                    )
                if elapsed > self.ready_timeout:
                    self._failed = True
                    self.stop()
                    raise RuntimeError(
                        f"the service was not ready after {self.ready_timeout:g} s; "
                        f"log {self.log_path}:\n{self.log_tail()}"
                    )
                live = ready = None
                try:
                    live = http.get("/livez").status_code
                    ready = http.get("/readyz").status_code
                except httpx.HTTPError:
                    pass
                self.startup_probes.append((round(elapsed, 3), live, ready))
                if ready == 200:
                    break
                time.sleep(0.05)
        self._wait_for_every_worker(start)
        return self

    def _wait_for_every_worker(self, start: float) -> None:
        """With ``METARL_WORKERS`` > 1, ``/readyz`` answers from whichever worker accepts the
        connection: poll ``/metadata`` on fresh connections until every worker said ready."""
        try:
            workers = int(self.env.get("METARL_WORKERS") or 1)
        except ValueError:
            workers = 1
        if workers <= 1:
            return
        token = self.env.get("METARL_API_TOKEN")
        if token is None and self.env.get("METARL_API_TOKEN_FILE"):
            token = Path(self.env["METARL_API_TOKEN_FILE"]).read_text()
        headers = {"Authorization": f"Bearer {token.strip()}"} if token else {}
        ready_pids: set[int] = set()
        limits = httpx.Limits(max_keepalive_connections=0)
        with httpx.Client(base_url=self.url, timeout=5.0, limits=limits, headers=headers) as http:
            while len(ready_pids) < workers:
                if time.monotonic() - start > self.ready_timeout:
                    self._failed = True
                    self.stop()
                    raise RuntimeError(
                        f"{len(ready_pids)} of {workers} workers ready after "
                        f"{self.ready_timeout:g} s; log {self.log_path}:\n{self.log_tail()}"
                    )
                try:
                    info = http.post("/metadata", json={}).json()
                    if info.get("ready"):
                        ready_pids.add(info["worker_pid"])
                except (httpx.HTTPError, ValueError, KeyError):
                    time.sleep(0.05)

    def _startup_failed(self) -> bool:
        # A worker whose start-up fails is restarted by BentoML's arbiter: do not wait for it.
        try:
            return b"Application startup failed" in self.log_path.read_bytes()
        except OSError:
            return False

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM to the server's process group (BentoML's arbiter then stops its workers);
        SIGKILL to whatever of the server's process tree is still there after ``timeout``."""
        if self.process is None or self.process.poll() is not None:
            self._remove_own_log()
            return
        import psutil  # a BentoML dependency

        try:  # the workers run in process groups of their own: remember them by pid
            tree = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.Error:
            tree = []
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)  # start_new_session: pgid == pid
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=timeout)
        _, alive = psutil.wait_procs(tree, timeout=timeout)
        for child in alive:
            with contextlib.suppress(psutil.Error):
                child.kill()
        self._remove_own_log()

    def _remove_own_log(self) -> None:
        if self._own_home is not None:
            shutil.rmtree(self._own_home, ignore_errors=True)
        if self._own_log and not self._failed:
            self.log_path.unlink(missing_ok=True)

    def __enter__(self) -> ServiceProcess:
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> None:
        self._failed = self._failed or exc_type is not None  # keep the log for the post-mortem
        self.stop()
