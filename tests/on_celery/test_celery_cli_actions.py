"""``flask threadctx rerun`` and ``cancel`` of a Celery task, against a real Redis and worker:
the re-run goes to the workers and the command ends at once, printing only the new id."""

from __future__ import annotations

import collections.abc as cabc
import os

import flask
import pytest
import rerun_tasks
from flask_threadctx.app_state import app_state
from harness import StartWorker
from rerun_tasks import echo
from rerun_tasks import threadctx

pytestmark = pytest.mark.integration  # separate worker processes: not in the fast loop


@pytest.fixture
def made(redis_url: str) -> cabc.Iterator[list[flask.Flask]]:
    os.environ["THREADCTX_TEST_REDIS"] = redis_url
    apps: list[flask.Flask] = []
    yield apps
    for app in apps:
        app_state(app).default.shutdown()


def test_rerun_of_a_celery_task_prints_its_id_and_leaves_it_to_the_workers(
    made: list[flask.Flask], workers: StartWorker
) -> None:
    workers(app="rerun_tasks")
    app = rerun_tasks.create_app()
    made.append(app)
    with app.app_context():
        original = echo.submit(1, item="tea")
        assert original.result(timeout=60)["args"] == [1]
    out = app.test_cli_runner().invoke(args=["threadctx", "rerun", original.task.id])
    assert (out.exit_code, out.stderr) == (0, "")
    (new_id,) = out.stdout.splitlines()
    with app.app_context():
        again = threadctx.get_task(new_id)
        assert again is not None
        seen = again.result(timeout=60)
        assert (seen["args"], seen["backend"]) == ([1], "celery")
        assert seen["pid"] != os.getpid()  # run by a worker, not by the command
        assert again.task.rerun_of == original.task.id
    out = app.test_cli_runner().invoke(args=["threadctx", "cancel", new_id])
    assert (out.exit_code, out.output) == (0, "already finished\n")
