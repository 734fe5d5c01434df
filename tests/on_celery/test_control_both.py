"""Control over tasks, the same cases on both engines (see :doc:`/control`): the thread pool,
and a real Celery worker process with a real Redis. Each test runs once per engine, with the
same expected values.

The tasks are :mod:`both_tasks`'s, declared once for both engines; :mod:`both_engines` has the
``engine`` fixture, :mod:`both_elsewhere` another process of the deployment (``elsewhere``).
"""

from __future__ import annotations

import collections
import concurrent.futures
import datetime
import itertools
import json
import os
import threading
import time
import typing as t
import uuid

import pytest
import redis
from both_elsewhere import Elsewhere
from both_elsewhere import elsewhere_fixture  # noqa: F401
from both_engines import counts
from both_engines import CREDENTIALS
from both_engines import Engine
from both_engines import engine_fixture  # noqa: F401
from both_engines import ENGINES
from both_engines import HEADERS_KEPT
from both_engines import REQUEST_SEEN
from both_engines import submit_rerunnable
from both_engines import unknown
from both_engines import until
from both_engines import WAIT
from both_engines import where
from both_engines import worker_process  # noqa: F401
from both_tasks import BACKOFF_DELAYS
from both_tasks import broken
from both_tasks import checking
from both_tasks import create_app
from both_tasks import echo
from both_tasks import fails_once_after_go
from both_tasks import flaky
from both_tasks import gated
from both_tasks import GRACE
from both_tasks import ignoring
from both_tasks import MAX_RETRIES
from both_tasks import retired
from both_tasks import stamp
from both_tasks import waits_for_child
from flask import g
from flask_threadctx import TaskCancelled
from flask_threadctx import TaskExpired
from flask_threadctx import TaskTimeout
from flask_threadctx.app_state import app_state
from flask_threadctx.contexts.wire import RemoteTraceback
from flask_threadctx.stores import flush
from redis_server import RedisServer

if t.TYPE_CHECKING:
    from flask_threadctx import TaskFuture

pytestmark = pytest.mark.integration  # a Celery worker and another process: not the fast loop

UTC = datetime.timezone.utc


def _states(futures: t.Iterable[TaskFuture[t.Any]]) -> list[str]:
    return [future.task.state for future in futures]


# -- delays ---------------------------------------------------------------------------------


def test_a_delayed_task_starts_no_earlier_than_its_countdown(engine: Engine) -> None:
    delays = [0.05, 0.1, 0.2, 0.3]
    key = engine.key("ran")
    futures = [engine.submit(stamp, (key,), countdown=delay) for delay in delays]
    started = [future.result(30) for future in futures]
    for future, delay, at in zip(futures, delays, started, strict=True):
        due = future.task.submitted_at + delay
        record = engine.record(future.task.id)
        assert (at >= due, t.cast(float, record.started_at) >= due) == (True, True)
        assert t.cast(float, future.task.started_at) >= due
        assert (future.task.state, record.state) == ("succeeded", "succeeded")
    assert sorted(note["at"] for note in engine.all_notes(key)) == sorted(started)
    assert engine.books() == [counts(submitted=4, succeeded=4)] * 3


def test_an_eta_is_the_earliest_start(engine: Engine) -> None:
    key = engine.key("ran")
    etas = [datetime.datetime.now(UTC) + datetime.timedelta(seconds=s) for s in (0.1, 0.2)]
    futures = [engine.submit(stamp, (key,), eta=eta) for eta in etas]
    for future, eta in zip(futures, etas, strict=True):
        started = future.result(30)
        record = engine.record(future.task.id)
        assert (
            started >= eta.timestamp(),
            t.cast(float, record.started_at) >= eta.timestamp(),
        ) == (True, True)
        assert record.state == "succeeded"
    assert engine.books() == [counts(submitted=2, succeeded=2)] * 3


def test_a_task_delayed_far_ahead_stays_queued_until_it_is_cancelled(engine: Engine) -> None:
    key = engine.key("ran")
    future = engine.submit(stamp, (key,), countdown=3600)
    task_id = future.task.id
    assert (future.task.state, engine.record(task_id).state) == ("pending", "pending")
    assert engine.books() == [counts(submitted=1, queued=1)] * 3
    assert engine.cancel_task(task_id) is True
    assert future.cancelled() is True
    assert (future.task.state, engine.record(task_id).state) == ("cancelled", "cancelled")
    assert engine.cancel_task(task_id) is False  # it has ended
    assert engine.books() == [counts(submitted=1, cancelled=1)] * 3
    assert engine.all_notes(key) == []
    # task_cancelled, once, in the thread that cancelled it, outside any task
    assert [
        (note["state"], note["pid"], note["thread"], note["task"])
        for note in engine.all_notes(f"cancelled:{task_id}")
    ] == [("cancelled", os.getpid(), threading.current_thread().name, None)]


