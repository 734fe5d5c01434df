"""What every task store shares: the :class:`Record` of a task and its merge rules, the
:class:`TaskReader` and :class:`TaskStore` protocols, and the future of a task read from a store
(:func:`stored_future`).

With ``THREADCTX_TASK_STORE`` set, a :class:`~flask_threadctx.stores.feed.Recorder` feeds the
app's task signals to the store as :class:`Record` objects, snapshots of the tasks'
:class:`TaskInfo`. A record only ever moves a task forward (pending, running, finished), so the
order in which the signals of one task reach the store does not matter.

Stores implement :class:`TaskStore`: :class:`~flask_threadctx.stores.sqlite.SQLiteTaskStore`
(one machine) and :class:`~flask_threadctx.stores.redis.RedisTaskRecords` (several machines),
which is also where the Celery backend keeps its records: with Celery, the store *is* those
records, and only the thread backend's tasks are written to it through the signals. The
registry that opens a store from its URL is :mod:`flask_threadctx.stores`.
"""

from __future__ import annotations

import builtins
import contextlib
import contextvars
import functools
import json
import os
import socket
import time
import typing as t

from .._process import reset_in_child
from ..errors import RemoteTaskError
from ..errors import ResultElsewhere
from ..future import FutureOwner
from ..future import TaskFuture
from ..model import TaskInfo
from ..model import TaskState
from ..progress import Progress

if t.TYPE_CHECKING:
    import collections.abc as cabc

    from .stops import StopRequests


TASK_STATES: tuple[TaskState, ...] = t.get_args(TaskState)
FINISHED_STATES = frozenset(
    {"succeeded", "failed", "cancelled", "rejected", "expired", "timed_out"}
)
_RANK = {state: 2 for state in FINISHED_STATES} | {"pending": 0, "running": 1, "retrying": 1}

COUNTS = (
    "submitted",
    "started",
    "succeeded",
    "failed",
    "cancelled",
    "rejected",
    "expired",
    "stopped",
    "timed_out",
    "retrying",
)
"""What a store counts, in the order of :func:`~flask_threadctx.model.task_counts`."""

HISTORY_STEP = 10
"""Seconds per bar of the throughput history."""
HISTORY_KEPT = 3600
"""Seconds of throughput history that a store keeps."""


_Info = t.TypeVar("_Info", bound=TaskInfo)
R = t.TypeVar("R")


class Record(t.NamedTuple):
    """What the store keeps of one task."""

    id: str
    name: str
    parent_id: str | None
    request: str | None
    state: TaskState
    submitted_at: float
    started_at: float | None
    finished_at: float | None
    progress: Progress | None
    error: str | None
    """``"TypeName: message"`` of the exception of a failed task."""
    process: str
    """``"host:pid"`` of the process that ran (or submitted) the task."""
    backend: str = "threads"
    result: str | None = None
    """What was kept of the result of a task that succeeded, if it was to be kept: JSON,
    ``{"value": ...}``, or why it was not, ``{"too_large": bytes, "max": bytes}`` or
    ``{"not_json": "why"}``. Never shown by the monitor or the CLI."""
    redelivery_at: float | None = None
    """While a Celery task is pending: when the broker delivers it again, the worker that
    had received it (prefetched, not started) being lost; ``None`` otherwise."""
    retries: int = 0
    """How many times the task was retried (see :doc:`/control`)."""
    due_at: float | None = None
    """While the task waits for its ``countdown``, ``eta`` or a retry: when it is due."""
    rerun_of: str | None = None
    """The id of the task this one re-runs (see :doc:`/control`, "Re-run"), or ``None``."""
    rerun: str | None = None
    """What a re-run of a task submitted ``rerunnable`` needs, as JSON: its function's import
    path, arguments, options and request snapshot (see :mod:`flask_threadctx.rerun`); ``None``
    for any other task. Never shown by the monitor or the CLI."""

    def info(self) -> TaskInfo:
        return self.into(TaskInfo)

    def into(self, kind: type[_Info]) -> _Info:
        """The task as this record has it, as a ``kind`` of :class:`TaskInfo`."""
        info = kind(self.id, self.name, self.parent_id, self.request)
        info.state = self.state
        info.submitted_at = self.submitted_at
        info.started_at = self.started_at
        info.finished_at = self.finished_at
        if self.progress is not None:
            info._progress = self.progress
        if self.retries:
            info.retries = self.retries
        if self.due_at is not None:
            info.due_at = self.due_at
        if self.rerun_of is not None:
            info.rerun_of = self.rerun_of
        return info

    def as_dict(self) -> dict[str, t.Any]:
        """The record as JSON data, with the queue wait and run time in seconds; without the
        result and what a re-run needs, which are the app's data, not the monitor's."""
        data = self._asdict()
        del data["result"], data["rerun"]
        data["progress"] = None if self.progress is None else self.progress._asdict()
        began = self.started_at
        data["waited"] = None if began is None else began - self.submitted_at
        data["ran"] = (
            None if began is None or self.finished_at is None else self.finished_at - began
        )
        return data


