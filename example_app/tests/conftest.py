from __future__ import annotations

import collections.abc as cabc
import dataclasses
import os
import signal
import subprocess
import sys
import time
import typing as t
from pathlib import Path

import flask
import pytest
from flask_threadctx.app_state import app_state

from example_app import create_app
from example_app import threadctx
from example_app.db import init_db

REPO = Path(__file__).resolve().parents[2]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "app_config(**config): more config for the test's app")


@dataclasses.dataclass
class CeleryDeployment:
    """A Redis and a ``flask threadctx worker`` (prefork, 2 processes) serving the shop."""

    redis_url: str
    database: Path


@pytest.fixture(scope="session")
def celery_deployment(
    tmp_path_factory: pytest.TempPathFactory,
) -> cabc.Iterator[CeleryDeployment]:
    # The Redis server the library's own Celery tests start, found and run the same way.
    sys.path.insert(0, str(REPO / "tests" / "on_celery"))
    from harness import start_cli_worker
    from redis_server import RedisServer

    folder = tmp_path_factory.mktemp("shop-on-celery")
    server = RedisServer(folder)
    try:
        server.start()
    except RuntimeError as error:
        pytest.fail(str(error))
    deployment = CeleryDeployment(server.url, folder / "shop.sqlite")
    env = {
        **os.environ,
        "FLASK_THREADCTX_BACKEND": "celery",
        "FLASK_REDIS_URL": deployment.redis_url,
        "FLASK_DATABASE": str(deployment.database),
    }
    with open(folder / "worker.log", "wb") as log:
        worker = start_cli_worker(
            {**env, "PYTHONPATH": str(REPO)}, log, "--concurrency", "2", app="example_app"
        )
    try:
        _wait_until_ready(deployment, worker, folder / "worker.log")
        yield deployment
    finally:
        worker.terminate()
        try:
            worker.wait(10)
        except subprocess.TimeoutExpired:
            # Now and then a pool process waits up to 30 s for the main process to read its
            # last messages (billiard's exit check); every result is in Redis already.
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
        server.stop()


def _wait_until_ready(
    deployment: CeleryDeployment, worker: subprocess.Popen[bytes], log: Path
) -> None:
    app = create_app({"THREADCTX_BACKEND": "celery", "REDIS_URL": deployment.redis_url})
    control = app_state(app).backend("celery").celery.control
    deadline = time.monotonic() + 60
    while not control.ping(timeout=0.5):  # each ping waits for replies: no sleep needed
        if worker.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"The Celery worker did not start:\n{log.read_text()}")


@pytest.fixture(params=["threads", pytest.param("celery", marks=pytest.mark.integration)])
def backend(request: pytest.FixtureRequest) -> str:
    """Which backend the shop runs on: every test runs on both unless it says otherwise (on
    Celery with a separate worker, so not in the fast loop)."""
    return t.cast(str, request.param)


@pytest.fixture
def app(tmp_path: Path, request: pytest.FixtureRequest, backend: str) -> cabc.Iterator[flask.Flask]:
    marker = request.node.get_closest_marker("app_config")
    config = {
        "TESTING": True,
        "DATABASE": str(tmp_path / "shop.sqlite"),
        "THREADCTX_TASK_STORE": f"sqlite:///{tmp_path / 'tasks.db'}",
        "MONITOR_TOKEN": "staff-only",
        "REPORT_STEP_SECONDS": 0,
    }
    if backend == "celery":
        deployment: CeleryDeployment = request.getfixturevalue("celery_deployment")
        config.update(
            THREADCTX_BACKEND="celery",
            REDIS_URL=deployment.redis_url,
            DATABASE=str(deployment.database),  # the worker's
            THREADCTX_TASK_STORE="celery",
        )
    app = create_app({**config, **({} if marker is None else marker.kwargs)})
    with app.app_context():
        init_db()
    yield app
    with app.app_context():
        threadctx.shutdown(wait=True)
