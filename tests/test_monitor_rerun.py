"""The monitor's Re-run through the test client: a finished rerunnable task is re-run and
linked; one that cannot be re-run gets no button and a 409. The checks every action goes
through (access, token, rule, audit): tests/test_monitor_actions.py."""

from __future__ import annotations

import json
import logging
import sys
import types
import typing as t
from pathlib import Path

import flask
import pytest
from flask_threadctx.app_state import app_state

import rerun_app
from rerun_app import echo
from rerun_app import plain
from rerun_app import threadctx
from test_monitor_actions import AUDIT
from test_monitor_actions import Rule
from test_monitor_actions import token_of


@pytest.fixture
def audit(caplog: pytest.LogCaptureFixture) -> t.Callable[[], list[str]]:
    """The audit lines written so far."""
    caplog.set_level(logging.INFO, logger=AUDIT)
    return lambda: [r.getMessage() for r in caplog.records if r.name == AUDIT]


@pytest.fixture
def rerun_shop(tmp_path: Path) -> t.Iterator[t.Callable[[Rule | None], flask.Flask]]:
    """The app of tests/rerun_app.py, whose tasks other processes find by their import path,
    with a SQLite store and the monitor at /m."""
    apps: list[flask.Flask] = []

    def make_app(check_action: Rule | None) -> flask.Flask:
        app = rerun_app.create_app(f"sqlite:///{tmp_path}/tasks.db")
        apps.append(app)
        app.register_blueprint(threadctx.monitor(check_action=check_action), url_prefix="/m")
        return app

    yield make_app
    for app in apps:
        app_state(app).default.shutdown()


def test_an_allowed_user_reruns_a_finished_task_linked_to_it(
    rerun_shop: t.Callable[[Rule | None], flask.Flask], audit: t.Callable[[], list[str]]
) -> None:
    app = rerun_shop(lambda action, task_id: True)
    with app.test_request_context("/orders/7?page=2", method="POST"):
        original = echo.submit(1, item="tea")
    first = original.result(timeout=30)
    client = app.test_client()
    token = token_of(client)
    assert token is not None
    assert client.get(f"/m/api/tasks/{original.task.id}").get_json()["actions"] == ["rerun"]
    answer = client.post(f"/m/api/tasks/{original.task.id}/rerun", headers={"X-CSRF-Token": token})
    new_id = answer.get_json()["task"]
    assert (answer.status_code, answer.get_json()) == (
        201,
        {"task": new_id, "rerun_of": original.task.id},
    )
    assert answer.location == f"/m/api/tasks/{new_id}"
    with app.app_context():
        again = threadctx.get_task(new_id)
        assert again is not None
        assert again.result(timeout=30) == first  # its arguments and request, again
    detail = client.get(f"/m/api/tasks/{new_id}").get_json()
    assert (detail["rerun_of"], detail["state"], detail["actions"]) == (
        original.task.id,
        "succeeded",
        ["rerun"],
    )
    assert "rerun" not in detail  # what a re-run needs is never shown
    assert audit() == [
        f'action=rerun task_id="{original.task.id}" outcome=rerun status=201'
        f' remote_addr="127.0.0.1" new_task_id="{new_id}"'
    ]


def test_a_task_that_cannot_be_rerun_has_no_button_and_gets_409(
    rerun_shop: t.Callable[[Rule | None], flask.Flask], audit: t.Callable[[], list[str]]
) -> None:
    app = rerun_shop(lambda action, task_id: True)
    with app.app_context():
        future = plain.submit(1)
        future.result(timeout=30)
        submitted = threadctx.stats()["submitted"]
    client = app.test_client()
    token = token_of(client) or ""
    assert client.get(f"/m/api/tasks/{future.task.id}").get_json()["actions"] == []
    answer = client.post(f"/m/api/tasks/{future.task.id}/rerun", headers={"X-CSRF-Token": token})
    assert (answer.status_code, answer.mimetype) == (409, "application/json")
    error = answer.get_json()["error"]
    assert future.task.id in error and "rerunnable=True)'" in error
    unknown = client.post("/m/api/tasks/nope/rerun", headers={"X-CSRF-Token": token})
    assert unknown.status_code == 404
    with app.app_context():
        assert threadctx.stats()["submitted"] == submitted  # nothing was submitted
    assert [line.split(" remote_addr")[0] for line in audit()] == [
        f'action=rerun task_id="{future.task.id}" outcome=conflict status=409',
        'action=rerun task_id="nope" outcome=unknown status=404',
    ]
    assert audit()[0].endswith(f" reason={json.dumps(error)}")


def test_a_rerun_of_a_task_whose_function_is_gone_gets_409(
    rerun_shop: t.Callable[[Rule | None], flask.Flask], audit: t.Callable[[], list[str]]
) -> None:
    module: t.Any = types.ModuleType("monitor_rerun_gone")
    sys.modules["monitor_rerun_gone"] = module
    try:
        exec(
            "from rerun_app import threadctx\n"
            "@threadctx.task(rerunnable=True)\n"
            "def job(n):\n    return n * 2\n",
            vars(module),
        )
        app = rerun_shop(lambda action, task_id: True)
        with app.app_context():
            future = module.job.submit(21)
            assert future.result(timeout=30) == 42
        del module.job
        client = app.test_client()
        token = token_of(client) or ""
        url = f"/m/api/tasks/{future.task.id}/rerun"
        answer = client.post(url, headers={"X-CSRF-Token": token})
        assert answer.status_code == 409
        assert "'monitor_rerun_gone:job'" in answer.get_json()["error"]
    finally:
        sys.modules.pop("monitor_rerun_gone", None)
    (line,) = audit()
    assert line.startswith(f'action=rerun task_id="{future.task.id}" outcome=conflict status=409')
