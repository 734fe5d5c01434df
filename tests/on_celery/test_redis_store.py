"""The shared task store on a real Redis, for the thread backend: what one process records,
another reads; a Redis that goes away costs the tasks nothing."""

from __future__ import annotations

import collections.abc as cabc
import concurrent.futures
import logging
import signal
import typing as t
from pathlib import Path

import ctx_tasks
import flask
import pytest
import redis
from flask_threadctx import Progress
from flask_threadctx import report_progress
from flask_threadctx import TaskFuture
from flask_threadctx import ThreadContext
from flask_threadctx.app_state import app_state
from flask_threadctx.backends.celery.claims import CeleryRecords as RedisTaskRecords
from flask_threadctx.errors import ResultElsewhere
from flask_threadctx.model import TaskInfo
from flask_threadctx.stores import store_of
from redis_server import RedisServer

from family import broken
from family import check_another_process_sees_a_retrying_task
from family import check_odd_results_are_recorded_not_kept
from family import check_one_tasks_odd_values_never_drop_the_batch
from family import halves
from family import receipt
from family import recorder
from family import sizable
from family import top
from family import UNDECODABLE


def make(url: str, **config: t.Any) -> flask.Flask:
    app = flask.Flask("shop")
    app.config.update(TESTING=True, THREADCTX_TASK_STORE=url)
    app.config.update(config)
    ThreadContext(app)
    return app


@pytest.fixture
def shut_down() -> cabc.Iterator[list[flask.Flask]]:
    apps: list[flask.Flask] = []
    yield apps
    for app in apps:
        for backend in app_state(app).backends.values():
            backend.shutdown()


@pytest.fixture
def two(redis_url: str, shut_down: list[flask.Flask]) -> tuple[flask.Flask, flask.Flask]:
    """Two processes of the app "shop", sharing the Redis store (as ``two`` of conftest.py, the
    SQLite one)."""
    here, there = make(redis_url), make(redis_url)
    shut_down += [here, there]
    return here, there


def test_another_process_reads_every_task(two: tuple[flask.Flask, flask.Flask]) -> None:
    here, there = two
    with here.test_request_context("/orders", method="POST"):
        ext = app_state(here).extension
        done, failed, root = ext.submit(halves, 10), ext.submit(broken), ext.submit(top)
        assert (done.result(), root.result()) == (10, "leaf")
        assert isinstance(failed.exception(), ValueError)
        stats = ext.stats()
    assert stats["submitted"] == 5 and stats["succeeded"] == 4 and stats["failed"] == 1
    with there.app_context():
        ext = app_state(there).extension
        seen = ext.get_task(done.task.id)
        assert seen is not None
        info = seen.task
        assert (info.name, info.state, info.request, info.progress) == (
            "halves",
            "succeeded",
            "POST /orders",
            Progress(5, 10, "halfway"),
        )
        assert (info.submitted_at, info.started_at, info.finished_at) == (
            done.task.submitted_at,
            done.task.started_at,
            done.task.finished_at,
        )
        with pytest.raises(ResultElsewhere):
            seen.result()
        lost = ext.get_task(failed.task.id)
        assert lost is not None
        assert repr(lost.exception()) == repr(failed.exception())
        assert ext.stats() == stats
    store = recorder(there).store
    (kid,) = store.children(root.task.id)
    assert (kid.name, kid.state, kid.backend) == ("middle", "succeeded", "threads")
    assert [r.name for r in store.recent()] == ["leaf", "middle", "top", "broken", "halves"]
    assert [r.name for r in store.recent(state="failed")] == ["broken"]
    assert [r.name for r in store.recent(name="halves", limit=1)] == ["halves"]


def test_another_process_sees_a_retrying_task(two: tuple[flask.Flask, flask.Flask]) -> None:
    check_another_process_sees_a_retrying_task(*two)


def test_one_tasks_odd_values_never_drop_the_batch(two: tuple[flask.Flask, flask.Flask]) -> None:
    large = check_one_tasks_odd_values_never_drop_the_batch(*two)[0]
    assert large is not None and large.progress is not None
    assert type(large.progress.done) is int  # SQLite gives a float: beyond its 64-bit integers