def test_a_delayed_task_says_when_it_is_due(engine: Engine) -> None:
    future = engine.submit(stamp, (engine.key("ran"),), countdown=3600)
    due = future.task.submitted_at + 3600
    assert (future.task.due_at, engine.record(future.task.id).due_at) == (due, due)
    assert engine.cancel_task(future.task.id) is True
    assert (future.task.due_at, engine.record(future.task.id).due_at) == (None, None)


def test_a_delayed_task_cancelled_before_it_is_due_never_runs(engine: Engine) -> None:
    key, after = engine.key("cancelled"), engine.key("after")
    cancelled = [engine.submit(stamp, (key,), countdown=d) for d in (0.3, 0.35, 0.4)]
    assert [engine.cancel_task(future.task.id) for future in cancelled] == [True] * 3
    # Due after all of them: once it ran, each of them was due, and was dropped.
    later = engine.submit(stamp, (after,), countdown=0.6)
    assert later.result(30) >= later.task.submitted_at + 0.6
    assert engine.all_notes(key) == []
    assert _states(cancelled) == ["cancelled"] * 3
    for future in cancelled:
        with pytest.raises(concurrent.futures.CancelledError) as raised:
            future.result(0)
        assert type(raised.value) is concurrent.futures.CancelledError
    assert [engine.record(future.task.id).state for future in cancelled] == ["cancelled"] * 3
    assert engine.books() == [counts(submitted=4, succeeded=1, cancelled=3)] * 3


# -- expiry ---------------------------------------------------------------------------------


def _occupy(engine: Engine) -> tuple[str, list[TaskFuture[str]]]:
    """Keep every worker of the engine busy until ``engine.go(key)``; return the key and the
    futures of the tasks that do."""
    key = engine.key("busy")
    busy = [engine.submit(gated, (key,)) for _ in range(engine.workers)]
    engine.notes(key, engine.workers)  # each runs
    return key, busy


@pytest.mark.parametrize("form", ["seconds", "datetime"])
def test_a_task_not_started_by_its_expiry_expires_and_never_runs(engine: Engine, form: str) -> None:
    busy_key, busy = _occupy(engine)
    key = engine.key("ran")
    at = datetime.datetime.now(UTC) + datetime.timedelta(seconds=0.2)
    expires: float | datetime.datetime = 0.2 if form == "seconds" else at
    expiring = engine.submit(stamp, (key,), expires=expires)
    until(time.time() + 0.2 if form == "seconds" else at.timestamp())  # past it, either way
    engine.go(busy_key)
    assert [future.result(30) for future in busy] == ["done"] * engine.workers
    with pytest.raises(TaskExpired, match=r"had not started by its 'expires' \("):
        expiring.result(30)
    assert engine.all_notes(key) == []
    assert (expiring.task.state, engine.record(expiring.task.id).state) == ("expired", "expired")
    # task_cancelled, once, where the engine found it expired: on threads, the pool's worker
    # thread that took it; on Celery, the worker (not this process).
    sent = engine.all_notes(f"cancelled:{expiring.task.id}")
    assert [note["state"] for note in sent] == ["expired"]
    assert (sent[0]["pid"] == os.getpid()) is (engine.name == "threads")
    submitted = engine.workers + 1
    assert engine.books() == [counts(submitted=submitted, succeeded=engine.workers, expired=1)] * 3


def test_an_expiry_racing_the_start_is_decided_once(engine: Engine) -> None:
    busy_key, busy = _occupy(engine)
    key = engine.key("ran")
    racing = [engine.submit(stamp, (key,), expires=0.05 * n) for n in range(1, 11)]
    until(time.time() + 0.2)  # the first ones expired; the worker is let go among the others
    engine.go(busy_key)
    everything: list[TaskFuture[t.Any]] = [*busy, *racing]
    concurrent.futures.wait(everything, timeout=30)
    ran = {note["task"] for note in engine.all_notes(key)}
    outcomes = [(future.task.state, future.task.id in ran) for future in racing]
    assert set(outcomes) <= {("expired", False), ("succeeded", True)}
    assert outcomes[0] == ("expired", False)  # it could not start before its expiry
    expired = outcomes.count(("expired", False))
    for future in racing:
        if future.task.state == "expired":
            with pytest.raises(TaskExpired):
                future.result(0)
    assert [engine.record(future.task.id).state for future in racing] == _states(racing)
    assert engine.books() == [counts(submitted=11, succeeded=11 - expired, expired=expired)] * 3


def test_a_task_started_before_its_expiry_runs_to_its_end(engine: Engine) -> None:
    key = engine.key("runs")
    future = engine.submit(gated, (key,), expires=1)
    submitted = time.time()
    engine.notes(key)  # it started
    until(submitted + 1)
    engine.go(key)
    assert future.result(30) == "done"
    assert (future.task.state, engine.record(future.task.id).state) == ("succeeded", "succeeded")
    assert engine.books() == [counts(submitted=1, succeeded=1)] * 3


