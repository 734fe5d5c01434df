"""Control over tasks on the thread engine: delays, expiry, time limits, stopping a running
task, retries with backoff; and their books."""

from __future__ import annotations

import concurrent.futures
import datetime
import itertools
import random
import threading
import time
import typing as t

import flask
import pytest
from flask import g
from flask import request
from flask_threadctx import check_cancelled
from flask_threadctx import report_progress
from flask_threadctx import TaskCancelled
from flask_threadctx import TaskExpired
from flask_threadctx import TaskFuture
from flask_threadctx import TaskInfo
from flask_threadctx import TaskTimeout
from flask_threadctx import ThreadContext
from flask_threadctx.app_state import app_state
from flask_threadctx.signals import task_cancelled
from flask_threadctx.signals import task_failed
from flask_threadctx.signals import task_retried

from family import check_another_process_sees_a_retrying_task

if t.TYPE_CHECKING:
    from conftest import AppFactory

UTC = datetime.timezone.utc


def _counts(app: flask.Flask, ext: ThreadContext, *names: str) -> tuple[int, ...]:
    with app.app_context():
        stats = ext.stats()
    return tuple(stats[name] for name in names)


def _until(when: float) -> None:
    """Let the clock pass ``when`` (a Unix time): what a delay or an expiry waits for."""
    while time.time() <= when:
        threading.Event().wait(when - time.time() + 0.001)


def power(base: int, exponent: int) -> int:
    return int(base**exponent)


def _until_checked(stop: threading.Event) -> None:
    while not stop.wait(0.005):
        check_cancelled()


def test_a_delayed_task_waits_for_its_countdown_and_says_when(
    make_app: AppFactory, ext: ThreadContext
) -> None:
    app = make_app(ext)
    delayed = ext.task(countdown=0.3)(time.time)
    with app.app_context():
        future = delayed.submit()
        info = future.task
        assert (info.state, info.due_at) == ("pending", info.submitted_at + 0.3)
        started = future.result(10)
    assert started >= info.submitted_at + 0.3
    assert (info.state, info.due_at) == ("succeeded", None)


def test_an_eta_is_when_it_starts(make_app: AppFactory, ext: ThreadContext) -> None:
    app = make_app(ext)
    at = datetime.datetime.now(UTC) + datetime.timedelta(seconds=0.2)
    with app.app_context():
        future = ext.task(time.time).submit_with_options(eta=at)
        assert future.task.due_at == at.timestamp()
        assert future.result(10) >= at.timestamp()


def test_delayed_tasks_take_no_place_in_the_bounded_queue_until_due(
    make_app: AppFactory, ext: ThreadContext
) -> None:
    app = make_app(ext, THREADCTX_MAX_QUEUE=2, THREADCTX_MAX_WORKERS=1)
    later = ext.task(countdown=3600)(power)
    with app.app_context():
        delayed = [later.submit(2, n) for n in range(50)]
        assert ext.submit(power, 2, 3).result(10) == 8
        assert [future.cancel() for future in delayed] == [True] * 50
    assert _counts(app, ext, "submitted", "cancelled", "succeeded", "queued", "rejected") == (
        51,
        50,
        1,
        0,
        0,
    )


def test_a_due_task_waits_while_the_queue_is_full_and_is_never_refused(
    make_app: AppFactory, ext: ThreadContext
) -> None:
    app = make_app(ext, THREADCTX_MAX_QUEUE=1, THREADCTX_MAX_WORKERS=1)
    started, gate = threading.Event(), threading.Event()
    with app.app_context():
        blocker = ext.submit(_block, started, gate)
        assert started.wait(10)
        queued = ext.submit(power, 2, 2)  # the queue's one place
        delayed = ext.task(countdown=0.05)(power).submit(2, 5)
        _until(delayed.task.submitted_at + 0.2)  # due, and found the queue full
        assert delayed.task.state == "pending"
        gate.set()
        assert [blocker.result(10), queued.result(10), delayed.result(10)] == [True, 4, 32]
    assert _counts(app, ext, "rejected", "succeeded") == (0, 3)


def _block(started: threading.Event, gate: threading.Event) -> bool:
    started.set()
    return gate.wait(10)


