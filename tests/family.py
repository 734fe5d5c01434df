"""Tasks for the tests of the task store and the monitor: a task, its child and its grandchild
(which reports progress), and a task that fails."""

from __future__ import annotations

import os
import threading
import time
import typing as t

import flask
from flask_threadctx import Progress
from flask_threadctx import report_progress
from flask_threadctx import TaskFuture
from flask_threadctx import ThreadContext
from flask_threadctx.app_state import app_state
from flask_threadctx.signals import task_retried

if t.TYPE_CHECKING:
    from flask_threadctx.stores.base import Record
    from flask_threadctx.stores.feed import Recorder


def recorder(app: flask.Flask) -> Recorder:
    """What writes ``app``'s tasks to its store."""
    found = app_state(app).recorder
    assert found is not None
    return found


def _submit(fn: t.Callable[[], str]) -> str:
    ext = app_state(flask.current_app).extension
    return ext.submit(fn).result()


def leaf() -> str:
    report_progress(3, 4, "almost")
    return "leaf"


def middle() -> str:
    return _submit(leaf)


def top() -> str:
    return _submit(middle)


def broken() -> None:
    raise ValueError("no stock for 'lamp'")


COUNTS_OF_TOP_AND_BROKEN = {
    "submitted": 4,
    "queued": 0,
    "running": 0,
    "succeeded": 3,
    "failed": 1,
    "cancelled": 0,
    "rejected": 0,
    "retrying": 0,
    "expired": 0,
    "timed_out": 0,
}
"""The counts once :func:`top` (with its child and grandchild) and :func:`broken` have ended."""


