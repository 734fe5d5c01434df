"""Fixtures and helpers of the Celery tests: a real Redis server, started and stopped; the app
with a worker in the test process (threads pool) that the fast tests share, one per module; the
web app and the ``flask threadctx worker`` processes of the integration tests."""

from __future__ import annotations

import collections.abc as cabc
import json
import os
import signal
import subprocess
import sys
import time
import typing as t
from pathlib import Path

import celery.contrib.testing.worker
import ctx_tasks
import flask
import pytest
import redis
from celery._state import _set_task_join_will_block
from flask_threadctx import TaskFuture
from flask_threadctx.app_state import app_state
from redis_server import free_port
from redis_server import RedisServer

__all__ = ["RedisServer", "free_port"]

HERE = Path(__file__).parent

threadctx = ctx_tasks.threadctx


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


def start_worker(app: flask.Flask) -> t.ContextManager[t.Any]:
    made = app_state(app).backend("celery").celery
    made.conf.worker_redirect_stdouts = False  # pytest's output would go to the worker's log
    # What Celery sets in each process of a prefork worker: a retry sent from a task does not
    # subscribe for its result (which, here, would outlive the Redis server of the test).
    _set_task_join_will_block(True)
    return celery.contrib.testing.worker.start_worker(  # type: ignore[no-any-return]
        made, pool="threads", concurrency=2, perform_ping_check=False, loglevel="WARNING"
    )


@pytest.fixture(scope="module")
def app(redis_server: RedisServer) -> cabc.Iterator[flask.Flask]:
    os.environ["THREADCTX_TEST_REDIS"] = redis_server.url
    made = ctx_tasks.create_app()
    with start_worker(made):
        yield made
    app_state(made).default.shutdown()


@pytest.fixture
def app_ctx(app: flask.Flask) -> cabc.Iterator[None]:
    with app.app_context():
        yield


def submit_from_request(
    app: flask.Flask, fn: t.Callable[..., t.Any], *args: t.Any, **request: t.Any
) -> TaskFuture[t.Any]:
    with app.test_request_context(**request):
        return threadctx.submit(fn, *args)


def wait_until_ready(worker: subprocess.Popen[bytes], log: Path) -> None:
    """Watch the worker's log until it says it is ready for tasks."""
    deadline = time.monotonic() + 60
    while b" ready." not in log.read_bytes():
        if worker.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"the worker did not start:\n{log.read_text()}")
        time.sleep(0.05)  # the worker tells only its log


def stop(worker: subprocess.Popen[bytes]) -> None:
    worker.send_signal(signal.SIGTERM)
    try:
        worker.wait(10)
    except subprocess.TimeoutExpired:
        # Now and then a pool process waits up to 30 s for the main process to read its last
        # messages (billiard's exit check); every result is in Redis already.
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()


@pytest.fixture
def web(worker_env: dict[str, str]) -> cabc.Iterator[flask.Flask]:
    os.environ["THREADCTX_TEST_REDIS"] = worker_env["THREADCTX_TEST_REDIS"]
    app = ctx_tasks.create_app()
    yield app
    app_state(app).default.shutdown()


@pytest.fixture
def workers(worker_env: dict[str, str], tmp_path: Path) -> cabc.Iterator[StartWorker]:
    started: list[tuple[subprocess.Popen[bytes], t.IO[bytes]]] = []

    def start(
        *options: str,
        app: str = "ctx_tasks",
        celery: dict[str, t.Any] | None = None,
        config: dict[str, t.Any] | None = None,
    ) -> subprocess.Popen[bytes]:
        path = tmp_path / f"worker-{len(started)}.log"
        log = path.open("wb")
        env = {
            **worker_env,
            "THREADCTX_TEST_CELERY": json.dumps(celery or {}),
            "THREADCTX_TEST_CONFIG": json.dumps(config or {}),
        }
        worker = start_cli_worker(env, log, *options, app=app)
        started.append((worker, log))
        wait_until_ready(worker, path)
        return worker

    yield start
    for worker, log in started:
        if worker.poll() is None:
            stop(worker)
        log.close()


class StartWorker(t.Protocol):
    def __call__(
        self,
        *options: str,
        app: str = ...,
        celery: dict[str, t.Any] | None = ...,
        config: dict[str, t.Any] | None = ...,
    ) -> subprocess.Popen[bytes]: ...
