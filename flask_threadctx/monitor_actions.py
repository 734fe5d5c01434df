"""The monitor's actions, Stop and Re-run: who may take them (``check_action``), the CSRF token
each one must carry, and the audit line each attempt writes.

An action is ``POST <prefix>/api/tasks/<id>/stop`` or ``.../rerun``. It is checked in this
order, and the first check that fails answers: ``check_access`` (403), the CSRF token (403),
``check_action`` (403); then it is done. Every attempt, allowed or refused, writes one line on
the logger ``flask_threadctx.audit``; see :doc:`/monitoring`.
"""

from __future__ import annotations

import hashlib
import hmac
import inspect
import json
import logging
import secrets
import typing as t

import flask
from flask import current_app
from flask import request
from flask import session
from werkzeug.exceptions import HTTPException

from .app_state import app_state
from .errors import BrokerUnavailable
from .errors import QueueFull
from .stores import flush
from .stores import reader_of
from .stores.base import FINISHED_STATES

if t.TYPE_CHECKING:
    from .stores.base import Record

CheckAccess = t.Callable[[], bool]
CheckAction = t.Callable[[str, str], bool]

ACTIONS = ("stop", "rerun")
"""What ``check_action`` is asked about, as its first argument."""

TOKEN_HEADER = "X-CSRF-Token"
"""The request header that carries the monitor's CSRF token."""

SESSION_KEY = "_threadctx_csrf"
"""The key of the session that holds the random value each token is made from."""

audit_logger = logging.getLogger("flask_threadctx.audit")
"""One line per action attempt: see :func:`audit_line`."""

REFUSALS = frozenset({"denied", "bad_token", "refused"})
"""The outcomes of an attempt that a check refused, logged at ``WARNING``."""

MAX_SHOWN = 500
"""The most characters of each value an audit line holds."""


def check_rule(check_action: object) -> CheckAction | None:
    """``check_action`` as given to ``monitor()``, checked where it is given: a function that
    can be called as ``check_action("stop", task_id)``, or ``None``."""
    if check_action is None:
        return None
    if not callable(check_action):
        raise TypeError(
            "'check_action' must be a function that takes the action ('stop' or 'rerun') and"
            f" the task's id, and returns True for a request that may take it, not"
            f" {check_action!r}."
        )
    try:
        signature = inspect.signature(check_action)
    except (TypeError, ValueError):  # a builtin without a signature: called as it is
        return t.cast(CheckAction, check_action)
    try:
        signature.bind("stop", "id")
    except TypeError:
        raise TypeError(
            "'check_action' is called with two arguments, the action ('stop' or 'rerun') and"
            f" the task's id, and {check_action!r} cannot take them: give it the signature"
            " 'check_action(action, task_id)'."
        ) from None
    return t.cast(CheckAction, check_action)


def csrf_token(name: str) -> str:
    """The token that the actions of the monitor ``name`` must carry in this session: an HMAC,
    keyed by the app's ``SECRET_KEY``, of a random value kept in the session (drawn here the
    first time). Every process of the app makes the same one for the same session."""
    nonce = session.get(SESSION_KEY)
    if not isinstance(nonce, str):
        nonce = session[SESSION_KEY] = secrets.token_urlsafe(32)
    return _token(name, nonce)


def _token(name: str, nonce: str) -> str:
    key = current_app.secret_key
    if not key:
        raise RuntimeError(
            "The monitor's actions need the app's 'SECRET_KEY', which signs their CSRF token."
        )
    key_bytes = key if isinstance(key, bytes) else key.encode()
    message = f"flask-threadctx monitor action\0{name}\0{nonce}".encode()
    return hmac.new(key_bytes, message, hashlib.sha256).hexdigest()


def token_ok(name: str) -> bool:
    """Whether the request carries this session's token for the monitor ``name``."""
    nonce = session.get(SESSION_KEY)
    given = request.headers.get(TOKEN_HEADER)
    if not isinstance(nonce, str) or given is None:
        return False
    # Header values arrive as latin-1 text: bytes compare in constant time, whatever they hold.
    return hmac.compare_digest(given.encode("latin-1", "replace"), _token(name, nonce).encode())


def allowed(check_action: CheckAction | None, record: Record) -> list[str]:
    """The actions the current request may take on the task of ``record``, for its buttons:
    Stop for a task that has not finished, Re-run for one that has and was rerunnable."""
    if check_action is None:
        return []
    if record.state not in FINISHED_STATES:
        action = "stop"
    elif record.rerun is not None:
        action = "rerun"
    else:
        return []
    return [action] if check_action(action, record.id) else []


