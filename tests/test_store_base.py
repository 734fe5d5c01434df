"""What every store shares (``stores/base.py``): a record only moves forward, and an error summary
comes back as the exception it names."""

from __future__ import annotations

import typing as t

import pytest
from flask_threadctx import Progress
from flask_threadctx import RemoteTaskError
from flask_threadctx.stores.base import count_changes
from flask_threadctx.stores.base import error_of
from flask_threadctx.stores.base import merge
from flask_threadctx.stores.base import Record


def _record(state: t.Any, **changes: t.Any) -> Record:
    base = Record("a-1", "job", None, None, "pending", 1.0, None, None, None, None, "h:1")
    return base._replace(state=state, **changes)


@pytest.mark.parametrize(
    ("summary", "expected"),
    [
        ("OverflowError: int too large", OverflowError("int too large")),
        ("KeyError: 'sku'", KeyError("'sku'")),
        ("OSError: caf\\udce9", OSError("caf\\udce9")),
        ("LampError: no lamp", RemoteTaskError("LampError", "no lamp")),
        ("KeyboardInterrupt: ", RemoteTaskError("KeyboardInterrupt", "")),  # never rebuilt
        (
            "UnicodeDecodeError: 'utf-8' codec",
            RemoteTaskError("UnicodeDecodeError", "'utf-8' codec"),
        ),
        ("print: x", RemoteTaskError("print", "x")),
    ],
)
def test_an_error_summary_comes_back_as_the_builtin_exception_it_names(
    summary: str, expected: Exception
) -> None:
    error = error_of(summary)
    assert (type(error), error.args) == (type(expected), expected.args)


@pytest.mark.parametrize(
    ("first", "then", "state", "counts"),
    [
        (None, "pending", "pending", {"submitted": 1}),
        ("pending", "running", "running", {"started": 1}),
        ("running", "pending", "running", {}),  # 'task_submitted' after 'task_started'
        ("succeeded", "running", "succeeded", {}),
        ("succeeded", "failed", "failed", {"succeeded": -1, "failed": 1}),  # teardown failed
        ("failed", "succeeded", "failed", {}),
        ("pending", "cancelled", "cancelled", {"cancelled": 1}),
        (None, "succeeded", "succeeded", {"submitted": 1, "started": 1, "succeeded": 1}),
        (None, "rejected", "rejected", {"submitted": 1, "rejected": 1}),
    ],
)
def test_records_only_move_forward(
    first: str | None, then: str, state: str, counts: dict[str, int]
) -> None:
    old = None if first is None else _record(first, started_at=2.0)
    merged = merge(old, _record(then, progress=Progress(1, 2, None)))
    assert merged.state == state
    assert merged.started_at == (None if old is None else 2.0)
    assert merged.progress == Progress(1, 2, None)
    assert dict(count_changes(None if old is None else old.state, merged.state)) == counts
