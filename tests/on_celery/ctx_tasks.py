"""The app and task functions of the Celery tests: importable by name in the test process and
in the worker processes that ``flask --app ctx_tasks threadctx worker`` starts."""

from __future__ import annotations

import concurrent.futures
import ctypes
import datetime
import enum
import json
import os
import threading
import typing as t

import celery
import celery.exceptions
import flask
import redis
from flask import g
from flask import request
from flask import session
from flask import url_for
from flask_threadctx import current_task
from flask_threadctx import report_progress
from flask_threadctx import ThreadContext

threadctx = ThreadContext()


def create_app(config: dict[str, t.Any] | None = None) -> flask.Flask:
    """The factory, configured from ``THREADCTX_TEST_REDIS`` in worker processes."""
    app = flask.Flask("ctx_tasks")
    url = os.environ.get("THREADCTX_TEST_REDIS", "redis://127.0.0.1:1/0")
    # More Celery settings, and more config, for a worker started by a test, as JSON.
    more = json.loads(os.environ.get("THREADCTX_TEST_CELERY", "{}"))
    app.config.update(
        SECRET_KEY="test",
        SERVER_NAME=None,
        THREADCTX_BACKEND="celery",
        THREADCTX_CELERY={"broker_url": url, "result_backend": url, **more},
    )
    app.config.update(json.loads(os.environ.get("THREADCTX_TEST_CONFIG", "{}")))
    app.config.update(config or {})
    threadctx.init_app(app)

    @app.post("/orders/<int:order_id>")
    def order(order_id: int) -> dict[str, t.Any]:
        g.user = "ada"
        session["cart"] = [1, 2]
        future = threadctx.submit(describe, "from-view")
        return {"task": future.task.id}

    @app.post("/heavy")
    def send_heavy() -> dict[str, t.Any]:
        g.user = "ada"
        return {"task": heavy.submit("heavy").task.id, "here": threadctx.submit(os_pid).task.id}

    @app.route("/read/<name>", methods=["GET", "POST"])
    def read(name: str) -> dict[str, t.Any]:
        return {"view": read_request(), "task": threadctx.submit(read_request).result(30)}

    @app.get("/hello/<name>", endpoint="hello")
    def hello(name: str) -> str:
        return name

    return app


own_celery = celery.Celery("own", set_as_current=False)
"""A user's own Celery app, for ``THREADCTX_CELERY_APP``."""


def create_mixed_app() -> flask.Flask:
    """Threads by default; what ``task(backend="celery")`` marks goes to ``own_celery``."""
    url = os.environ.get("THREADCTX_TEST_REDIS", "redis://127.0.0.1:1/0")
    own_celery.conf.update(broker_url=url, result_backend=url)
    return create_app(
        {
            "THREADCTX_BACKEND": "threads",
            "THREADCTX_CELERY": None,
            "THREADCTX_CELERY_APP": "ctx_tasks:own_celery",
        }
    )


def os_pid() -> int:
    return os.getpid()


def add(a: int, b: int) -> int:
    return a + b


class Colour(str, enum.Enum):
    RED = "red"


def echo(*args: t.Any, as_keys: bool = False, **kwargs: t.Any) -> t.Any:
    """The arguments as they arrived; with ``as_keys``, the values of the first one's keys
    become keys themselves."""
    if as_keys:
        return {key: {value: key} for key, value in args[0].items()}
    return [list(args), kwargs]


class NoStr(Exception):
    """An exception that cannot say what it is: its ``str()`` raises."""

    def __str__(self) -> str:
        raise RuntimeError("no str")


class NoText(NoStr):
    """Nor its ``repr()``."""

    def __repr__(self) -> str:
        raise RuntimeError("no repr")


def raise_no_text(cls_name: str) -> None:
    raise {"NoStr": NoStr, "NoText": NoText}[cls_name]("code 7")


def nested_keys(depth: int) -> t.Any:
    """A dict with a key 2 (and "2") inside ``depth`` lists."""
    value: t.Any = {2: "int", "2": "str"}
    for _ in range(depth):
        value = [value]
    return value


def fail(message: str) -> None:
    raise LookupError(message)


