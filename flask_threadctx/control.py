"""Asking a running task to stop, and the task finding out: :func:`check_cancelled`.

Python cannot stop a thread from outside, so a stop is a request the task honours where it
checks: in :func:`check_cancelled` and :func:`~flask_threadctx.report_progress`. The requests
of this process live here, by task id, for the engine that runs the task to set and clear: a
stop asked for with ``cancel_task``, and the deadline of a task with a ``time_limit``. A task
with neither costs a look at two empty dicts when it ends.
"""

from __future__ import annotations

import time
import typing as t

from ._process import reset_in_child
from .errors import TaskCancelled
from .model import current_task_var

StopReason = t.Literal["cancel", "time_limit"]
Asked = t.Literal["cancel", "told"]
"""A stop asked for with ``cancel_task``: ``"told"`` once a check of the task raised for it,
so that a task that catches that and returns is known to have chosen to finish."""


class _Requests:
    """The requests of this process's tasks, by task id (unique among all apps' tasks).
    Written by the engines, read by the tasks, each operation a single dict call (atomic under
    the GIL)."""

    def __init__(self) -> None:
        self.asked: dict[str, Asked] = {}
        self.deadlines: dict[str, float] = {}  # time.monotonic() times
        self.told_of_limit: set[str] = set()
        reset_in_child(self)

    def reset_after_fork(self) -> None:
        """Forget the parent's tasks, which do not run in a forked child."""
        self.asked.clear()
        self.deadlines.clear()
        self.told_of_limit.clear()


_requests = _Requests()
asked = _requests.asked
"""The tasks asked to stop, and whether they were told; read by the engines, which skip
:func:`forget` while it and :data:`deadlines` are empty (the hot path)."""
deadlines = _requests.deadlines
"""When each task with a time limit must stop, a :func:`time.monotonic` time."""
told_of_limit = _requests.told_of_limit
"""The tasks past their time limit that a check raised for: one that returns all the same
chose to finish."""


def ask_to_stop(task_id: str) -> None:
    """Have the task ``task_id``, running in this process, stop at its next check."""
    asked.setdefault(task_id, "cancel")


def set_time_limit(task_id: str, seconds: float) -> None:
    """Have the task ``task_id``, starting now in this process, stop at its first check after
    ``seconds``."""
    deadlines[task_id] = time.monotonic() + seconds
    told_of_limit.discard(task_id)  # told in an earlier attempt


def forget(task_id: str) -> None:
    """Drop what is kept for the task ``task_id``, which ended in this process."""
    asked.pop(task_id, None)
    deadlines.pop(task_id, None)
    told_of_limit.discard(task_id)


def stop_reason(task_id: str) -> StopReason | None:
    """Why the task ``task_id`` must stop, if it must: a stop was asked for, or its time limit
    passed."""
    deadline = deadlines.get(task_id)
    if deadline is not None and time.monotonic() >= deadline:
        return "time_limit"  # it came first, if a stop was asked for too
    return None if asked.get(task_id) is None else "cancel"


def reason_at_end(task_id: str) -> StopReason | None:
    """Why the task ``task_id``, which has just returned, is booked as stopped rather than
    succeeded, if it is: its time limit passed, or a stop was asked for, and no check of the
    task raised for it (a task told that returns all the same chose to finish). Takes the
    stop request out: whichever of this and ``Pool.stop`` takes it decides."""
    request = asked.pop(task_id, None)
    deadline = deadlines.get(task_id)
    if deadline is not None and time.monotonic() >= deadline:
        # It came first, if a stop was asked for too.
        return None if task_id in told_of_limit else "time_limit"
    return None if request is None or request == "told" else "cancel"


def check_cancelled() -> None:
    """Raise :exc:`~flask_threadctx.TaskCancelled` if the calling task was asked to stop, with
    :meth:`~flask_threadctx.ThreadContext.cancel_task` or by its ``time_limit``. Call it
    between steps of long work; let the exception propagate (clean up in ``finally``).

    .. code-block:: python

        for row in rows:
            check_cancelled()
            import_row(row)

    Outside a task it does nothing: no one can ask code outside a task to stop, and a helper
    that checks may be called from a view as well.
    """
    if asked or deadlines:
        info = current_task_var.get(None)
        if info is not None:
            reason = stop_reason(info.id)
            if reason is not None:
                raise tell(info.id, reason)


def tell(task_id: str, reason: StopReason) -> TaskCancelled:
    """The error that a check in the task ``task_id`` raises, noting that it was told."""
    if reason == "cancel":
        asked[task_id] = "told"
    else:
        told_of_limit.add(task_id)
    return stopped(task_id, reason)


def stopped(task_id: str, reason: StopReason) -> TaskCancelled:
    """The error that stops the task ``task_id``, saying why."""
    if reason == "time_limit":
        return TaskCancelled(f"Task {task_id} ran past its time limit ('time_limit').")
    return TaskCancelled(f"Task {task_id} was asked to stop ('cancel_task').")