def test_a_task_started_before_its_expiry_is_retried_after_it(engine: Engine) -> None:
    key, after = engine.key("attempts"), engine.key("after")
    future = engine.submit(fails_once_after_go, (key,), expires=1)
    submitted = time.time()
    first = engine.notes(key)  # its first attempt started
    until(submitted + 1)
    engine.go(key)  # it fails now, after its expiry; its retry is due 0.05 s later
    # Due after the retry, on the same one worker: once it ran, the retry had its turn.
    assert engine.submit(stamp, (after,), countdown=1).result(30) > 0
    assert future.done() is True, "the retry never ran, nor was the task booked"
    assert future.result(0) == 2
    assert [note["attempt"] for note in [*first, *engine.all_notes(key)]] == [1, 2]
    assert (future.task.state, engine.record(future.task.id).state) == ("succeeded", "succeeded")
    assert engine.books() == [counts(submitted=2, succeeded=2)] * 3


# -- retries --------------------------------------------------------------------------------


def _check_attempts(
    engine: Engine, future: TaskFuture[t.Any], notes: list[dict[str, t.Any]]
) -> None:
    """Each attempt of ``future``'s task is the same task, from the same request and ``g``,
    and each retry started no earlier than its backoff delay after the attempt before it
    failed."""
    assert [note["attempt"] for note in notes] == list(range(1, len(notes) + 1))
    assert {(note["task"], note["path"], note["user"]) for note in notes} == {
        (future.task.id, "/orders/7", "ada")
    }
    gaps = [later["at"] - earlier["failed_at"] for earlier, later in itertools.pairwise(notes)]
    assert [gap >= delay for gap, delay in zip(gaps, BACKOFF_DELAYS, strict=False)] == [True] * (
        len(notes) - 1
    )
    pids = {note["pid"] for note in notes}
    assert len(pids) == 1  # one worker thread, or one pool process
    assert (pids == {os.getpid()}) is (engine.name == "threads")


def test_a_task_retried_with_backoff_succeeds_after_its_failures(engine: Engine) -> None:
    key = engine.key("attempts")
    future = engine.submit(flaky, (key, 2), g={"user": "ada"})
    assert future.result(30) == 3
    _check_attempts(engine, future, engine.all_notes(key))
    assert (future.task.state, engine.record(future.task.id).state) == ("succeeded", "succeeded")
    assert engine.books() == [counts(submitted=1, succeeded=1)] * 3


def test_a_task_that_fails_every_retry_fails_with_the_last_error(engine: Engine) -> None:
    key = engine.key("attempts")
    future = engine.submit(flaky, (key, 10), g={"user": "ada"})
    with pytest.raises(ConnectionError, match=rf"^attempt {MAX_RETRIES + 1}$"):
        future.result(30)
    notes = engine.all_notes(key)
    assert len(notes) == MAX_RETRIES + 1
    _check_attempts(engine, future, notes)  # the last delay is the capped one
    record = engine.record(future.task.id)
    assert (future.task.state, record.state) == ("failed", "failed")
    assert record.error == f"ConnectionError: attempt {MAX_RETRIES + 1}"
    assert engine.books() == [counts(submitted=1, failed=1)] * 3


@pytest.mark.parametrize(("failures", "retries", "state"), [(2, 2, "succeeded"), (10, 3, "failed")])
def test_retries_are_counted_on_the_task_and_in_the_store(
    engine: Engine, failures: int, retries: int, state: str
) -> None:
    future = engine.submit(flaky, (engine.key("attempts"), failures), g={"user": "ada"})
    concurrent.futures.wait([future], timeout=30)
    record = engine.record(future.task.id)
    assert (future.task.retries, record.retries) == (retries, retries)
    assert (future.task.state, record.state, future.task.due_at, record.due_at) == (
        state,
        state,
        None,
        None,
    )


def test_between_attempts_a_task_is_retrying_and_says_when_it_is_due(engine: Engine) -> None:
    key, busy_key = engine.key("attempts"), engine.key("busy")
    assert engine.workers == 1  # what keeps the retry from its attempt below
    future = engine.submit(flaky, (key, 1), g={"user": "ada"})
    busy = engine.submit(gated, (busy_key,))
    # The one worker took the busy task once the first attempt had failed; the retry waits
    # for the worker, past its due time, until the busy task is let go.
    engine.notes(busy_key)
    [failed] = engine.all_notes(key)
    info = future.task
    assert (info.state, info.retries) == ("retrying", 1)
    due = t.cast(float, info.due_at)
    assert due >= failed["failed_at"] + BACKOFF_DELAYS[0]
    record = engine.record(info.id)
    assert (record.state, record.retries, record.due_at) == ("retrying", 1, due)
    assert engine.books() == [counts(submitted=2, running=1, retrying=1)] * 3
    engine.go(busy_key)
    assert (busy.result(30), future.result(30)) == ("done", 2)
    assert (info.state, info.retries, info.due_at) == ("succeeded", 1, None)
    record = engine.record(info.id)
    assert (record.state, record.retries, record.due_at) == ("succeeded", 1, None)
    assert engine.books() == [counts(submitted=2, succeeded=2)] * 3


