"""The app the monitor's actions are tried on in a browser (test_monitor_actions_browser.py):
a SQLite task store at ``ACTIONS_STORE``, a long task that runs until it is stopped, a short one
that may be re-run, and two users, "ops", who may act, and "viewer", who may only look. The audit
lines go to standard output, each after ``AUDIT``, as an app would ship them."""

from __future__ import annotations

import logging
import os
import sys
import threading

from flask import Flask
from flask import redirect
from flask import session
from flask.typing import ResponseReturnValue
from flask_threadctx import check_cancelled
from flask_threadctx import ThreadContext

threadctx = ThreadContext()


@threadctx.task
def import_feed() -> None:
    """Runs until it is asked to stop."""
    never = threading.Event()
    while not never.wait(0.01):
        check_cancelled()


@threadctx.task(rerunnable=True)
def count(n: int) -> int:
    """Ends at once; kept rerunnable, found again by its import path."""
    return n * 2


def may_see() -> bool:
    return session.get("user") in ("ops", "viewer")


def may_act(action: str, task_id: str) -> bool:
    return session.get("user") == "ops"


def create_app() -> Flask:
    app = Flask("actions")
    app.config.update(
        SECRET_KEY="actions-secret",
        THREADCTX_TASK_STORE=f"sqlite:///{os.environ['ACTIONS_STORE']}",
        THREADCTX_SHUTDOWN_TIMEOUT=5,
    )
    threadctx.init_app(app)
    audit = logging.getLogger("flask_threadctx.audit")
    if not audit.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("AUDIT %(message)s"))
        audit.addHandler(handler)
        audit.setLevel(logging.INFO)
        audit.propagate = False
    monitor = threadctx.monitor(check_access=may_see, check_action=may_act)
    app.register_blueprint(monitor, url_prefix="/monitor")

    @app.get("/login/<user>")
    def login(user: str) -> ResponseReturnValue:
        session["user"] = user
        return redirect("/monitor/")

    @app.post("/feeds")
    def start_feed() -> dict[str, str]:
        return {"task": import_feed.submit().task.id}

    @app.post("/counts")
    def start_count() -> dict[str, str]:
        return {"task": count.submit(21).task.id}

    return app
