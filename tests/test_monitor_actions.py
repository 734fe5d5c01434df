"""The monitor's actions, Stop and Re-run, through the test client: who may take them, the CSRF
token, what they answer and the audit line each attempt writes. Re-run's own cases are in
tests/test_monitor_rerun.py; in a real browser, tests/integration/test_monitor_actions_browser.py.
"""

from __future__ import annotations

import collections.abc as cabc
import json
import logging
import re
import threading
import typing as t
from pathlib import Path

import flask
import pytest
from flask_threadctx import check_cancelled
from flask_threadctx import TaskCancelled
from flask_threadctx import ThreadContext
from flask_threadctx.app_state import app_state
from flask_threadctx.future import TaskFuture

from shop import make
from stop_cases import record_of

SECRET = "the-app's-secret"
AUDIT = "flask_threadctx.audit"
Rule = t.Callable[[str, str], bool]


@pytest.fixture
def apps(tmp_path: Path) -> cabc.Iterator[list[flask.Flask]]:
    made: list[flask.Flask] = []
    yield made
    for app in made:
        app_state(app).default.shutdown()


@pytest.fixture
def audit(caplog: pytest.LogCaptureFixture) -> cabc.Callable[[], list[str]]:
    """The audit lines written so far."""
    caplog.set_level(logging.INFO, logger=AUDIT)
    return lambda: [r.getMessage() for r in caplog.records if r.name == AUDIT]


def shop(
    apps: list[flask.Flask],
    folder: Path,
    check_action: Rule | None = None,
    *,
    store: bool = True,
    check_access: t.Callable[[], bool] | None = None,
    **config: t.Any,
) -> flask.Flask:
    config = {"SECRET_KEY": SECRET, **config}
    if not store:
        config["THREADCTX_TASK_STORE"] = None
    app = make(folder, **config)
    apps.append(app)
    monitor = app_state(app).extension.monitor(check_access, check_action=check_action)
    app.register_blueprint(monitor, url_prefix="/m")
    return app


def token_of(client: t.Any) -> str | None:
    """The CSRF token the page gives its script, as the page's script reads it."""
    (line,) = [line for line in client.get("/m/").text.splitlines() if "const TOKEN" in line]
    return t.cast("str | None", json.loads(line.split(" = ", 1)[1].split(";")[0]))


def running(app: flask.Flask) -> tuple[TaskFuture[None], threading.Event]:
    """A task that runs, checking for a stop, until it is stopped or released."""
    started, release = threading.Event(), threading.Event()

    def import_feed() -> None:
        started.set()
        while not release.wait(0.005):
            check_cancelled()

    with app.app_context():
        future = app_state(app).extension.submit(import_feed)
    started.wait()
    return future, release


@pytest.mark.parametrize("store", [False, True], ids=["this-process", "sqlite-store"])
def test_an_allowed_user_stops_a_running_task(
    apps: list[flask.Flask], tmp_path: Path, audit: t.Callable[[], list[str]], store: bool
) -> None:
    asked: list[tuple[str, str]] = []

    def may(action: str, task_id: str) -> bool:
        asked.append((action, task_id))
        return True

    app = shop(apps, tmp_path, may, store=store)
    future, release = running(app)
    task_id = future.task.id
    client = app.test_client()
    token = token_of(client)
    assert token is not None and re.fullmatch("[0-9a-f]{64}", token)
    assert client.get(f"/m/api/tasks/{task_id}").get_json()["actions"] == ["stop"]
    assert asked == [("stop", task_id)]
    try:
        answer = client.post(f"/m/api/tasks/{task_id}/stop", headers={"X-CSRF-Token": token})
        assert (answer.status_code, answer.get_json()) == (200, {"stopped": True})
        with pytest.raises(TaskCancelled):
            future.result()
    finally:
        release.set()
    assert future.task.state == "cancelled"
    again = client.post(f"/m/api/tasks/{task_id}/stop", headers={"X-CSRF-Token": token})
    assert (again.status_code, again.get_json()) == (200, {"stopped": False})
    detail = client.get(f"/m/api/tasks/{task_id}").get_json()
    assert (detail["state"], detail["actions"]) == ("cancelled", [])  # not rerunnable
    assert audit() == [
        f'action=stop task_id="{task_id}" outcome=stopped status=200 remote_addr="127.0.0.1"',
        f'action=stop task_id="{task_id}" outcome=already_finished status=200'
        ' remote_addr="127.0.0.1"',
    ]