def test_only_the_last_finished_tasks_are_kept(
    redis_url: str, shut_down: list[flask.Flask]
) -> None:
    app = make(redis_url, THREADCTX_KEEP_FINISHED=5)
    shut_down.append(app)
    ext = app_state(app).extension
    with app.app_context():
        futures = [ext.submit(int, i) for i in range(40)]
        assert [f.result() for f in futures] == list(range(40))
        recorder(app).flush()
        store = t.cast(RedisTaskRecords, recorder(app).store)
        store.trim()
        kept = store.recent(limit=100)
        # Redis keeps the last to finish: four workers finish them in nearly, not quite, the
        # order they were submitted in.
        by_end = sorted(futures, key=lambda f: t.cast(float, f.task.finished_at))
        assert {r.id for r in kept} == {f.task.id for f in by_end[-5:]}
        assert store.get(by_end[0].task.id) is None
        assert ext.stats()["succeeded"] == 40


def test_redis_stopped_mid_run_costs_tasks_nothing_and_catches_up(
    tmp_path: Path, shut_down: list[flask.Flask], caplog: pytest.LogCaptureFixture
) -> None:
    server = RedisServer(tmp_path)
    server.start()
    app = make(server.url)
    shut_down.append(app)
    ext = app_state(app).extension
    try:
        with app.app_context(), caplog.at_level(logging.WARNING, "flask_threadctx.recorder"):
            assert ext.submit(int, 1).result() == 1
            recorder(app).flush()
            server.stop()
            futures = [ext.submit(int, i) for i in range(300)]
            assert [f.result() for f in futures] == list(range(300))
            recorder(app).flush()
            assert recorder(app).dropped == 300
            (warning,) = [r.getMessage() for r in caplog.records]
            assert "task store of 'shop' is not taking writes" in warning
            assert "tasks dropped from it so far" in warning
            server.start()
            after = ext.submit(int, 7)
            assert after.result() == 7
            recorder(app).flush()
            record = recorder(app).store.get(after.task.id)
            assert record is not None and record.state == "succeeded"
            # The test's Redis keeps nothing on disk: it came back empty, and counts anew.
            assert ext.stats()["succeeded"] == 1
    finally:
        server.stop()


@ctx_tasks.threadctx.task(backend="threads")
def double(n: int) -> int:
    return n * 2


def test_with_celery_the_store_is_its_records_for_thread_tasks_too(
    redis_url: str, shut_down: list[flask.Flask]
) -> None:
    config = {
        "THREADCTX_CELERY": {"broker_url": redis_url, "result_backend": redis_url},
        "THREADCTX_TASK_STORE": "celery",
    }
    here, there = ctx_tasks.create_app(config), ctx_tasks.create_app(config)
    shut_down += [here, there]
    with here.test_request_context("/double", method="POST"):
        future = double.submit(21)
        assert future.result() == 42
    recorder(here).flush()
    with there.app_context():
        seen = ctx_tasks.threadctx.get_task(future.task.id)
        assert seen is not None
        assert (seen.task.name, seen.task.state, seen.task.request) == (
            "double",
            "succeeded",
            "POST /double",
        )
        with pytest.raises(ResultElsewhere):
            seen.result()
        assert ctx_tasks.threadctx.stats()["succeeded"] == 1  # the Celery backend's counts
    # One registry: the Celery backend's records, where its own tasks are too.
    records = app_state(there).backend("celery")._connect()[1]
    record = records.get(future.task.id)
    assert record is not None and record.backend == "threads"
    assert store_of(there) is recorder(there).store