def act(
    action: str,
    task_id: str,
    name: str,
    check_access: CheckAccess | None,
    check_action: CheckAction | None,
) -> flask.Response:
    """Check and take ``action`` on the task ``task_id``, and write its audit line."""
    outcome = "denied"
    try:
        if check_access is not None and not check_access():
            return _answer(action, task_id, outcome, 403, "This request may not see the tasks.")
        outcome = "bad_token"
        if not token_ok(name):
            return _answer(
                action,
                task_id,
                outcome,
                403,
                f"Missing or wrong CSRF token: send the '{TOKEN_HEADER}' header the monitor's"
                " page sends (reload the page if the session changed).",
            )
        outcome = "refused"
        if check_action is None or not check_action(action, task_id):
            verb = "re-run" if action == "rerun" else action
            return _answer(action, task_id, outcome, 403, f"This request may not {verb} tasks.")
        outcome = "error"
        return _DO[action](task_id)
    except HTTPException as error:  # an abort (a redirect to a login page, say) of a check
        status = error.code if error.response is None else error.response.status_code
        _audit(action, task_id, outcome, status or 500)
        raise
    except Exception as error:
        _audit(action, task_id, "error", 500, f"{type(error).__name__}: {error}")
        raise


def _stop(task_id: str) -> flask.Response:
    extension = app_state(current_app, "monitor").extension
    try:
        stopped = extension.cancel_task(task_id)
    except LookupError as error:
        return _answer("stop", task_id, "unknown", 404, str(error))
    except RuntimeError as error:  # it runs where this process cannot reach it
        return _answer("stop", task_id, "conflict", 409, str(error))
    except TimeoutError as error:  # the process that runs it did not answer in time
        return _answer("stop", task_id, "no_answer", 504, str(error))
    outcome = "stopped" if stopped else "already_finished"
    return _answer("stop", task_id, outcome, 200, body={"stopped": stopped})


def _rerun(task_id: str) -> flask.Response:
    extension = app_state(current_app, "monitor").extension
    try:
        future = extension.rerun(task_id)
    except LookupError as error:
        if _known(task_id):  # known, but its function is no longer declared
            return _answer("rerun", task_id, "conflict", 409, str(error))
        return _answer("rerun", task_id, "unknown", 404, str(error))
    except (QueueFull, BrokerUnavailable) as error:
        return _answer("rerun", task_id, "unavailable", 503, str(error))
    except (ValueError, TypeError, RuntimeError) as error:  # not rerunnable, or not keepable
        return _answer("rerun", task_id, "conflict", 409, str(error))
    new_id = future.task.id
    response = _answer(
        "rerun", task_id, "rerun", 201, body={"task": new_id, "rerun_of": task_id}, new=new_id
    )
    response.headers["Location"] = flask.url_for(".task", task_id=new_id)
    return response


_DO: dict[str, t.Callable[[str], flask.Response]] = {"stop": _stop, "rerun": _rerun}


def _known(task_id: str) -> bool:
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    flush(app)
    return reader_of(app).get(task_id) is not None


def _answer(
    action: str,
    task_id: str,
    outcome: str,
    status: int,
    error: str | None = None,
    *,
    body: dict[str, object] | None = None,
    new: str | None = None,
) -> flask.Response:
    _audit(action, task_id, outcome, status, error, new)
    response = flask.jsonify(body if error is None else {"error": error})
    response.status_code = status
    return response


def _audit(
    action: str,
    task_id: str,
    outcome: str,
    status: int,
    reason: str | None = None,
    new: str | None = None,
) -> None:
    fields = {
        "action": action,
        "task_id": task_id,
        "outcome": outcome,
        "status": status,
        "remote_addr": request.remote_addr,
        "new_task_id": new,
        "reason": reason,
    }
    # By the outcome, not the status: a check that refuses with a redirect answers 302.
    if outcome == "error":
        level = logging.ERROR
    elif outcome in REFUSALS:
        level = logging.WARNING
    else:
        level = logging.INFO
    audit_logger.log(level, audit_line(fields), extra={"audit": fields})


def audit_line(fields: dict[str, object]) -> str:
    """One line, ``key=value`` separated by spaces, in a fixed order, leaving out what is
    ``None`` among ``new_task_id`` and ``reason``: the action, outcome and status as they are
    (they are of a fixed set), every other value as a JSON string, ASCII only, so that no
    newline or quote a client sends can end the line or forge a field, and cut to
    :data:`MAX_SHOWN` characters."""
    parts = []
    for key, value in fields.items():
        if value is None and key in ("new_task_id", "reason"):
            continue
        if key in ("action", "outcome", "status"):
            parts.append(f"{key}={value}")
        else:
            parts.append(f"{key}={_quoted(value)}")
    return " ".join(parts)


def _quoted(value: object) -> str:
    if value is None:
        return "null"
    text = str(value)
    if len(text) > MAX_SHOWN:
        text = f"{text[:MAX_SHOWN]}...[{len(text)} characters]"
    return json.dumps(text, ensure_ascii=True)