def summary(error: BaseException) -> str:
    try:
        text = str(error)
    except Exception:  # as the traceback module says it: the task's error all the same
        text = "<exception str() failed>"
    return storable_text(f"{type(error).__name__}: {text}"[:1000])


def storable_text(text: str) -> str:
    """``text`` as UTF-8 can carry it, for a store: a lone surrogate (the undecodable bytes of
    a file name, from :func:`os.fsdecode`) written as its escape, ``\\udce9``. Raising instead
    would fail the whole batch of every task written with this one."""
    if text.isascii():
        return text
    try:
        text.encode()
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode()
    return text


def findable(task_id: str) -> bool:
    """Whether a store may hold a task with this id: one that UTF-8 cannot carry (a lone
    surrogate) was never a task's, and a store would raise on it rather than find nothing."""
    return task_id.isascii() or storable_text(task_id) is task_id


def storable_record(record: Record) -> Record:
    """``record`` with its texts made storable (see :func:`storable_text`)."""
    progress = record.progress
    if progress is not None and progress.note is not None:
        progress = progress._replace(note=storable_text(progress.note))
    return record._replace(
        name=storable_text(record.name),
        request=None if record.request is None else storable_text(record.request),
        progress=progress,
        error=None if record.error is None else storable_text(record.error),
    )


def merge(old: Record | None, new: Record) -> Record:
    """``new``, with what ``old`` knew that ``new`` does not, and ``old``'s state if that is
    further on: the signals of one task may be written in any order."""
    if old is None:
        return new
    state = new.state if _moves_on(old.state, new.state) else old.state
    return new._replace(
        state=state,
        started_at=new.started_at or old.started_at,
        finished_at=new.finished_at or old.finished_at,
        progress=new.progress or old.progress,
        error=new.error or old.error,
        result=new.result or old.result,
        rerun_of=new.rerun_of or old.rerun_of,
        rerun=new.rerun or old.rerun,
    )


def _moves_on(old: str, new: str) -> bool:
    # A task that returned but whose contexts failed to tear down fails after it succeeded.
    # A retried task runs again after it waited.
    return (
        _RANK[new] > _RANK[old]
        or new == old
        or (old == "succeeded" and new == "failed")
        or _RANK[new] == _RANK[old] == 1
    )


_STARTED = frozenset({"running", "retrying", "succeeded", "failed", "timed_out"})


@functools.cache
def count_changes(old: str | None, new: str, started: bool = False) -> tuple[tuple[str, int], ...]:
    """How the counts of ``stats()`` change when a task moves from ``old`` (``None``: the
    store had not seen it) to ``new``: ``(count, change)`` pairs. ``started``: whether the
    task has started, which tells a task stopped while it ran (counted as ``stopped``) from
    one cancelled before it started."""
    changes: dict[str, int] = {}
    if old is None:
        changes["submitted"] = 1
    stopped = new == "cancelled" and started
    if old in (None, "pending") and (new in _STARTED or stopped):
        changes["started"] = 1
    if (new == "retrying") != (old == "retrying"):
        changes["retrying"] = 1 if new == "retrying" else -1
    if new in FINISHED_STATES and old not in FINISHED_STATES:
        changes["stopped" if stopped else new] = 1
    elif old == "succeeded" and new == "failed":
        changes.update(succeeded=-1, failed=1)
    return tuple(changes.items())


Tally = tuple[dict[str, int], dict[tuple[int, str], int]]
"""How a batch changes the counts, and the throughput history: by (step, outcome)."""