def test_a_task_not_started_by_its_expiry_never_runs(
    make_app: AppFactory, ext: ThreadContext
) -> None:
    app = make_app(ext, THREADCTX_MAX_WORKERS=1)
    started, gate = threading.Event(), threading.Event()
    ran: list[int] = []
    cancelled: list[str] = []
    with (
        app.app_context(),
        task_cancelled.connected_to(lambda sender, task: cancelled.append(task.state), app),
    ):
        blocker = ext.submit(_block, started, gate)
        assert started.wait(10)
        expiring = ext.task(expires=0.05)(ran.append).submit(1)
        _until(expiring.task.submitted_at + 0.05)
        gate.set()
        with pytest.raises(TaskExpired, match=r"had not started by its 'expires' \("):
            expiring.result(10)
        blocker.result(10)
    assert (ran, cancelled, expiring.task.state) == ([], ["expired"], "expired")
    assert _counts(app, ext, "submitted", "expired", "queued", "running", "succeeded") == (
        2,
        1,
        0,
        0,
        1,
    )


def test_a_task_that_checks_stops_at_its_time_limit(
    make_app: AppFactory, ext: ThreadContext
) -> None:
    app = make_app(ext)
    never = threading.Event()
    with app.app_context():
        future = ext.task(time_limit=0.1)(_until_checked).submit(never)
        with pytest.raises(TaskTimeout, match=r"ran past its time limit \('time_limit'\)"):
            future.result(10)
    assert isinstance(future.exception(), TaskTimeout)
    assert isinstance(t.cast(BaseException, future.exception()).__cause__, TaskCancelled)
    assert future.task.state == "timed_out"
    assert _counts(app, ext, "timed_out", "failed", "running", "cancelled") == (1, 0, 0, 0)


def test_a_task_that_ignores_its_time_limit_is_written_off_and_its_thread_replaced(
    make_app: AppFactory, ext: ThreadContext
) -> None:
    app = make_app(ext, THREADCTX_MAX_WORKERS=1, THREADCTX_TIME_LIMIT_GRACE=0.1)
    gate = threading.Event()
    pool = app_state(app).backend("threads")
    with app.app_context():
        stuck = ext.task(time_limit=0.1)(gate.wait).submit(30)
        with pytest.raises(TaskTimeout, match=r"did not stop within 'THREADCTX_TIME_LIMIT_GRACE'"):
            stuck.result(10)
        assert ext.submit(power, 3, 2).result(10) == 9  # on the thread that replaced it
        assert [worker.name for worker in pool._threads] == ["threadctx-1"]
        gate.set()  # the stuck thread returns, and ends
        old = next(w for w in threading.enumerate() if w.name == "threadctx-0")
        old.join(10)
        assert not old.is_alive()
        assert stuck.task.state == "timed_out"
    assert _counts(app, ext, "submitted", "timed_out", "succeeded", "running") == (2, 1, 1, 0)


def test_an_eager_task_past_its_limit_is_written_off_without_a_thread_to_replace(
    make_app: AppFactory, ext: ThreadContext, caplog: pytest.LogCaptureFixture
) -> None:
    """In eager mode the stuck thread is the one that submitted: the pool cannot replace it,
    and neither the error nor the log says it did."""
    app = make_app(ext, THREADCTX_EAGER=True, THREADCTX_TIME_LIMIT_GRACE=0.05)
    written_off = threading.Event()

    def on_failed(sender: flask.Flask, task: TaskInfo, exception: BaseException) -> None:
        written_off.set()

    with app.app_context(), task_failed.connected_to(on_failed, app):
        future = ext.task(time_limit=0.05)(written_off.wait).submit(30)
    message = str(future.exception(0))
    assert isinstance(future.exception(0), TaskTimeout)
    assert "Its thread was written off; it runs on until the task returns" in message
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == [message]
    assert app_state(app).backend("threads")._threads == []
    assert future.task.state == "timed_out"


