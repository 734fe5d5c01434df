"""What a task sees: the contract of docs/contract.rst."""

from __future__ import annotations

import asyncio
import contextvars
import threading
import typing as t

import flask
import pytest
from flask import after_this_request
from flask import appcontext_popped
from flask import appcontext_pushed
from flask import appcontext_tearing_down
from flask import current_app
from flask import g
from flask import has_app_context
from flask import has_request_context
from flask import request
from flask import session
from flask import url_for
from flask_threadctx import current_task
from flask_threadctx import ThreadContext

if t.TYPE_CHECKING:
    from conftest import AppFactory

REPEAT = 200


def test_request_is_carried(make_app: AppFactory, ext: ThreadContext) -> None:
    app = make_app(ext)

    def seen() -> dict[str, t.Any]:
        return {
            "method": request.method,
            "url": request.url,
            "path": request.path,
            "args": request.args.to_dict(),
            "header": request.headers["X-User"],
            "cookie": request.cookies["flavour"],
            "remote_addr": request.remote_addr,
            "endpoint": request.endpoint,
            "view_args": request.view_args,
            "json": request.json,
            "data": request.get_data(as_text=True),
            "url_for": url_for("view", user=7),
        }

    @app.post("/users/<int:user>")
    def view(user: int) -> t.Any:
        return ext.submit(seen).result()

    client = app.test_client()
    client.set_cookie("flavour", "oat")
    response = client.post(
        "/users/3?page=2",
        json={"a": [1, 2]},
        headers={"X-User": "u3"},
        environ_base={"REMOTE_ADDR": "10.1.2.3"},
    )
    assert response.json == {
        "method": "POST",
        "url": "http://localhost/users/3?page=2",
        "path": "/users/3",
        "args": {"page": "2"},
        "header": "u3",
        "cookie": "oat",
        "remote_addr": "10.1.2.3",
        "endpoint": "view",
        "view_args": {"user": 3},
        "json": {"a": [1, 2]},
        "data": '{"a": [1, 2]}',
        "url_for": "/users/7",
    }


def test_form_is_carried(make_app: AppFactory, ext: ThreadContext) -> None:
    app = make_app(ext)

    @app.post("/")
    def view() -> t.Any:
        def seen() -> t.Any:
            return {"form": request.form.to_dict(), "data": request.get_data(as_text=True)}

        return ext.submit(seen).result()

    response = app.test_client().post("/", data={"name": "Ada", "lang": "en"})
    assert response.json == {"form": {"name": "Ada", "lang": "en"}, "data": "name=Ada&lang=en"}


def test_form_read_by_view_first(make_app: AppFactory, ext: ThreadContext) -> None:
    app = make_app(ext)

    @app.post("/")
    def view() -> t.Any:
        name = request.form["name"]
        return {"view": name, "task": ext.submit(lambda: request.form["name"]).result()}

    assert app.test_client().post("/", data={"name": "Ada"}).json == {"view": "Ada", "task": "Ada"}


def test_task_json_is_its_own(make_app: AppFactory, ext: ThreadContext) -> None:
    app = make_app(ext)

    @app.post("/")
    def view() -> t.Any:
        request.json["view"] = True

        def mutate(n: int) -> t.Any:
            body = request.json
            body[f"task{n}"] = True
            return sorted(body)

        first = ext.submit(mutate, 1).result()
        second = ext.submit(mutate, 2).result()
        return {"first": first, "second": second, "view": sorted(request.json)}

    assert app.test_client().post("/", json={"x": 1}).json == {
        "first": ["task1", "x"],
        "second": ["task2", "x"],
        "view": ["view", "x"],
    }