def tally(moves: cabc.Iterable[tuple[str | None, Record]]) -> Tally:
    """What the tasks of a batch, each moving from a state (``None``: new) to a record,
    change in the counts and in the throughput history."""
    counts: dict[str, int] = {}
    history: dict[tuple[int, str], int] = {}
    for old, new in moves:
        for name, change in count_changes(old, new.state, new.started_at is not None):
            counts[name] = counts.get(name, 0) + change
            if name in ("succeeded", "failed") and new.finished_at is not None:
                step = int(new.finished_at // HISTORY_STEP * HISTORY_STEP), name
                history[step] = history.get(step, 0) + change
    return counts, history


def history_steps(seconds: int, now: float | None = None) -> list[int]:
    """The starts of the steps of the last ``seconds``, oldest first."""
    last = int((time.time() if now is None else now) // HISTORY_STEP * HISTORY_STEP)
    return list(range(last - seconds + HISTORY_STEP, last + 1, HISTORY_STEP))


def history_row(at: int, counts: cabc.Mapping[str, int]) -> dict[str, int]:
    return {"at": at, "succeeded": counts.get("succeeded", 0), "failed": counts.get("failed", 0)}


class TaskReader(t.Protocol):
    """What the monitor and the CLI read: a :class:`TaskStore`, or :class:`LocalTasks`."""

    def get(self, task_id: str) -> Record | None: ...

    def counts(self) -> dict[str, int]:
        """What ``stats()`` reports, for every process of the app."""

    def recent(
        self, *, state: str | None = None, name: str | None = None, limit: int = 50
    ) -> list[Record]:
        """The last ``limit`` tasks submitted, newest first, in ``state`` and named ``name``
        if given."""

    def children(self, task_id: str) -> list[Record]:
        """The tasks that the task ``task_id`` submitted, oldest first."""

    def history(self, seconds: int = 300) -> list[dict[str, int]]:
        """Tasks finished in each step of 10 seconds of the last ``seconds``, oldest first:
        ``{"at": start of the step, "succeeded": n, "failed": n}``."""


class TaskStore(TaskReader, t.Protocol):
    """Where the tasks of one app are kept, for all its processes to read."""

    def write(self, records: cabc.Sequence[Record]) -> None:
        """Merge ``records`` (at most one per task) into the store, and update the counts; keep
        ``THREADCTX_KEEP_FINISHED`` finished tasks. Raise if the store cannot be reached."""

    def stop_requests(self) -> StopRequests | None:
        """Where ``cancel_task`` asks another process to stop a thread task, and where that
        process answers: see :mod:`~flask_threadctx.stores.stops`. ``None`` (the default): the
        store keeps none, and a thread task is stopped only in its own process."""
        return None


def tree(store: TaskReader, record: Record, depth: int = 20) -> dict[str, t.Any]:
    """``record`` as JSON data, with its children's, and theirs, ``depth`` levels down."""
    data = record.as_dict()
    children = store.children(record.id) if depth else []
    data["children"] = [tree(store, child, depth - 1) for child in children]
    return data


class Here:
    """``"host:pid"`` of this process, made anew in a forked child."""

    name = ""

    @classmethod
    def reset_after_fork(cls) -> None:
        cls.name = f"{socket.gethostname()}:{os.getpid()}"


Here.reset_after_fork()
reset_in_child(Here)


keep_result: contextvars.ContextVar[bool | None] = contextvars.ContextVar(
    "threadctx_keep_result", default=None
)
"""Set by a :class:`~flask_threadctx.Task` decorated with ``keep_result`` while it
submits: whether the store keeps its result, whatever ``THREADCTX_KEEP_RESULTS`` says."""


class KeptForRerun:
    """What a rerunnable submit keeps for a re-run, set in :data:`kept_for_rerun` while it
    submits: the JSON of :attr:`Record.rerun`, and the id of the task it re-runs, if it does.

    The task's contexts are copied from the submitting thread, so a task (or a child it submits
    on another thread) may see it too: it belongs to the first task submitted with
    ``parent_id`` (the parent of the submit, if any), and to it alone; see :meth:`claim`."""

    __slots__ = ("parent_id", "payload", "rerun_of", "task_id")

    def __init__(self, payload: str, rerun_of: str | None, parent_id: str | None) -> None:
        self.payload = payload
        self.rerun_of = rerun_of
        self.parent_id = parent_id
        self.task_id: str | None = None

    def claim(self, task: TaskInfo) -> bool:
        """Whether this is ``task``'s: the task the submit made (told here first by the
        store, or by the task's signal), never a child of it."""
        if self.task_id is None and task.parent_id == self.parent_id:
            self.task_id = task.id
        return self.task_id == task.id


kept_for_rerun: contextvars.ContextVar[KeptForRerun | None] = contextvars.ContextVar(
    "threadctx_kept_for_rerun", default=None
)
"""Set by a rerunnable submit while it submits (:mod:`flask_threadctx.rerun`); read in that
submit by what writes the task's first record: the recorder's ``task_submitted`` receiver, and
the Celery backend's records (:func:`~flask_threadctx.stores.redis.rerun_fields`)."""


def kept_result(value: object, max_bytes: int) -> str:
    """What the store keeps of a result: see :attr:`Record.result`."""
    try:
        text = json.dumps(value)  # ASCII: a lone surrogate is escaped, and chars are bytes
    except BaseException as error:
        # Whatever the value's own methods raise (a lazy row's items(): RuntimeError, even a
        # KeyboardInterrupt, which no signal brings to this thread) is the value's reason.
        return json.dumps({"not_json": f"{type(value).__name__}: {_told(error)}"})
    if len(text) > max_bytes:
        return json.dumps({"too_large": len(text), "max": max_bytes})
    return f'{{"value": {text}}}'


def _told(error: BaseException) -> str:
    """An exception's message, or its type's name if its ``__str__`` raises too."""
    try:
        return str(error)
    except Exception:
        return f"{type(error).__name__} (its message could not be read)"


def stored_future(record: Record) -> TaskFuture[object]:
    """A future of a task of another process, as the store saw it when it was read: a snapshot,
    whose state does not change. ``result()`` of a task that succeeded is its kept result;
    without one, and waiting for a task that has not finished, it raises
    :exc:`ResultElsewhere`. A failed task's exception is made from its error summary by
    :func:`error_of`."""
    future = _StoredFuture(record.info(), _ELSEWHERE, None, None, (), {})
    state = record.state
    if state in ("cancelled", "rejected"):
        future._cancelled_elsewhere()
    elif state == "running":
        future._claim()
    elif state == "succeeded":
        kept = {} if record.result is None else json.loads(record.result)
        future._no_result = None if "value" in kept else _not_kept(future.task, kept)
        future._finish(kept.get("value"), None)
    elif state == "failed":
        future._finish(None, error_of(record.error or "Exception: "))
    return future


def error_of(summary: str) -> Exception:
    """The exception of an error summary, ``"TypeName: message"``: of the built-in class of
    that name, as the process that ran the task saw it (and as the Celery backend rebuilds
    it), if there is one; else a :exc:`~flask_threadctx.RemoteTaskError` naming it."""
    type_name, _, message = summary.partition(": ")
    cls = getattr(builtins, type_name, None)
    if isinstance(cls, type) and issubclass(cls, Exception):
        with contextlib.suppress(Exception):  # one that takes other arguments
            return cls(message)
    return RemoteTaskError(type_name, message)


class _StoredFuture(TaskFuture[object]):
    __slots__ = ("_no_result",)

    _no_result: ResultElsewhere | None
    """Why a task that succeeded has no result here."""

    def result(self, timeout: float | None = None) -> object:
        if self.task.state == "succeeded" and self._no_result is not None:
            raise self._no_result
        return super().result(timeout)


def _not_kept(task: TaskInfo, kept: dict[str, t.Any]) -> ResultElsewhere:
    if "too_large" in kept:
        return ResultElsewhere(
            f"{task} succeeded in another process, but its result, {kept['too_large']} bytes"
            f" of JSON, was over 'THREADCTX_RESULT_MAX_BYTES' ({kept['max']}) and was not"
            " kept. Raise the limit, or keep a large result in your own storage (a database,"
            " a file) and return its key."
        )
    if "not_json" in kept:
        return ResultElsewhere(
            f"{task} succeeded in another process, but its result was not kept: JSON cannot"
            f" carry it ({kept['not_json']}). Return plain data (strings, numbers, lists,"
            " dicts with string keys)."
        )
    return _elsewhere(task)


def _elsewhere(task: TaskInfo) -> ResultElsewhere:
    return ResultElsewhere(
        f"{task} is {task.state} in another process; the task store keeps its state, times,"
        " progress and error, and its result only if asked to: decorate the function with"
        " '@threadctx.task(keep_result=True)', or set 'THREADCTX_KEEP_RESULTS'. Or wait for"
        " the future where the task was submitted."
    )


class _Elsewhere(FutureOwner):
    """The backend of a stored future: nothing here can run, cancel or finish it."""

    def before_wait(self, future: TaskFuture[R], timeout: float | None) -> None:
        raise _elsewhere(future.task)

    def may_cancel(self, future: TaskFuture[R]) -> bool:
        return False

    def record_cancelled(self, future: TaskFuture[R]) -> None:
        raise AssertionError("'may_cancel' refused: a stored future is never cancelled here.")


_ELSEWHERE: FutureOwner = _Elsewhere()
