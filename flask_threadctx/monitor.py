"""The task monitor: a blueprint with a JSON API, one live HTML page and the metrics, made by
:meth:`ThreadContext.monitor <flask_threadctx.ThreadContext.monitor>`."""

from __future__ import annotations

import hmac
import time
import typing as t
import urllib.parse
from importlib import resources

import flask
from flask import abort
from flask import current_app
from flask import request
from jinja2.utils import htmlsafe_json_dumps

from .app_state import app_state
from .monitor_actions import act
from .monitor_actions import allowed
from .monitor_actions import check_rule
from .monitor_actions import csrf_token
from .stores import flush
from .stores import reader_of
from .stores.base import TASK_STATES
from .stores.base import tree

if t.TYPE_CHECKING:
    from flask.blueprints import BlueprintSetupState

    from .config import Settings
    from .monitor_actions import CheckAccess
    from .stores.base import TaskReader

MAX_LIMIT = 500
"""The most tasks one call of the API lists."""


def make_monitor(
    check_access: CheckAccess | None, check_action: object, name: str
) -> flask.Blueprint:
    rule = check_rule(check_action)
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
        if rule is not None and not app.secret_key:
            raise RuntimeError(
                "The task monitor's actions ('check_action') need the app's 'SECRET_KEY': it"
                " signs the CSRF token each action must carry. Set 'SECRET_KEY' before"
                " registering the monitor."
            )

    # A token is bound to the blueprint as registered ('request.blueprint'): the same
    # monitor registered twice, under two names, has two tokens.
    def show_page() -> flask.Response:
        return page(None if rule is None else csrf_token(t.cast(str, request.blueprint)))

    def show_task(task_id: str) -> dict[str, t.Any]:
        """One task, with its children and theirs, and the actions this request may take."""
        reader = _reader()
        record = reader.get(task_id)
        if record is None:
            abort(404, f"No task {task_id!r}: unknown, or it finished long ago.")
        return {**tree(reader, record), "actions": allowed(rule, record)}

    def stop(task_id: str) -> flask.Response:
        return act("stop", task_id, t.cast(str, request.blueprint), check_access, rule)

    def rerun(task_id: str) -> flask.Response:
        return act("rerun", task_id, t.cast(str, request.blueprint), check_access, rule)

    @bp.before_request
    def guard() -> None:
        if _serving(metrics) and _scraper_has_token():
            return
        if _serving(stop) or _serving(rerun):
            return  # checked there, so that a refusal is audited too
        if check_access is not None and not check_access():
            abort(403)

    @bp.errorhandler(400)
    @bp.errorhandler(401)
    @bp.errorhandler(403)
    @bp.errorhandler(404)
    def error(e: t.Any) -> flask.typing.ResponseReturnValue:
        if e.code == 403 and _serving(show_page):
            # A person at a browser, not a script: a page that says what to do.
            return FORBIDDEN_PAGE, 403, {"Content-Type": "text/html; charset=utf-8"}
        if e.code == 401:
            return {"error": e.description}, 401, {"WWW-Authenticate": 'Bearer realm="metrics"'}
        return {"error": e.description}, e.code

    bp.add_url_rule("/", "page", show_page)
    bp.add_url_rule("/api/stats", "stats", stats)
    bp.add_url_rule("/api/tasks", "tasks", tasks)
    bp.add_url_rule("/api/tasks/<task_id>", "task", show_task)
    bp.add_url_rule("/api/tasks/<task_id>/stop", "stop", stop, methods=["POST"])
    bp.add_url_rule("/api/tasks/<task_id>/rerun", "rerun", rerun, methods=["POST"])
    bp.add_url_rule("/metrics", "metrics", metrics)
    return bp


FORBIDDEN_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Tasks: not allowed</title></head>
<body style="font: 16px/1.5 system-ui, sans-serif; max-width: 38em; margin: 3em auto;
padding: 0 1em; color: #1a202c">
<h1>Not allowed</h1>
<p>The task monitor shows the requests and errors of every task, so only those the app lets in
may see it, and this request is not one of them.</p>
<p>Sign in to the app with an account that may see it, then reload this page.</p>
<p style="color: #718096">If you run the app: the monitor's <code>check_access</code> function
decides who may see it, and it can send people who are not signed in to your login page; see the
Monitoring page of the Flask-ThreadCtx docs.</p>
</body></html>
"""
"""What the monitor's page answers when ``check_access`` says no; its API answers JSON."""


