"""The Celery backend's Redis down, hanging, back again, or behind a password (``sending.py``,
``state.py``): submits and reads give up within their bound, and are booked once Redis answers."""

from __future__ import annotations

import collections.abc as cabc
import concurrent.futures
import gc
import json
import signal
import time
import typing as t
from pathlib import Path

import ctx_tasks
import flask
import pytest
import redis
from flask_threadctx import BrokerUnavailable
from flask_threadctx import task_rejected
from flask_threadctx.app_state import app_state
from flask_threadctx.model import TaskInfo
from harness import free_port
from harness import RedisServer

threadctx = ctx_tasks.threadctx


@pytest.fixture
def own_redis(tmp_path: Path) -> cabc.Iterator[RedisServer]:
    """A Redis server of the test's own, which it may stop, start again or hang (SIGSTOP): let
    go on and stopped after the test, once the test has shut its apps down."""
    server = RedisServer(tmp_path)
    server.start()
    yield server
    if server.process is not None:
        server.process.send_signal(signal.SIGCONT)
    server.stop()


def test_broker_down_rejects_and_sends_nothing(redis_server: RedisServer) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    app = ctx_tasks.create_app(
        {"THREADCTX_CELERY": {"broker_url": dead, "result_backend": redis_server.url}}
    )
    reasons: list[Exception] = []

    def rejected(sender: flask.Flask, task: t.Any, reason: Exception) -> None:
        reasons.append(reason)

    with app.app_context(), task_rejected.connected_to(rejected, app):
        before = threadctx.stats()
        with pytest.raises(BrokerUnavailable, match="the broker cannot be reached") as caught:
            threadctx.submit(ctx_tasks.add, 1, 2)
        after = threadctx.stats()
    assert reasons == [caught.value]
    assert after["rejected"] - before["rejected"] == 1
    assert after["submitted"] - before["submitted"] == 1
    assert after["queued"] == before["queued"]


def test_a_redis_that_hangs_fails_the_submit_at_its_bound(own_redis: RedisServer) -> None:
    """Redis stopped, not closed: a submit raises ``BrokerUnavailable`` after
    ``THREADCTX_CELERY_SUBMIT_TIMEOUT``, while Redis still hangs, in a process that was
    connected and in one that was not (its listener connects first); each is booked rejected
    once Redis answers. A message the broker took after all is not run: the rejection holds."""
    server = own_redis
    assert server.process is not None
    config = {
        "THREADCTX_CELERY": {"broker_url": server.url, "result_backend": server.url},
        "THREADCTX_CELERY_SUBMIT_TIMEOUT": 1,
    }
    connected, fresh = ctx_tasks.create_app(config), ctx_tasks.create_app(config)
    bound = r"^The task was not sent: Redis did not answer within 1 s \('THREADCTX_CELERY_SUB"
    rejected: list[TaskInfo] = []

    def on_rejected(sender: flask.Flask, task: TaskInfo, reason: Exception) -> None:
        rejected.append(task)

    task_rejected.connect(on_rejected)
    try:
        with connected.app_context():
            sent = threadctx.submit(ctx_tasks.add, 1, 2)  # no worker takes it
            assert threadctx.stats()["queued"] == 1  # its record written
        server.process.send_signal(signal.SIGSTOP)
        try:
            for app in (connected, fresh):
                with app.app_context(), pytest.raises(BrokerUnavailable, match=bound):
                    threadctx.submit(ctx_tasks.add, 3, 4)
        finally:
            server.process.send_signal(signal.SIGCONT)
        app_state(fresh).backend("celery").flush_records()
        with connected.app_context():
            stats = threadctx.stats()
        assert (stats["submitted"], stats["queued"], stats["rejected"]) == (3, 1, 2)
        records = app_state(connected).backend("celery")._connect()[1]
        found = [records.get(task.id) for task in rejected]
        assert [r and r.state for r in found] == ["rejected"] * 2
        client = redis.Redis.from_url(server.url)
        queued = [
            json.loads(message)["headers"]["id"] for message in client.lrange("celery", 0, -1)
        ]
        client.close()
        # One was published as Redis hung and reached the queue once it went on: a worker
        # that takes it finds it rejected. The other's listener was still connecting: its
        # submit gave up before it was published.
        assert set(queued) <= {sent.task.id, rejected[0].id}
        assert [records.claim(task.id, "run") for task in rejected] == ["rejected"] * 2
    finally:
        task_rejected.disconnect(on_rejected)
        for app in (connected, fresh):
            app_state(app).default.shutdown(wait=False)


