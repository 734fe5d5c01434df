"""The app and tasks of ``test_control_both.py``, the same on both engines: importable by name in
the test process, whose app runs them on threads or sends them to Celery, and in the worker
processes that ``flask --app both_tasks threadctx worker`` starts.

The tasks tell the test what they do through Redis lists (the same server on both engines, so
that a task on a worker process says it the same way as one on a thread): each run pushes a
JSON note, and a task that waits for the test blocks on a list the test pushes to.
"""

from __future__ import annotations

import builtins
import json
import os
import threading
import time
import typing as t
from pathlib import Path

import flask
import redis
from flask import g
from flask import request
from flask_threadctx import check_cancelled
from flask_threadctx import current_task
from flask_threadctx import report_progress
from flask_threadctx import TaskCancelled
from flask_threadctx import ThreadContext
from flask_threadctx.signals import task_cancelled
from flask_threadctx.signals import task_failed
from flask_threadctx.signals import task_retried

if t.TYPE_CHECKING:
    from flask_threadctx import TaskInfo

threadctx = ThreadContext()

WAIT = 30
"""Seconds a task waits for the test's go at most: a test that failed leaves no task behind."""

MAX_RETRIES = 3
BACKOFF = 0.1
BACKOFF_MAX = 0.3
BACKOFF_DELAYS = [0.1, 0.2, 0.3]
"""The delays before retries 1, 2 and 3 of :func:`flaky`: ``BACKOFF * 2**(n - 1)``, at most
``BACKOFF_MAX``."""

GRACE = 0.5
"""``THREADCTX_TIME_LIMIT_GRACE`` of the apps: how long past its time limit a task that does not
stop is left running, before it is written off (threads) or its process killed (Celery)."""


def create_app(
    engine: str = "celery", redis_url: str | None = None, **config: t.Any
) -> flask.Flask:
    """The app named ``both_<engine>``: its tasks run on ``engine`` (the worker processes make
    the default, ``"celery"``); on threads, one worker thread and its tasks recorded in the
    Redis task store, as the Celery engine keeps its records in Redis (which are its task
    store, ``"celery"``). A grace of :data:`GRACE` after a time limit. ``config`` comes
    last."""
    url = redis_url or os.environ.get("THREADCTX_TEST_REDIS", "redis://127.0.0.1:1/0")
    app = flask.Flask(f"both_{engine}", root_path=str(Path(__file__).parent))
    app.config.update(SECRET_KEY="test", THREADCTX_BACKEND=engine, BOTH_REDIS=url)
    app.config["THREADCTX_TIME_LIMIT_GRACE"] = GRACE
    if engine == "celery":
        app.config["THREADCTX_CELERY"] = {"broker_url": url, "result_backend": url}
        app.config["THREADCTX_TASK_STORE"] = "celery"  # what a re-run needs is kept there
    else:
        app.config.update(THREADCTX_MAX_WORKERS=1, THREADCTX_TASK_STORE=url)
    app.config.update(config)
    threadctx.init_app(app)
    task_retried.connect(tell_retried, app)
    task_cancelled.connect(tell_cancelled, app)
    task_failed.connect(tell_failed, app)
    return app


def client() -> redis.Redis:
    return redis.Redis.from_url(flask.current_app.config["BOTH_REDIS"])


def here() -> dict[str, t.Any]:
    """Where the calling code runs: its task, process and thread."""
    info = current_task()
    return {
        "task": None if info is None else info.id,
        "pid": os.getpid(),
        "thread": threading.current_thread().name,
    }


@threadctx.task
def stamp(key: str) -> float:
    """Say that it runs, and when it started (pushed to ``key``); return that time."""
    started = time.time()
    client().rpush(key, json.dumps({**here(), "at": started}))
    return started


@threadctx.task
def gated(key: str) -> str:
    """Say that it runs (on ``key``), then wait for the test's go (on ``key:go``)."""
    redis_client = client()
    redis_client.rpush(key, json.dumps(here()))
    redis_client.blpop([f"{key}:go"], timeout=WAIT)
    return "done"


@threadctx.task
def broken(message: str) -> None:
    raise ValueError(message)


@threadctx.task(
    retry_for=(ConnectionError,),
    max_retries=MAX_RETRIES,
    retry_backoff=BACKOFF,
    retry_backoff_max=BACKOFF_MAX,
    retry_jitter=False,
)
def flaky(key: str, failures: int, error: str = "ConnectionError") -> int:
    """Fail on the first ``failures`` attempts, with the builtin exception named ``error``;
    return the number of the attempt that succeeded. Each attempt pushes to ``key`` when it
    started and, if it fails, when it raised, with what it saw of its request and ``g``."""
    started = time.time()
    redis_client = client()
    attempt = int(redis_client.incr(f"{key}:attempts"))
    note = {
        **here(),
        "attempt": attempt,
        "at": started,
        "path": request.path,
        "user": g.get("user"),
    }
    if attempt <= failures:
        note["failed_at"] = time.time()
        redis_client.rpush(key, json.dumps(note))
        raise getattr(builtins, error)(f"attempt {attempt}")
    redis_client.rpush(key, json.dumps(note))
    return attempt