def test_session_is_a_copy_taken_at_submit(make_app: AppFactory, ext: ThreadContext) -> None:
    app = make_app(ext)
    release = threading.Event()

    @app.get("/login")
    def login() -> str:
        session["user"] = "ada"
        return ""

    @app.get("/")
    def view() -> t.Any:
        def task() -> t.Any:
            release.wait(5)
            before = dict(session)
            session["task"] = "wrote"
            return before

        future = ext.submit(task)
        session["after_submit"] = True
        release.set()
        return {"task_saw": future.result(), "view_has": sorted(session)}

    client = app.test_client()
    client.get("/login")
    assert client.get("/").json == {
        "task_saw": {"user": "ada"},
        "view_has": ["after_submit", "user"],
    }


def test_submit_does_not_mark_the_session_accessed(
    make_app: AppFactory, ext: ThreadContext
) -> None:
    app = make_app(ext)

    @app.get("/")
    def view() -> str:
        ext.submit(int).result()
        return ""

    assert "Vary" not in app.test_client().get("/").headers


def test_session_without_secret_key(make_app: AppFactory, ext: ThreadContext) -> None:
    app = make_app(ext, SECRET_KEY=None)

    @app.get("/")
    def view() -> t.Any:
        def task() -> t.Any:
            with pytest.raises(RuntimeError, match="secret key"):
                session["x"] = 1
            return dict(session)

        return {"session": ext.submit(task).result()}

    assert app.test_client().get("/").json == {"session": {}}


@pytest.mark.parametrize(
    ("copy_g", "expected"),
    [
        ("data", {"name": "ada", "ids": [1, 2], "nested": {"k": (1, "x")}}),
        (False, {}),
        (["name", "absent"], {"name": "ada"}),
    ],
)
def test_copy_g(make_app: AppFactory, ext: ThreadContext, copy_g: t.Any, expected: t.Any) -> None:
    app = make_app(ext, THREADCTX_COPY_G=copy_g)
    lock = threading.Lock()
    with app.app_context():
        g.name = "ada"
        g.ids = [1, 2]
        g.nested = {"k": (1, "x")}
        g.lock = lock
        seen = ext.submit(lambda: dict(vars(g))).result()
    assert seen == expected


def test_copy_g_true_is_shallow(make_app: AppFactory, ext: ThreadContext) -> None:
    app = make_app(ext, THREADCTX_COPY_G=True)
    lock = threading.Lock()
    with app.app_context():
        g.lock = lock
        g.ids = [1]
        assert ext.submit(lambda: (g.lock is lock, g.ids)).result() == (True, [1])


def test_task_cannot_change_parent_g(make_app: AppFactory, ext: ThreadContext) -> None:
    app = make_app(ext)
    with app.app_context():
        g.ids = [1, 2]
        g.user = "ada"

        def task() -> None:
            g.ids.append(3)
            g.user = "eve"
            g.new = True

        ext.submit(task).result()
        assert (g.ids, g.user, "new" in g) == ([1, 2], "ada", False)


def test_tasks_do_not_share_g(make_app: AppFactory, ext: ThreadContext) -> None:
    app = make_app(ext, THREADCTX_MAX_WORKERS=1)
    with app.app_context():
        first = ext.submit(lambda: g.setdefault("counter", []).append(1) or list(g.counter))
        second = ext.submit(lambda: g.setdefault("counter", []).append(1) or list(g.counter))
        assert (first.result(), second.result()) == ([1], [1])


def test_teardown_appcontext_runs_once_per_task_in_the_worker(
    make_app: AppFactory, ext: ThreadContext
) -> None:
    app = make_app(ext)
    torn_down: list[tuple[str, str]] = []

    @app.teardown_appcontext
    def record(exc: BaseException | None) -> None:
        torn_down.append((threading.current_thread().name, g.get("label", "request")))

    @app.get("/")
    def view() -> str:
        futures = [ext.submit(setattr, g, "label", f"task{n}") for n in range(3)]
        for future in futures:
            future.result()
        return ""

    app.test_client().get("/")
    labels = sorted(label for _, label in torn_down)
    assert labels == ["request", "task0", "task1", "task2"]
    assert all(name.startswith("threadctx-") for name, label in torn_down if label != "request")


