"""report_progress: kept on the task at once, passed on at most every 0.1 s."""

from __future__ import annotations

import enum
import threading
import typing as t

import pytest
from flask_threadctx import current_task
from flask_threadctx import Progress
from flask_threadctx import progress as progress_module
from flask_threadctx import report_progress
from flask_threadctx import task_progress
from flask_threadctx import ThreadContext

if t.TYPE_CHECKING:
    import flask

    from conftest import AppFactory


def test_outside_a_task_it_says_where_to_call_it(app: flask.Flask) -> None:
    with app.app_context(), pytest.raises(RuntimeError, match="called outside a task"):
        report_progress(1)


@pytest.mark.parametrize(
    ("args", "error", "message"),
    [
        ((-1,), ValueError, "'done' must be a finite number >= 0, not -1."),
        ((float("nan"),), ValueError, "'done' must be a finite number >= 0, not nan."),
        ((True,), TypeError, "'done' must be a number, not True."),
        (("3",), TypeError, "'done' must be a number, not '3'."),
        ((5, 4), ValueError, "'done' (5) is more than 'total' (4)."),
        ((1, "10"), TypeError, "'total' must be a number, not '10'."),
        ((1, 10, 7), TypeError, "'note' must be a string or None, not 7."),
        (
            (10**400,),
            ValueError,
            "'done' must be at most 1.7976931348623157e+308, not a whole number of 1329 bits.",
        ),
        ((-(2**1024),), ValueError, f"'done' must be a finite number >= 0, not {-(2**1024)}."),
        (
            (1, 2**1024),
            ValueError,
            "'total' must be at most 1.7976931348623157e+308, not a whole number of 1025 bits.",
        ),
    ],
)
def test_bad_values_fail_the_call_not_the_task(
    app: flask.Flask, ext: ThreadContext, args: tuple[t.Any, ...], error: type, message: str
) -> None:
    def task() -> Progress | None:
        with pytest.raises(error) as caught:
            report_progress(*args)
        assert str(caught.value) == f"report_progress(): {message}"
        report_progress(1, 2)
        return _task_progress()

    with app.app_context():
        assert ext.submit(task).result(10) == Progress(1, 2, None)


def test_the_submitter_sees_the_latest_report_while_the_task_runs(
    app: flask.Flask, ext: ThreadContext
) -> None:
    reported = threading.Event()
    go_on = threading.Event()

    def task() -> str:
        report_progress(3, 10, "rows")
        reported.set()
        go_on.wait(10)
        report_progress(10, 10, "done")
        return "ok"

    with app.app_context():
        future = ext.submit(task)
        assert reported.wait(10)
        assert future.task.progress == Progress(3, 10, "rows")
        go_on.set()
        assert future.result(10) == "ok"
        assert future.task.progress == Progress(10, 10, "done")


def test_a_tight_loop_passes_reports_on_at_most_every_tenth_of_a_second(
    make_app: AppFactory, ext: ThreadContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = make_app(ext, THREADCTX_EAGER=True)
    now = [100.0]
    monkeypatch.setattr(progress_module, "_clock", lambda: now[0])
    passed: list[tuple[t.Any, ...]] = []

    def receiver(sender: flask.Flask, task: t.Any, done: float, total: t.Any, note: t.Any) -> None:
        passed.append((sender is app, done, total, note))

    def task() -> Progress | None:
        for i in range(1000):  # the clock stands still: only the first is passed on
            report_progress(i, 2000)
        now[0] += 0.099
        report_progress(1000, 2000)  # too soon still
        now[0] += 0.001
        report_progress(1001, 2000, "half")  # 0.1 s after the first
        report_progress(2000, 2000, "all")  # the last always
        return _task_progress()

    with app.app_context(), task_progress.connected_to(receiver, app):
        assert ext.submit(task).result() == Progress(2000, 2000, "all")
    assert passed == [
        (True, 0, 2000, None),
        (True, 1001, 2000, "half"),
        (True, 2000, 2000, "all"),
    ]


def _task_progress() -> Progress | None:
    info = current_task()
    assert info is not None
    return info.progress


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
def test_a_receiver_that_raises_never_breaks_the_task(
    make_app: AppFactory, ext: ThreadContext, caplog: pytest.LogCaptureFixture, error: type
) -> None:
    app = make_app(ext, THREADCTX_MAX_WORKERS=1)

    def receiver(sender: flask.Flask, **kwargs: t.Any) -> None:
        raise error("receiver")

    def task() -> Progress | None:
        report_progress(1, 2)
        report_progress(2, 2)
        return _task_progress()

    with app.app_context(), task_progress.connected_to(receiver, app):
        assert ext.submit(task).result(10) == Progress(2, 2, None)
        assert ext.submit(int).result(10) == 0  # the worker lives on
    assert caplog.text.count("of the 'task-progress' signal raised") == 2


def test_a_long_note_is_cut_to_the_documented_length(app: flask.Flask, ext: ThreadContext) -> None:
    note = "é" * 1024 * 1024

    def task() -> Progress | None:
        report_progress(1, 2, note)
        return _task_progress()

    with app.app_context():
        assert ext.submit(task).result(10) == Progress(1, 2, "é" * 200)
    assert progress_module.MAX_NOTE == 200
    # Python 3.13 strips a docstring's indentation: compare the words.
    assert "first ``MAX_NOTE`` (200) characters are kept" in " ".join(
        (report_progress.__doc__ or "").split()
    )


def test_an_int_stays_an_int(app: flask.Flask, ext: ThreadContext) -> None:
    def task() -> Progress | None:
        report_progress(2**64, 2**65)
        return _task_progress()

    with app.app_context():
        progress = ext.submit(task).result(10)
    assert progress == Progress(2**64, 2**65, None)
    assert progress is not None and type(progress.done) is int and type(progress.total) is int


class _Five(enum.IntEnum):
    FIVE = 5


class _NumpyLike(float):
    def __repr__(self) -> str:  # as numpy 2's np.float64: not a number that float() reads
        return f"np.float64({float(self)!r})"


def test_a_number_of_a_subclass_is_passed_on_as_a_plain_one(
    app: flask.Flask, ext: ThreadContext
) -> None:
    seen: list[tuple[object, object]] = []

    def receiver(sender: flask.Flask, **kwargs: t.Any) -> None:
        seen.append((kwargs["done"], kwargs["total"]))

    def task() -> list[Progress | None]:
        report_progress(_Five.FIVE, _NumpyLike(10.0))
        first = _task_progress()
        report_progress(_NumpyLike(10.0), _Five.FIVE * 2)
        return [first, _task_progress()]

    with app.app_context(), task_progress.connected_to(receiver, app):
        first, last = ext.submit(task).result(10)
    assert (first, last) == (Progress(5, 10.0, None), Progress(10.0, 10, None))
    assert first is not None and last is not None
    assert [type(n) for n in (*first[:2], *last[:2])] == [int, float, float, int]
    assert [(repr(a), repr(b)) for a, b in seen] == [("5", "10.0"), ("10.0", "10")]
