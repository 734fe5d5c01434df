"""Retries and expiry on the Celery engine, beyond the cases both engines share
(``test_control_both.py``): the retry options a message carries, checked at the submit; a
retrying task and an expired one as another process of the app sees them; the start of the
last attempt on the submitter's future. A real worker process and a real Redis."""

from __future__ import annotations

import concurrent.futures
import json
import time
import typing as t
import uuid

import pytest
import redis
from both_engines import counts
from both_engines import Engine
from both_engines import engine_fixture  # noqa: F401
from both_engines import until
from both_engines import worker_process  # noqa: F401
from both_tasks import create_app
from both_tasks import flaky
from both_tasks import gated
from both_tasks import stamp
from both_tasks import threadctx
from flask_threadctx import TaskExpired
from flask_threadctx.app_state import app_state
from flask_threadctx.backends.celery.claims import CeleryRecords
from flask_threadctx.backends.celery.claims import RETRYING
from flask_threadctx.model import TaskInfo
from redis_server import RedisServer

if t.TYPE_CHECKING:
    from flask_threadctx import TaskFuture

celery_only = pytest.mark.parametrize("engine", ["celery"], indirect=True)

# A class whose import path names nothing: its module holds it under another name.
Renamed = type("NotThisName", (ConnectionError,), {})


@pytest.mark.parametrize("eager", [False, True])
def test_a_retry_for_class_not_importable_by_its_path_is_a_type_error_at_the_submit(
    redis_server: RedisServer, eager: bool
) -> None:
    class Local(ConnectionError):
        pass

    app = create_app("celery", redis_server.url, THREADCTX_EAGER=eager)
    with app.app_context():
        before = threadctx.stats()
    for cls, path in (
        (Local, f"{__name__}:{Local.__qualname__}"),
        (Renamed, f"{__name__}:NotThisName"),
    ):
        with app.test_request_context("/orders/7"), pytest.raises(TypeError) as raised:
            flaky.submit_with_options(args=("never", 1), retry_for=(ConnectionError, cls))
        assert str(raised.value) == (
            f"The 'retry_for' of 'flaky' holds {cls!r}, which a Celery worker cannot find by its"
            f" import path {path!r}, so it could not tell that error from another: define the"
            " exception class at the top level of a module."
        )
    with app.app_context():
        assert threadctx.stats() == before  # nothing was sent, run or booked
    app_state(app).backend("celery").shutdown(wait=False)


@celery_only
def test_another_process_sees_a_retrying_task_and_the_last_attempts_start(engine: Engine) -> None:
    key = engine.key("attempts")
    # One failure, then a retry 2 s later: time to look at it while it waits.
    future = engine.submit(flaky, (key, 1), g={"user": "ada"}, retry_backoff=False, retry_delay=2)
    [sent] = engine.notes(f"retried:{future.task.id}")  # 'task_retried', in the worker
    other = engine.another()
    with other.app_context():
        seen = engine.ext.get_task(future.task.id)
        stats = engine.ext.stats()
    assert seen is not None
    assert (seen.task.state, seen.task.retries, seen.task.due_at) == ("retrying", 1, sent["due_at"])
    assert (seen.running(), seen.done()) == (False, False)  # pending again, as on threads
    stats.pop("max_workers", None)
    assert stats == counts(submitted=1, retrying=1)
    assert seen.result(30) == 2
    assert future.result(30) == 2
    record = engine.record(future.task.id)
    for info in (future.task, seen.task):
        assert (info.state, info.retries, info.due_at) == ("succeeded", 1, None)
    # The last attempt's start, after its retry was due, on the future as in the record.
    due = t.cast(float, sent["due_at"])
    assert t.cast(float, future.task.started_at) >= due
    assert t.cast(float, record.started_at) >= due
    assert (record.retries, record.due_at) == (1, None)


@celery_only
def test_another_process_sees_an_expired_task_expired(engine: Engine) -> None:
    busy_key = engine.key("busy")
    busy = engine.submit(gated, (busy_key,))
    engine.notes(busy_key)
    expiring = engine.submit(stamp, (engine.key("ran"),), expires=0.1)
    until(expiring.task.submitted_at + 0.1)
    engine.go(busy_key)
    waited: list[TaskFuture[t.Any]] = [busy, expiring]
    concurrent.futures.wait(waited, timeout=30)
    with pytest.raises(TaskExpired):
        expiring.result(0)
    other = engine.another()
    with other.app_context():
        seen = engine.ext.get_task(expiring.task.id)
    assert seen is not None
    with pytest.raises(TaskExpired, match=r"had not started by its 'expires' \("):
        seen.result(30)
    assert seen.task.state == "expired"
    assert engine.books() == [counts(submitted=2, succeeded=1, expired=1)] * 3