def test_without_check_action_there_are_no_actions(
    apps: list[flask.Flask], tmp_path: Path, audit: t.Callable[[], list[str]]
) -> None:
    app = shop(apps, tmp_path, None)
    future, release = running(app)
    try:
        client = app.test_client()
        assert token_of(client) is None
        with client.session_transaction() as session:
            assert dict(session) == {}  # nothing put in the session without actions
        assert client.get(f"/m/api/tasks/{future.task.id}").get_json()["actions"] == []
        for action in ("stop", "rerun"):
            answer = client.post(f"/m/api/tasks/{future.task.id}/{action}")
            assert (answer.status_code, answer.get_json()) == (
                403,
                {
                    "error": "Missing or wrong CSRF token: send the 'X-CSRF-Token' header the"
                    " monitor's page sends (reload the page if the session changed)."
                },
            )
        assert future.task.state == "running"
    finally:
        release.set()
    future.result()
    assert [line.split(" remote_addr")[0] for line in audit()] == [
        f'action={action} task_id="{future.task.id}" outcome=bad_token status=403'
        for action in ("stop", "rerun")
    ]


def test_without_check_action_even_a_valid_token_is_refused(
    apps: list[flask.Flask], tmp_path: Path, audit: t.Callable[[], list[str]]
) -> None:
    """A token of another monitor of the app, one with actions, opens nothing here."""
    app = shop(apps, tmp_path, None)
    app.register_blueprint(
        app_state(app).extension.monitor(check_action=lambda a, i: True, name="acting"),
        url_prefix="/acting",
    )
    future, release = running(app)
    try:
        client = app.test_client()
        page = client.get("/acting/").text
        token = re.search('const TOKEN = "([0-9a-f]+)";', page)
        assert token is not None
        headers = {"X-CSRF-Token": token.group(1)}
        answer = client.post(f"/m/api/tasks/{future.task.id}/stop", headers=headers)
        assert answer.status_code == 403
        assert future.task.state == "running"
    finally:
        release.set()
    future.result()
    assert audit()[0].startswith(f'action=stop task_id="{future.task.id}" outcome=bad_token')


def test_a_user_that_check_action_refuses_sees_no_button_and_gets_403(
    apps: list[flask.Flask], tmp_path: Path, audit: t.Callable[[], list[str]]
) -> None:
    app = shop(apps, tmp_path, lambda action, task_id: flask.session.get("user") == "ops")
    future, release = running(app)
    task_id = future.task.id
    try:
        client = app.test_client()
        token = token_of(client)
        assert token is not None  # the page may be seen, and its token is valid ...
        assert client.get(f"/m/api/tasks/{task_id}").get_json()["actions"] == []
        answer = client.post(f"/m/api/tasks/{task_id}/stop", headers={"X-CSRF-Token": token})
        assert (answer.status_code, answer.get_json()) == (
            403,
            {"error": "This request may not stop tasks."},
        )
        assert future.task.state == "running"  # ... and nothing was done
        with client.session_transaction() as session:
            session["user"] = "ops"
        assert client.get(f"/m/api/tasks/{task_id}").get_json()["actions"] == ["stop"]
        answer = client.post(f"/m/api/tasks/{task_id}/stop", headers={"X-CSRF-Token": token})
        assert answer.get_json() == {"stopped": True}
        with pytest.raises(TaskCancelled):
            future.result()
    finally:
        release.set()
    assert [line.split(" status")[0] for line in audit()] == [
        f'action=stop task_id="{task_id}" outcome=refused',
        f'action=stop task_id="{task_id}" outcome=stopped',
    ]


def test_check_access_applies_to_the_actions_too(
    apps: list[flask.Flask], tmp_path: Path, audit: t.Callable[[], list[str]]
) -> None:
    seeing = [True]
    app = shop(apps, tmp_path, lambda a, i: True, check_access=lambda: seeing[0])
    future, release = running(app)
    try:
        client = app.test_client()
        token = token_of(client)
        assert token is not None
        seeing[0] = False
        url = f"/m/api/tasks/{future.task.id}/stop"
        answer = client.post(url, headers={"X-CSRF-Token": token})
        assert (answer.status_code, answer.get_json()) == (
            403,
            {"error": "This request may not see the tasks."},
        )
        assert future.task.state == "running"
    finally:
        release.set()
    future.result()
    assert audit() == [
        f'action=stop task_id="{future.task.id}" outcome=denied status=403'
        ' remote_addr="127.0.0.1" reason="This request may not see the tasks."'
    ]


