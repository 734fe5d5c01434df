"""The task signals: who sends them, where, with what."""

from __future__ import annotations

import gc
import threading
import typing as t

import pytest
from flask import current_app
from flask import g
from flask import request
from flask_threadctx import ThreadContext
from flask_threadctx.signals import task_failed
from flask_threadctx.signals import task_finished
from flask_threadctx.signals import task_started
from flask_threadctx.signals import task_submitted

if t.TYPE_CHECKING:
    from conftest import AppFactory


def boom() -> None:
    raise KeyError("lost")


def test_lifecycle_signals(make_app: AppFactory, ext: ThreadContext) -> None:
    app = make_app(ext, THREADCTX_LOG_EXCEPTIONS=False)
    events: list[tuple[t.Any, ...]] = []

    def submitted(sender: t.Any, task: t.Any) -> None:
        events.append(("submitted", sender is app, threading.current_thread().name))

    def started(sender: t.Any, task: t.Any) -> None:
        events.append(("started", sender is app, request.path, g.user, task.state))

    def finished(sender: t.Any, task: t.Any, result: t.Any, exception: t.Any) -> None:
        events.append(("finished", current_app.name, task.state, result, repr(exception)))

    def failed(sender: t.Any, task: t.Any, exception: t.Any) -> None:
        events.append(("failed", task.state, repr(exception)))

    with (
        task_submitted.connected_to(submitted, app),
        task_started.connected_to(started, app),
        task_finished.connected_to(finished, app),
        task_failed.connected_to(failed, app),
    ):

        @app.get("/run")
        def view() -> str:
            g.user = "ada"
            ext.submit(int, "4").result()
            ext.submit(boom).exception()
            return ""

        app.test_client().get("/run")

    me = threading.current_thread().name
    # An idle worker may start a task before 'task_submitted' is sent (see its docs), so the
    # submitting thread's events and the worker's are compared apart.
    assert [e for e in events if e[0] == "submitted"] == [("submitted", True, me)] * 2
    assert [e for e in events if e[0] != "submitted"] == [
        ("started", True, "/run", "ada", "running"),
        ("finished", app.name, "succeeded", 4, "None"),
        ("started", True, "/run", "ada", "running"),
        ("finished", app.name, "failed", None, "KeyError('lost')"),
        ("failed", "failed", "KeyError('lost')"),
    ]


def test_receiver_that_raises_is_logged_and_harmless(
    make_app: AppFactory, ext: ThreadContext, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app(ext)
    heard: list[str] = []

    def bad(sender: t.Any, **kwargs: t.Any) -> None:
        raise RuntimeError("receiver broke")

    def good(sender: t.Any, **kwargs: t.Any) -> None:
        heard.append(kwargs["task"].state)

    with (
        task_submitted.connected_to(bad, app),
        task_started.connected_to(bad, app),
        task_started.connected_to(good, app),
        task_finished.connected_to(bad, app),
        app.app_context(),
    ):
        for _ in range(20):
            assert ext.submit(int, "3").result() == 3
    assert heard == ["running"] * 20
    logged = [r for r in caplog.records if "Receiver" in r.getMessage()]
    assert len(logged) == 60
    assert all(r.exc_info is not None for r in logged)


def test_receivers_for_another_app_are_not_called(make_app: AppFactory, ext: ThreadContext) -> None:
    app = make_app(ext)
    other = make_app(ext)
    heard: list[t.Any] = []
    with task_started.connected_to(lambda sender, task: heard.append(sender), other):
        with app.app_context():
            ext.submit(int).result()
        with other.app_context():
            ext.submit(int).result()
    assert heard == [other]


def test_async_receiver(make_app: AppFactory, ext: ThreadContext) -> None:
    app = make_app(ext)
    heard: list[str] = []

    async def receiver(sender: t.Any, task: t.Any) -> None:
        heard.append(current_app.name)

    with task_started.connected_to(receiver, app), app.app_context():
        ext.submit(int).result()
    assert heard == [app.name]


def test_receivers_connected_and_disconnected_between_tasks_are_heard_exactly(
    make_app: AppFactory, ext: ThreadContext
) -> None:
    # The extension keeps each app's receivers between sends; every change must reach it.
    app = make_app(ext)
    heard: list[str] = []

    def first(sender: t.Any, **kwargs: t.Any) -> None:
        heard.append("first")

    def second(sender: t.Any, **kwargs: t.Any) -> None:
        heard.append("second")

    async def third(sender: t.Any, **kwargs: t.Any) -> None:
        heard.append("third")

    def weak(sender: t.Any, **kwargs: t.Any) -> None:
        heard.append("weak")

    def run() -> list[str]:
        heard.clear()
        with app.app_context():
            ext.submit(int).result()
        return sorted(heard)

    task_submitted.connect(first, app)
    assert run() == ["first"]
    task_submitted.connect(second, app)
    task_submitted.connect(third)  # for any sender; a coroutine, run through ensure_sync
    assert run() == ["first", "second", "third"]
    task_submitted.disconnect(first, app)
    assert run() == ["second", "third"]
    task_submitted.connect(weak, app)  # weakly: gone when the function is
    assert run() == ["second", "third", "weak"]
    del weak
    gc.collect()
    assert run() == ["second", "third"]
    task_submitted.disconnect(second)
    task_submitted.disconnect(third)
    assert run() == []