@pytest.mark.parametrize("store", ["redis", "celery"])
def test_a_kept_result_is_read_from_another_process(
    redis_url: str, shut_down: list[flask.Flask], store: str
) -> None:
    if store == "redis":
        here, there = (make(redis_url, THREADCTX_RESULT_MAX_BYTES=100) for _ in "ab")
    else:  # the Celery backend's records, for the thread tasks of an app with Celery
        config = {
            "THREADCTX_CELERY": {"broker_url": redis_url, "result_backend": redis_url},
            "THREADCTX_TASK_STORE": "celery",
            "THREADCTX_RESULT_MAX_BYTES": 100,
        }
        here, there = ctx_tasks.create_app(config), ctx_tasks.create_app(config)
    shut_down += [here, there]
    ext = app_state(here).extension
    kept = ext.task(backend="threads", keep_result=True)
    with here.app_context():
        futures: list[TaskFuture[t.Any]] = [
            kept(receipt).submit(7),
            kept(sizable).submit(99),
            ext.task(backend="threads")(halves).submit(2),
        ]
        concurrent.futures.wait(futures)
        recorder(here).flush()
    with there.app_context():
        other = app_state(there).extension
        seen = [other.get_task(f.task.id) for f in futures]
    found = [f for f in seen if f is not None]
    assert [f.task.state for f in found] == ["succeeded"] * 3
    assert found[0].result() == {
        "order": 7,
        "items": ["lamp", "café"],
        "file": UNDECODABLE,
        "paid": True,
    }
    with pytest.raises(ResultElsewhere, match=r"result, 101 bytes of JSON, was over"):
        found[1].result()
    with pytest.raises(ResultElsewhere, match=r"keep_result=True\)', or set"):
        found[2].result()


def test_with_celery_no_other_store_is_taken(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="set 'THREADCTX_TASK_STORE' to \"celery\""):
        ctx_tasks.create_app({"THREADCTX_TASK_STORE": f"sqlite:///{tmp_path}/t.db"})


def test_the_index_lets_go_of_expired_tasks(redis_url: str) -> None:
    # What keeps the index of Celery tasks, whose records are never trimmed, from growing: the
    # submits' writer drops the entries older than the records last, once a second.
    client = redis.Redis.from_url(redis_url)
    records = RedisTaskRecords(client, "expiring", 60, 30.0)
    old, new = TaskInfo("old-1", "job", None, None), TaskInfo("new-1", "job", None, None)
    old.submitted_at -= 120
    records.add_soon(old, "reply")
    records.add_soon(new, "reply")
    records.flush()
    assert [r.id for r in records.recent()] == ["new-1"]
    assert client.zrange("threadctx:expiring:recent", 0, -1) == [b"new-1"]
    client.close()


def test_a_workers_odd_progress_never_drops_the_batch(redis_url: str) -> None:
    # What a Celery task's progress goes through: the records' writer, in batches.
    client = redis.Redis.from_url(redis_url)
    records = RedisTaskRecords(client, "odd-progress", 60, 30.0)
    infos = [TaskInfo(f"t{n}", "job", None, None) for n in range(21)]
    for info in infos:
        records.add_soon(info, "reply")
    records.progress_soon(infos[0], Progress(1, 2, UNDECODABLE), None, 1)
    records.progress_soon(infos[1], Progress(2**64, 2**65, None), None, 1)
    records.flush()
    found = [records.get(info.id) for info in infos]
    assert [r and r.progress for r in found[:3]] == [
        Progress(1, 2, "caf\\udce9"),
        Progress(2**64, 2**65, None),
        None,
    ]
    assert [r and r.state for r in found] == ["pending"] * 21
    client.close()


def test_a_redis_that_hangs_costs_tasks_nothing(
    tmp_path: Path, shut_down: list[flask.Flask], caplog: pytest.LogCaptureFixture
) -> None:
    """A slow store, not a dead one: the server stops answering (SIGSTOP) and the writer's
    reads time out (the URL's socket_timeout), while the tasks run on."""
    server = RedisServer(tmp_path)
    server.start()
    assert server.process is not None
    app = make(f"{server.url}?socket_timeout=0.2")
    shut_down.append(app)
    ext = app_state(app).extension
    try:
        with app.app_context(), caplog.at_level(logging.WARNING, "flask_threadctx.recorder"):
            server.process.send_signal(signal.SIGSTOP)
            futures = [ext.submit(int, i) for i in range(100)]
            assert [f.result() for f in futures] == list(range(100))
            recorder(app).flush()
            assert recorder(app).dropped == 100
            (warning,) = [r.getMessage() for r in caplog.records]
            assert "Timeout reading from" in warning or "timed out" in warning, warning
            server.process.send_signal(signal.SIGCONT)
            after = ext.submit(int, 7)
            assert after.result() == 7
            recorder(app).flush()
            record = recorder(app).store.get(after.task.id)
            assert record is not None and record.state == "succeeded"
    finally:
        server.process.send_signal(signal.SIGCONT)
        server.stop()


