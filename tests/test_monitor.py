"""The monitor blueprint's JSON API, its page, and its access check, through the test client.
The page's live behaviour in a real browser: tests/integration/test_monitor_browser.py."""

from __future__ import annotations

import json
import threading
import typing as t
from pathlib import Path

import flask
import pytest
from flask_threadctx import report_progress
from flask_threadctx import ThreadContext
from flask_threadctx.app_state import app_state

from family import broken
from family import COUNTS_OF_TOP_AND_BROKEN
from family import top


def make(folder: Path, store: bool, **config: t.Any) -> flask.Flask:
    app = flask.Flask("shop", instance_path=str(folder))
    app.config.update(TESTING=True, THREADCTX_MAX_WORKERS=4)
    if store:
        app.config["THREADCTX_TASK_STORE"] = "sqlite:///tasks.db"
    app.config.update(config)
    ThreadContext(app)
    return app


Shop = t.Callable[..., flask.Flask]


@pytest.fixture
def shop(tmp_path: Path) -> t.Iterator[Shop]:
    """Makes the app "shop" in ``tmp_path``, with a SQLite store or without, and the config
    given (see ``make``); its pool is shut down after the test."""
    made: list[flask.Flask] = []

    def make_shop(store: bool, **config: t.Any) -> flask.Flask:
        made.append(make(tmp_path, store, **config))
        return made[-1]

    yield make_shop
    for app in made:
        app_state(app).default.shutdown()


@pytest.fixture(params=[False, True], ids=["this-process", "sqlite-store"])
def app(request: pytest.FixtureRequest, shop: Shop) -> flask.Flask:
    app = shop(request.param)
    app.register_blueprint(app_state(app).extension.monitor(), url_prefix="/admin/tasks")
    return app


def test_the_api_shows_counts_history_tasks_and_trees(app: flask.Flask) -> None:
    ext = app_state(app).extension
    with app.test_request_context("/orders", method="POST"):
        root = ext.submit(top)
        failed = ext.submit(broken)
        assert root.result() == "leaf"
        assert isinstance(failed.exception(), ValueError)
    client = app.test_client()
    stats = client.get("/admin/tasks/api/stats").get_json()
    assert stats["counts"] == COUNTS_OF_TOP_AND_BROKEN
    assert len(stats["history"]) == 30
    assert sum(h["succeeded"] for h in stats["history"]) == 3
    assert sum(h["failed"] for h in stats["history"]) == 1
    recent = client.get("/admin/tasks/api/tasks").get_json()["tasks"]
    assert sorted(r["name"] for r in recent) == ["broken", "leaf", "middle", "top"]
    (bad,) = client.get("/admin/tasks/api/tasks?state=failed").get_json()["tasks"]
    assert (bad["id"], bad["error"], bad["request"]) == (
        failed.task.id,
        "ValueError: no stock for 'lamp'",
        "POST /orders",
    )
    assert failed.task.started_at is not None
    assert bad["waited"] == pytest.approx(failed.task.started_at - failed.task.submitted_at)
    named = client.get("/admin/tasks/api/tasks?name=leaf&limit=1").get_json()["tasks"]
    assert [(r["name"], r["progress"]) for r in named] == [
        ("leaf", {"done": 3, "total": 4, "note": "almost"})
    ]
    tree = client.get(f"/admin/tasks/api/tasks/{root.task.id}").get_json()
    assert (tree["name"], tree["state"]) == ("top", "succeeded")
    (child,) = tree["children"]
    (grandchild,) = child["children"]
    assert (child["name"], grandchild["name"], grandchild["children"]) == ("middle", "leaf", [])
    assert grandchild["parent_id"] == child["id"]


def test_the_api_refuses_bad_queries(app: flask.Flask) -> None:
    client = app.test_client()
    for query, error in [
        ("state=done", "'state' must be one of pending, running, retrying, succeeded, failed,"),
        ("limit=0", "'limit' must be a whole number from 1 to 500, not '0'."),
        ("limit=x", "'limit' must be a whole number from 1 to 500, not 'x'."),
    ]:
        response = client.get(f"/admin/tasks/api/tasks?{query}")
        assert response.status_code == 400
        assert response.get_json()["error"].startswith(error)
    response = client.get("/admin/tasks/api/tasks/nope")
    assert (response.status_code, response.get_json()) == (
        404,
        {"error": "No task 'nope': unknown, or it finished long ago."},
    )