@pytest.mark.parametrize("then_cancel", [False, True], ids=["returns", "cancelled-then-returns"])
def test_a_task_that_returns_past_its_limit_unchecked_is_timed_out(
    make_app: AppFactory, ext: ThreadContext, then_cancel: bool
) -> None:
    """Its limit asked it to stop, as a cancel does: returning without a check does not make it
    succeed, and a cancel that comes after the limit does not make it cancelled."""
    app = make_app(ext, THREADCTX_TIME_LIMIT_GRACE=60)
    started, gate = threading.Event(), threading.Event()
    failed: list[str] = []

    def slow() -> int:
        started.set()
        gate.wait(30)
        return 42

    def on_failed(sender: flask.Flask, task: TaskInfo, exception: BaseException) -> None:
        failed.append(type(exception).__name__)

    with app.app_context(), task_failed.connected_to(on_failed, app):
        future = ext.task(time_limit=0.05)(slow).submit()
        assert started.wait(10)
        _until(t.cast(float, future.task.started_at) + 0.05)
        if then_cancel:
            assert ext.cancel_task(future.task.id) is True
        gate.set()
        with pytest.raises(TaskTimeout, match=r"ran past its time limit") as raised:
            future.result(10)
    assert isinstance(raised.value.__cause__, TaskCancelled)
    assert (future.task.state, failed) == ("timed_out", ["TaskTimeout"])
    assert _counts(app, ext, "timed_out", "cancelled", "succeeded") == (1, 0, 0)


def test_a_task_told_of_its_limit_that_returns_succeeds(
    make_app: AppFactory, ext: ThreadContext
) -> None:
    app = make_app(ext, THREADCTX_TIME_LIMIT_GRACE=60)

    def catches() -> str:
        try:
            while True:
                check_cancelled()
                threading.Event().wait(0.005)
        except TaskCancelled:
            return "cleaned up"

    with app.app_context():
        future = ext.task(time_limit=0.05)(catches).submit()
        assert future.result(10) == "cleaned up"
    assert (future.task.state, _counts(app, ext, "succeeded", "timed_out")) == ("succeeded", (1, 0))


def test_a_config_time_limit_applies_to_every_task(
    make_app: AppFactory, ext: ThreadContext
) -> None:
    app = make_app(ext, THREADCTX_TIME_LIMIT=0.1)
    with app.app_context():
        future = ext.submit(_until_checked, threading.Event())
        with pytest.raises(TaskTimeout):
            future.result(10)
        longer = ext.task(time_limit=60)(power).submit(2, 4)  # its own limit wins
        assert longer.result(10) == 16


def _report_until_stopped(ready: threading.Event) -> None:
    ready.set()
    n = 0
    while True:
        n += 1
        report_progress(n)
        threading.Event().wait(0.001)


def test_cancel_task_stops_a_running_task_at_its_next_report(
    make_app: AppFactory, ext: ThreadContext
) -> None:
    app = make_app(ext)
    ready = threading.Event()
    cancelled: list[str] = []
    with (
        app.app_context(),
        task_cancelled.connected_to(lambda sender, task: cancelled.append(task.state), app),
    ):
        future = ext.submit(_report_until_stopped, ready)
        assert ready.wait(10)
        assert ext.cancel_task(future.task.id) is True
        with pytest.raises(TaskCancelled, match=r"was asked to stop \('cancel_task'\)"):
            future.result(10)
        assert ext.cancel_task(future.task.id) is False  # finished already
    assert (future.task.state, cancelled) == ("cancelled", ["cancelled"])
    assert _counts(app, ext, "cancelled", "running", "failed", "queued") == (1, 0, 0, 0)


def test_cancel_task_of_a_pending_task_keeps_it_from_running(
    make_app: AppFactory, ext: ThreadContext
) -> None:
    app = make_app(ext, THREADCTX_MAX_WORKERS=1)
    started, gate = threading.Event(), threading.Event()
    ran: list[int] = []
    with app.app_context():
        blocker = ext.submit(_block, started, gate)
        assert started.wait(10)
        pending = ext.submit(ran.append, 1)
        assert ext.cancel_task(pending.task.id) is True
        gate.set()
        blocker.result(10)
    assert (ran, pending.cancelled()) == ([], True)


def test_cancel_task_of_an_unknown_id_or_not_an_id(app: flask.Flask, ext: ThreadContext) -> None:
    with pytest.raises(LookupError, match=r"^No task 'nope' of 'app0' is known here"):
        ext.cancel_task("nope")
    with pytest.raises(TypeError, match=r"^'cancel_task' takes a task id string, not 5\.$"):
        ext.cancel_task(5)  # type: ignore[arg-type]


