"""Every public entry point given wrong types and values: a clear error at the point of the
mistake, and a pool that still works afterwards."""

from __future__ import annotations

import re
import typing as t

import flask
import pytest
from flask_threadctx import ContextThread
from flask_threadctx import copy_current_context
from flask_threadctx import TaskTimeout
from flask_threadctx import ThreadContext
from flask_threadctx.app_state import app_state
from flask_threadctx.config import DEFAULTS
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

Mistake = t.Callable[[ThreadContext, flask.Flask], t.Any]

MISTAKES: list[tuple[str, Mistake, type[Exception], str]] = [
    ("submit None", lambda e, a: e.submit(None), TypeError, "'submit' takes a callable to run, not None."),  # type: ignore[call-overload]
    ("submit a string", lambda e, a: e.submit("print"), TypeError, "not 'print'"),  # type: ignore[call-overload]
    ("map a non-callable", lambda e, a: e.map(3, [1]), TypeError, "'map' takes a callable to run, not 3."),  # type: ignore[arg-type]
    ("map nothing", lambda e, a: e.map(abs), TypeError, "'map' needs at least one iterable"),
    ("map mismatched", lambda e, a: e.map(pow, [1, 2, 3], [1, 2]), ValueError, "'map' takes iterables of the same length: iterable 2 is shorter than iterable 1."),
    ("map mismatched the other way", lambda e, a: e.map(pow, [1], [1, 2]), ValueError, "iterable 2 is longer than iterable 1"),
    ("get_task with a number", lambda e, a: e.get_task(7), TypeError, "'get_task' takes a task id string, not 7."),  # type: ignore[arg-type]
    ("get_task with None", lambda e, a: e.get_task(None), TypeError, "not None"),  # type: ignore[arg-type]
    ("init_app twice", lambda e, a: e.init_app(a), RuntimeError, "A 'ThreadContext' is already registered on 'bad'. Call 'init_app' once per app."),
    ("submit a task function with bad arguments", lambda e, a: e.submit(int, "x").result(), ValueError, "invalid literal for int()"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("mistake", "error", "message"),
    [pytest.param(m, e, msg, id=name) for name, m, e, msg in MISTAKES],
)
def test_mistake(mistake: Mistake, error: type[Exception], message: str) -> None:
    app = flask.Flask("bad")
    ext = ThreadContext(app)
    try:
        with app.app_context():
            before = ext.stats()
            with pytest.raises(error, match=re.escape(message)):
                mistake(ext, app)
            assert ext.submit(pow, 3, 2).result(timeout=10) == 9
            after = ext.stats()
    finally:
        ext.shutdown()
    # A refused call leaves no task behind; a task that failed is counted as failed.
    assert after["submitted"] - before["submitted"] in {1, 2}
    assert after["queued"] == after["running"] == 0


def test_submit_after_shutdown() -> None:
    app = flask.Flask("bad")
    ext = ThreadContext(app)
    ext.shutdown()
    with pytest.raises(RuntimeError, match=re.escape("The task pool of 'bad' was shut down")):
        ext.submit(int)
    assert ext.stats()["rejected"] == 1


def test_outside_any_context() -> None:
    ext = ThreadContext()
    for call in (lambda: ext.submit(int), ext.stats, lambda: ext.get_task("x"), ext.shutdown):
        with pytest.raises(RuntimeError, match="needs an application context"):
            call()
    with pytest.raises(RuntimeError, match="'copy_current_context' needs an application context"):
        copy_current_context(int)
    with pytest.raises(RuntimeError, match="'ContextThread' needs an application context"):
        ContextThread(target=int)


ANY_VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-5, max_value=50),
    st.floats(allow_nan=True),
    st.text(max_size=5),
    st.lists(st.text(max_size=3), max_size=3),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(DEFAULTS)), ANY_VALUE)
def test_any_config_value(key: str, value: t.Any) -> None:
    """Any value either works or is refused by ``init_app`` naming the key and the value; a
    refused app can be fixed and registered."""
    app = flask.Flask("config")
    app.config[key] = value
    ext = ThreadContext()
    try:
        ext.init_app(app)
    except (TypeError, ValueError) as exc:
        assert f"'{key}'" in str(exc)
        assert "threadctx" not in app.extensions
        app.config[key] = DEFAULTS[key]
        ext.init_app(app)
    try:
        with app.app_context():
            future = ext.submit(pow, 2, 3)
            if key == "THREADCTX_TIME_LIMIT" and future.exception(timeout=10) is not None:
                # A limit shorter than the task ran (1e-300 s): it is asked to stop, and timed out.
                with pytest.raises(TaskTimeout, match=r"ran past its time limit"):
                    future.result()
            else:
                assert future.result(timeout=10) == 8
    finally:
        app_state(app).default.shutdown()
