"""Failures outside the task's function: setting up and tearing down its contexts, signal
receivers, coroutine functions without ``flask[async]``. Each fails the task's future (or is
logged), books the task right, and leaves the worker alive; a failed task lets go of what it
captured."""

from __future__ import annotations

import asyncio
import gc
import sys
import typing as t
import weakref

import flask
import pytest
from flask import appcontext_popped
from flask import appcontext_pushed
from flask import g
from flask import request
from flask_threadctx import current_task
from flask_threadctx import task_failed
from flask_threadctx import task_finished
from flask_threadctx import task_started
from flask_threadctx import ThreadContext

if t.TYPE_CHECKING:
    from conftest import AppFactory

REPEAT = 50


class DatabaseDown(Exception):
    pass


def answer() -> int:
    return 42


def settled(app: flask.Flask, ext: ThreadContext) -> dict[str, int]:
    with app.app_context():
        stats = ext.stats()
    del stats["max_workers"]
    return stats


@pytest.mark.parametrize("error", [DatabaseDown, KeyboardInterrupt])
@pytest.mark.parametrize("eager", [False, True])
def test_appcontext_pushed_receiver_raising_fails_the_task(
    make_app: AppFactory,
    ext: ThreadContext,
    caplog: pytest.LogCaptureFixture,
    eager: bool,
    error: type[BaseException],
) -> None:
    app = make_app(ext, THREADCTX_MAX_WORKERS=1, THREADCTX_EAGER=eager)
    signalled: list[tuple[str, t.Any]] = []

    def database_down(sender: flask.Flask, **kwargs: t.Any) -> None:
        if not flask.has_request_context():  # the task's push, not the test's own
            raise error("no database")

    def on_finished(sender: flask.Flask, task: t.Any, **kwargs: t.Any) -> None:
        signalled.append(("finished", type(kwargs["exception"])))

    def on_failed(sender: flask.Flask, task: t.Any, exception: BaseException) -> None:
        signalled.append(("failed", type(exception)))

    with app.app_context():
        with (
            appcontext_pushed.connected_to(database_down, app),
            task_finished.connected_to(on_finished, app),
            task_failed.connected_to(on_failed, app),
        ):
            futures = [ext.submit(answer) for _ in range(REPEAT)]
            errors = [f.exception(timeout=10) for f in futures]
        after = ext.submit(answer).result(timeout=10)
        ext.shutdown(wait=True)
    assert all(type(e) is error for e in errors)
    assert [f.task.state for f in futures] == ["failed"] * REPEAT
    assert after == 42
    assert settled(app, ext) == {
        "submitted": REPEAT + 1,
        "queued": 0,
        "running": 0,
        "succeeded": 1,
        "failed": REPEAT,
        "cancelled": 0,
        "rejected": 0,
        "retrying": 0,
        "expired": 0,
        "timed_out": 0,
    }
    assert signalled == [("finished", error), ("failed", error)] * REPEAT
    logged = [r for r in caplog.records if "Setting up the contexts of" in r.getMessage()]
    assert len(logged) == REPEAT
    assert all(r.exc_info and type(r.exc_info[1]) is error for r in logged)


@pytest.mark.parametrize("error", [KeyboardInterrupt, asyncio.CancelledError, SystemExit])
def test_receiver_raising_a_base_exception_is_logged(
    make_app: AppFactory,
    ext: ThreadContext,
    caplog: pytest.LogCaptureFixture,
    error: type[BaseException],
) -> None:
    app = make_app(ext, THREADCTX_MAX_WORKERS=1)

    def stop(sender: flask.Flask, **kwargs: t.Any) -> None:
        raise error

    async def stop_async(sender: flask.Flask, **kwargs: t.Any) -> None:
        raise error

    with app.app_context():
        with (
            task_started.connected_to(stop, app),
            task_finished.connected_to(stop_async, app),
        ):
            results = [ext.submit(answer).result(timeout=10) for _ in range(REPEAT)]
        ext.shutdown(wait=True)
    assert results == [42] * REPEAT
    assert settled(app, ext)["succeeded"] == REPEAT
    assert caplog.text.count("raised; the task is not affected") == 2 * REPEAT


@pytest.mark.parametrize("eager", [False, True])
def test_async_task_without_flask_async_fails_the_task(
    make_app: AppFactory, ext: ThreadContext, monkeypatch: pytest.MonkeyPatch, eager: bool
) -> None:
    monkeypatch.setitem(sys.modules, "asgiref.sync", None)  # as if asgiref were not installed
    app = make_app(ext, THREADCTX_MAX_WORKERS=1, THREADCTX_EAGER=eager)

    async def fetch() -> int:
        return 1

    with app.app_context():
        error = ext.submit(fetch).exception(timeout=10)
        after = ext.submit(answer).result(timeout=10)
        ext.shutdown(wait=True)
    assert isinstance(error, RuntimeError)
    assert "'async' extra" in str(error)
    assert after == 42
    assert (settled(app, ext)["failed"], settled(app, ext)["running"]) == (1, 0)