def test_a_token_is_refused_when_missing_wrong_or_of_another_session(
    apps: list[flask.Flask], tmp_path: Path, audit: t.Callable[[], list[str]]
) -> None:
    """A cross-site POST carries the session cookie (SameSite lets it, or an old browser does)
    but cannot read the page, so it has no token: refused, whatever its Origin says."""
    app = shop(apps, tmp_path, lambda a, i: True)
    future, release = running(app)
    url = f"/m/api/tasks/{future.task.id}/stop"
    try:
        client, other = app.test_client(), app.test_client()
        token, others = token_of(client), token_of(other)
        assert token is not None and others is not None and token != others
        for headers in [
            {"Origin": "https://evil.example", "Referer": "https://evil.example/"},
            {"X-CSRF-Token": ""},
            {"X-CSRF-Token": token.upper()},
            {"X-CSRF-Token": token[:-1]},
            {"X-CSRF-Token": others},  # valid, for another session
            {"X-CSRF-Token": "é\u00ff" + token},  # not ASCII: refused, no error
        ]:
            answer = client.post(url, headers=headers)
            assert answer.status_code == 403, headers
        form = client.post(url, data={"csrf_token": token, "X-CSRF-Token": token})
        assert form.status_code == 403  # the header only: a cross-site form cannot set one
        assert future.task.state == "running"
        # A session that lost its random value (signed out, cleared) has no valid token.
        with client.session_transaction() as session:
            session.clear()
        assert client.post(url, headers={"X-CSRF-Token": token}).status_code == 403
        assert future.task.state == "running"
    finally:
        release.set()
    future.result()
    assert {line.split(" status")[0] for line in audit()} == {
        f'action=stop task_id="{future.task.id}" outcome=bad_token'
    }
    assert len(audit()) == 8


def test_the_token_of_one_process_is_good_in_another(
    apps: list[flask.Flask], tmp_path: Path
) -> None:
    """Behind a load balancer: the page from one process, the action to another. Two apps with
    the same SECRET_KEY stand for two processes."""
    one, two = shop(apps, tmp_path, lambda a, i: True), shop(apps, tmp_path, lambda a, i: True)
    future, release = running(two)
    try:
        client = one.test_client()
        token = token_of(client)
        assert token is not None
        cookie = client.get_cookie("session")
        assert cookie is not None
        there = two.test_client()
        there.set_cookie("session", cookie.value)
        url = f"/m/api/tasks/{future.task.id}/stop"
        answer = there.post(url, headers={"X-CSRF-Token": token})
        assert (answer.status_code, answer.get_json()) == (200, {"stopped": True})
        with pytest.raises(TaskCancelled):
            future.result()
    finally:
        release.set()
    assert future.task.state == "cancelled"
    rotated = shop(apps, tmp_path, lambda a, i: True, SECRET_KEY="another secret")
    elsewhere = rotated.test_client()
    elsewhere.set_cookie("session", cookie.value)
    assert elsewhere.post(url, headers={"X-CSRF-Token": token}).status_code == 403