def test_task_does_not_close_the_requests_resources(
    make_app: AppFactory, ext: ThreadContext
) -> None:
    app = make_app(ext)

    class Connection:
        closed = False

    @app.teardown_appcontext
    def close(exc: BaseException | None) -> None:
        conn = g.pop("db", None)
        if conn is not None:
            conn.closed = True

    def task() -> Connection:
        assert "db" not in g
        g.db = conn = Connection()
        return conn

    with app.app_context():
        g.db = parent = Connection()
        task_conn = ext.submit(task).result()
        assert (parent.closed, task_conn.closed) == (False, True)


@pytest.mark.parametrize(("teardown_request", "expected"), [(False, 1), (True, 4)])
def test_teardown_request(
    make_app: AppFactory, ext: ThreadContext, teardown_request: bool, expected: int
) -> None:
    app = make_app(ext, THREADCTX_TEARDOWN_REQUEST=teardown_request)
    calls: list[str] = []

    @app.teardown_request
    def record(exc: BaseException | None) -> None:
        calls.append(request.path)

    @app.get("/")
    def view() -> str:
        for future in [ext.submit(int) for _ in range(3)]:
            future.result()
        return ""

    app.test_client().get("/")
    assert calls == ["/"] * expected


def test_after_this_request_in_task(make_app: AppFactory, ext: ThreadContext) -> None:
    app = make_app(ext)

    @app.get("/")
    def view() -> str:
        future = ext.submit(after_this_request, lambda response: response)
        with pytest.raises(RuntimeError, match="'after_this_request' cannot be used in a task"):
            future.result()
        return "ok"

    assert app.test_client().get("/").data == b"ok"


def test_other_context_variables_are_visible(make_app: AppFactory, ext: ThreadContext) -> None:
    app = make_app(ext)
    trace_id: contextvars.ContextVar[str] = contextvars.ContextVar("trace_id")
    with app.app_context():
        trace_id.set("abc")
        assert ext.submit(trace_id.get).result() == "abc"


def test_app_context_only(make_app: AppFactory, ext: ThreadContext) -> None:
    app = make_app(ext)
    with app.app_context():
        seen = ext.submit(lambda: (current_app.name, has_request_context())).result()
    assert seen == (app.name, False)


def test_no_context_with_the_app_given(make_app: AppFactory) -> None:
    app = flask.Flask("direct")
    ext = ThreadContext(app)
    try:
        assert ext.submit(lambda: (current_app.name, has_request_context())).result() == (
            "direct",
            False,
        )
    finally:
        ext.shutdown()


def test_no_context_with_init_app(make_app: AppFactory, ext: ThreadContext) -> None:
    make_app(ext)
    with pytest.raises(RuntimeError, match=r"'submit' needs an application context\."):
        ext.submit(int)


def test_unregistered_app(ext: ThreadContext) -> None:
    with (
        flask.Flask("bare").app_context(),
        pytest.raises(RuntimeError, match=r"has no 'ThreadContext'\..*init_app"),
    ):
        ext.submit(int)


def test_pooled_thread_keeps_no_old_context(make_app: AppFactory, ext: ThreadContext) -> None:
    app = make_app(ext, THREADCTX_MAX_WORKERS=1)
    for _ in range(REPEAT):
        with app.test_request_context("/old"):
            g.secret = "old"
            ext.submit(int).result()
        with app.app_context():
            seen = ext.submit(lambda: (has_request_context(), g.get("secret"))).result()
        assert seen == (False, None)
    assert has_app_context() is False


