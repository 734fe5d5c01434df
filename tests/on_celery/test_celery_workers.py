"""The Celery backend with separate ``flask threadctx worker`` processes (prefork pool)."""

from __future__ import annotations

import collections.abc as cabc
import itertools
import os
import signal
import subprocess
import time
import typing as t
from pathlib import Path

import celery.exceptions
import ctx_tasks
import flask
import pytest
import redis
from harness import start_cli_worker

threadctx = ctx_tasks.threadctx


def wait_until_ready(worker: subprocess.Popen[bytes], log: Path) -> None:
    """Watch the worker's log until it says it is ready for tasks."""
    deadline = time.monotonic() + 60
    while b" ready." not in log.read_bytes():
        if worker.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"the worker did not start:\n{log.read_text()}")
        time.sleep(0.05)  # the worker tells only its log


def stop(worker: subprocess.Popen[bytes]) -> None:
    worker.send_signal(signal.SIGTERM)
    try:
        worker.wait(30)
    except subprocess.TimeoutExpired:
        worker.kill()
        worker.wait()


@pytest.fixture
def web(worker_env: dict[str, str]) -> cabc.Iterator[flask.Flask]:
    os.environ["THREADCTX_TEST_REDIS"] = worker_env["THREADCTX_TEST_REDIS"]
    app = ctx_tasks.create_app()
    yield app
    app.extensions["threadctx"].shutdown()


@pytest.fixture
def workers(worker_env: dict[str, str], tmp_path: Path) -> cabc.Iterator[t.Callable[..., None]]:
    started: list[tuple[subprocess.Popen[bytes], t.IO[bytes]]] = []

    def start(*options: str) -> None:
        path = tmp_path / f"worker-{len(started)}.log"
        log = path.open("wb")
        worker = start_cli_worker(worker_env, log, *options)
        started.append((worker, log))
        wait_until_ready(worker, path)

    yield start
    for worker, log in started:
        stop(worker)
        log.close()


def test_nested_waits_on_a_worker_with_one_process(
    web: flask.Flask, workers: t.Callable[..., None]
) -> None:
    workers("--concurrency", "1")
    with web.app_context():
        for _ in range(5):
            assert threadctx.submit(ctx_tasks.grandparent).result(60) == [1, 2]
        chain = threadctx.submit(ctx_tasks.chain_of_ids, 3)
        ids = chain.result(60)
    assert ids[0] == chain.task.id
    # Each task's parent is the task before it, across the processes that ran them.
    for parent, child in itertools.pairwise(ids):
        with web.app_context():
            info = threadctx.get_task(child)
            assert info is not None
            assert info.task.parent_id == parent


def test_isolation_between_requests_on_two_worker_processes(
    web: flask.Flask, workers: t.Callable[..., None]
) -> None:
    workers("--concurrency", "2")
    futures = []
    for i in range(200):
        with web.test_request_context(f"/r/{i}?i={i}", json={"i": i}, method="POST"):
            flask.g.i = i
            flask.session["i"] = i
            futures.append(threadctx.submit(ctx_tasks.describe, str(i)))
    pids = set()
    for i, future in enumerate(futures):
        seen = future.result(60)
        pids.add(seen["pid"])
        assert (seen["tag"], seen["args"], seen["json"], seen["g"], seen["session"]) == (
            str(i),
            {"i": [str(i)]},
            {"i": i},
            {"i": i},
            {"i": i},
        )
        assert seen["label"] == f"POST /r/{i}"
    assert len(pids) == 2
    assert os.getpid() not in pids
    with web.app_context():
        stats = threadctx.stats()
    assert (stats["submitted"], stats["succeeded"], stats["running"], stats["queued"]) == (
        200,
        200,
        0,
        0,
    )


def test_a_killed_worker_process_fails_the_task_by_name(
    web: flask.Flask, workers: t.Callable[..., None], redis_url: str
) -> None:
    workers("--concurrency", "2")
    client = redis.Redis.from_url(redis_url)
    with web.app_context():
        future = threadctx.submit(ctx_tasks.wait_for_signal, "kill-me", redis_url)
        popped = client.blpop(["kill-me"], timeout=60)
        assert popped is not None
        os.kill(int(popped[1]), signal.SIGKILL)
        with pytest.raises(celery.exceptions.WorkerLostError, match="signal 9 \\(SIGKILL\\)"):
            future.result(60)
        assert future.task.state == "failed"
        # The books of every process say so too, once the worker's main process has booked
        # it, which Celery lets it do only after it stored the failure that ended the wait.
        deadline = time.monotonic() + 30
        while threadctx.stats()["failed"] != 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        stats = threadctx.stats()
        assert (stats["failed"], stats["running"]) == (1, 0)
        # The pool process was replaced: the next task runs.
        assert threadctx.submit(ctx_tasks.add, 1, 1).result(60) == 2
