"""The app the integration suite serves, configured from ``THREADCTX_TEST_*`` environment
variables. Every task writes what it saw to a SQLite file (WAL mode), so the tests judge by what
the tasks recorded, not by what the server answered."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
import typing as t

from flask import after_this_request
from flask import current_app
from flask import Flask
from flask import g
from flask import request
from flask import session
from flask_threadctx import current_task
from flask_threadctx import QueueFull
from flask_threadctx import ThreadContext
from flask_threadctx.signals import task_cancelled

SECRET_KEY = "integration-secret"
SCHEMA = """
CREATE TABLE IF NOT EXISTS seen (
    request_id TEXT, level INTEGER, task_id TEXT, parent_id TEXT, pid INTEGER,
    query TEXT, body TEXT, header TEXT, session TEXT, g TEXT
);
CREATE TABLE IF NOT EXISTS after (
    request_id TEXT, json TEXT, form TEXT, data TEXT, file TEXT
);
CREATE TABLE IF NOT EXISTS flood (task_id TEXT, outcome TEXT, pid INTEGER);
"""

threadctx = ThreadContext()


def create_app() -> Flask:
    app = Flask(__name__)
    env = os.environ
    app.config.update(
        SECRET_KEY=SECRET_KEY,
        DATABASE=env["THREADCTX_TEST_DB"],
        THREADCTX_MAX_WORKERS=int(env.get("THREADCTX_TEST_MAX_WORKERS", "8")),
        THREADCTX_MAX_QUEUE=int(env["THREADCTX_TEST_MAX_QUEUE"])
        if "THREADCTX_TEST_MAX_QUEUE" in env
        else None,
        THREADCTX_SHUTDOWN_TIMEOUT=float(env.get("THREADCTX_TEST_SHUTDOWN_TIMEOUT", "60")),
        THREADCTX_COPY_FILES=True,
        THREADCTX_TASK_STORE=env.get("THREADCTX_TEST_STORE"),
        THREADCTX_METRICS="THREADCTX_TEST_METRICS" in env,
    )
    with contextlib.closing(sqlite3.connect(app.config["DATABASE"], timeout=30)) as db:
        db.execute("PRAGMA journal_mode=WAL")
        db.executescript(SCHEMA)
    threadctx.init_app(app)
    app.teardown_appcontext(_close_db)
    task_cancelled.connect(_record_cancelled, app, weak=False)
    app.register_error_handler(QueueFull, _busy)
    app.add_url_rule("/work", view_func=work, methods=["POST"])
    app.add_url_rule("/after", view_func=after, methods=["POST"])
    app.add_url_rule("/flood", view_func=flood, methods=["POST"])
    app.add_url_rule("/slow", view_func=slow, methods=["POST"])
    app.add_url_rule("/stats", view_func=stats)
    app.add_url_rule("/job", view_func=job, methods=["POST"])
    app.add_url_rule("/status/<task_id>", view_func=status)
    if app.config["THREADCTX_METRICS"]:
        from flask_threadctx.metrics import metrics_response

        app.add_url_rule("/metrics", view_func=metrics_response)
    return app


def _db() -> sqlite3.Connection:
    if "db" not in g:
        g.db = sqlite3.connect(current_app.config["DATABASE"], timeout=30)
    db: sqlite3.Connection = g.db
    return db


def _close_db(exc: BaseException | None) -> None:
    db = g.pop("db", None)
    if db is not None:
        db.close()


def _busy(error: QueueFull) -> tuple[str, int, dict[str, str]]:
    return "busy", 503, {"Retry-After": "1"}


def _write(sql: str, *values: t.Any) -> None:
    db = _db()
    db.execute(sql, values)
    db.commit()


# -- isolation under load ---------------------------------------------------------------------


def work() -> dict[str, str]:
    g.user_id = request.args["user"]
    return {"task": threadctx.submit(_record, 1).task.id}


def _record(level: int) -> None:
    task = current_task()
    assert task is not None
    body = request.get_json()
    _write(
        "INSERT INTO seen VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        request.headers["X-Request-Id"],
        level,
        task.id,
        task.parent_id,
        os.getpid(),
        request.args["user"],
        body["user"],
        request.headers["X-User"],
        session.get("user"),
        g.user_id,
    )
    if level == 1:
        threadctx.submit(_record, 2)


# -- after the response -----------------------------------------------------------------------


def after() -> dict[str, str]:
    sent = threading.Event()

    @after_this_request
    def signal_when_sent(response: t.Any) -> t.Any:
        response.call_on_close(sent.set)
        return response

    return {"task": threadctx.submit(_read_after_response, sent).task.id}


def _read_after_response(sent: threading.Event) -> None:
    if not sent.wait(30):
        raise RuntimeError("The response was never closed.")
    upload = request.files.get("upload")
    _write(
        "INSERT INTO after VALUES (?, ?, ?, ?, ?)",
        request.headers["X-Request-Id"],
        repr(request.get_json(silent=True)),
        repr(request.form.to_dict()),
        request.get_data(as_text=True),
        None if upload is None else upload.read().decode(),
    )


# -- shutdown and overload --------------------------------------------------------------------


def flood() -> dict[str, int]:
    count = int(request.args["n"])
    seconds = float(request.args["ms"]) / 1000
    for _ in range(count):
        threadctx.submit(_sleep_and_record, seconds)
    return {"submitted": count}


def _sleep_and_record(seconds: float) -> None:
    time.sleep(seconds)  # the work being drained: a task that takes a known time
    task = current_task()
    assert task is not None
    _write("INSERT INTO flood VALUES (?, ?, ?)", task.id, "finished", os.getpid())


def _record_cancelled(sender: Flask, task: t.Any) -> None:
    with contextlib.closing(sqlite3.connect(sender.config["DATABASE"], timeout=30)) as db:
        db.execute("INSERT INTO flood VALUES (?, ?, ?)", (task.id, "cancelled", os.getpid()))
        db.commit()


def slow() -> dict[str, str]:
    return {"task": threadctx.submit(time.sleep, 0.05).task.id}


def stats() -> dict[str, t.Any]:
    with open("/proc/self/status") as status:
        rss_kb = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
    return {
        **threadctx.stats(),
        "pid": os.getpid(),
        "rss_kb": rss_kb,
        "threads": threading.active_count(),
    }


# -- status across processes (a task store) -----------------------------------------------------


def job() -> dict[str, str]:
    return {"task": _parent_job.submit().task.id}


@threadctx.task(keep_result=True)
def _parent_job() -> str:
    return threadctx.submit(_child_job).result()


def _child_job() -> str:
    return "done"


def status(task_id: str) -> tuple[dict[str, t.Any], int]:
    future = threadctx.get_task(task_id)
    if future is None:
        return {"pid": os.getpid()}, 404
    state = future.task.state
    result = future.result() if state == "succeeded" else None
    return {"state": state, "result": result, "pid": os.getpid()}, 200