def test_nesting_to_any_depth(make_app: AppFactory, ext: ThreadContext) -> None:
    app = make_app(ext)

    def level(depth: int) -> list[tuple[int, str, str, str | None]]:
        task = current_task()
        assert task is not None
        here = (depth, request.path, g.path, task.parent_id)
        g.path = f"{g.path}/{depth}"
        if depth == 10:
            return [here]
        return [here, *ext.submit(level, depth + 1).result()]

    with app.test_request_context("/deep"):
        g.path = "root"
        top = ext.submit(level, 1)
        chain = top.result()
    assert [(d, p, gp) for d, p, gp, _ in chain] == [
        (d, "/deep", "root" + "".join(f"/{i}" for i in range(1, d))) for d in range(1, 11)
    ]
    assert chain[0][3] is None
    assert all(parent is not None for *_, parent in chain[1:])


def test_parent_id_links(make_app: AppFactory, ext: ThreadContext) -> None:
    app = make_app(ext)

    @app.get("/")
    def view() -> t.Any:
        parent = ext.submit(lambda: ext.submit(int).task)
        child = parent.result()
        return {
            "parent": parent.task.id,
            "child_parent": child.parent_id,
            "child_request": child.request,
        }

    body = app.test_client().get("/").get_json()
    assert body["child_parent"] == body["parent"]
    assert body["child_request"] == "GET /"


def test_isolation_between_concurrent_requests(make_app: AppFactory, ext: ThreadContext) -> None:
    app = make_app(ext)

    @app.post("/<user>")
    def view(user: str) -> t.Any:
        g.user = user
        session["user"] = user

        def child() -> t.Any:
            return [request.view_args["user"], request.json["user"], g.user, session["user"]]  # type: ignore[index]

        def parent() -> t.Any:
            return [*child(), *ext.submit(child).result()]

        return {"seen": ext.submit(parent).result()}

    errors: list[str] = []

    def client_thread(n: int) -> None:
        client = app.test_client()
        for i in range(REPEAT // 4):
            user = f"u{n}-{i}"
            seen = client.post(f"/{user}", json={"user": user}).json["seen"]  # type: ignore[index]
            if seen != [user] * 8:
                errors.append(f"{user}: {seen}")

    threads = [threading.Thread(target=client_thread, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


async def _async_task(x: int) -> int:
    return x * 2 if current_app else 0


def test_coroutine_function(make_app: AppFactory, ext: ThreadContext) -> None:
    app = make_app(ext)
    with app.app_context():
        assert t.cast(int, ext.submit(_async_task, 21).result()) == 42


def test_submit_from_async_view(make_app: AppFactory, ext: ThreadContext) -> None:
    app = make_app(ext)

    @app.get("/<int:n>")
    async def view(n: int) -> t.Any:
        return {"n": await asyncio.wrap_future(ext.submit(lambda: request.view_args["n"] + 1))}  # type: ignore[index]

    assert app.test_client().get("/4").json == {"n": 5}


def test_task_leaving_a_context_pushed(
    make_app: AppFactory, ext: ThreadContext, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app(ext, THREADCTX_MAX_WORKERS=1)
    other = flask.Flask("other")
    with app.app_context():
        ext.submit(lambda: other.app_context().push()).result()
        assert ext.submit(lambda: current_app.name).result() == app.name
    assert "left an app or request context pushed" in caplog.text


def test_appcontext_signals_per_task(make_app: AppFactory, ext: ThreadContext) -> None:
    app = make_app(ext)
    heard: list[tuple[str, str]] = []

    def receiver(name: str) -> t.Callable[..., None]:
        return lambda sender, **kwargs: heard.append((name, threading.current_thread().name))

    on_push, on_teardown, on_pop = receiver("pushed"), receiver("tearing down"), receiver("popped")
    with app.app_context():
        ext.submit(int).result()  # no receivers: the fast path
        with (
            appcontext_pushed.connected_to(on_push, app),
            appcontext_tearing_down.connected_to(on_teardown, app),
            appcontext_popped.connected_to(on_pop, app),
        ):
            future = ext.submit(threading.current_thread)
            worker = future.result().name
    assert heard == [("pushed", worker), ("tearing down", worker), ("popped", worker)]