def test_a_running_task_shows_its_progress(app: flask.Flask) -> None:
    ext = app_state(app).extension
    reported, release = threading.Event(), threading.Event()

    def slow() -> None:
        report_progress(40, 100, "copying")
        reported.set()
        release.wait()

    with app.app_context():
        future = ext.submit(slow)
    reported.wait()
    try:
        (running,) = (
            app.test_client().get("/admin/tasks/api/tasks?state=running").get_json()["tasks"]
        )
        assert (running["id"], running["progress"], running["ran"]) == (
            future.task.id,
            {"done": 40, "total": 100, "note": "copying"},
            None,
        )
    finally:
        release.set()
    future.result()


def test_the_page_points_at_its_api(app: flask.Flask) -> None:
    response = app.test_client().get("/admin/tasks/")
    assert response.status_code == 200
    assert response.headers["Cache-Control"] == "no-store"
    assert 'const API = "/admin/tasks/api";' in response.text


def test_check_access_says_no_and_nothing_is_sent(shop: Shop) -> None:
    app = shop(True)
    allowed: list[bool] = [False]
    calls: list[str] = []

    def check() -> bool:
        calls.append(flask.request.path)
        return allowed[0]

    ext = app_state(app).extension
    app.register_blueprint(ext.monitor(check_access=check), url_prefix="/m")
    with app.app_context():
        ext.submit(broken).exception()
    client = app.test_client()
    paths = ["/m/", "/m/api/stats", "/m/api/tasks", "/m/api/tasks/x"]
    for path in paths:
        response = client.get(path)
        assert response.status_code == 403
        assert "broken" not in response.text and "lamp" not in response.text
    assert calls == paths
    allowed[0] = True
    assert client.get("/m/api/stats").get_json()["counts"]["failed"] == 1


def test_outside_debug_and_testing_check_access_is_required(shop: Shop) -> None:
    app = shop(False, TESTING=False)
    ext = app_state(app).extension
    with pytest.raises(RuntimeError, match="outside debug and testing mode it needs 'check_"):
        app.register_blueprint(ext.monitor(), url_prefix="/m")
    app.register_blueprint(ext.monitor(check_access=lambda: True, name="guarded"), url_prefix="/g")
    assert app.test_client().get("/g/api/stats").status_code == 200
    debug = shop(False, TESTING=False, DEBUG=True)
    debug.debug = True
    debug.register_blueprint(ext.monitor(), url_prefix="/m")
    with pytest.raises(TypeError, match="'check_access' must be a function"):
        ext.monitor(check_access="admin")  # type: ignore[arg-type]


def test_the_api_and_page_never_show_arguments_or_results(app: flask.Flask) -> None:
    ext: ThreadContext = app_state(app).extension

    @ext.task(keep_result=True)
    def echo(word: str) -> dict[str, str]:
        return {"said": word.upper()}

    with app.test_request_context("/orders", method="POST"):
        future = echo.submit("hunter2")
        assert future.result() == {"said": "HUNTER2"}
    recorder = app_state(app).recorder
    if recorder is not None:  # the store does keep the result: the monitor leaves it out
        recorder.flush()
        kept = recorder.store.get(future.task.id)
        assert kept is not None and kept.result == '{"value": {"said": "HUNTER2"}}'
    client = app.test_client()
    shown = [
        client.get(f"/admin/tasks/{path}")
        for path in ("", "api/stats", "api/tasks", f"api/tasks/{future.task.id}")
    ]
    assert [r.status_code for r in shown] == [200] * 4
    assert shown[3].get_json()["name"].endswith("echo")
    for response in shown:
        assert "hunter2" not in response.get_data(as_text=True).lower()
    assert "result" not in shown[3].get_json()


HOSTILE = '/p";window.pwned=1;"</script><script>window.pwned=2</script>'


