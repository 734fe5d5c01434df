"""The Celery tasks' records in Redis: written in batches in the background (``writer.py``), and
claimed and ended through ``CeleryRecords`` (``claims.py``), each end booked once."""

from __future__ import annotations

import concurrent.futures
import itertools
import os
import threading
import time
import typing as t

import celery.exceptions
import ctx_tasks
import pytest
import redis
import redis.backoff
import redis.retry
from flask_threadctx import Progress
from flask_threadctx.backends.celery.claims import CeleryRecords as RedisTaskRecords
from flask_threadctx.model import TaskInfo
from harness import free_port
from harness import RedisServer

threadctx = ctx_tasks.threadctx


def test_records_written_in_the_background_are_read_back_after_flush(
    redis_server: RedisServer,
) -> None:
    client = redis.Redis.from_url(redis_server.url)
    records = RedisTaskRecords(client, f"flush-{os.getpid()}", 60, 30.0)
    infos = [TaskInfo(f"t{n}", "add", None, "GET /") for n in range(500)]
    for info in infos[:-1]:
        records.add_soon(info, "replies")
    records.reject_soon(infos[-1], "replies")  # added and booked at once
    records.progress_soon(infos[0], Progress(1, 2, "half"), None)
    records.progress_soon(infos[0], Progress(2, 2, None), None)  # the note goes too
    records.flush()
    assert records.get(infos[0].id).progress == Progress(2, 2, None)  # type: ignore[union-attr]
    assert [records.get(info.id).state for info in infos] == ["pending"] * 499 + ["rejected"]  # type: ignore[union-attr]
    assert (records.counts()["submitted"], records.counts()["rejected"]) == (500, 1)


def test_an_end_is_booked_once_by_whoever_books_it_first(redis_server: RedisServer) -> None:
    """The worker's own end, its main process's word that the pool process died and a
    submitter's verdict that the task was lost, in every order and racing: each task is booked
    once, by the first, and a duplicate delivery of a task that ended does not run again."""
    client = redis.Redis.from_url(redis_server.url)
    records = RedisTaskRecords(client, f"once-{os.getpid()}", 60, 30.0)
    error = celery.exceptions.WorkerLostError("gone")
    ends: dict[str, t.Callable[[str], bool]] = {
        "succeeded": lambda task_id: records.finish(task_id, None, (f"r-{task_id}", "{}", 60)),
        "died": lambda task_id: records.finish(task_id, error, (f"r-{task_id}", "{}", 60)),
        "lost": lambda task_id: records.finish(
            task_id, error, (f"r-{task_id}", "{}", 60), lost_since=time.time()
        ),
    }
    orders = list(itertools.permutations(ends))
    racing = 300
    infos = [TaskInfo(f"t{n}", "add", None, None) for n in range(len(orders) + racing)]
    for info in infos:
        records.add_soon(info, "replies")
    records.flush()
    for info in infos:
        assert records.claim(info.id, "run") == "run"
    client.delete(*(records._alive_key(info.id) for info in infos))  # its process is gone
    booked: dict[str, list[str]] = {}
    for info, order in zip(infos, orders, strict=False):
        booked[info.id] = [how for how in order if ends[how](info.id)]
    assert [booked[info.id] for info in infos[: len(orders)]] == [[order[0]] for order in orders]

    def race(task_id: str, how: str, start: threading.Barrier) -> str | None:
        start.wait()
        return how if ends[how](task_id) else None

    with concurrent.futures.ThreadPoolExecutor(len(ends)) as pool:
        for info in infos[len(orders) :]:
            start = threading.Barrier(len(ends))
            found = [pool.submit(race, info.id, how, start) for how in ends]
            booked[info.id] = [how for f in found if (how := f.result()) is not None]
    assert [len(booked[info.id]) for info in infos] == [1] * len(infos)
    states = {"succeeded": "succeeded", "died": "failed", "lost": "failed"}
    assert [records.get(info.id).state for info in infos] == [  # type: ignore[union-attr]
        states[booked[info.id][0]] for info in infos
    ]
    assert [records.claim(info.id, "run") for info in infos] == ["finished"] * len(infos)
    counts = records.counts()
    succeeded = sum(booked[info.id] == ["succeeded"] for info in infos)
    assert (counts["queued"], counts["running"], counts["succeeded"], counts["failed"]) == (
        0,
        0,
        succeeded,
        len(infos) - succeeded,
    )
    client.close()


def test_records_that_cannot_be_written_are_given_up_with_an_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    records = RedisTaskRecords(
        redis.Redis(port=free_port(), retry=redis.retry.Retry(redis.backoff.NoBackoff(), 0)),
        "away",
        60,
        30.0,
    )
    records.add_soon(TaskInfo("t1", "add", None, None), "replies")  # returns at once
    records.flush(timeout=30)
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == [
        "Gave up writing 1 task records to Redis (Error 111 connecting to localhost:"
        f"{records.client.connection_pool.connection_kwargs['port']}. Connection refused.);"
        " the tasks are not affected, but their records and counts are incomplete."
    ]