def _serving(view: t.Callable[..., t.Any]) -> bool:
    """Whether the current request is for ``view``, whatever the blueprint's name."""
    return current_app.view_functions.get(request.endpoint or "") is view


def _scraper_has_token() -> bool:
    """Whether the request carries ``THREADCTX_METRICS_TOKEN`` as a bearer token. A request
    without one is left to ``check_access``; a wrong one is refused."""
    token = _settings().metrics_token
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if token is None or scheme.lower() != "bearer":
        return False
    if not hmac.compare_digest(given.strip().encode(), token.encode()):
        abort(401, "Wrong bearer token for the metrics: send 'THREADCTX_METRICS_TOKEN'.")
    return True


def metrics() -> flask.Response:
    """The app's metrics for Prometheus, with ``THREADCTX_METRICS``: for a request with the
    bearer token ``THREADCTX_METRICS_TOKEN``, or one that ``check_access`` lets in."""
    if app_state(current_app, "metrics").metrics is None:
        abort(404, "Metrics are off: set 'THREADCTX_METRICS = True' (needs prometheus_client).")
    from .metrics import metrics_response

    return metrics_response()


def page(token: str | None) -> flask.Response:
    """The page; ``token`` is the CSRF token its actions send, ``None`` without actions."""
    html = resources.files(__package__).joinpath("monitor.html").read_text("utf-8")
    # The URL holds the request's script root, which a proxy's 'X-Forwarded-Prefix' sets:
    # JSON, with '<', '>', '&' and quotes escaped, can hold anything inside a script element.
    api = htmlsafe_json_dumps(flask.url_for(".stats").rsplit("/", 1)[0])
    html = html.replace("{{api}}", api).replace("{{token}}", htmlsafe_json_dumps(token))
    response = flask.make_response(html)
    response.headers["Cache-Control"] = "no-store"
    return response


def stats() -> dict[str, t.Any]:
    """Counts by state, and the tasks finished in each 10 seconds of the last 5 minutes."""
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    reader = _reader()
    recorder = app_state(app, "stats").recorder
    return {
        "app": app.name,
        "store": store_description(app),
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


def _reader() -> TaskReader:
    """The current app's tasks, with what this process recorded so far written."""
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    flush(app)
    return reader_of(app)


def _settings(app: flask.Flask | None = None) -> Settings:
    return app_state(app or current_app, "monitor").settings


def store_description(app: flask.Flask) -> str:
    """Where ``app``'s tasks are read from, for people: ``"SQLite /srv/instance/tasks.db"``,
    ``"Redis redis://:***@host:6379/0"`` (no password), ``"Redis redis://host:6379/0 (Celery
    records)"``, or ``"this process"`` without a store."""
    state = app_state(app, "store_description")
    url = state.settings.task_store
    if url == "celery" or (url is None and state.celery is not None):
        try:
            backend_url = str(state.backend("celery").celery.conf.result_backend)
        except Exception:  # an unloadable Celery app: said when the records are read
            return "Redis (Celery records)"
        return f"Redis {hide_password(backend_url)} (Celery records)"
    if url is None:
        return "this process"
    path = getattr(getattr(state.recorder, "store", None), "path", None)
    if url.startswith("sqlite:///"):
        return f"SQLite {path or url[len('sqlite:///') :]}"
    return f"Redis {hide_password(url)}"


def hide_password(url: str) -> str:
    """``url`` with its password, in the user part or the query, replaced by ``***``."""
    parts = urllib.parse.urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        netloc = f"{parts.username or ''}:***@{netloc.rpartition('@')[2]}"
    query = "&".join(
        f"{key}=***" if key.lower() == "password" else f"{key}={value}" if sep else key
        for key, sep, value in (item.partition("=") for item in parts.query.split("&") if item)
    )
    # Put together by hand: 'urlunsplit' would make 'unix:///path' 'unix:/path'.
    return f"{parts.scheme}://{netloc}{parts.path}{'?' if query else ''}{query}"
