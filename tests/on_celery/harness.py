"""Fixtures and helpers of the Celery tests: a real Redis server, started and stopped."""

from __future__ import annotations

import collections.abc as cabc
import os
import subprocess
import sys
import typing as t
from pathlib import Path

import pytest
import redis
from redis_server import free_port
from redis_server import RedisServer

__all__ = ["RedisServer", "free_port"]

HERE = Path(__file__).parent


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> cabc.Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    try:
        server.start()
    except RuntimeError as error:
        pytest.fail(str(error))
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
    env: dict[str, str], log: t.IO[bytes], *options: str, app: str = "ctx_tasks"
) -> subprocess.Popen[bytes]:
    """``flask --app APP threadctx worker`` with a prefork pool, as in production, its log
    written to ``log``."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flask",
            "--app",
            app,
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
        start_new_session=True,  # its pool processes too can be stopped as one group
    )


T = t.TypeVar("T")
