"""Control over tasks, the same cases on both engines (see :doc:`/control`): the thread pool,
and a real Celery worker process with a real Redis. Each test runs once per engine, with the
same expected values; where an engine breaks a promise today, its case is marked
``xfail(strict=True)`` with the bug, so that the fix shows as an unexpected pass.

The tasks are :mod:`both_tasks`'s, declared once for both engines; :mod:`both_engines` has the
``engine`` fixture.
"""

from __future__ import annotations

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
from both_engines import counts
from both_engines import Engine
from both_engines import engine_fixture  # noqa: F401
from both_engines import ENGINES
from both_engines import until
from both_engines import worker_process  # noqa: F401
from both_tasks import BACKOFF_DELAYS
from both_tasks import broken
from both_tasks import create_app
from both_tasks import fails_once_after_go
from both_tasks import flaky
from both_tasks import gated
from both_tasks import MAX_RETRIES
from both_tasks import stamp
from flask import g
from flask_threadctx import TaskExpired
from flask_threadctx.app_state import app_state
from flask_threadctx.stores import flush
from redis_server import RedisServer

if t.TYPE_CHECKING:
    from flask_threadctx import TaskFuture

UTC = datetime.timezone.utc


def both(celery_bug: str | None = None) -> pytest.MarkDecorator:
    """Run the test on both engines; on Celery as an expected failure for ``celery_bug``."""
    params = [
        name
        if name != "celery" or celery_bug is None
        else pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=celery_bug))
        for name in ENGINES
    ]
    return pytest.mark.parametrize("engine", params, indirect=True)


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
