"""What a task sees: the contract of docs/contract.rst."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextvars
import gc
import threading
import typing as t
import weakref

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
from flask import stream_with_context
from flask import url_for
from flask_threadctx import copy_current_context
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
        assert ext.submit(_async_task, 21).result() == 42


def test_submit_from_async_view(make_app: AppFactory, ext: ThreadContext) -> None:
    app = make_app(ext)

    def next_n() -> int:
        assert request.view_args is not None
        n: int = request.view_args["n"]
        return n + 1

    @app.get("/<int:n>")
    async def view(n: int) -> t.Any:
        return {"n": await asyncio.wrap_future(ext.submit(next_n))}

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


def test_another_apps_request_is_never_visible(make_app: AppFactory, ext: ThreadContext) -> None:
    app_a = make_app(ext)
    app_b = make_app(ext)

    def meddle() -> tuple[bool, str]:
        seen = has_request_context()
        if seen:  # what the tester's task did to app A's live request
            session["from_task"] = True
            request.view_args["from_task"] = True  # type: ignore[index]
        return seen, current_app.name

    @app_a.get("/a/<int:n>")
    def view(n: int) -> dict[str, t.Any]:
        session["user"] = "ada"
        outcomes = []
        for _ in range(REPEAT):
            with app_b.app_context():
                outcomes.append(ext.submit(meddle).result())
                in_thread = copy_current_context(meddle)
                with concurrent.futures.ThreadPoolExecutor(2) as pool:
                    outcomes += [pool.submit(in_thread).result() for _ in range(2)]
        return {
            "outcomes": sorted(set(outcomes)),
            "session": dict(session),
            "view_args": request.view_args,
        }

    response = app_a.test_client().get("/a/1")
    assert response.json == {
        "outcomes": [[False, app_b.name]],
        "session": {"user": "ada"},
        "view_args": {"n": 1},
    }


def test_stream_with_context_in_a_task(make_app: AppFactory, ext: ThreadContext) -> None:
    app = make_app(ext)
    torn_down: list[str] = []

    @app.teardown_appcontext
    def count(exc: BaseException | None) -> None:
        if current_task() is not None:
            torn_down.append(g.get("mark", "?"))

    def generate() -> t.Iterator[str]:
        yield request.args["name"]
        yield g.mark

    def task(n: int) -> tuple[str, str, str]:
        g.mark = f"task{n}"
        streamed = "".join(stream_with_context(generate()))
        # The task's contexts are still whole after the stream popped its pushes.
        return streamed, request.args["name"], g.mark

    with app.test_request_context("/?name=ada"):
        results = [ext.submit(task, n).result(timeout=10) for n in range(REPEAT)]
    assert results == [(f"adatask{n}", "ada", f"task{n}") for n in range(REPEAT)]
    assert sorted(torn_down) == sorted(f"task{n}" for n in range(REPEAT))


Point = collections.namedtuple("Point", "x y")


class Pair(t.NamedTuple):
    left: list[int]
    right: str


def test_copy_g_data_keeps_standard_containers(make_app: AppFactory, ext: ThreadContext) -> None:
    app = make_app(ext)
    with app.app_context():
        g.counts = collections.defaultdict(list, {"a": [1]})
        g.ordered = collections.OrderedDict([("z", 1), ("a", 2)])
        g.tally = collections.Counter("abca")
        g.point = Point(1, 2)
        g.pair = Pair([1], "r")

        def task() -> dict[str, t.Any]:
            g.counts["b"].append(2)  # the default factory came along
            g.pair.left.append(2)  # a copy: the request's list stays as it was
            return {name: (type(value), value) for name, value in vars(g).items()}

        seen = ext.submit(task).result(timeout=10)
        assert (dict(g.counts), g.pair) == ({"a": [1]}, Pair([1], "r"))
    assert seen == {
        "counts": (collections.defaultdict, {"a": [1], "b": [2]}),
        "ordered": (collections.OrderedDict, collections.OrderedDict([("z", 1), ("a", 2)])),
        "tally": (collections.Counter, collections.Counter("abca")),
        "point": (Point, Point(1, 2)),
        "pair": (Pair, Pair([1, 2], "r")),
    }


class User:
    pass


@pytest.mark.parametrize(
    ("copy_g", "says"),
    [
        ("data", 'THREADCTX_COPY_G = "data" carries plain data only'),
        (False, "THREADCTX_COPY_G = False carries nothing from 'g'"),
        (["name"], "THREADCTX_COPY_G = ['name'] does not name it. Add 'user' to that list"),
    ],
)
def test_a_g_value_left_behind_says_why(
    make_app: AppFactory, ext: ThreadContext, copy_g: t.Any, says: str
) -> None:
    app = make_app(ext, THREADCTX_COPY_G=copy_g)

    def read_user() -> User:
        user: User = g.user
        return user

    def read_missing() -> t.Any:
        return g.never_set

    def defaults() -> tuple[t.Any, bool, bool]:
        return g.get("user"), "user" in g, hasattr(g, "user")

    with app.app_context():
        g.user = User()
        g.name = "ada"
        error = ext.submit(read_user).exception(timeout=10)
        missing = ext.submit(read_missing).exception(timeout=10)
        assert ext.submit(defaults).result(timeout=10) == (None, False, False)
    assert isinstance(error, AttributeError)
    message = str(error)
    assert message.startswith(
        "'g.user' was set where the task was submitted, but not carried into the task:"
    )
    assert says in message
    assert isinstance(missing, AttributeError)
    assert str(missing) == "never_set"


@pytest.mark.parametrize("pushed_again", [False, True])
def test_a_finished_tasks_contexts_are_freed_without_the_cyclic_gc(
    make_app: AppFactory, ext: ThreadContext, pushed_again: bool
) -> None:
    """No reference cycle keeps a task's contexts: they go when the task does, not at the next
    collection, which would make every task's garbage cost the collector's time."""
    app = make_app(ext, THREADCTX_EAGER=True)  # eager: every frame of the run has returned
    refs: list[weakref.ref[t.Any]] = []

    def task() -> None:
        refs.append(weakref.ref(g._get_current_object()))
        refs.append(weakref.ref(request._get_current_object()))  # type: ignore[attr-defined]
        if pushed_again:
            "".join(stream_with_context(iter(["x"])))

    gc.disable()
    try:
        with app.test_request_context("/"):
            for _ in range(REPEAT):
                ext.submit(task).result()
        assert [ref() for ref in refs if ref() is not None] == []
    finally:
        gc.enable()
