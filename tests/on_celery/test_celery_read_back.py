"""What the listener reads back from Redis when no message told it: a result whose message was
lost, what it missed while reconnecting, a start never heard of; and the listener ending with
its app. No worker runs the tasks."""

from __future__ import annotations

import collections.abc as cabc
import gc
import logging
import os
import threading
import time
import typing as t

import celery.exceptions
import ctx_tasks
import flask
import pytest
import redis
from flask_threadctx import TaskFuture
from flask_threadctx.app_state import app_state
from flask_threadctx.backends.celery.state import CeleryTaskInfo

pytestmark = pytest.mark.integration  # separate worker processes: not in the fast loop

threadctx = ctx_tasks.threadctx


def lose_the_message(app: flask.Flask, future: TaskFuture[t.Any], result: t.Any) -> None:
    """Store ``future``'s result as a worker would, and publish it only on the task's own
    channel, which a submitter does not listen to: as if the message to it had been lost."""
    made = app_state(app).backend("celery").celery
    made.backend.store_result(future.task.id, result, "SUCCESS")


@pytest.fixture
def no_worker_left_with_tasks(worker_env: dict[str, str]) -> cabc.Iterator[None]:
    os.environ["THREADCTX_TEST_REDIS"] = worker_env["THREADCTX_TEST_REDIS"]
    yield
    redis.Redis.from_url(worker_env["THREADCTX_TEST_REDIS"]).delete("celery")  # the queue


class _Heard(logging.Handler):
    """Keeps the messages logged that start with ``start``, and says when one came: the
    listener logs after it has resolved the futures, so a test woken by a future must wait for
    the log line."""

    def __init__(self, start: str) -> None:
        super().__init__(logging.INFO)
        self.start = start
        self.messages: list[str] = []
        self.one_came = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith(self.start):
            self.messages.append(message)
            self.one_came.set()


@pytest.mark.usefixtures("no_worker_left_with_tasks")
def test_a_result_whose_message_was_lost_is_found(monkeypatch: pytest.MonkeyPatch) -> None:
    logger = logging.getLogger("flask_threadctx.celery_backend")
    heard = _Heard("Read how")
    monkeypatch.setattr(logger, "level", logging.INFO)
    monkeypatch.setattr(logger, "handlers", [heard])
    app = ctx_tasks.create_app({"THREADCTX_CELERY_HEARTBEAT": 1})
    with app.app_context():
        future = threadctx.submit(ctx_tasks.add, 1, 2)  # no worker takes it
        lose_the_message(app, future, 3)
        assert future.result(30) == 3
    assert heard.one_came.wait(30)
    assert heard.messages == ["Read how 1 task(s) went from Redis, not from a message."]
    app_state(app).default.shutdown()


@pytest.mark.usefixtures("no_worker_left_with_tasks")
def test_a_task_said_to_come_again_says_nothing_more_once_its_end_is_read_back() -> None:
    """A redelivered task can start and end while the listener reads Redis: its end, read
    back, comes without its start, and must clear when the broker would deliver it again
    (CI saw a finished task still say so)."""
    app = ctx_tasks.create_app({"THREADCTX_CELERY_HEARTBEAT": 1})
    with app.app_context():
        future = threadctx.submit(ctx_tasks.add, 1, 2)  # no worker takes it
        info = future.task
        assert isinstance(info, CeleryTaskInfo)
        # As the listener's look for stranded tasks does (typed so that mypy forgets it after).
        info.redelivery_at = t.cast("float | None", time.time() + 60)
        lose_the_message(app, future, 3)
        assert future.result(30) == 3
    assert (info.state, info.redelivery_at) == ("succeeded", None)
    app_state(app).default.shutdown()


@pytest.mark.usefixtures("no_worker_left_with_tasks")
def test_a_start_never_heard_of_and_a_worker_gone_fail_the_task() -> None:
    """A worker claims the task as a worker does, but its word that the task started never
    reaches the submitter, and it dies without a sign of life: the future runs and then fails
    with the lost worker's name, rather than stay pending."""
    app = ctx_tasks.create_app({"THREADCTX_CELERY_HEARTBEAT": 1})
    with app.app_context():
        future = threadctx.submit(ctx_tasks.add, 1, 2)  # no worker takes it
        _, records = app_state(app).backend("celery")._connect()
        records.flush()  # the submit's record, which the claim finds
        assert records.claim(future.task.id, "run", worker="gone:1") == "run"
        with pytest.raises(
            celery.exceptions.WorkerLostError, match=r"^Worker gone:1 gave no sign of life"
        ):
            future.result(30)
        heard = time.time()
        record = records.get(future.task.id)
    assert future.task.state == "failed"
    # Its run ends at its last sign of life, a heartbeat before the verdict at the latest,
    # not at the verdict: the wait for it is no work.
    assert record is not None and record.started_at is not None
    assert record.finished_at is not None
    assert record.started_at <= record.finished_at <= heard - 1
    app_state(app).default.shutdown()


@pytest.mark.usefixtures("no_worker_left_with_tasks")
def test_what_was_missed_while_reconnecting_is_read_back(worker_env: dict[str, str]) -> None:
    # A heartbeat of an hour: no periodic check comes during the test.
    app = ctx_tasks.create_app({"THREADCTX_CELERY_HEARTBEAT": 3600})
    with app.app_context():
        future = threadctx.submit(ctx_tasks.add, 2, 3)
        lose_the_message(app, future, 5)
        # The listener's connection drops; it connects again and reads back what it missed.
        redis.Redis.from_url(worker_env["THREADCTX_TEST_REDIS"]).client_kill_filter(_type="pubsub")
        assert future.result(30) == 5
    app_state(app).default.shutdown()


@pytest.mark.usefixtures("no_worker_left_with_tasks")
def test_the_listener_ends_with_its_app() -> None:
    app = ctx_tasks.create_app()
    with app.app_context():
        future = threadctx.submit(ctx_tasks.add, 1, 1)
    assert future.cancel() is True
    listener = app_state(app).backend("celery")._listener
    assert listener is not None
    assert listener.is_alive()
    del app, future
    deadline = time.monotonic() + 30
    while listener.is_alive() and time.monotonic() < deadline:
        gc.collect()  # again, if the listener held its backend for a moment during the last
        listener.join(1)
    assert not listener.is_alive()