def describe(tag: str) -> dict[str, t.Any]:
    """What a task sees of its contexts."""
    info = current_task()
    assert info is not None
    seen: dict[str, t.Any] = {
        "tag": tag,
        "pid": os.getpid(),
        "task": info.id,
        "parent": info.parent_id,
        "label": info.request,
        "g": dict(vars(g)),
    }
    if flask.has_request_context():
        seen.update(
            method=request.method,
            path=request.path,
            args=request.args.to_dict(flat=False),
            json=request.get_json(silent=True),
            form=request.form.to_dict(flat=False),
            content_type=request.content_type,
            custom_header=request.headers.get("X-Custom"),
            cookie=request.headers.get("Cookie"),
            authorization=request.headers.get("Authorization"),
            remote_addr=request.remote_addr,
            view_args=request.view_args,
            endpoint=request.endpoint,
            url=url_for("hello", name="x", _external=True),
            session=dict(session),
        )
    return seen


def read_request() -> dict[str, t.Any]:
    """What a view or a task reads of the URL, form and headers of its request."""
    return {
        "path": request.path,
        "root_path": request.root_path,
        "url": request.url,
        "args": request.args.to_dict(flat=False),
        "form": request.form.to_dict(flat=False),
        "headers": [[k, v] for k, v in request.headers.items() if k.startswith("X-")],
        "view_args": request.view_args,
        "endpoint": request.endpoint,
        "environ": {
            k: request.environ.get(k) for k in ("SCRIPT_NAME", "PATH_INFO", "QUERY_STRING")
        },
    }


def headers() -> list[tuple[str, str]]:
    """The request headers the task sees, in order."""
    return list(request.headers.items())


def wait_for_signal(key: str, url: str) -> int:
    """Tell the test which process runs this (push the pid to ``key``), then wait for the test
    to say go on ``key + ':go'``."""
    client = redis.Redis.from_url(url)
    client.rpush(key, os.getpid())
    client.blpop([key + ":go"], timeout=60)
    return os.getpid()


def parent_of(n: int) -> list[int]:
    """Submit ``n`` children and wait for each: on a worker with one process, only running them
    here could finish."""
    children = [threadctx.submit(add, i, 1) for i in range(n)]
    return [child.result() for child in children]


def parent_of_timed(n: int, timeout: float) -> list[int]:
    """Submit ``n`` children and wait for each, with a timeout."""
    children = [threadctx.submit(add, i, 1) for i in range(n)]
    return [child.result(timeout) for child in children]


def timed_parent(key: str, url: str, timeout: float) -> list[str]:
    """Tell the test it runs (on ``key``) and wait for its go; then wait for a child with a
    timeout: ``["done", the child's thread]`` or ``["timed out", the child's id]``."""
    client = redis.Redis.from_url(url)
    client.rpush(key, os.getpid())
    client.blpop([key + ":go"], timeout=60)
    child = threadctx.submit(thread_after_go, key + ":child", url)
    try:
        return ["done", child.result(timeout)]
    except concurrent.futures.TimeoutError:  # not yet the builtin one on Python 3.10
        return ["timed out", child.task.id]


def thread_after_go(key: str, url: str) -> str:
    """The name of the thread this runs on, once the test says go on ``key + ':go'``."""
    redis.Redis.from_url(url).blpop([key + ":go"], timeout=60)
    return threading.current_thread().name


def grandparent() -> list[int]:
    return threadctx.submit(parent_of, 2).result()


@threadctx.task(backend="celery", retry_for=(ConnectionError,), max_retries=2, retry_delay=0)
def flaky(key: str, url: str) -> int:
    """Fails with ConnectionError until it has been tried three times."""
    tries = redis.Redis.from_url(url).incr(key)
    if tries < 3:
        raise ConnectionError(f"try {tries}")
    return int(tries)


def returns_object() -> object:
    return object()


class CustomError(Exception):
    pass


def raise_custom() -> None:
    raise CustomError("custom")


class Vanished(Exception):
    pass


Vanished.__module__ = "gone.module"


def raise_vanished() -> None:
    raise Vanished("it went")


@threadctx.task(backend="celery", countdown=30)
def later(n: int) -> int:
    return n


@threadctx.task(
    backend="celery",
    eta=datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc),  # past: runs at once
    expires=datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=1),
)
def dated(a: int, b: int) -> int:
    return a + b