@celery_only
def test_a_cancel_and_an_expiry_are_decided_once(engine: Engine) -> None:
    busy_key = engine.key("busy")
    busy = engine.submit(gated, (busy_key,))
    engine.notes(busy_key)
    key = engine.key("ran")
    futures: list[TaskFuture[t.Any]] = [
        engine.submit(stamp, (key,), expires=0.1) for _ in range(10)
    ]
    until(time.time() + 0.1)  # all expired: cancel them as the worker finds them so
    cancels = []
    engine.go(busy_key)
    for future in futures:
        cancels.append(engine.cancel_task(future.task.id))
    concurrent.futures.wait([busy, *futures], timeout=30)
    states = [future.task.state for future in futures]
    assert set(states) <= {"cancelled", "expired"}
    # A cancel that won says True; one that came after the expiry finds the task ended.
    assert cancels == [state == "cancelled" for state in states]
    assert [engine.record(future.task.id).state for future in futures] == states
    cancelled = states.count("cancelled")
    assert engine.all_notes(key) == []
    assert (
        engine.books()
        == [counts(submitted=11, succeeded=1, cancelled=cancelled, expired=10 - cancelled)] * 3
    )


def test_the_records_book_a_retry_and_an_expiry_once(redis_server: RedisServer) -> None:
    """The steps of ``claims.py`` and ``control_steps.py``: a delayed task's ``due_at`` kept
    until it starts; a retry booked only while an attempt runs, counted ``retrying`` until the
    next attempt's claim, which counts no second start; an expiry claimed once, only before any
    other claim."""
    client = redis.Redis.from_url(redis_server.url)
    records = CeleryRecords(client, f"retries-{uuid.uuid4().hex[:8]}", 60, 30.0)
    info = TaskInfo("r1", "flaky", None, "GET /")
    info.due_at = 1234.5
    records.add_soon(info, "replies-r")
    records.flush()
    record = records.get("r1")
    assert record is not None
    assert (record.state, record.due_at) == ("pending", 1234.5)
    assert records.retrying("r1", 1, 2000.25, None) is False  # not started: nothing to retry
    assert records.claim("r1", "run") == "run"
    pubsub = client.pubsub()
    pubsub.subscribe("replies-r")
    subscribed = pubsub.get_message(timeout=5)
    assert subscribed is not None and subscribed["type"] == "subscribe"
    assert records.retrying("r1", 1, 2000.25, None) is True
    heard = pubsub.get_message(timeout=5)  # the submitter hears it on its reply channel
    assert heard is not None
    assert heard["data"] == (RETRYING + json.dumps(["r1", 1, 2000.25])).encode()
    pubsub.close()
    record = records.get("r1")
    assert record is not None
    assert (record.state, record.retries, record.due_at) == ("retrying", 1, 2000.25)
    assert records.counts() == counts(submitted=1, retrying=1)
    assert records.claim("r1", "run") == "run"  # the retry starts
    record = records.get("r1")
    assert record is not None
    assert (record.state, record.retries, record.due_at) == ("running", 1, None)
    assert records.counts() == counts(submitted=1, running=1)
    assert records.retrying("r1", 2, 3000.0, None) is True
    assert records.finish("r1", ValueError("x"), ("res-r1", "{}", 60)) is True  # stopped, say
    assert records.retrying("r1", 3, 4000.0, None) is False  # ended: stays as it ended
    record = records.get("r1")
    assert record is not None
    assert (record.state, record.retries, record.due_at) == ("failed", 2, None)
    assert records.counts() == counts(submitted=1, failed=1)

    expiring, running = TaskInfo("e1", "stamp", None, None), TaskInfo("e2", "stamp", None, None)
    for task in (expiring, running):
        records.add_soon(task, "replies-e")
    records.flush()
    assert records.claim("e2", "run") == "run"
    assert records.expire("e1") == (True, "replies-e")
    assert records.expire("e1") == (False, None)  # once
    assert records.expire("e2") == (False, None)  # it started first
    assert records.claim("e1", "cancelled") == "expired"  # a cancel after it: too late
    assert records.claim("e1", "run") == "expired"  # nor does it run
    assert [records.get(i).state for i in ("e1", "e2")] == ["expired", "running"]  # type: ignore[union-attr]
    assert records.counts() == counts(submitted=3, failed=1, running=1, expired=1)
