"""The task monitor: a blueprint with a JSON API and one live HTML page, made by
:meth:`ThreadContext.monitor <flask_threadctx.ThreadContext.monitor>`."""

from __future__ import annotations

import time
import typing as t
from importlib import resources

import flask
from flask import abort
from flask import current_app
from flask import request

from .store import flush
from .store import reader_of
from .store import TASK_STATES
from .store import tree

if t.TYPE_CHECKING:
    from flask.blueprints import BlueprintSetupState

    from .recorder import Recorder
    from .store import TaskReader

CheckAccess = t.Callable[[], bool]

MAX_LIMIT = 500
"""The most tasks one call of the API lists."""


def make_monitor(check_access: CheckAccess | None, name: str) -> flask.Blueprint:
    if check_access is not None and not callable(check_access):
        raise TypeError(
            "'check_access' must be a function that takes no arguments and returns True for"
            f" a request that may see the tasks, not {check_access!r}."
        )
    bp = flask.Blueprint(name, __name__)

    @bp.record_once
    def refuse_unguarded(state: BlueprintSetupState) -> None:
        app = state.app
        if check_access is None and not (app.debug or app.testing):
            raise RuntimeError(
                "The task monitor shows the requests and errors of every task: outside debug"
                " and testing mode it needs 'check_access', a function that says whether the"
                " current request may see it, for example"
                " 'threadctx.monitor(check_access=lambda: current_user.is_admin)'."
            )

    @bp.before_request
    def guard() -> None:
        if check_access is not None and not check_access():
            abort(403)

    @bp.errorhandler(400)
    @bp.errorhandler(403)
    @bp.errorhandler(404)
    def error(e: t.Any) -> tuple[dict[str, t.Any], int]:
        return {"error": e.description}, e.code

    bp.add_url_rule("/", "page", page)
    bp.add_url_rule("/api/stats", "stats", stats)
    bp.add_url_rule("/api/tasks", "tasks", tasks)
    bp.add_url_rule("/api/tasks/<task_id>", "task", task)
    bp.add_url_rule("/metrics", "metrics", metrics)
    return bp


def metrics() -> flask.Response:
    """The app's metrics for Prometheus, with ``THREADCTX_METRICS``."""
    if "threadctx.metrics" not in current_app.extensions:
        abort(404, "Metrics are off: set 'THREADCTX_METRICS = True' (needs prometheus_client).")
    from .metrics import metrics_response

    return metrics_response()


def page() -> flask.Response:
    html = resources.files(__package__).joinpath("monitor.html").read_text("utf-8")
    response = flask.make_response(
        html.replace("{{api}}", flask.url_for(".stats").rsplit("/", 1)[0])
    )
    response.headers["Cache-Control"] = "no-store"
    return response


def stats() -> dict[str, t.Any]:
    """Counts by state, and the tasks finished in each 10 seconds of the last 5 minutes."""
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    reader = _reader()
    recorder: Recorder | None = app.extensions.get("threadctx.recorder")
    return {
        "app": app.name,
        "store": None if recorder is None else type(recorder.store).__name__,
        "counts": reader.counts(),
        "history": reader.history(300),
        "dropped": None if recorder is None else recorder.dropped,
        "now": time.time(),
    }


def tasks() -> dict[str, t.Any]:
    """The tasks submitted last: ``?state=failed&name=send_mail&limit=50``."""
    state = request.args.get("state") or None
    if state is not None and state not in TASK_STATES:
        abort(400, f"'state' must be one of {', '.join(TASK_STATES)}, not {state!r}.")
    limit = request.args.get("limit", "50")
    if not limit.isdigit() or not 1 <= int(limit) <= MAX_LIMIT:
        abort(400, f"'limit' must be a whole number from 1 to {MAX_LIMIT}, not {limit!r}.")
    reader = _reader()
    found = reader.recent(state=state, name=request.args.get("name") or None, limit=int(limit))
    return {"tasks": [record.as_dict() for record in found]}


def task(task_id: str) -> dict[str, t.Any]:
    """One task, with its children and theirs."""
    reader = _reader()
    record = reader.get(task_id)
    if record is None:
        abort(404, f"No task {task_id!r}: unknown, or it finished long ago.")
    return tree(reader, record)


def _reader() -> TaskReader:
    """The current app's tasks, with what this process recorded so far written."""
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    flush(app)
    return reader_of(app)