def test_a_proxy_prefix_reaches_the_page_as_data_not_script(shop: Shop) -> None:
    """Under ProxyFix(x_prefix=1), 'X-Forwarded-Prefix' is the script root of every URL the
    page is given: it must arrive as a JavaScript string, whatever it holds."""
    from werkzeug.middleware.proxy_fix import ProxyFix

    app = shop(False)
    app.register_blueprint(app_state(app).extension.monitor(), url_prefix="/m")
    app.wsgi_app = ProxyFix(app.wsgi_app, x_prefix=1)  # type: ignore[method-assign]
    html = app.test_client().get("/m/", headers={"X-Forwarded-Prefix": HOSTILE}).text
    assert html.count("</script>") == 1 and html.count("<script>") == 1
    (line,) = [line for line in html.splitlines() if line.startswith("const API = ")]
    assert json.loads(line.removeprefix("const API = ").removesuffix(";")) == HOSTILE + "/m/api"
    assert "<script>window.pwned" not in html and '"/p";window' not in html


def test_the_page_says_what_to_do_when_check_access_says_no(shop: Shop) -> None:
    app = shop(False)
    ext = app_state(app).extension
    app.register_blueprint(ext.monitor(check_access=lambda: False), url_prefix="/m")
    client = app.test_client()
    page = client.get("/m/")
    api = client.get("/m/api/stats")
    assert (page.status_code, page.mimetype) == (403, "text/html")
    assert "<h1>Not allowed</h1>" in page.text
    assert "Sign in to the app with an account that may see it" in page.text
    assert (api.status_code, api.get_json()) == (
        403,
        {
            "error": "You don't have the permission to access the requested resource. It is"
            " either read-protected or not readable by the server."
        },
    )


def test_check_access_can_send_people_to_sign_in(shop: Shop) -> None:
    """What docs/monitoring.rst shows: 'abort' with a redirect from 'check_access'."""
    app = shop(False)

    def check() -> bool:
        if "user" not in flask.session:
            flask.abort(flask.redirect(f"/login?next={flask.request.full_path}"))
        return bool(flask.session["user"] == "admin")

    app.secret_key = "test"
    ext = app_state(app).extension
    app.register_blueprint(ext.monitor(check_access=check), url_prefix="/m")
    client = app.test_client()
    response = client.get("/m/")
    assert (response.status_code, response.location) == (302, "/login?next=/m/?")
    with client.session_transaction() as session:
        session["user"] = "admin"
    assert client.get("/m/").status_code == 200


@pytest.mark.parametrize(
    ("config", "shown"),
    [
        ({}, "this process"),
        ({"THREADCTX_TASK_STORE": "sqlite:///tasks.db"}, "SQLite {instance}/tasks.db"),
        (
            {"THREADCTX_TASK_STORE": "redis://:s3cret@127.0.0.1:1/0"},
            "Redis redis://:***@127.0.0.1:1/0",
        ),
    ],
)
def test_the_header_names_the_store_for_people(
    tmp_path: Path, shop: Shop, config: dict[str, str], shown: str
) -> None:
    app = shop(False, **config)
    app.register_blueprint(app_state(app).extension.monitor(), url_prefix="/m")
    if "redis" in shown:
        # Not through the API, which would read the store: no Redis listens there.
        from flask_threadctx.monitor import store_description

        described = store_description(app)
    else:
        described = app.test_client().get("/m/api/stats").get_json()["store"]
    assert described == shown.format(instance=tmp_path)


@pytest.mark.parametrize(
    ("url", "hidden"),
    [
        ("redis://:pw@host:6379/0", "redis://:***@host:6379/0"),
        (
            "rediss://user:pw@host/1?ssl_cert_reqs=none",
            "rediss://user:***@host/1?ssl_cert_reqs=none",
        ),
        ("redis://host/0?password=pw&db=1", "redis://host/0?password=***&db=1"),
        ("unix:///run/redis.sock?db=2", "unix:///run/redis.sock?db=2"),
    ],
)
def test_urls_are_shown_without_their_password(url: str, hidden: str) -> None:
    from flask_threadctx.monitor import hide_password

    assert hide_password(url) == hidden