def tell_retried(
    sender: flask.Flask, task: TaskInfo, exception: BaseException, delay: float
) -> None:
    """Receiver of ``task_retried``: push what it says, and where it was sent (which task's
    contexts, process and thread), to ``retried:<task id>``."""
    note = {
        **here(),
        "id": task.id,
        "state": task.state,
        "retries": task.retries,
        "due_at": task.due_at,
        "delay": delay,
        "error": repr(exception),
    }
    redis.Redis.from_url(sender.config["BOTH_REDIS"]).rpush(f"retried:{task.id}", json.dumps(note))


@threadctx.task(retry_for=(ConnectionError,), retry_delay=0.05)
def fails_once_after_go(key: str) -> int:
    """Say that it runs (on ``key``); on the first attempt, wait for the test's go (on
    ``key:go``) and fail with :exc:`ConnectionError`; return the attempt's number."""
    redis_client = client()
    attempt = int(redis_client.incr(f"{key}:attempts"))
    redis_client.rpush(key, json.dumps({**here(), "attempt": attempt, "at": time.time()}))
    if attempt == 1:
        redis_client.blpop([f"{key}:go"], timeout=WAIT)
        raise ConnectionError(f"attempt {attempt}")
    return attempt


def tell_cancelled(sender: flask.Flask, task: TaskInfo) -> None:
    """Receiver of ``task_cancelled``: push the task's state, and where the signal was sent,
    to ``cancelled:<task id>``."""
    note = {**here(), "id": task.id, "state": task.state}
    redis.Redis.from_url(sender.config["BOTH_REDIS"]).rpush(
        f"cancelled:{task.id}", json.dumps(note)
    )


def tell_failed(sender: flask.Flask, task: TaskInfo, exception: BaseException) -> None:
    """Receiver of ``task_failed``: push the task's state and error, and where the signal was
    sent, to ``failed:<task id>``."""
    note = {**here(), "id": task.id, "state": task.state, "error": repr(exception)}
    redis.Redis.from_url(sender.config["BOTH_REDIS"]).rpush(f"failed:{task.id}", json.dumps(note))


@threadctx.task
def checking(key: str, how: str = "check_cancelled", steps: int | None = None) -> int:
    """Say that it runs (on ``key``), then, every 10 ms, check for a stop ``how`` says: with
    ``check_cancelled()`` or with ``report_progress()``, which checks too; until the test's go
    (on ``key:go``), or after ``steps`` checks. Return the number of checks. A check that
    raises is said, with when, on ``key:raised``."""
    redis_client = client()
    redis_client.rpush(key, json.dumps({**here(), "at": time.time()}))
    done = 0
    try:
        while done != steps and redis_client.blpop([f"{key}:go"], timeout=0.01) is None:
            done += 1
            if how == "report_progress":
                report_progress(done)
            else:
                check_cancelled()
    except TaskCancelled as error:
        note = {**here(), "at": time.time(), "error": str(error)}
        redis_client.rpush(f"{key}:raised", json.dumps(note))
        raise
    return done


@threadctx.task
def ignoring(key: str) -> str:
    """Say that it runs (on ``key``), wait for the test's go (on ``key:go``) without a check,
    and say that it returned (on ``key:returned``)."""
    redis_client = client()
    redis_client.rpush(key, json.dumps({**here(), "at": time.time()}))
    redis_client.blpop([f"{key}:go"], timeout=WAIT)
    redis_client.rpush(f"{key}:returned", json.dumps(here()))
    return "done"


@threadctx.task
def waits_for_child(key: str, child_key: str) -> str:
    """Submit :func:`gated` on ``child_key``, say so (with the child's id, on ``key``), and
    return what the child returns, waiting for it without a check."""
    child = gated.submit(child_key)
    client().rpush(key, json.dumps({**here(), "child": child.task.id}))
    return child.result(WAIT)


def _seen(key: str, args: tuple[t.Any, ...], kwargs: dict[str, t.Any]) -> dict[str, t.Any]:
    """What a task saw of its arguments, request and ``g``, and where it ran, pushed to
    ``key``."""
    info = current_task()
    assert info is not None
    seen: dict[str, t.Any] = {
        **here(),
        "backend": info.backend,
        "user": g.get("user"),
        "args": list(args),
        "kwargs": kwargs,
        "request": {
            "method": request.method,
            "path": request.path,
            "url": request.url,
            "args": request.args.to_dict(flat=False),
            "headers": [[name, value] for name, value in sorted(request.headers.items())],
            "json": request.get_json(silent=True),
        },
    }
    client().rpush(key, json.dumps(seen))
    return seen


@threadctx.task(rerunnable=True)
def echo(key: str, *args: t.Any, **kwargs: t.Any) -> dict[str, t.Any]:
    """Say (on ``key``) and return its arguments, the request it saw, and where it ran."""
    return _seen(key, args, kwargs)


@threadctx.task(rerunnable=True)
def retired(key: str, *args: t.Any, **kwargs: t.Any) -> dict[str, t.Any]:
    """:func:`echo`, under a name that a test removes from another process's code, as a
    deploy that dropped the function would."""
    return _seen(key, args, kwargs)