@pytest.mark.parametrize("error", [OSError("disk gone"), KeyboardInterrupt()])
def test_teardown_error_fails_a_task_that_returned(
    make_app: AppFactory,
    ext: ThreadContext,
    caplog: pytest.LogCaptureFixture,
    error: BaseException,
) -> None:
    app = make_app(ext, THREADCTX_MAX_WORKERS=1)
    failed: list[BaseException] = []

    @app.teardown_appcontext
    def commit(exc: BaseException | None) -> None:
        if g.get("commit"):
            raise error

    def write() -> str:
        g.commit = True
        return "written"

    def on_failed(sender: flask.Flask, task: t.Any, exception: BaseException) -> None:
        failed.append(exception)

    with app.app_context(), task_failed.connected_to(on_failed, app):
        futures = [ext.submit(write) for _ in range(REPEAT)]
        outcomes = [f.exception(timeout=10) for f in futures]
        after = ext.submit(answer).result(timeout=10)
        ext.shutdown(wait=True)
    assert outcomes == [error] * REPEAT
    assert failed == [error] * REPEAT
    assert [f.task.state for f in futures] == ["failed"] * REPEAT
    assert after == 42
    assert (settled(app, ext)["failed"], settled(app, ext)["succeeded"]) == (REPEAT, 1)
    assert caplog.text.count("Tearing down the contexts of") == REPEAT


@pytest.mark.parametrize("error", [OSError, KeyboardInterrupt])
def test_appcontext_popped_receiver_raising_fails_a_task_that_returned(
    make_app: AppFactory,
    ext: ThreadContext,
    caplog: pytest.LogCaptureFixture,
    error: type[BaseException],
) -> None:
    """A failure while the task's context is popped, from Flask's own signal."""
    app = make_app(ext, THREADCTX_MAX_WORKERS=1)

    def broken(sender: flask.Flask, **kwargs: t.Any) -> None:
        if current_task() is not None:  # the task's pop, not the test's own
            raise error("pop failed")

    with app.app_context():
        with appcontext_popped.connected_to(broken, app):
            futures = [ext.submit(answer) for _ in range(REPEAT)]
            outcomes = [type(f.exception(timeout=10)) for f in futures]
        after = ext.submit(answer).result(timeout=10)
        ext.shutdown(wait=True)
    assert outcomes == [error] * REPEAT
    assert [f.task.state for f in futures] == ["failed"] * REPEAT
    assert after == 42
    assert (settled(app, ext)["failed"], settled(app, ext)["running"]) == (REPEAT, 0)
    assert caplog.text.count("Tearing down the contexts of") == REPEAT


def test_teardown_error_after_a_failure_keeps_the_tasks_own_error(
    make_app: AppFactory, ext: ThreadContext, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app(ext, THREADCTX_MAX_WORKERS=1)

    @app.teardown_appcontext
    def broken(exc: BaseException | None) -> None:
        if g.get("break_teardown"):
            raise OSError("teardown failed")

    def fail() -> None:
        g.break_teardown = True
        raise ValueError("task failed")

    with app.app_context():
        error = ext.submit(fail).exception(timeout=10)
    assert isinstance(error, ValueError)
    assert caplog.text.count("Tearing down the contexts of") == 1
    assert caplog.text.count("raised an exception") == 1


class Payload:
    """Something a test can hold a weak reference to."""


def test_a_failed_task_lets_go_of_what_it_captured(
    make_app: AppFactory, ext: ThreadContext
) -> None:
    app = make_app(ext)
    refs: list[weakref.ref[t.Any]] = []

    def fail(payload: Payload) -> None:
        refs.append(weakref.ref(request._get_current_object()))  # type: ignore[attr-defined]
        refs.append(weakref.ref(g._get_current_object()))
        request.get_data()
        raise ValueError("failed")

    futures = []
    for _ in range(REPEAT):
        payload = Payload()
        refs.append(weakref.ref(payload))
        with app.test_request_context("/upload", method="POST", data=b"x" * 100_000):
            g.numbers = list(range(100))
            future = ext.submit(fail, payload)
            del payload
            assert isinstance(future.exception(timeout=10), ValueError)
            futures.append(future)
    gc.collect()
    # The futures, their exceptions and the tracebacks stay (and get_task finds them), but not
    # the arguments, the request or the task's g.
    assert [getattr(f.exception(), "__traceback__", None) is not None for f in futures] == [
        True
    ] * REPEAT
    with app.app_context():
        assert ext.get_task(futures[0].task.id) is futures[0]
    assert [ref() for ref in refs if ref() is not None] == []