def test_task_retried_is_sent_where_the_attempt_ran(engine: Engine) -> None:
    key = engine.key("attempts")
    future = engine.submit(flaky, (key, 10), g={"user": "ada"})
    with pytest.raises(ConnectionError):
        future.result(30)
    attempts = engine.all_notes(key)
    sent = engine.all_notes(f"retried:{future.task.id}")
    retries = range(1, MAX_RETRIES + 1)
    # The delays exact, as retry_jitter=False makes them; the third one capped.
    assert [
        (note["id"], note["state"], note["retries"], note["delay"], note["error"]) for note in sent
    ] == [
        (future.task.id, "retrying", n, BACKOFF_DELAYS[n - 1], f"ConnectionError('attempt {n}')")
        for n in retries
    ]
    # In the process and thread that ran the attempt, within its contexts (its task).
    assert [(note["pid"], note["thread"], note["task"]) for note in sent] == [
        (attempt["pid"], attempt["thread"], future.task.id) for attempt in attempts[:-1]
    ]
    assert [
        note["due_at"] >= attempt["failed_at"] + note["delay"]
        for note, attempt in zip(sent, attempts, strict=False)
    ] == [True] * MAX_RETRIES
    if engine.name == "threads":  # the pool's worker thread, in this process
        assert {note["pid"] for note in sent} == {os.getpid()}


@pytest.mark.parametrize(("error", "attempts"), [("ConnectionRefusedError", 2), ("LookupError", 1)])
def test_retry_for_names_the_errors_retried_with_their_subclasses(
    engine: Engine, error: str, attempts: int
) -> None:
    key = engine.key("attempts")
    future = engine.submit(flaky, (key, 1, error), g={"user": "ada"})
    if attempts == 2:  # a ConnectionError
        assert future.result(30) == 2
    else:
        with pytest.raises(LookupError, match=r"^attempt 1$"):
            future.result(30)
    assert len(engine.all_notes(key)) == attempts
    assert engine.record(future.task.id).state == ("succeeded" if attempts == 2 else "failed")


def test_retry_options_given_per_call_replace_the_declared_ones(engine: Engine) -> None:
    key = engine.key("attempts")
    future = engine.submit(flaky, (key, 10), g={"user": "ada"}, max_retries=1)
    with pytest.raises(ConnectionError, match=r"^attempt 2$"):
        future.result(30)
    assert len(engine.all_notes(key)) == 2


@pytest.mark.parametrize("name", ENGINES)
def test_in_eager_mode_delays_are_ignored_and_retries_run_at_once(
    redis_server: RedisServer, name: str
) -> None:
    app = create_app(name, redis_server.url, THREADCTX_EAGER=True)
    key = f"both:eager:{uuid.uuid4().hex[:8]}"
    with app.test_request_context("/orders/7", method="POST"):
        g.user = "ada"
        later = stamp.submit_with_options(args=(f"{key}:later",), countdown=3600)
        retried = flaky.submit(key, 2)
    app_state(app).default.shutdown()
    flush(app)  # its records written: none lands in the next test's books
    assert (later.done(), later.task.state) == (True, "succeeded")
    assert (retried.result(0), retried.task.retries, retried.task.state) == (3, 2, "succeeded")
    notes = [json.loads(raw) for raw in redis.Redis.from_url(redis_server.url).lrange(key, 0, -1)]
    assert {(note["pid"], note["thread"]) for note in notes} == {
        (os.getpid(), threading.current_thread().name)
    }


# -- the books ------------------------------------------------------------------------------