def chain_of_ids(depth: int) -> list[str]:
    """The ids of this task and of the chain of children below it, each waited for."""
    info = current_task()
    assert info is not None
    if depth == 0:
        return [info.id]
    return [info.id, *threadctx.submit(chain_of_ids, depth - 1).result()]


def only_in_web() -> str:
    """Deployed to the web processes, and not yet to the workers that
    ``THREADCTX_TEST_SKEW`` marks."""
    return "new code"


if os.environ.get("THREADCTX_TEST_SKEW"):
    del only_in_web


def read_upload() -> object:
    return request.files.get("upload")


@threadctx.task(backend="celery")
def heavy(tag: str) -> dict[str, t.Any]:
    return describe(tag)


@threadctx.task(backend="celery", time_limit=1)
def past_hard_limit(key: str, url: str) -> int:
    """Wait for a go from the test that never comes: the hard time limit kills it first."""
    client = redis.Redis.from_url(url)
    client.blpop([key + ":go"], timeout=60)
    return os.getpid()


@threadctx.task(backend="celery", soft_time_limit=1, time_limit=60)
def past_soft_limit(key: str, url: str) -> str:
    """Wait likewise, until the soft time limit interrupts the wait."""
    client = redis.Redis.from_url(url)
    try:
        client.blpop([key + ":go"], timeout=60)
    except celery.exceptions.SoftTimeLimitExceeded:
        return "cleaned up"
    return "not stopped"


def runs_again_once_killed(key: str, url: str) -> int:
    """The first run tells the test its pid (on ``key``) and waits to be killed; the next run
    returns how many runs there were."""
    client = redis.Redis.from_url(url)
    runs = client.incr(key + ":runs")
    if runs == 1:
        client.rpush(key, os.getpid())
        client.blpop([key + ":go"], timeout=60)
    return int(runs)


def reports_then_waits(key: str, url: str) -> str:
    """Report some progress, tell the test (on ``key``), wait for its go, then finish."""
    report_progress(3, 10, "rows")
    client = redis.Redis.from_url(url)
    client.rpush(key, os.getpid())
    client.blpop([key + ":go"], timeout=60)
    report_progress(10, 10, "done")
    return "ok"


def steps(key: str, url: str, n: int) -> str:
    """Report each of ``n`` steps once the test says go (on ``key + ':go'``), and tell it (on
    ``key``) after each."""
    client = redis.Redis.from_url(url)
    for i in range(1, n + 1):
        client.blpop([key + ":go"], timeout=60)
        report_progress(i, n, f"step {i}")
        client.rpush(key, i)
    return "done"


def reports(done: int) -> int:
    report_progress(done, done + 1, "child")
    return done


def parent_of_reporter() -> str:
    """Submit a child that reports progress and wait for it: on a worker with one process,
    this task runs the child itself."""
    child = threadctx.submit(reports, 3)
    assert child.result() == 3
    return child.task.id


def raise_undecodable() -> None:
    """Fail with a file name that is not UTF-8, as ``os.fsdecode`` gives it: a lone surrogate."""
    raise FileNotFoundError("no such file: " + os.fsdecode(b"caf\xe9"))


def report_undecodable() -> str:
    report_progress(1, 2, os.fsdecode(b"caf\xe9"))
    return "ok"


def holds_the_gil(key: str, url: str, fifo: str) -> int:
    """Tell the test which process runs this (on ``key``), then hold the GIL until the test
    writes a byte to ``fifo``, as a long C call does: every other thread of this process
    waits meanwhile."""
    fd = os.open(fifo, os.O_RDWR)  # both ends: the open does not wait for a writer
    try:
        redis.Redis.from_url(url).rpush(key, os.getpid())
        byte = ctypes.create_string_buffer(1)
        ctypes.PyDLL(None).read(fd, byte, 1)  # a PyDLL call keeps the GIL while it blocks
    finally:
        os.close(fd)
    return os.getpid()


def returns_after_signal(key: str, url: str) -> int:
    """As :func:`wait_for_signal`, and say on ``key + ':returning'`` that it returns now."""
    pid = wait_for_signal(key, url)
    redis.Redis.from_url(url).rpush(key + ":returning", pid)
    return pid