def test_reads_of_the_records_give_up_at_the_bound_on_a_redis_that_hangs(
    own_redis: RedisServer,
) -> None:
    """Redis stopped, not closed: get_task, stats and 'flask threadctx stats' raise (one line
    for the CLI) within ``THREADCTX_CELERY_SUBMIT_TIMEOUT``, not when Redis goes on."""
    server = own_redis
    assert server.process is not None
    config = {
        "THREADCTX_CELERY": {"broker_url": server.url, "result_backend": server.url},
        "THREADCTX_CELERY_SUBMIT_TIMEOUT": 1,
        "THREADCTX_TASK_STORE": "celery",
    }
    app, other = ctx_tasks.create_app(config), ctx_tasks.create_app(config)
    reads = concurrent.futures.ThreadPoolExecutor(1)
    try:
        with app.app_context():
            sent = threadctx.submit(ctx_tasks.add, 1, 2)  # no worker takes it
            assert threadctx.stats()["queued"] == 1
        with other.app_context():
            assert threadctx.stats()["queued"] == 1  # connected
        server.process.send_signal(signal.SIGSTOP)
        try:

            def read(what: t.Callable[[], object]) -> object:
                with other.app_context():
                    return what()

            def cli() -> t.Any:
                return other.test_cli_runner().invoke(args=["threadctx", "stats"])

            answers = [
                reads.submit(read, lambda: threadctx.get_task(sent.task.id)),
                reads.submit(read, threadctx.stats),
                reads.submit(cli),
            ]
            # A guard against a hang, far beyond the bound: not what the test measures.
            done, _ = concurrent.futures.wait(answers, timeout=60)
            assert len(done) == 3, "a read waited for Redis to go on"
            errors = [answers[0].exception(), answers[1].exception()]
            result: t.Any = answers[2].result()
        finally:
            server.process.send_signal(signal.SIGCONT)
        assert [type(e) for e in errors] == [redis.exceptions.TimeoutError] * 2
        # redis-py names the server from 8.2 on ("... from socket" before).
        assert [str(e).startswith("Timeout reading from ") for e in errors] == [True, True]
        assert (result.exit_code, result.output.count("\n")) == (1, 1), result.output
        assert result.output.startswith("Error: Cannot read the task store, ")
        assert ": Timeout reading from " in result.output
    finally:
        reads.shutdown(wait=False)
        for made in (app, other):
            app_state(made).default.shutdown(wait=False)


def test_a_submit_refused_while_redis_is_down_is_counted_once_it_is_back(
    own_redis: RedisServer,
) -> None:
    server = own_redis
    app = ctx_tasks.create_app(
        {"THREADCTX_CELERY": {"broker_url": server.url, "result_backend": server.url}}
    )
    try:
        with app.app_context():
            threadctx.submit(ctx_tasks.add, 1, 2)  # connected; no worker takes it
            server.stop()  # and its data with it
            for _ in range(3):
                with pytest.raises(BrokerUnavailable, match="cannot be reached"):
                    threadctx.submit(ctx_tasks.add, 3, 4)
            listener = app_state(app).backend("celery")._listener
            assert listener is not None
            deadline = time.monotonic() + 60
            while listener._attempts < 7:  # its backoff is at its longest, 5 s, now
                assert time.monotonic() < deadline
                time.sleep(0.05)  # a poll of the listener's attempts
            server.start()
            # Taken at once, not when the listener's backoff ends: the submit has it try now.
            taken = threadctx.submit(ctx_tasks.add, 5, 6)
            assert taken.task.state == "pending"
            stats = threadctx.stats()
        assert (stats["submitted"], stats["queued"], stats["rejected"]) == (4, 1, 3)
    finally:
        app_state(app).default.shutdown(wait=False)


def test_password_protected_redis(tmp_path: t.Any) -> None:
    """Publishing, the records and the cancel claim all go through a Redis with a password."""
    server = RedisServer(tmp_path, password="s3cret")
    server.start()
    try:
        app = ctx_tasks.create_app(
            {"THREADCTX_CELERY": {"broker_url": server.url, "result_backend": server.url}}
        )
        with app.app_context():
            future = ctx_tasks.later.submit(1)
            assert redis.Redis.from_url(server.url).llen("celery") == 1  # published
            assert future.cancel() is True
            assert threadctx.stats()["cancelled"] == 1
        app_state(app).default.shutdown()
        listener = app_state(app).backend("celery")._listener
        assert listener is not None
        listener.join(10)
        gc.collect()
    finally:
        server.stop()
