"""``report_progress`` in a Celery task: heard by the submitter's listener, kept in the records,
seen from another process, a later report never replaced by an earlier one."""

from __future__ import annotations

import itertools
import json
import os
import time
import typing as t

import ctx_tasks
import flask
import pytest
import redis
from flask_threadctx import Progress
from flask_threadctx import progress as progress_module
from flask_threadctx import TaskFuture
from flask_threadctx.app_state import app_state
from flask_threadctx.backends.celery.claims import PROGRESS_MESSAGE
from harness import RedisServer

threadctx = ctx_tasks.threadctx


@pytest.mark.usefixtures("app_ctx")
def test_progress_reaches_the_submitter_and_the_records(redis_server: RedisServer) -> None:
    client = redis.Redis.from_url(redis_server.url)
    key = f"progress-{os.getpid()}"
    future = threadctx.submit(ctx_tasks.reports_then_waits, key, redis_server.url)
    assert client.blpop([key], timeout=30) is not None
    records = app_state(flask.current_app).backend("celery")._connect()[1]
    records.flush()  # the worker here writes through this process's writer
    seen = records.get(future.task.id)
    assert seen is not None and seen.progress == Progress(3, 10, "rows")
    deadline = time.monotonic() + 30
    while future.task.progress is None and time.monotonic() < deadline:
        time.sleep(0.01)  # the listener thread hears it: nothing to wait on from here
    assert future.task.progress == Progress(3, 10, "rows")
    client.rpush(key + ":go", 1)
    assert future.result(30) == "ok"
    assert future.task.progress == Progress(10, 10, "done")  # heard before the result


@pytest.fixture
def every_report_passed_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each report a second after the last, for the clock of report_progress: every one is
    passed on, however fast the test goes."""
    ticks = itertools.count(step=1.0)
    monkeypatch.setattr(progress_module, "_clock", lambda: next(ticks))


@pytest.mark.usefixtures("every_report_passed_on")
def test_progress_seen_from_another_process_follows_the_task(
    app: flask.Flask, redis_server: RedisServer
) -> None:
    client = redis.Redis.from_url(redis_server.url)
    key = f"steps-{os.getpid()}"
    with app.app_context():
        future = threadctx.submit(ctx_tasks.steps, key, redis_server.url, 4)
    # Another web process: an app of its own, with its own Celery backend and listener.
    there = ctx_tasks.create_app()
    records = app_state(app).backend("celery")._connect()[1]
    try:
        seen = []
        for _ in range(4):
            client.rpush(key + ":go", 1)
            assert client.blpop([key], timeout=30) is not None
            records.flush()  # the worker here writes through this process's writer
            with there.app_context():
                other = threadctx.get_task(future.task.id)
            assert other is not None and other.task.progress is not None
            seen.append(other.task.progress)
            assert type(other.task.progress.done) is int
        assert seen == [Progress(i, 4, f"step {i}") for i in range(1, 5)]
        assert future.result(30) == "done"
        assert future.task.progress == Progress(4, 4, "step 4")
    finally:
        app_state(there).default.shutdown()


@pytest.mark.usefixtures("app_ctx")
def test_an_earlier_report_never_replaces_a_later_one(redis_server: RedisServer) -> None:
    client = redis.Redis.from_url(redis_server.url)
    backend = app_state(flask.current_app).backend("celery")
    key = f"later-{os.getpid()}"
    first, second = (
        threadctx.submit(ctx_tasks.wait_for_signal, key, redis_server.url) for _ in "ab"
    )
    for _ in "ab":
        assert client.blpop([key], timeout=30) is not None
    try:

        def report(future: TaskFuture[t.Any], done: int, seq: int) -> None:
            data = [future.task.id, done, 10, f"report {seq}", seq]
            client.publish(backend.reply_channel, PROGRESS_MESSAGE + json.dumps(data))

        def heard(future: TaskFuture[t.Any], done: int) -> None:
            deadline = time.monotonic() + 30
            while getattr(future.task.progress, "done", None) != done:
                assert time.monotonic() < deadline
                time.sleep(0.01)  # the listener thread hears it: nothing to wait on from here

        report(first, 6, 2)
        heard(first, 6)
        report(first, 5, 1)  # late, or sent again
        report(second, 1, 1)  # heard after it, in order
        heard(second, 1)
        assert first.task.progress == Progress(6, 10, "report 2")
        # The records keep the later one too, whatever order the writes come in.
        records = backend._connect()[1]
        records.progress_soon(first.task, Progress(8, 10, "report 4"), None, 4)
        records.progress_soon(first.task, Progress(7, 10, "report 3"), None, 3)
        records.flush()
        kept = records.get(first.task.id)
        assert kept is not None and kept.progress == Progress(8, 10, "report 4")
    finally:
        client.rpush(key + ":go", 1, 1)
    assert (first.result(30), second.result(30)) == (os.getpid(), os.getpid())
