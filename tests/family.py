"""Tasks for the tests of the task store and the monitor: a task, its child and its grandchild
(which reports progress), and a task that fails."""

from __future__ import annotations

import os
import typing as t

import flask
from flask_threadctx import report_progress


def _submit(fn: t.Callable[[], str]) -> str:
    ext = flask.current_app.extensions["threadctx"].extension
    return t.cast(str, ext.submit(fn).result())


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