def test_the_books_of_a_mix_of_outcomes_are_exact(engine: Engine) -> None:
    key = engine.key("ran")
    busy_key, busy = _occupy(engine)
    queued = engine.submit(stamp, (key,))  # behind the busy worker
    assert engine.cancel_task(queued.task.id) is True
    later = engine.submit(stamp, (key,), countdown=3600)
    assert engine.cancel_task(later.task.id) is True
    engine.go(busy_key)
    futures: list[TaskFuture[t.Any]] = [
        *busy,
        queued,
        later,
        engine.submit(stamp, (key,)),
        engine.submit(broken, ("no stock",)),
        engine.submit(flaky, (engine.key("once"), 1), g={"user": "ada"}),
        engine.submit(flaky, (engine.key("always"), 10), g={"user": "ada"}),
    ]
    concurrent.futures.wait(futures, timeout=60)
    states = ["succeeded"] * engine.workers + ["cancelled", "cancelled"]
    states += ["succeeded", "failed", "succeeded", "failed"]
    assert _states(futures) == states
    assert [engine.record(future.task.id).state for future in futures] == states
    assert len(engine.all_notes(key)) == 1  # neither cancelled task ran
    expected = counts(submitted=len(futures), succeeded=engine.workers + 2, failed=2, cancelled=2)
    assert engine.books() == [expected] * 3
    other = engine.another()  # another process of the app reads the same books
    with other.app_context():
        seen = [engine.ext.get_task(future.task.id) for future in futures]
        stats = engine.ext.stats()
    assert [None if found is None else found.task.state for found in seen] == states
    stats.pop("max_workers", None)
    assert stats == expected


# -- time limits ----------------------------------------------------------------------------

LIMIT = 0.5
"""The time limit of the tasks that run past it: ``GRACE`` later, one that ignores it ends."""
CHECKS = ["check_cancelled", "report_progress"]


@pytest.mark.parametrize("how", CHECKS)
def test_a_task_that_checks_ends_timed_out_at_its_time_limit(engine: Engine, how: str) -> None:
    key = engine.key("checks")
    future = engine.submit(checking, (key, how), time_limit=LIMIT)
    [started] = engine.notes(key)
    with pytest.raises(TaskTimeout) as raised:
        future.result(WAIT)
    task_id = future.task.id
    assert str(raised.value) == (
        f"task {task_id} (checking) ran past its time limit ('time_limit') and stopped."
    )
    stopped = f"Task {task_id} ran past its time limit ('time_limit')."
    cause = raised.value.__cause__
    if engine.name == "threads":
        assert (type(cause), str(cause)) == (TaskCancelled, stopped)
    else:  # as for every error of a Celery task: the worker's traceback, which holds the cause
        assert type(cause) is RemoteTraceback
        assert cause.text.endswith(
            f"flask_threadctx.errors.TaskCancelled: {stopped}\n\nThe above exception was the"
            " direct cause of the following exception:\n\nflask_threadctx.errors.TaskTimeout:"
            f" {raised.value}\n"
        )
    [told] = engine.all_notes(f"{key}:raised")  # its check raised, where it ran
    assert [told["error"], told["pid"], told["thread"]] == [
        stopped,
        started["pid"],
        started["thread"],
    ]
    assert (future.task.state, engine.record(task_id).state) == ("timed_out", "timed_out")
    # task_failed, once, where the task ran, in its contexts; task_cancelled never.
    assert where(engine.all_notes(f"failed:{task_id}")) == [
        ("timed_out", started["pid"], started["thread"], task_id)
    ]
    assert engine.all_notes(f"cancelled:{task_id}") == []
    assert engine.books() == [counts(submitted=1, timed_out=1)] * 3


def test_a_task_that_ignores_its_time_limit_is_ended_a_grace_past_it(engine: Engine) -> None:
    key = engine.key("ignores")
    future = engine.submit(ignoring, (key,), time_limit=LIMIT)
    [started] = engine.notes(key)
    with pytest.raises(TaskTimeout) as caught:
        future.result(WAIT)
    raised, task_id = caught.value, future.task.id
    assert (future.task.state, engine.record(task_id).state) == ("timed_out", "timed_out")
    # The engine goes on with a worker of its own size: on threads a new thread in place of
    # the stuck one, which was written off; on Celery a new pool process in place of the one
    # its hard limit killed.
    after = engine.key("after")
    assert engine.submit(stamp, (after,)).result(WAIT) > 0
    [went_on] = engine.all_notes(after)
    if engine.name == "threads":
        assert str(raised) == (
            f"task {task_id} (ignoring) ran past its time limit ({LIMIT:g} s) and did not stop"
            f" within 'THREADCTX_TIME_LIMIT_GRACE' ({GRACE:g} s). Its thread was written off"
            " and replaced; it runs on until the task returns, and what it returns is dropped."
            " Call 'check_cancelled()' in long loops so that the task stops when asked."
        )
        assert (went_on["pid"], went_on["thread"] != started["thread"]) == (os.getpid(), True)
        engine.go(key)
        [returned] = engine.notes(f"{key}:returned")  # the stuck thread, its result dropped
        assert (returned["thread"], returned["task"]) == (started["thread"], task_id)
        # task_failed, once, where the grace ended, outside the task: the pool's timer.
        assert where(engine.all_notes(f"failed:{task_id}")) == [
            ("timed_out", os.getpid(), "threadctx-timer", None)
        ]
    else:
        assert str(raised).startswith(
            f"Task {task_id} (ignoring) ran past its time limit ('time_limit', {LIMIT:g} s)"
            " and did not stop within its grace ('THREADCTX_TIME_LIMIT_GRACE'): at"
            f" {LIMIT + GRACE:g} s its worker on "
        )
        assert went_on["pid"] != started["pid"]
        with pytest.raises(ProcessLookupError):
            os.kill(started["pid"], 0)
        # Killed, it sent nothing: billiard's SIGTERM, 0.1 s before its SIGKILL, raised
        # SystemExit in the task, which goes on untouched (its process is gone: the task
        # after it ran in another one).
        assert engine.all_notes(f"failed:{task_id}") == []
    assert engine.all_notes(f"cancelled:{task_id}") == []
    assert (future.task.state, engine.record(task_id).state) == ("timed_out", "timed_out")
    assert engine.books() == [counts(submitted=2, succeeded=1, timed_out=1)] * 3


