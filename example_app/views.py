"""The views: place an order (recorded by a task, which submits a receipt task), look at a
task's status, list the orders. The same on both backends: on Celery, the tasks below run on a
worker, found by their import path, with the request rebuilt there."""

from __future__ import annotations

import contextlib
import hmac
import threading
import time
import typing as t

from flask import abort
from flask import Blueprint
from flask import current_app
from flask import g
from flask import redirect
from flask import request
from flask import session
from flask import url_for
from flask_threadctx import BrokerUnavailable
from flask_threadctx import current_task
from flask_threadctx import QueueFull
from flask_threadctx import report_progress
from flask_threadctx import ResultElsewhere
from werkzeug import Response
from werkzeug.exceptions import HTTPException

from .db import get_db
from .extensions import threadctx

bp = Blueprint("shop", __name__)


@bp.app_errorhandler(HTTPException)
def http_error(error: HTTPException) -> tuple[dict[str, str], int]:
    """Errors as JSON, like the rest of the API, rather than Flask's HTML pages."""
    return {"error": error.description or error.name}, error.code or 500


@bp.errorhandler(QueueFull)
def busy(error: QueueFull) -> tuple[dict[str, str], int, dict[str, str]]:
    return {"error": "Too busy, try again shortly."}, 503, {"Retry-After": "1"}


@bp.errorhandler(BrokerUnavailable)
def no_broker(error: BrokerUnavailable) -> tuple[dict[str, str], int, dict[str, str]]:
    return (
        {"error": "Orders cannot be taken just now, try again shortly."},
        503,
        {"Retry-After": "5"},
    )


ORDER_FORMAT = 'Send JSON like {"item": "tea", "quantity": 2}.'
MAX_ITEM = 100
"""The longest item name, in characters."""
MAX_QUANTITY = 1000
"""The most of one item in one order (SQLite's integers end at 2**63 - 1)."""


@bp.post("/orders")
def place_order() -> tuple[dict[str, t.Any], int, dict[str, str]]:
    # Checked here, so that a bad order gets its answer now, not a failed task later.
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        abort(400, f"The body must be a JSON object. {ORDER_FORMAT}")
    item = body.get("item")
    if not isinstance(item, str) or not item.strip():
        abort(400, f"'item' must be a non-empty string. {ORDER_FORMAT}")
    if len(item) > MAX_ITEM:
        abort(400, f"'item' must be at most {MAX_ITEM} characters long, not {len(item)}.")
    try:
        item.encode()
    except UnicodeEncodeError as error:  # a lone surrogate, which JSON may carry as "\udce9"
        abort(
            400,
            f"'item' must be text that UTF-8 can carry, not {item!r}: character {error.start}"
            " is a lone surrogate.",
        )
    quantity = body.get("quantity", 1)
    if (
        isinstance(quantity, bool)
        or not isinstance(quantity, int)
        or not 1 <= quantity <= MAX_QUANTITY
    ):
        shown = repr(quantity) if len(repr(quantity)) <= 40 else f"{repr(quantity)[:40]}..."
        abort(400, f"'quantity' must be a whole number from 1 to {MAX_QUANTITY}, not {shown}.")
    g.user = request.headers.get("X-User", "guest")
    task = threadctx.submit(record_order).task
    status = url_for("shop.task_status", task_id=task.id)
    return {"task": task.id, "status": status}, 202, {"Location": status}


@bp.get("/tasks/<task_id>")
def task_status(task_id: str) -> dict[str, t.Any]:
    future = threadctx.get_task(task_id)
    if future is None:
        abort(404, "No such task, or it finished long ago.")
    task = future.task
    status: dict[str, t.Any] = {
        "id": task.id,
        "name": task.name,
        "state": task.state,
        "parent_id": task.parent_id,
        "request": task.request,
    }
    if task.progress is not None:
        status["progress"] = task.progress._asdict()
    if future.done() and not future.cancelled():
        error = future.exception()
        if error is not None:
            status["error"] = repr(error)
        else:
            # Another process ran it: the task store keeps its state, not its result (the
            # order itself is in the database, for every process to read).
            with contextlib.suppress(ResultElsewhere):
                status["result"] = future.result()
    return status


@bp.post("/reports")
def start_report() -> tuple[dict[str, t.Any], int, dict[str, str]]:
    task = threadctx.submit(build_report).task
    status = url_for("shop.task_status", task_id=task.id)
    return {"task": task.id, "status": status}, 202, {"Location": status}


def build_report() -> dict[str, int]:
    """A slow task that says how far it got, for the status endpoint and the monitor."""
    orders = get_db().execute("SELECT item, quantity FROM orders ORDER BY item, id").fetchall()
    step = current_app.config["REPORT_STEP_SECONDS"]
    totals: dict[str, int] = {}
    for done, (item, quantity) in enumerate(orders, 1):
        totals[item] = totals.get(item, 0) + quantity
        time.sleep(step)  # stands for real work on each order
        report_progress(done, len(orders), f"counted {item}")
    if not orders:
        report_progress(0, 0, "no orders yet")
    return totals


def is_staff() -> bool:
    """Who may see the task monitor: here, whoever signed in with ``MONITOR_TOKEN``."""
    return session.get("staff") is True


def staff_may(action: str, task_id: str) -> bool:
    """What staff may do from the monitor: stop a task. Not re-run one: an order re-run would
    be recorded twice."""
    return action == "stop" and is_staff()


@bp.get("/staff/login")
def staff_login() -> Response:
    token = current_app.config["MONITOR_TOKEN"]
    given = request.args.get("token", "")
    if not token or not hmac.compare_digest(given.encode(), token.encode()):
        abort(403, "Wrong or missing token.")
    session["staff"] = True
    return redirect(url_for("threadctx_monitor.page"))


@bp.get("/orders")
def list_orders() -> dict[str, t.Any]:
    rows = get_db().execute(
        "SELECT o.id, o.task_id, o.user, o.item, o.quantity, o.request, r.text AS receipt"
        " FROM orders o LEFT JOIN receipts r ON r.order_id = o.id ORDER BY o.id"
    )
    return {"orders": [dict(row) for row in rows]}


def record_order() -> dict[str, t.Any]:
    """Runs in a worker thread (or a Celery worker), with the request, ``g.user`` and its own
    database connection."""
    body = request.json
    assert body is not None
    if body["item"] in current_app.config["OUT_OF_STOCK"]:
        # Found out only here, as a real shop would when it reserves the stock.
        raise LookupError(f"{body['item']!r} is out of stock.")
    task = current_task()
    assert task is not None
    db = get_db()
    cursor = db.execute(
        "INSERT INTO orders (task_id, user, item, quantity, request, thread)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        (
            task.id,
            g.user,
            body["item"],
            body.get("quantity", 1),
            f"{request.method} {request.path}",
            threading.current_thread().name,
        ),
    )
    db.commit()
    order_id = cursor.lastrowid
    assert order_id is not None
    receipt = threadctx.submit(write_receipt, order_id)
    # No timeout: a task that waits so for a child nobody has started runs it itself, so this
    # cannot deadlock, even on one worker thread or one Celery worker process.
    return {"order": order_id, "receipt": receipt.result()}


def write_receipt(order_id: int) -> str:
    """A grandchild of the request: still sees its JSON and ``g.user``."""
    body = request.json
    assert body is not None
    text = f"{g.user} ordered {body.get('quantity', 1)} x {body['item']}"
    db = get_db()
    db.execute("INSERT INTO receipts (order_id, text) VALUES (?, ?)", (order_id, text))
    db.commit()
    return text
