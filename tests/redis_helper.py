"""A private ``redis-server`` for the tests: on a free loopback port, in a temporary directory,
no persistence; stopped by the test that started it. Tests that need one skip, saying so, when
``redis-server`` is not installed (CI installs it: .ci/run)."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from serving.launch import free_port

REDIS_SERVER = shutil.which("redis-server")


def require_redis_server() -> str:
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server; CI installs it)")
    return REDIS_SERVER


class RedisServer:
    """``redis-server`` on ``127.0.0.1:port`` with its files under ``directory``."""

    def __init__(self, directory: Path, port: int | None = None):
        self.binary = require_redis_server()
        self.directory, self.port = Path(directory), port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self) -> RedisServer:
        self.directory.mkdir(parents=True, exist_ok=True)
        cmd = [
            self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir",
            str(self.directory), "--save", "", "--appendonly", "no", "--daemonize", "no",
            "--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru",
        ]  # fmt: skip
        log = open(self.directory / f"redis-{self.port}.log", "ab")  # noqa: SIM115
        self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        import redis

        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + 20
        while True:
            try:
                if client.ping():
                    return self
            except redis.exceptions.ConnectionError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def kill(self) -> None:
        """SIGKILL: Redis gone without a goodbye, as in a crash."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