@pytest.mark.parametrize(
    ("task_id", "shown"),
    [
        ("nope", '"nope"'),
        ('x" outcome=stopped status=200\naction=stop task_id="y', None),
        ("\u2028line\rbreak\x1b[31m", '"\\u2028line\\rbreak\\u001b[31m"'),
        ("z" * 5000, '"' + "z" * 500 + '...[5000 characters]"'),
    ],
    ids=["unknown", "forged-line", "control-characters", "long"],
)
def test_hostile_ids_get_404_and_one_escaped_audit_line(
    apps: list[flask.Flask],
    tmp_path: Path,
    audit: t.Callable[[], list[str]],
    task_id: str,
    shown: str | None,
) -> None:
    from urllib.parse import quote

    app = shop(apps, tmp_path, lambda a, i: True)
    client = app.test_client()
    token = token_of(client)
    assert token is not None
    answer = client.post(f"/m/api/tasks/{quote(task_id)}/stop", headers={"X-CSRF-Token": token})
    assert answer.status_code == 404
    assert answer.get_json()["error"].startswith("No task ")
    (line,) = audit()
    assert "\n" not in line and "\r" not in line and "\u2028" not in line
    fields = dict(re.findall(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)', line))
    assert list(fields) == ["action", "task_id", "outcome", "status", "remote_addr", "reason"]
    assert (fields["action"], fields["outcome"], fields["status"]) == ("stop", "unknown", "404")
    if shown is None:
        assert json.loads(fields["task_id"]) == task_id
    else:
        assert fields["task_id"] == shown


def test_the_audit_line_names_the_address_werkzeug_gives(
    apps: list[flask.Flask], tmp_path: Path, audit: t.Callable[[], list[str]]
) -> None:
    """A client's 'X-Forwarded-For' counts only behind ProxyFix, which the app chooses; the
    audit line holds what Werkzeug says the address is, quoted."""
    from werkzeug.middleware.proxy_fix import ProxyFix

    app = shop(apps, tmp_path, lambda a, i: True)
    client = app.test_client()
    token = token_of(client)
    assert token is not None
    forged = {"X-CSRF-Token": token, "X-Forwarded-For": "10.9.8.7 outcome=stopped"}
    client.post("/m/api/tasks/nope/stop", headers=forged)
    app.wsgi_app = ProxyFix(app.wsgi_app, x_for=1)  # type: ignore[method-assign]
    client.post("/m/api/tasks/nope/stop", headers=forged)
    client.post("/m/api/tasks/nope/stop", headers={**forged, "X-Forwarded-For": "203.0.113.9"})
    assert [line.split(" reason=")[0] for line in audit()] == [
        'action=stop task_id="nope" outcome=unknown status=404 remote_addr="127.0.0.1"',
        'action=stop task_id="nope" outcome=unknown status=404'
        ' remote_addr="10.9.8.7 outcome=stopped"',
        'action=stop task_id="nope" outcome=unknown status=404 remote_addr="203.0.113.9"',
    ]


def test_the_audit_record_carries_its_fields_for_structured_logs(
    apps: list[flask.Flask], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=AUDIT)
    app = shop(apps, tmp_path, lambda a, i: False)
    client = app.test_client()
    token = token_of(client)
    client.post("/m/api/tasks/abc/rerun", headers={"X-CSRF-Token": token or ""})
    (record,) = [r for r in caplog.records if r.name == AUDIT]
    assert record.levelno == logging.WARNING
    assert record.audit == {  # type: ignore[attr-defined]
        "action": "rerun",
        "task_id": "abc",
        "outcome": "refused",
        "status": 403,
        "remote_addr": "127.0.0.1",
        "new_task_id": None,
        "reason": "This request may not re-run tasks.",
    }


def test_a_check_that_aborts_or_raises_is_audited(
    apps: list[flask.Flask],
    tmp_path: Path,
    audit: t.Callable[[], list[str]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    def sign_in_first(action: str, task_id: str) -> bool:
        if task_id == "boom":
            raise KeyError("users")
        flask.abort(flask.redirect("/login"))

    app = shop(apps, tmp_path, sign_in_first)
    client = app.test_client()
    token = token_of(client) or ""
    answer = client.post("/m/api/tasks/abc/stop", headers={"X-CSRF-Token": token})
    assert (answer.status_code, answer.location) == (302, "/login")
    with pytest.raises(KeyError):
        client.post("/m/api/tasks/boom/stop", headers={"X-CSRF-Token": token})
    assert [line.split(" remote_addr")[0] for line in audit()] == [
        'action=stop task_id="abc" outcome=refused status=302',
        'action=stop task_id="boom" outcome=error status=500',
    ]
    assert audit()[1].endswith(" reason=\"KeyError: 'users'\"")
    # A refusal is a WARNING whatever its status, a redirect's too.
    assert [r.levelname for r in caplog.records if r.name == AUDIT] == ["WARNING", "ERROR"]


def test_actions_answer_post_only(apps: list[flask.Flask], tmp_path: Path) -> None:
    app = shop(apps, tmp_path, lambda a, i: True)
    answer = app.test_client().get("/m/api/tasks/abc/stop")
    assert answer.status_code == 405


def test_check_action_is_checked_where_it_is_given(apps: list[flask.Flask], tmp_path: Path) -> None:
    ext = ThreadContext()
    with pytest.raises(TypeError, match=r"^'check_action' must be a function that takes the"):
        ext.monitor(check_action="ops")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"give it the signature 'check_action\(action, task_id\)'"):
        ext.monitor(check_action=lambda: True)  # type: ignore[arg-type,misc]
    ext.monitor(check_action=lambda *args: True)
    app = make(tmp_path, SECRET_KEY=None)
    apps.append(app)
    monitor = app_state(app).extension.monitor(check_action=lambda a, i: True)
    with pytest.raises(RuntimeError, match=r"need the app's 'SECRET_KEY'"):
        app.register_blueprint(monitor, url_prefix="/m")


def test_a_filter_names_the_user_as_the_docs_show(
    apps: list[flask.Flask], tmp_path: Path, audit: t.Callable[[], list[str]]
) -> None:
    """docs/monitoring.rst's filter, with the session for flask_login: it runs in the request,
    and what it adds is escaped like the rest, so a user name cannot forge a line either."""

    class WithUser(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            user = flask.session.get("user") if flask.has_request_context() else None
            record.msg = f"{record.msg} user={json.dumps(user)}"
            return True

    logger = logging.getLogger(AUDIT)
    with_user = WithUser()
    logger.addFilter(with_user)
    try:
        app = shop(apps, tmp_path, lambda a, i: True)
        client = app.test_client()
        token = token_of(client) or ""
        with client.session_transaction() as session:
            session["user"] = 'ops"\naction=rerun'
        client.post("/m/api/tasks/nope/stop", headers={"X-CSRF-Token": token})
    finally:
        logger.removeFilter(with_user)
    (line,) = audit()
    assert line.endswith(' user="ops\\"\\naction=rerun"')
    assert "\n" not in line


def test_a_stop_that_its_process_does_not_answer_gets_504_and_its_audit_line(
    apps: list[flask.Flask], tmp_path: Path, audit: t.Callable[[], list[str]]
) -> None:
    app = shop(apps, tmp_path, lambda action, task_id: True, THREADCTX_CANCEL_TIMEOUT=0.05)
    store = app_state(app).recorder
    assert store is not None
    store.store.write([record_of("gone.example:4242")])
    client = app.test_client()
    token = token_of(client)
    assert token is not None
    answer = client.post("/m/api/tasks/t-elsewhere/stop", headers={"X-CSRF-Token": token})
    assert answer.status_code == 504
    error = answer.get_json()["error"]
    assert error.startswith("Task t-elsewhere runs in the process gone.example:4242, which did")
    assert audit() == [
        f'action=stop task_id="t-elsewhere" outcome=no_answer status=504'
        f' remote_addr="127.0.0.1" reason={json.dumps(error)}'
    ]


def test_one_monitor_registered_twice_has_a_token_for_each(
    apps: list[flask.Flask], tmp_path: Path, audit: t.Callable[[], list[str]]
) -> None:
    """Registered again under another name, as Flask asks, the same blueprint's token of one
    registration opens nothing in the other."""
    app = shop(apps, tmp_path, lambda a, i: True)
    monitor = app.blueprints["threadctx_monitor"]
    app.register_blueprint(monitor, url_prefix="/m2", name="second_monitor")
    future, release = running(app)
    try:
        client = app.test_client()
        first = token_of(client)
        page = client.get("/m2/").text
        second = re.search('const TOKEN = "([0-9a-f]+)";', page)
        assert first is not None and second is not None and first != second.group(1)
        url = f"/m2/api/tasks/{future.task.id}/stop"
        answer = client.post(url, headers={"X-CSRF-Token": first})
        assert answer.status_code == 403
        assert future.task.state == "running"
        answer = client.post(url, headers={"X-CSRF-Token": second.group(1)})
        assert (answer.status_code, answer.get_json()) == (200, {"stopped": True})
    finally:
        release.set()
    assert [line.split(" status")[0] for line in audit()] == [
        f'action=stop task_id="{future.task.id}" outcome=bad_token',
        f'action=stop task_id="{future.task.id}" outcome=stopped',
    ]