def test_a_progress_that_cannot_be_read_back_is_left_out_not_raised(redis_url: str) -> None:
    # A record an older version wrote with repr() of numpy's float64: "np.float64(4.0)".
    client = redis.Redis.from_url(redis_url)
    records = RedisTaskRecords(client, "unreadable", 60, 30.0)
    odd, plain = TaskInfo("odd-1", "job", None, None), TaskInfo("plain-1", "job", None, None)
    for info in (odd, plain):
        records.add_soon(info, "reply")
    records.progress_soon(odd, Progress(4.0, 8.0, "np"), None, 1)
    records.progress_soon(plain, Progress(3, 8, None), None, 1)
    records.flush()
    client.hset(
        "threadctx:unreadable:task:odd-1",
        mapping={"progress_done": "np.float64(4.0)", "progress_total": "np.float64(8.0)"},
    )
    found = records.get("odd-1")
    assert found is not None and (found.id, found.state, found.progress) == (
        "odd-1",
        "pending",
        None,
    )
    assert [(r.id, r.progress) for r in records.recent()] == [
        ("plain-1", Progress(3, 8, None)),
        ("odd-1", None),
    ]
    assert records.progress_of("odd-1") == (None, 1)
    client.close()


class _NumpyLike(float):
    def __repr__(self) -> str:  # as numpy 2's np.float64 writes itself
        return f"np.float64({float(self)!r})"


def _reports_numpy_like() -> str:
    report_progress(_NumpyLike(4.0), _NumpyLike(8.0), "np")
    return "ok"


def test_a_float_subclass_progress_is_stored_as_a_plain_number(
    two: tuple[flask.Flask, flask.Flask],
) -> None:
    here, there = two
    with here.app_context():
        ext = app_state(here).extension
        future = ext.submit(_reports_numpy_like)
        assert future.result(10) == "ok"
        recorder(here).flush()
    assert recorder(here).dropped == 0
    found = recorder(there).store.get(future.task.id)
    assert found is not None and (found.state, found.progress) == (
        "succeeded",
        Progress(4.0, 8.0, "np"),
    )
    assert [r.id for r in recorder(there).store.recent()] == [future.task.id]


def test_a_result_whose_encoding_raises_anything_is_recorded_not_kept(
    redis_url: str, shut_down: list[flask.Flask]
) -> None:
    here, there = (make(redis_url, THREADCTX_KEEP_RESULTS=True) for _ in "ab")
    shut_down += [here, there]
    check_odd_results_are_recorded_not_kept(here, there)


def test_counts_never_go_below_zero_after_redis_lost_its_data(tmp_path: Path) -> None:
    # A Redis restarted without persistence: the counts start again from zero, and a task
    # that started before and ends after is counted as it ends, never as running -1.
    server = RedisServer(tmp_path)
    server.start()
    try:
        client = redis.Redis.from_url(server.url)
        records = RedisTaskRecords(client, "restarted", 60, 30.0)
        infos = [TaskInfo(f"t{n}", "job", None, None) for n in range(3)]
        for info in infos:
            records.add_soon(info, "reply")
        records.flush()
        assert [records.claim(info.id, "run") for info in infos[:2]] == ["run", "run"]
        assert records.counts()["running"] == 2
        server.stop()
        server.start()
        for info in infos[:2]:
            assert records.finish(info.id, None, (f"result-{info.id}", "{}", 60)) is True
        counts = records.counts()
        assert (counts["queued"], counts["running"], counts["succeeded"]) == (0, 0, 2)
        client.close()
    finally:
        server.stop()


def test_an_end_stored_late_is_booked_when_the_task_ended(redis_url: str) -> None:
    # A worker that stores a task's end once a restarted Redis is back: its run time is its
    # work, not the wait for Redis.
    client = redis.Redis.from_url(redis_url)
    records = RedisTaskRecords(client, "late-end", 60, 30.0)
    info = TaskInfo("late-1", "job", None, None)
    records.add_soon(info, "reply")
    records.flush()
    assert records.claim(info.id, "run") == "run"
    started = records.get(info.id)
    assert started is not None and started.started_at is not None
    ended_at = started.started_at + 2.5
    assert records.finish(info.id, None, ("result-late-1", "{}", 60), ended_at=ended_at)
    found = records.get(info.id)
    assert found is not None and (found.state, found.finished_at) == ("succeeded", ended_at)
    client.close()