def test_a_stop_racing_the_end_books_each_task_once(
    make_app: AppFactory, ext: ThreadContext
) -> None:
    app = make_app(ext)
    rounds = 300
    with app.app_context():
        futures = [ext.submit(_count_to, 200) for _ in range(rounds)]
        answers = [ext.cancel_task(future.task.id) for future in futures]
        concurrent.futures.wait(futures, timeout=60)
    states = [future.task.state for future in futures]
    for answer, state in zip(answers, states, strict=True):
        assert answer is (state == "cancelled")
    assert _counts(app, ext, "succeeded", "cancelled", "running", "queued") == (
        states.count("succeeded"),
        states.count("cancelled"),
        0,
        0,
    )


def _count_to(n: int) -> int:
    for _ in range(n):
        check_cancelled()
    return n


def test_a_thousand_stops_among_running_tasks_stop_only_those_named(
    make_app: AppFactory, ext: ThreadContext
) -> None:
    app = make_app(ext, THREADCTX_MAX_WORKERS=32)
    release = threading.Event()
    chosen = random.Random(7)
    with app.app_context():
        futures = [ext.submit(_until_checked, release) for _ in range(1000)]
        named = {future.task.id for future in chosen.sample(futures, 1000 // 2)}
        for task_id in named:
            assert ext.cancel_task(task_id) is True
        release.set()
        concurrent.futures.wait(futures, timeout=120)
    stopped = {f.task.id for f in futures if f.task.state == "cancelled"}
    assert stopped == named
    assert {f.task.state for f in futures if f.task.id not in named} == {"succeeded"}


def test_retries_run_the_same_task_again_with_the_same_request_and_g(
    make_app: AppFactory, ext: ThreadContext
) -> None:
    app = make_app(ext)
    seen: list[tuple[str, bytes, str, int]] = []
    retried: list[tuple[int, str, float]] = []

    @ext.task(retry_for=(KeyError,), max_retries=3)
    def flaky() -> str:
        seen.append((request.path, request.get_data(), g.user, len(seen)))
        if len(seen) < 3:
            raise KeyError(len(seen))
        return "done"

    def on_retry(
        sender: flask.Flask, task: TaskInfo, exception: BaseException, delay: float
    ) -> None:
        retried.append((task.retries, task.state, delay))

    with (
        task_retried.connected_to(on_retry, app),
        app.test_request_context("/orders/7", method="POST", data=b"body"),
    ):
        g.user = "ada"
        future = flaky.submit()
        assert future.result(10) == "done"
    assert seen == [("/orders/7", b"body", "ada", n) for n in range(3)]
    assert retried == [(1, "retrying", 0.0), (2, "retrying", 0.0)]
    assert (future.task.retries, future.task.state) == (2, "succeeded")
    assert _counts(app, ext, "submitted", "succeeded", "failed", "retrying", "running") == (
        1,
        1,
        0,
        0,
        0,
    )


def test_retries_give_up_after_max_retries_with_the_last_error(
    make_app: AppFactory, ext: ThreadContext
) -> None:
    app = make_app(ext)
    attempts: list[int] = []

    def always(n: int) -> None:
        attempts.append(n)
        raise OSError(len(attempts))

    with app.app_context():
        future = ext.task(retry_for=(OSError,), max_retries=2)(always).submit(1)
        with pytest.raises(OSError, match=r"^3$"):
            future.result(10)
    assert (attempts, future.task.retries, future.task.state) == ([1, 1, 1], 2, "failed")
    assert _counts(app, ext, "failed", "running", "retrying") == (1, 0, 0)


def test_backoff_delays_double_and_say_when_the_next_attempt_is(
    make_app: AppFactory, ext: ThreadContext
) -> None:
    app = make_app(ext)
    delays: list[float] = []
    dues: list[bool] = []

    def on_retry(
        sender: flask.Flask, task: TaskInfo, exception: BaseException, delay: float
    ) -> None:
        delays.append(delay)
        dues.append(task.due_at is not None and task.due_at >= time.time() + delay - 0.05)

    backoff = ext.task(
        retry_for=(ValueError,), retry_backoff=0.02, retry_jitter=False, max_retries=3
    )(int)
    with task_retried.connected_to(on_retry, app), app.app_context():
        future = backoff.submit("x")
        with pytest.raises(ValueError):
            future.result(10)
    assert (delays, dues) == ([0.02, 0.04, 0.08], [True, True, True])


def test_retries_are_never_refused_by_a_full_queue(
    make_app: AppFactory, ext: ThreadContext
) -> None:
    app = make_app(ext, THREADCTX_MAX_QUEUE=1, THREADCTX_MAX_WORKERS=1)
    attempts: list[int] = []
    filled = threading.Event()

    def flaky() -> int:
        attempts.append(1)
        if len(attempts) == 1:
            filled.wait(10)  # the queue is full before this attempt fails
            raise KeyError("once")
        return len(attempts)

    with app.app_context():
        future = ext.task(retry_for=(KeyError,))(flaky).submit()
        other = ext.submit(power, 2, 2)  # takes the queue's one place
        filled.set()
        assert (future.result(10), other.result(10)) == (2, 4)
    assert _counts(app, ext, "rejected", "succeeded") == (0, 2)


def test_a_task_waiting_for_a_retry_can_be_cancelled(
    make_app: AppFactory, ext: ThreadContext
) -> None:
    app = make_app(ext)
    retrying = threading.Event()
    with task_retried.connected_to(lambda *a, **k: retrying.set(), app), app.app_context():
        future = ext.task(retry_for=(KeyError,), retry_delay=3600)(_missing).submit(1)
        assert retrying.wait(10)
        _until_state(future.task, "retrying")
        assert ext.cancel_task(future.task.id) is True
        assert future.cancelled()
    assert _counts(app, ext, "cancelled", "retrying", "running", "queued") == (1, 0, 0, 0)


def _missing(key: int) -> int:
    found: dict[int, int] = {}
    return found[key]


def _until_state(info: TaskInfo, state: str) -> None:
    deadline = time.monotonic() + 10
    while info.state != state:
        assert time.monotonic() < deadline
        threading.Event().wait(0.005)


def test_shutdown_cancels_and_counts_the_delayed_tasks(
    make_app: AppFactory, ext: ThreadContext
) -> None:
    app = make_app(ext)
    with app.app_context():
        delayed = [ext.task(countdown=3600)(power).submit(2, n) for n in range(5)]
        ext.shutdown(wait=True)
    assert [future.cancelled() for future in delayed] == [True] * 5
    assert _counts(app, ext, "submitted", "cancelled", "queued") == (5, 5, 0)


def _fails_twice() -> t.Callable[[], int]:
    """A function that raises :exc:`KeyError` on its first two calls and returns 3."""
    attempts: list[int] = []

    def flaky() -> int:
        attempts.append(1)
        if len(attempts) < 3:
            raise KeyError("again")
        return len(attempts)

    return flaky


def test_eager_runs_delayed_tasks_and_retries_at_once(
    make_app: AppFactory, ext: ThreadContext
) -> None:
    app = make_app(ext, THREADCTX_EAGER=True)
    flaky = _fails_twice()

    with app.app_context():
        later = ext.task(countdown=3600)(power).submit(2, 5)
        retried = ext.task(retry_for=(KeyError,), retry_delay=3600)(flaky).submit()
    assert (later.result(0), retried.result(0), retried.task.retries) == (32, 3, 2)


def test_options_of_the_wrong_kind_fail_at_the_call(app: flask.Flask, ext: ThreadContext) -> None:
    plain = ext.task(power)
    with pytest.raises(TypeError, match=r"^'task\(\)' does not take 'queue'"):
        plain.submit_with_options(args=(2, 2), queue="fast")
    with pytest.raises(TypeError, match=r"^'args' must be a tuple of arguments, not list\.$"):
        plain.submit_with_options(args=[2, 2])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^'countdown' must be a number of seconds 0 or more"):
        plain.submit_with_options(args=(2, 2), countdown=-1)
    assert _counts(app, ext, "submitted") == (0,)


def test_the_store_books_stopped_expired_timed_out_and_retried_tasks(
    two: tuple[flask.Flask, flask.Flask],
) -> None:
    here, there = two
    ext = app_state(here).extension
    ready, never = threading.Event(), threading.Event()
    flaky = _fails_twice()

    with here.app_context():
        workers = ext.stats()["max_workers"]
        gate = threading.Event()
        blockers = [ext.submit(gate.wait, 10) for _ in range(workers)]
        expired = ext.task(expires=0.05)(power).submit(2, 2)
        _until(expired.task.submitted_at + 0.05)
        gate.set()
        assert [blocker.result(10) for blocker in blockers] == [True] * workers
        stopped = ext.submit(_report_until_stopped, ready)
        assert ready.wait(10)
        assert ext.cancel_task(stopped.task.id) is True
        timed_out = ext.task(time_limit=0.05)(_until_checked).submit(never)
        retried = ext.task(retry_for=(KeyError,))(flaky).submit()
        futures: list[TaskFuture[t.Any]] = [stopped, timed_out, expired, retried]
        concurrent.futures.wait(futures, timeout=30)
        assert retried.result(0) == 3
        stats = ext.stats()
    assert [future.task.state for future in futures] == [
        "cancelled",
        "timed_out",
        "expired",
        "succeeded",
    ]
    assert stats == {
        "submitted": 4 + workers,
        "queued": 0,
        "running": 0,
        "retrying": 0,
        "succeeded": 1 + workers,
        "failed": 0,
        "cancelled": 1,
        "rejected": 0,
        "expired": 1,
        "timed_out": 1,
        "max_workers": stats["max_workers"],
    }
    with there.app_context():
        other = app_state(there).extension
        seen = [other.get_task(future.task.id) for future in futures]
        assert [None if s is None else s.task.state for s in seen] == [
            "cancelled",
            "timed_out",
            "expired",
            "succeeded",
        ]
        assert other.stats() == stats


def test_a_stop_of_a_task_waiting_for_its_child_takes_effect_when_the_wait_ends(
    make_app: AppFactory, ext: ThreadContext
) -> None:
    app = make_app(ext, THREADCTX_MAX_WORKERS=2)
    child_started, gate = threading.Event(), threading.Event()
    children: list[TaskFuture[bool]] = []

    def parent() -> str:
        child = ext.submit(_block, child_started, gate)
        children.append(child)
        return f"child said {child.result(30)}"

    with app.app_context():
        waiting = ext.submit(parent)
        assert child_started.wait(10)
        assert ext.cancel_task(waiting.task.id) is True
        assert waiting.task.state == "running"  # it cannot stop while it waits
        gate.set()
        with pytest.raises(TaskCancelled):
            waiting.result(10)
        assert children[0].result(10) is True
    assert (waiting.task.state, children[0].task.state) == ("cancelled", "succeeded")
    assert _counts(app, ext, "cancelled", "succeeded", "running") == (1, 1, 0)


@pytest.mark.parametrize("task_id", ["\ud800", "x" * 100_000, "", "../../etc"])
def test_cancel_task_of_a_hostile_id_says_it_is_unknown(
    app: flask.Flask, ext: ThreadContext, task_id: str
) -> None:
    with pytest.raises(LookupError, match=r"^No task .* of 'app0' is known here") as raised:
        ext.cancel_task(task_id)
    assert repr(task_id)[:50] in str(raised.value)
    assert len(str(raised.value)) < 300


def test_another_process_sees_a_retrying_task_its_retries_and_when_it_is_due(
    two: tuple[flask.Flask, flask.Flask],
) -> None:
    check_another_process_sees_a_retrying_task(*two)


def test_tasks_that_end_within_their_time_limit_leave_nothing_in_the_timer(
    make_app: AppFactory, ext: ThreadContext
) -> None:
    app = make_app(ext)
    limited = ext.task(time_limit=3600)(power)
    with app.app_context():
        assert [limited.submit(2, n).result(10) for n in range(50)] == [2**n for n in range(50)]
    controller = app_state(app).backend("threads")._control
    assert controller is not None
    assert len(controller.timer) == 0
    timer = [thread for thread in threading.enumerate() if thread.name == "threadctx-timer"]
    for thread in timer:
        thread.join(10)
    assert [thread.is_alive() for thread in timer] == [False] * len(timer)


def test_a_task_that_catches_the_stop_and_returns_finishes_normally(
    make_app: AppFactory, ext: ThreadContext
) -> None:
    app = make_app(ext)
    started, go = threading.Event(), threading.Event()

    def careful() -> int:
        started.set()
        go.wait(10)
        try:
            check_cancelled()
        except TaskCancelled:
            return 42  # it cleaned up, and says what it got done
        return 0

    with app.app_context():
        future = ext.submit(careful)
        assert started.wait(10)
        assert ext.cancel_task(future.task.id) is True
        go.set()
        assert future.result(10) == 42
    assert future.task.state == "succeeded"
    assert _counts(app, ext, "succeeded", "cancelled", "running") == (1, 0, 0)


def test_a_parent_waiting_for_a_delayed_child_waits_until_it_is_due(
    make_app: AppFactory, ext: ThreadContext
) -> None:
    app = make_app(ext, THREADCTX_MAX_WORKERS=1)
    later = ext.task(countdown=0.3)(time.time)

    def parent() -> float:
        return later.submit().result(10)

    with app.app_context():
        waiting = ext.submit(parent)
        ran_at = waiting.result(10)
    # The one worker ran both: the parent, then its child in its wait, once it was due.
    assert _counts(app, ext, "succeeded", "running") == (2, 0)
    assert ran_at >= t.cast(float, waiting.task.started_at) + 0.3


@pytest.mark.parametrize("timeout", [None, 10.0])  # inline, or on a helper thread
def test_a_parent_waiting_for_a_retrying_child_lets_each_retry_wait_its_delay(
    make_app: AppFactory, ext: ThreadContext, timeout: float | None
) -> None:
    app = make_app(ext, THREADCTX_MAX_WORKERS=1)
    attempts: list[float] = []

    def flaky() -> int:
        attempts.append(time.monotonic())
        if len(attempts) < 3:
            raise ConnectionError(len(attempts))
        return len(attempts)

    child_task = ext.task(retry_for=(ConnectionError,), retry_delay=0.2, max_retries=2)(flaky)

    def parent() -> int:
        return child_task.submit().result(timeout)

    with app.app_context():
        assert ext.submit(parent).result(10) == 3
    gaps = [later - earlier for earlier, later in itertools.pairwise(attempts)]
    assert [gap >= 0.2 for gap in gaps] == [True, True]


def test_a_retry_scheduled_as_the_pool_shuts_down_is_cancelled(
    make_app: AppFactory, ext: ThreadContext
) -> None:
    app = make_app(ext)
    in_receiver, shut = threading.Event(), threading.Event()
    ran: list[int] = []

    def hold(sender: flask.Flask, **kwargs: object) -> None:
        in_receiver.set()
        shut.wait(10)

    def fails() -> None:
        ran.append(1)
        raise KeyError("again")

    with task_retried.connected_to(hold, app), app.app_context():
        future = ext.task(retry_for=(KeyError,), retry_delay=0.05)(fails).submit()
        assert in_receiver.wait(10)
        ext.shutdown(wait=False, cancel_futures=True)
        shut.set()
        with pytest.raises(concurrent.futures.CancelledError):
            future.result(10)
    assert (ran, future.task.state) == ([1], "cancelled")
    assert _counts(app, ext, "cancelled", "retrying", "running") == (1, 0, 0)


def test_the_timer_ends_once_its_only_delayed_task_is_cancelled(
    make_app: AppFactory, ext: ThreadContext
) -> None:
    app = make_app(ext)
    with app.app_context():
        future = ext.task(countdown=30_000)(power).submit(2, 2)
        assert ext.cancel_task(future.task.id) is True
    controller = app_state(app).backend("threads")._control
    assert controller is not None and len(controller.timer) == 0


def test_a_cancel_after_the_time_limit_passed_leaves_it_timed_out(
    make_app: AppFactory, ext: ThreadContext
) -> None:
    app = make_app(ext)
    past_limit, go = threading.Event(), threading.Event()

    def slow() -> None:
        threading.Event().wait(0.1)  # past its limit, without a check
        past_limit.set()
        go.wait(10)
        check_cancelled()

    with app.app_context():
        future = ext.task(time_limit=0.05)(slow).submit()
        assert past_limit.wait(10)
        assert ext.cancel_task(future.task.id) is True
        go.set()
        with pytest.raises(TaskTimeout):
            future.result(10)
    assert future.task.state == "timed_out"


def test_stats_never_go_negative_while_tasks_retry(
    make_app: AppFactory, ext: ThreadContext
) -> None:
    app = make_app(ext, THREADCTX_MAX_WORKERS=8)
    flaky = ext.task(retry_for=(KeyError,), max_retries=10)(_missing)
    low: list[dict[str, int]] = []
    done = threading.Event()

    def watch() -> None:
        with app.app_context():
            while not done.is_set():
                stats = ext.stats()
                if min(stats.values()) < 0:
                    low.append(stats)

    watcher = threading.Thread(target=watch)
    with app.app_context():
        watcher.start()
        futures = [flaky.submit(n) for n in range(100)]
        concurrent.futures.wait(futures, timeout=60)
        done.set()
        watcher.join(10)
    assert low == []
    assert _counts(app, ext, "failed", "running", "retrying") == (100, 0, 0)