@pytest.mark.parametrize("task", [checking, ignoring], ids=["checking", "ignoring"])
def test_a_task_that_ends_within_its_time_limit_succeeds(engine: Engine, task: t.Any) -> None:
    key = engine.key("within")
    future = engine.submit(task, (key,), time_limit=60)
    engine.notes(key)
    engine.go(key)
    future.result(WAIT)
    task_id = future.task.id
    assert (future.task.state, engine.record(task_id).state) == ("succeeded", "succeeded")
    assert [engine.all_notes(f"{kind}:{task_id}") for kind in ("failed", "cancelled")] == [[], []]
    assert engine.books() == [counts(submitted=1, succeeded=1)] * 3


# -- stop from another process --------------------------------------------------------------


# The other process is a real one (``elsewhere``). It knows a task once the process that
# submitted it (and, on Celery, the worker that runs it) has written its record, which their
# writers do within 50 ms: a case that asks it about a task writes its record first
# (``engine.flush``), but for the one about that window.


def _everywhere(
    engine: Engine, elsewhere: Elsewhere, future: TaskFuture[t.Any]
) -> list[str | None]:
    """The task's state as its future, the store and the other process say."""
    task_id = future.task.id
    return [
        future.task.state,
        engine.record(task_id).state,
        elsewhere.state(engine.name, task_id),
    ]


@pytest.mark.parametrize("how", CHECKS)
def test_a_running_task_is_stopped_from_another_process(
    engine: Engine, elsewhere: Elsewhere, how: str
) -> None:
    key = engine.key("checks")
    future = engine.submit(checking, (key, how))
    [started] = engine.notes(key)
    where_ran = [started["pid"], started["thread"]]
    engine.flush()
    task_id = future.task.id
    assert elsewhere.cancel_task(engine.name, task_id) is True
    with pytest.raises(TaskCancelled) as raised:
        future.result(WAIT)
    assert str(raised.value) == f"Task {task_id} was asked to stop ('cancel_task')."
    [told] = engine.all_notes(f"{key}:raised")  # at its check, where it ran
    assert [told["error"], told["pid"], told["thread"]] == [str(raised.value), *where_ran]
    assert _everywhere(engine, elsewhere, future) == ["cancelled"] * 3
    # task_cancelled, once, where the task ran, in its contexts; task_failed never.
    assert where(engine.all_notes(f"cancelled:{task_id}")) == [
        ("cancelled", started["pid"], started["thread"], task_id)
    ]
    assert engine.all_notes(f"failed:{task_id}") == []
    assert engine.books() == [counts(submitted=1, cancelled=1)] * 3


def test_a_stop_of_a_task_that_had_finished_returns_false(
    engine: Engine, elsewhere: Elsewhere
) -> None:
    """Asked of a task that succeeded and of one stopped before, from either process (twice
    from the other): ``False`` each time, and nothing changes. Asked too of one whose record
    still said ``running``, its end not written yet: the process that ran it answers."""
    key, ended_key = engine.key("checks"), engine.key("ended")
    stopped = engine.submit(checking, (key,))
    engine.notes(key)
    assert engine.cancel_task(stopped.task.id) is True
    with pytest.raises(TaskCancelled):
        stopped.result(WAIT)
    ended = engine.submit(gated, (ended_key,))
    engine.notes(ended_key)
    engine.flush()  # its record says running
    engine.go(ended_key)
    assert ended.result(WAIT) == "done"
    assert elsewhere.cancel_task(engine.name, ended.task.id) is False
    engine.flush()
    for future in (ended, stopped):
        answers = [elsewhere.cancel_task(engine.name, future.task.id) for _ in range(2)]
        assert [*answers, engine.cancel_task(future.task.id)] == [False] * 3
    assert _everywhere(engine, elsewhere, ended) == ["succeeded"] * 3
    assert _everywhere(engine, elsewhere, stopped) == ["cancelled"] * 3
    assert [len(engine.all_notes(f"cancelled:{f.task.id}")) for f in (ended, stopped)] == [0, 1]
    assert engine.books() == [counts(submitted=2, succeeded=1, cancelled=1)] * 3


