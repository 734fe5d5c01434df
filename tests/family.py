"""Tasks for the tests of the task store and the monitor: a task, its child and its grandchild
(which reports progress), and a task that fails."""

from __future__ import annotations

import os
import typing as t

import flask
from flask_threadctx import report_progress
from flask_threadctx import TaskFuture
from flask_threadctx.app_state import app_state


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
