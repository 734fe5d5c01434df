"""How far a task got: :func:`report_progress`, called by the task itself."""

from __future__ import annotations

import math
import sys
import time
import typing as t

from flask import current_app

from . import control
from . import signals
from .model import current_task
from .signals import task_progress

if t.TYPE_CHECKING:
    from .model import TaskInfo

_clock = time.monotonic  # the tests' to replace

MIN_INTERVAL = 0.1
"""Seconds between two reports that are passed on (signal, other processes); the reports in
between only update :attr:`TaskInfo.progress <flask_threadctx.TaskInfo.progress>`."""


MAX_NOTE = 200
"""Characters of a progress note that are kept; a longer note is cut to its first ones."""


class Progress(t.NamedTuple):
    """The last progress a task reported."""

    done: float
    """How much is done, in the task's own unit (rows, files, percent)."""
    total: float | None
    """How much there is in all, if known."""
    note: str | None
    """What the task is doing now, in a few words."""


OnProgress = t.Callable[["TaskInfo", Progress], None]
"""What a backend does with the progress of a task it runs for another process."""


def report_progress(done: float, total: float | None = None, note: str | None = None) -> None:
    """Report how far the calling task got: ``report_progress(i, len(rows))``.

    The report is kept on the task's :class:`~flask_threadctx.TaskInfo` at once. It is passed
    on, as the :data:`~flask_threadctx.signals.task_progress` signal and, for a task on a
    Celery worker, to the submitting process and the task records, at most every 0.1 seconds,
    and always for the first report and the last (``done == total``): a tight loop may call it
    for every item.

    :param done: how much is done, a number from 0 to the largest float (an ``int`` stays an
        ``int``; a subclass of ``int`` or ``float``, such as numpy's ``float64``, is passed
        on as a plain ``int`` or ``float``).
    :param total: how much there is in all, at least ``done``, if known.
    :param note: what the task is doing now, in a few words: its first ``MAX_NOTE``
        (200) characters are kept, the rest cut off without an error, so that a note made
        from data (a file name, a row) never fails the task that reports it.
    :raise TaskCancelled: the task was asked to stop, or its ``time_limit`` passed, as
        :func:`~flask_threadctx.check_cancelled` raises it; the report is kept first.
    :raise RuntimeError: called outside a task.
    :raise TypeError: or :exc:`ValueError`, for a value that is not a count as described.
    """
    info = current_task()
    if info is None:
        raise RuntimeError(
            "report_progress() reports the progress of the task that calls it; it was called"
            " outside a task. Call it in the function you submit."
        )
    progress = Progress(_count("done", done), _total(total, done), _note(note))
    info._progress = progress
    if control.asked or control.deadlines:
        reason = control.stop_reason(info.id)
        if reason is not None:  # the report is kept: how far the task got
            raise control.tell(info.id, reason)
    now = _clock()
    last = getattr(info, "_progress_passed_at", None)
    if last is not None and now - last < MIN_INTERVAL and progress.done != progress.total:
        return
    info._progress_passed_at = now
    if task_progress.receivers:
        signals.send(
            task_progress,
            current_app._get_current_object(),  # type: ignore[attr-defined]
            task=info,
            done=progress.done,
            total=progress.total,
            note=progress.note,
        )
    on_progress: OnProgress | None = getattr(info, "_on_progress", None)
    if on_progress is not None:
        on_progress(info, progress)


def _count(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"report_progress(): {name!r} must be a number, not {value!r}.")
    # A subclass (an IntEnum, numpy's float64) may write itself as no store reads it back.
    value = int(value) if isinstance(value, int) else float(value)
    if isinstance(value, int) and value > sys.float_info.max:
        # Stores and messages carry numbers as floats at most; and such an int has no float.
        raise ValueError(
            f"report_progress(): {name!r} must be at most {sys.float_info.max!r}, not a whole"
            f" number of {value.bit_length()} bits."
        )
    if value < 0 or not math.isfinite(value):
        raise ValueError(
            f"report_progress(): {name!r} must be a finite number >= 0, not {value!r}."
        )
    return value


def _total(total: object, done: float) -> float | None:
    if total is None:
        return None
    count = _count("total", total)
    if count < done:
        raise ValueError(f"report_progress(): 'done' ({done!r}) is more than 'total' ({total!r}).")
    return count


def _note(note: object) -> str | None:
    if note is None:
        return None
    if not isinstance(note, str):
        raise TypeError(f"report_progress(): 'note' must be a string or None, not {note!r}.")
    return note[:MAX_NOTE]
