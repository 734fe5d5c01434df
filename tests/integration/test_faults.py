"""Faults in tasks, receivers and teardown: the pool keeps working, the next task on the same
thread sees clean contexts, and the counts add up."""

from __future__ import annotations

import threading
import typing as t

import flask
import pytest
from flask import current_app
from flask import g
from flask import has_request_context
from flask_threadctx import ThreadContext
from flask_threadctx.signals import task_finished
from flask_threadctx.signals import task_started

ROUNDS = 200


def fail() -> None:
    raise ValueError("task failed")


def leave_context_pushed() -> None:
    flask.Flask("stray").test_request_context("/stray").push()


def plant_in_g() -> None:
    g.planted = "by an earlier task"


def look() -> tuple[str, str, bool, t.Any, str]:
    return (
        threading.current_thread().name,
        current_app.name,
        has_request_context(),
        g.get("planted"),
        flask.request.path if has_request_context() else "",
    )


def test_faults_leave_the_pool_clean(
    caplog: pytest.LogCaptureFixture, figures: dict[str, t.Any]
) -> None:
    app = flask.Flask("faults")
    app.config.update(THREADCTX_MAX_WORKERS=1)
    ext = ThreadContext(app)
    teardown_calls = [0]

    @app.teardown_appcontext
    def flaky_teardown(exc: BaseException | None) -> None:
        teardown_calls[0] += 1
        if g.get("break_teardown"):
            raise OSError("teardown failed")

    def break_teardown() -> None:
        g.break_teardown = True

    def broken_receiver(sender: flask.Flask, **kwargs: t.Any) -> None:
        raise RuntimeError("receiver failed")

    faults = [fail, leave_context_pushed, plant_in_g, break_teardown]
    seen: list[tuple[str, str, bool, t.Any, str]] = []
    try:
        with (
            task_started.connected_to(broken_receiver, app),
            task_finished.connected_to(broken_receiver, app),
        ):
            for n in range(ROUNDS):
                fault = faults[n % len(faults)]
                if n % 2:
                    with app.app_context():
                        ext.submit(fault).exception()
                        seen.append(ext.submit(look).result())
                else:
                    with app.test_request_context("/clean"):
                        ext.submit(fault).exception()
                        seen.append(ext.submit(look).result())
        stats = ext.stats()
    finally:
        ext.shutdown()

    worker = seen[0][0]
    expected = [
        (worker, "faults", n % 2 == 0, None, "/clean" if n % 2 == 0 else "") for n in range(ROUNDS)
    ]
    logged = caplog.text
    figures.update(
        tasks=stats["submitted"],
        failed=stats["failed"],
        teardown_errors_logged=logged.count("Tearing down the contexts of"),
        receiver_errors_logged=logged.count("Receiver"),
        leaks_logged=logged.count("left an app or request context pushed"),
    )
    assert seen == expected
    assert stats == {
        "submitted": 2 * ROUNDS,
        "queued": 0,
        "running": 0,
        # A task whose teardown raised failed with the teardown's error.
        "succeeded": 2 * ROUNDS - ROUNDS // 2,
        "failed": ROUNDS // 2,
        "cancelled": 0,
        "rejected": 0,
        "retrying": 0,
        "expired": 0,
        "timed_out": 0,
        "max_workers": 1,
    }
    assert teardown_calls[0] == 2 * ROUNDS + ROUNDS  # each task's, and each round's own
    assert logged.count("Tearing down the contexts of") == ROUNDS // 4
    assert logged.count("left an app or request context pushed") == ROUNDS // 4
    assert logged.count("Receiver") == 2 * 2 * ROUNDS
    assert logged.count("raised an exception") == ROUNDS // 4