RACES = 30


def test_a_stop_racing_the_tasks_end_is_decided_once(engine: Engine, elsewhere: Elsewhere) -> None:
    """Each task ends on its own after 0 to 5 checks, 10 ms apart, and is asked to stop from
    the other process once it runs: the stop lands before, among or after the checks. The
    answer agrees with how the task ended, every time: ``True``, stopped; ``False``,
    succeeded; asked again, ``False``."""
    outcomes: collections.Counter[bool] = collections.Counter()
    for i in range(RACES):
        key = engine.key(f"race-{i}")
        future = engine.submit(checking, (key, "check_cancelled", i % 6))
        engine.notes(key)
        engine.flush()
        answer = elsewhere.cancel_task(engine.name, future.task.id)
        outcomes[answer] += 1
        if answer:
            with pytest.raises(TaskCancelled):
                future.result(WAIT)
        else:
            assert future.result(WAIT) == i % 6
        state = "cancelled" if answer else "succeeded"
        assert (future.task.state, engine.record(future.task.id).state) == (state, state)
        sent = engine.all_notes(f"cancelled:{future.task.id}")
        assert [note["state"] for note in sent] == ["cancelled"] * answer
        assert engine.cancel_task(future.task.id) is False
    expected = counts(submitted=RACES, succeeded=outcomes[False], cancelled=outcomes[True])
    assert engine.books() == [expected] * 3
    print(f"{engine.name}: stops that took {outcomes[True]}, ends first {outcomes[False]}")


def test_a_stop_from_another_process_keeps_a_delayed_task_from_running(
    engine: Engine, elsewhere: Elsewhere
) -> None:
    key, after = engine.key("delayed"), engine.key("after")
    future = engine.submit(stamp, (key,), countdown=1)
    engine.flush()
    task_id = future.task.id
    assert elsewhere.cancel_task(engine.name, task_id) is True
    # Due after it, on the same one worker: once it ran, the stopped one was due, and dropped.
    later = engine.submit(stamp, (after,), countdown=1)
    assert later.result(WAIT) >= later.task.submitted_at + 1
    assert engine.all_notes(key) == []
    with pytest.raises(concurrent.futures.CancelledError) as raised:
        future.result(0)
    assert type(raised.value) is concurrent.futures.CancelledError  # it never started
    assert _everywhere(engine, elsewhere, future) == ["cancelled"] * 3
    assert engine.books() == [counts(submitted=2, succeeded=1, cancelled=1)] * 3
    # task_cancelled, once, outside any task: on threads in this process (its store writer
    # stopped it, as its own cancel_task would); on Celery in the process that asked.
    sent = where(engine.all_notes(f"cancelled:{task_id}"))
    pid = os.getpid() if engine.name == "threads" else elsewhere.pid
    assert [(state, at, task) for state, at, _, task in sent] == [("cancelled", pid, None)]


SOON = 60


def test_a_stop_from_another_process_right_after_the_submit(
    engine: Engine, elsewhere: Elsewhere
) -> None:
    """Asked before the submitting process may have written the task's record: the other
    process knows it, and stops it (``True``: it never runs), or does not yet, and raises
    :exc:`LookupError` as for any id it does not know, leaving the task as it is."""
    key = engine.key("delayed")
    not_known = 0
    for _ in range(SOON):
        future = engine.submit(stamp, (key,), countdown=3600)
        task_id = future.task.id
        try:
            answer = elsewhere.cancel_task(engine.name, task_id)
        except LookupError as error:
            assert str(error) == unknown(engine, task_id)
            assert future.task.state == "pending"
            not_known += 1
            answer = engine.cancel_task(task_id)
        # On Celery the submitter hears of a cancel made elsewhere through its listener.
        concurrent.futures.wait([future], timeout=WAIT)
        assert (answer, future.cancelled()) == (True, True)
    assert engine.all_notes(key) == []
    assert engine.books() == [counts(submitted=SOON, cancelled=SOON)] * 3
    print(f"{engine.name}: not known yet {not_known} of {SOON}")


def test_a_stop_of_an_unknown_task_raises_lookup_error(
    engine: Engine, elsewhere: Elsewhere
) -> None:
    task_id = str(uuid.uuid4())
    with pytest.raises(LookupError) as here:
        engine.cancel_task(task_id)
    with pytest.raises(LookupError) as there:
        elsewhere.cancel_task(engine.name, task_id)
    assert [str(here.value), str(there.value)] == [unknown(engine, task_id)] * 2
    assert engine.books() == [counts()] * 3


