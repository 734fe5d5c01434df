"""The task model every other module shares: :class:`TaskInfo`, the task states,
:func:`current_task`, and the bookkeeping helpers both engines use (a task's name, finding it
among the live and finished ones, counts by state).

It imports nothing of the package's at run time, so that the stores, the engines and the
extension can all depend on it without depending on each other; it was part of the thread
pool's module, which made the stores and the Celery backend import the pool to get it.

Internal API
------------
A :class:`TaskInfo`'s progress is kept in three slots, left unset until the task reports:
``_progress`` (the last report), ``_progress_passed_at`` (when a report was last passed on)
and ``_on_progress`` (where the engine passes a report on, if anywhere). They are set and read by
:mod:`~flask_threadctx.progress` (which reports), by the engines (which pass a report on, or keep
one that a worker sent) and by the stores (which keep one read elsewhere), and by nothing else;
users read :attr:`TaskInfo.progress`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextvars
import time
import typing as t

if t.TYPE_CHECKING:
    from .future import TaskFuture
    from .progress import OnProgress
    from .progress import Progress

TaskState = t.Literal[
    "pending",
    "running",
    "retrying",
    "succeeded",
    "failed",
    "cancelled",
    "rejected",
    "expired",
    "timed_out",
]

current_task_var: contextvars.ContextVar[TaskInfo] = contextvars.ContextVar("flask_threadctx.task")
"""The task running in this context; set by the engine that runs it, read by
:func:`current_task`."""


def current_task() -> TaskInfo | None:
    """The :class:`TaskInfo` of the task running in this thread, or ``None`` outside a task.

    .. code-block:: python

        app.logger.info("step 2 of %s", current_task().id)
    """
    return current_task_var.get(None)


class TaskInfo:
    """What is known about one task, for status pages and signal receivers.

    Times are Unix timestamps (:func:`time.time`), ``None`` until they happen.
    """

    __slots__ = (
        "_due_at",
        "_on_progress",
        "_progress",
        "_progress_passed_at",
        "_rerun_of",
        "_retries",
        "finished_at",
        "id",
        "name",
        "parent_id",
        "request",
        "started_at",
        "state",
        "submitted_at",
    )

    def __init__(self, id: str, name: str, parent_id: str | None, request: str | None) -> None:
        self.id = id
        """Unique among the app's tasks, in every process: each process draws a random prefix
        for the ids of its own."""
        self.name = name
        """The task function's ``__qualname__``."""
        self.parent_id = parent_id
        """The id of the task that submitted this one, or ``None``."""
        self.state: TaskState = "pending"
        """``"pending"``, ``"running"``, ``"retrying"`` (an attempt failed, the next one waits
        for its delay), ``"succeeded"``, ``"failed"``, ``"cancelled"`` (before it started, or
        stopped when asked), ``"rejected"`` (never queued), ``"expired"`` (not started by its
        ``expires``) or ``"timed_out"`` (ran past its ``time_limit``)."""
        self.submitted_at: float = time.time()
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.request = request
        """``"METHOD /path"`` of the request the task (or its first ancestor) was submitted from,
        or ``None``."""

    backend: t.ClassVar[str] = "threads"
    """The backend that runs the task, ``"threads"`` or ``"celery"``."""

    # Left unset until a task reports its progress: a task that never does pays nothing. The
    # module's internal API (see its docstring).
    _progress: Progress
    _progress_passed_at: float
    _on_progress: OnProgress
    # Left unset for a task without options (see '.options'), likewise.
    _retries: int
    _due_at: float | None
    # Left unset but for a re-run, likewise.
    _rerun_of: str | None

    @property
    def retries(self) -> int:
        """How many times the task was retried (its ``retry_for``)."""
        return getattr(self, "_retries", 0)

    @retries.setter
    def retries(self, retries: int) -> None:
        self._retries = retries

    @property
    def due_at(self) -> float | None:
        """While a task waits for its ``countdown``, ``eta`` or a retry's delay: when it is due
        to start (a Unix time); otherwise ``None``."""
        return getattr(self, "_due_at", None)

    @due_at.setter
    def due_at(self, due_at: float | None) -> None:
        self._due_at = due_at

    @property
    def rerun_of(self) -> str | None:
        """The id of the task this one re-runs (:meth:`ThreadContext.rerun
        <flask_threadctx.ThreadContext.rerun>`), or ``None``: on the future ``rerun`` returns,
        from ``get_task`` and in the task store; set by the submitting side, so not promised
        to the task itself while it runs."""
        return getattr(self, "_rerun_of", None)

    @rerun_of.setter
    def rerun_of(self, task_id: str | None) -> None:
        self._rerun_of = task_id

    @property
    def progress(self) -> Progress | None:
        """The last :func:`~flask_threadctx.report_progress` of the task, or ``None``."""
        return getattr(self, "_progress", None)

    @property
    def redelivery_at(self) -> float | None:
        """While a Celery task is pending: by when the broker has delivered it again (a Unix
        time, a latest bound: its ``visibility_timeout`` and a period of the workers' sweep),
        the worker that had received it (prefetched, not started) being lost; otherwise, and
        for threads, ``None``. See :doc:`/scaling`, "Delivery"."""
        return None

    def __repr__(self) -> str:
        return f"<TaskInfo {self.id} {self.name!r} {self.state}>"

    def __str__(self) -> str:
        return f"task {self.id} ({self.name})"


def find_task(
    live: dict[str, TaskFuture[t.Any]],
    finished: collections.deque[TaskFuture[t.Any]],
    task_id: str,
) -> TaskFuture[t.Any] | None:
    """The future of ``task_id`` among a backend's ``live`` tasks and its window of
    ``finished`` ones."""
    future = live.get(task_id)
    if future is None:
        # ``list()`` copies the deque in one C call; iterating it live could see it change.
        window = list(finished)
        future = next((f for f in reversed(window) if f.task.id == task_id), None)
    return future


def wait_until_done(
    live: dict[str, TaskFuture[t.Any]], deadline: float | None
) -> list[TaskFuture[t.Any]]:
    """Wait until ``live`` is empty, or ``deadline`` (a :func:`time.monotonic` time) passes;
    return the futures still in it."""
    while futures := list(live.values()):
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            return futures
        concurrent.futures.wait(futures, timeout=remaining)
    return []


def task_counts(
    submitted: int,
    started: int,
    succeeded: int,
    failed: int,
    cancelled: int,
    rejected: int,
    expired: int = 0,
    stopped: int = 0,
    timed_out: int = 0,
    retrying: int = 0,
) -> dict[str, int]:
    """What ``stats()`` reports, from the counts of what happened to tasks: ``cancelled``
    counts the tasks cancelled before they started, ``stopped`` those stopped while running
    (both are reported as ``cancelled``); ``retrying`` the started tasks waiting for a
    retry."""
    return {
        "submitted": submitted,
        "queued": submitted - rejected - cancelled - expired - started,
        "running": started - succeeded - failed - stopped - timed_out - retrying,
        "retrying": retrying,
        "succeeded": succeeded,
        "failed": failed,
        "cancelled": cancelled + stopped,
        "rejected": rejected,
        "expired": expired,
        "timed_out": timed_out,
    }


def task_name(fn: t.Callable[..., t.Any]) -> str:
    """The name a task of ``fn`` goes by in its :class:`TaskInfo`."""
    return getattr(fn, "__qualname__", None) or type(fn).__qualname__