def halves(n: int) -> int:
    report_progress(n // 2, n, "halfway")
    return n


UNDECODABLE = os.fsdecode(b"caf\xe9")
"""A file name that is not UTF-8, as Python decodes it: with a lone surrogate."""


def huge() -> str:
    report_progress(2**64, 2**65)
    return "huge"


def undecodable_note() -> str:
    report_progress(1, 2, UNDECODABLE)
    return "note"


def undecodable_error() -> None:
    raise FileNotFoundError(UNDECODABLE)


def receipt(n: int) -> dict[str, t.Any]:
    return {"order": n, "items": ["lamp", "café"], "file": UNDECODABLE, "paid": True}


def sizable(n: int) -> str:
    return "x" * n


def a_set() -> set[int]:
    return {1}


class LazyRows(dict[str, int]):
    """A dict subclass, as a lazy ORM row, whose ``items()`` fails once its session closed."""

    def items(self) -> t.Any:
        raise RuntimeError("the session is closed")


def lazy_rows() -> LazyRows:
    return LazyRows(a=1)


class _Untold(Exception):
    def __str__(self) -> str:
        raise ValueError("no message")


class Unspeakable(dict[str, int]):
    """A dict whose ``items()`` raises an exception whose message cannot be read either."""

    def items(self) -> t.Any:
        raise _Untold


def unspeakable() -> Unspeakable:
    return Unspeakable(a=1)


def check_odd_results_are_recorded_not_kept(here: t.Any, there: t.Any) -> None:
    """With ``THREADCTX_KEEP_RESULTS`` on both apps: a result whose encoding raises anything is
    recorded as not kept, with the reason, and no other task nor a later batch misses out."""
    import concurrent.futures

    import pytest
    from flask_threadctx.errors import ResultElsewhere

    ext = app_state(here).extension
    recorder = app_state(here).recorder
    assert recorder is not None
    with here.app_context():
        first: list[TaskFuture[t.Any]] = [ext.submit(halves, n) for n in range(4)]
        odd: list[TaskFuture[t.Any]] = [ext.submit(lazy_rows), ext.submit(unspeakable)]
        first += [*odd, *(ext.submit(halves, n) for n in range(4, 8))]
        concurrent.futures.wait(first)
        recorder.flush()
        later = [ext.submit(halves, n) for n in range(8, 12)]
        concurrent.futures.wait(later)
        recorder.flush()
    assert recorder.dropped == 0
    with there.app_context():
        get = app_state(there).extension.get_task
        seen = [get(f.task.id) for f in first + later]
    assert [f and f.task.state for f in seen] == ["succeeded"] * 14
    assert [f and f.result() for f in seen[:4] + seen[6:]] == list(range(12))
    reasons = []
    for future in seen[4:6]:
        assert future is not None
        with pytest.raises(ResultElsewhere) as caught:
            future.result()
        reasons.append(str(caught.value).partition("JSON cannot carry it (")[2])
    assert reasons == [
        "LazyRows: the session is closed). Return plain data (strings, numbers, lists, dicts"
        " with string keys).",
        "Unspeakable: _Untold (its message could not be read)). Return plain data (strings,"
        " numbers, lists, dicts with string keys).",
    ]


def check_one_tasks_odd_values_never_drop_the_batch(
    here: flask.Flask, there: flask.Flask
) -> list[Record | None]:
    """A progress too large for 64 bits, a note and an error that are not UTF-8 are each stored
    as they are, and no other task of the batch misses out. Returns the records read back, in
    the order of the tasks: those three, then the 18 plain ones."""
    import concurrent.futures

    with here.app_context():
        ext = app_state(here).extension
        odd: list[TaskFuture[t.Any]] = [
            ext.submit(huge),
            ext.submit(undecodable_note),
            ext.submit(undecodable_error),
        ]
        futures = odd + [ext.submit(halves, n) for n in range(18)]
        concurrent.futures.wait(futures)
        recorder(here).flush()
    assert recorder(here).dropped == 0
    store = recorder(there).store
    found = [store.get(future.task.id) for future in futures]
    assert [r and r.state for r in found] == ["succeeded"] * 2 + ["failed"] + ["succeeded"] * 18
    large, note, error = found[:3]
    assert large is not None and large.progress == Progress(2**64, 2**65, None)
    assert note is not None and note.progress == Progress(1, 2, "caf\\udce9")
    assert error is not None and error.error == "FileNotFoundError: caf\\udce9"
    assert [r and r.progress for r in found[3:]] == [
        Progress(n // 2, n, "halfway") for n in range(18)
    ]
    assert type(found[4].progress.done) is int  # type: ignore[union-attr]
    return found


def _missing_key(key: int) -> int:
    found: dict[int, int] = {}
    return found[key]


def check_another_process_sees_a_retrying_task(here: flask.Flask, there: flask.Flask) -> None:
    """A task waiting for its retry, as another process reads it from the store: its state,
    its retries and when it is due; then stopped, no longer due."""
    ext = app_state(here).extension
    retrying = threading.Event()
    with task_retried.connected_to(lambda *a, **k: retrying.set(), here), here.app_context():
        future = ext.task(retry_for=(KeyError,), retry_delay=3600)(_missing_key).submit(1)
        assert retrying.wait(10)
        due = future.task.due_at
        assert due is not None
    with there.app_context():
        other = app_state(there).extension
        seen = until_seen(other, future.task.id, "retrying")
        assert (seen.task.retries, seen.task.due_at) == (1, due)
    with here.app_context():
        assert ext.cancel_task(future.task.id) is True
    with there.app_context():
        seen = until_seen(other, future.task.id, "cancelled")
        assert (seen.task.retries, seen.task.due_at) == (1, None)


def until_seen(ext: ThreadContext, task_id: str, state: str) -> TaskFuture[t.Any]:
    """The task ``task_id`` as the store has it once its state there is ``state``: written by
    another process's recorder, every 0.05 s."""
    deadline = time.monotonic() + 10
    while True:
        seen = ext.get_task(task_id)
        if seen is not None and seen.task.state == state:
            return seen
        assert time.monotonic() < deadline, None if seen is None else seen.task.state
        threading.Event().wait(0.01)