def test_a_stop_of_a_task_waiting_for_its_child_takes_once_the_wait_ends(
    engine: Engine, elsewhere: Elsewhere
) -> None:
    key, child_key = engine.key("parent"), engine.key("child")
    parent = engine.submit(waits_for_child, (key, child_key))
    [submitted] = engine.notes(key)
    [child_ran] = engine.notes(child_key)
    # The one worker busy with the parent, the child runs in the parent's wait, on a helper
    # thread of the parent's process.
    assert (child_ran["task"], child_ran["pid"]) == (submitted["child"], submitted["pid"])
    assert child_ran["thread"].startswith("threadctx-helper-")
    engine.flush()
    parent_id = parent.task.id
    assert elsewhere.cancel_task(engine.name, parent_id) is True
    assert parent.done() is False  # it waits for its child, which waits for the test
    engine.go(child_key)
    with pytest.raises(TaskCancelled) as raised:
        parent.result(WAIT)
    assert str(raised.value) == f"Task {parent_id} was asked to stop ('cancel_task')."
    with engine.app.app_context():
        child = engine.ext.get_task(submitted["child"])
    assert child is not None
    assert (child.result(WAIT), child.task.state) == ("done", "succeeded")
    assert _everywhere(engine, elsewhere, parent) == ["cancelled"] * 3
    assert _everywhere(engine, elsewhere, child) == ["succeeded"] * 3
    # task_cancelled, once, as the parent returned, where it ran, in its contexts.
    assert where(engine.all_notes(f"cancelled:{parent_id}")) == [
        ("cancelled", submitted["pid"], submitted["thread"], parent_id)
    ]
    assert engine.all_notes(f"cancelled:{child.task.id}") == []
    assert engine.books() == [counts(submitted=2, succeeded=1, cancelled=1)] * 3


# -- re-run ---------------------------------------------------------------------------------


def test_a_finished_task_is_rerun_from_another_process(
    engine: Engine, elsewhere: Elsewhere
) -> None:
    key = engine.key("echo")
    original = submit_rerunnable(engine, echo, key)
    first = original.result(0)
    rerun = elsewhere.rerun(engine.name, original.task.id)
    second = rerun["result"]
    assert (rerun["rerun_of"], rerun["backend"], rerun["state"]) == (
        original.task.id,
        engine.name,
        "succeeded",
    )
    assert rerun["id"] not in (original.task.id, None)
    assert engine.all_notes(key) == [first, second]
    # The same arguments and request, on the same engine, but for the credentials; a fresh g.
    assert [(seen["args"], seen["kwargs"], seen["backend"]) for seen in (first, second)] == [
        ([1, "two"], {"when": {"a": [1.5]}}, engine.name)
    ] * 2
    assert (first["user"], second["user"]) == ("ada", None)
    for seen in (first, second):
        assert {name: seen["request"][name] for name in REQUEST_SEEN} == REQUEST_SEEN
    assert second["request"]["headers"] == HEADERS_KEPT
    crossing = [header for header in first["request"]["headers"] if header[0] not in CREDENTIALS]
    assert crossing == HEADERS_KEPT
    # A thread task sees its live request, credentials too; a Celery task the one rebuilt.
    kept = {name for name, _ in first["request"]["headers"]} & CREDENTIALS
    assert kept == (CREDENTIALS if engine.name == "threads" else set())
    # Where it ran: a thread task in the process that asked for the re-run, a Celery task on
    # the worker (its one pool process, which ran the original).
    pid = elsewhere.pid if engine.name == "threads" else first["pid"]
    assert (first["pid"] == os.getpid(), second["pid"]) == (engine.name == "threads", pid)
    records = [engine.record(task_id) for task_id in (original.task.id, rerun["id"])]
    assert [(r.state, r.backend, r.rerun_of) for r in records] == [
        ("succeeded", engine.name, None),
        ("succeeded", engine.name, original.task.id),
    ]
    # The books of the app; on threads each process's pool counts its own tasks.
    two, one = counts(submitted=2, succeeded=2), counts(submitted=1, succeeded=1)
    own = one if engine.name == "threads" else two
    assert (engine.books(), rerun["own"]) == ([two, two, own], own)


def test_a_rerun_of_a_task_whose_function_was_removed_raises_lookup_error(
    engine: Engine, elsewhere: Elsewhere
) -> None:
    key = engine.key("retired")
    original = submit_rerunnable(engine, retired, key)
    rerun = elsewhere.rerun(engine.name, original.task.id, without=["retired"])
    one = counts(submitted=1, succeeded=1)
    assert rerun == {
        "error": "LookupError",
        "message": (
            f"Task {original.task.id} cannot be re-run, and nothing was submitted: its function"
            " 'both_tasks:retired' is no longer declared in this process (module 'both_tasks'"
            " has no attribute 'retired'): it was removed or renamed. Submit the function that"
            " took its place instead."
        ),
        "own": counts() if engine.name == "threads" else one,
    }
    assert len(engine.all_notes(key)) == 1  # it ran once: the original
    assert engine.books() == [one] * 3
