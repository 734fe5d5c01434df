"""A Celery task that its worker found expired: not started by its ``expires``, it never runs.

Celery checks a task's ``expires`` in the worker's main process, as it receives the task and
again as it hands it to a pool process, and then sends ``task_revoked`` with ``expired=True``
there (see :func:`.worker._on_celery_revoked`). :func:`book_expired` books it as on threads: a
claim, as a cancel's, so that the first of it, a cancel and a pool process's claim to run
decides; state and count ``"expired"``; its result, a :exc:`~flask_threadctx.TaskExpired`,
stored and published for its submitter, whose future raises it; ``task_cancelled`` sent in that
worker process (before the end is published), where the metrics count it.
"""

from __future__ import annotations

import datetime
import time
import typing as t

from celery import states

from ... import signals
from ...errors import TaskExpired
from ...signals import task_cancelled
from .state import CeleryTaskInfo
from .state import TASK_STATE

if t.TYPE_CHECKING:
    from .backend import CeleryBackend


def book_expired(backend: CeleryBackend, task_id: str, expires: object) -> None:
    """Book the task ``task_id``, found past its ``expires`` (Celery's header, an ISO 8601
    time, or a datetime) before it started, as expired, unless it was claimed first."""
    result_backend, records = backend._connect()
    record = records.get(task_id)
    # None: its submitter's add is not written yet.
    info = CeleryTaskInfo(task_id, "?", None, None) if record is None else CeleryTaskInfo.of(record)
    error = TaskExpired(
        f"{info} had not started by its 'expires' ({_when(expires)}); it never ran."
    )
    meta = {
        "status": states.REVOKED,
        "result": result_backend.encode_result(error, states.REVOKED),
        "traceback": None,
        "task_id": task_id,
        "children": [],
        TASK_STATE: "expired",
    }
    result = (
        result_backend.get_key_for_task(task_id),
        result_backend.encode(meta),
        result_backend.expires,
    )
    won, reply = records.expire(task_id)
    if not won:
        return  # cancelled, or claimed to run, first: that decided
    info.state = "expired"
    info.finished_at = time.time()
    info.due_at = None
    try:  # sent before the submitter hears the end, as on threads before the future wakes
        if task_cancelled.receivers:
            signals.send(task_cancelled, backend.app, task=info)
    finally:
        records.publish_end(result, reply)


def _when(expires: object) -> str:
    """``expires`` as the thread engine says it: an ISO 8601 time in UTC."""
    when = expires
    if isinstance(expires, str):
        try:
            when = datetime.datetime.fromisoformat(expires)
        except ValueError:
            return expires
    if isinstance(when, datetime.datetime) and when.utcoffset() is not None:
        return when.astimezone(datetime.timezone.utc).isoformat()
    return str(expires)
