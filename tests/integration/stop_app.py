"""The app that tests/integration/test_stop_across_processes.py serves in a process of its own,
with the task store of ``THREADCTX_TEST_STORE``: thread tasks that run until stopped (or told to
finish), or for a given time, and what their futures said in the process that ran them."""

from __future__ import annotations

import os
import threading
import time
import typing as t

from flask import Flask
from flask import request
from flask_threadctx import check_cancelled
from flask_threadctx import current_task
from flask_threadctx import report_progress
from flask_threadctx import ThreadContext

threadctx = ThreadContext()
_finish: dict[str, threading.Event] = {}


def create_app() -> Flask:
    app = Flask("stop_app")
    app.config.update(
        THREADCTX_TASK_STORE=os.environ["THREADCTX_TEST_STORE"], THREADCTX_MAX_WORKERS=16
    )
    threadctx.init_app(app)
    app.add_url_rule("/loop", view_func=loop, methods=["POST"])
    app.add_url_rule("/finish/<task_id>", view_func=finish, methods=["POST"])
    app.add_url_rule("/timed", view_func=timed, methods=["POST"])
    app.add_url_rule("/outcome/<task_id>", view_func=outcome)
    return app


def loop() -> dict[str, t.Any]:
    finish = threading.Event()
    future = threadctx.submit(_until_told, finish)
    _finish[future.task.id] = finish
    return {"task": future.task.id, "pid": os.getpid()}


def _until_told(finish: threading.Event) -> str:
    """Report a count every 5 ms (which checks for a stop) until told to finish."""
    n = 0
    while not finish.wait(0.005):
        n += 1
        report_progress(n)
    return "done"


def finish(task_id: str) -> dict[str, bool]:
    _finish.pop(task_id).set()
    return {"told": True}


def timed() -> dict[str, str]:
    seconds = float(request.args["ms"]) / 1000
    return {"task": threadctx.submit(_for, seconds).task.id}


def _for(seconds: float) -> str:
    """Check for a stop every millisecond for ``seconds``, then return."""
    task = current_task()
    assert task is not None and task.started_at is not None
    end = task.started_at + seconds
    while time.time() < end:
        check_cancelled()
        threading.Event().wait(0.001)
    return "done"


def outcome(task_id: str) -> tuple[dict[str, t.Any], int]:
    """How the task ended, as its own future says, here in the process that ran it."""
    future = threadctx.get_task(task_id)
    if future is None or future.task.backend != "threads":
        return {"pid": os.getpid()}, 404
    error = future.exception(30)
    return {
        "state": future.task.state,
        "error": None if error is None else type(error).__name__,
        "result": None if error is not None else future.result(),
    }, 200
