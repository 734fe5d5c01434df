"""Workers killed, frozen, starved of the GIL, stopping, or cut off from Redis: signs of life and
the verdicts on them (``claims.py``, ``listener.py``), late acknowledgement and redelivery, and
each task booked once."""

from __future__ import annotations

import collections.abc as cabc
import concurrent.futures
import json
import os
import signal
import time
from pathlib import Path

import celery.exceptions
import ctx_tasks
import flask
import pytest
import redis
from flask_threadctx.app_state import app_state
from flask_threadctx.cli import _when
from harness import RedisServer
from harness import start_cli_worker
from harness import StartWorker
from harness import stop
from harness import wait_until_ready

pytestmark = pytest.mark.integration  # separate worker processes: not in the fast loop

threadctx = ctx_tasks.threadctx


FAST = {"THREADCTX_CELERY_HEARTBEAT": 1}
"""A sign of life every second, so that a worker killed, frozen or gone is found in two."""


@pytest.fixture
def fast_web(worker_env: dict[str, str], workers: StartWorker) -> cabc.Iterator[flask.Flask]:
    """The web app of a test that kills, freezes or stops its workers (start them with
    ``config=FAST``): signs of life every second. After the test both its backends are shut
    down, before the workers stop."""
    os.environ["THREADCTX_TEST_REDIS"] = worker_env["THREADCTX_TEST_REDIS"]
    web = ctx_tasks.create_app(FAST)
    yield web
    with web.app_context():
        threadctx.shutdown()


def test_a_killed_worker_process_fails_the_task_by_name(
    web: flask.Flask, workers: StartWorker, redis_url: str
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
        # The books of every process say so too: stored with the failure, in one step.
        stats = threadctx.stats()
        assert (stats["failed"], stats["running"]) == (1, 0)
        # The pool process was replaced: the next task runs.
        assert threadctx.submit(ctx_tasks.add, 1, 1).result(60) == 2


def test_a_task_whose_whole_worker_was_killed_fails_naming_it(
    workers: StartWorker, fast_web: flask.Flask, redis_url: str
) -> None:
    """With Celery's default early acknowledgement nobody would ever run the task again: once
    its sign of life runs out, the submitter fails its future naming the lost worker, and the
    records count it failed. A task that only runs long is left alone."""
    worker = workers("--concurrency", "2", config=FAST)
    client = redis.Redis.from_url(redis_url)
    with fast_web.app_context():
        slow = threadctx.submit(ctx_tasks.wait_for_signal, "slow", redis_url)
        assert client.blpop(["slow"], timeout=60) is not None
        doomed = threadctx.submit(ctx_tasks.wait_for_signal, "doomed", redis_url)
        assert client.blpop(["doomed"], timeout=60) is not None
        # Signs of life come three times a heartbeat: the slow task outlives several.
        done, _ = concurrent.futures.wait([slow], timeout=3)
        assert (done, slow.running()) == (set(), True)
        os.killpg(worker.pid, signal.SIGKILL)  # the main process and its pool, at once
        worker.wait()
        with pytest.raises(
            celery.exceptions.WorkerLostError,
            match=r"^Worker celery@[^ ]*:\d+ gave no sign of life for 2 s while running",
        ) as caught:
            doomed.result(30)
        heard = time.time()
        assert "it is gone (killed, its machine lost) or frozen" in str(caught.value)
        _, records = app_state(fast_web).backend("celery")._connect()
        record = records.get(doomed.task.id)
        assert record is not None and record.started_at is not None
        assert record.finished_at is not None
        assert record.started_at <= record.finished_at <= heard - 1
        stats = threadctx.stats()
        assert (stats["failed"], stats["running"]) == (2, 0)
        with pytest.raises(celery.exceptions.WorkerLostError):
            slow.result(30)


def test_a_frozen_worker_is_said_gone_or_frozen_and_its_late_end_is_logged_not_booked(
    workers: StartWorker, fast_web: flask.Flask, redis_url: str, tmp_path: Path
) -> None:
    """A worker stopped (SIGSTOP of its process group: docker pause, a VM frozen) for two
    heartbeats cannot be told from a lost one: the verdict says both, and the end the task
    reaches once its worker goes on is ignored, in the worker's log, booked once."""
    worker = workers("--concurrency", "1", config=FAST)
    client = redis.Redis.from_url(redis_url)
    with fast_web.app_context():
        before = threadctx.stats()
        frozen = threadctx.submit(ctx_tasks.wait_for_signal, "frozen", redis_url)
        assert client.blpop(["frozen"], timeout=60) is not None
        _, records = app_state(fast_web).backend("celery")._connect()
        who = records.worker_of(frozen.task.id)
        os.killpg(worker.pid, signal.SIGSTOP)
        try:
            with pytest.raises(celery.exceptions.WorkerLostError) as caught:
                frozen.result(30)
            client.rpush("frozen:go", 1)  # the task goes on with its worker
        finally:
            os.killpg(worker.pid, signal.SIGCONT)
        assert str(caught.value) == (
            f"Worker {who} gave no sign of life for 2 s while running {frozen.task}: it is"
            " gone (killed, its machine lost) or frozen (stopped, paused). The task is"
            " booked failed; if its worker was only frozen, the task may still finish"
            " there, and that end is ignored (the worker logs it). Submit it again if it"
            " should run; Celery's 'task_acks_late' and 'task_reject_on_worker_lost' would"
            " deliver it again."
        )
        ignored = (
            f"Task {frozen.task.id} (wait_for_signal) succeeded on this worker, but its end"
            f" had been booked already as failed (WorkerLostError: Worker {who} gave no"
            " sign of life for 2 s"
        ).encode()
        wait_for_log(tmp_path / "worker-0.log", ignored, 1)
        record = records.get(frozen.task.id)
        assert record is not None and record.state == "failed"
        assert (record.error or "").startswith(f"WorkerLostError: Worker {who} gave no")
        after = threadctx.stats()
    assert {k: after[k] - before[k] for k in ("submitted", "failed", "succeeded")} == {
        "submitted": 1,
        "failed": 1,
        "succeeded": 0,
    }
    assert after["running"] == 0


LATE_ACKS = {"task_acks_late": True, "task_reject_on_worker_lost": True}


def test_late_acknowledgement_runs_a_killed_task_again(
    web: flask.Flask, workers: StartWorker, redis_url: str
) -> None:
    workers("--concurrency", "2", celery=LATE_ACKS)
    client = redis.Redis.from_url(redis_url)
    with web.app_context():
        before = threadctx.stats()
        future = threadctx.submit(ctx_tasks.runs_again_once_killed, "late", redis_url)
        popped = client.blpop(["late"], timeout=60)
        assert popped is not None
        os.kill(int(popped[1]), signal.SIGKILL)
        assert future.result(60) == 2  # the second run's answer
        after = threadctx.stats()
    assert {key: after[key] - before[key] for key in after} == {
        "submitted": 1,
        "queued": 0,
        "running": 0,
        "succeeded": 1,
        "failed": 0,
        "cancelled": 0,
        "rejected": 0,
        "retrying": 0,
        "expired": 0,
        "timed_out": 0,
    }


def test_a_whole_worker_killed_gives_its_task_to_the_next_one(
    web: flask.Flask, workers: StartWorker, redis_url: str
) -> None:
    """With late acknowledgement, a task whose worker vanished entirely (every process killed,
    as with a lost machine) goes to another worker once the broker's visibility timeout is
    over."""
    transport = {"visibility_timeout": 2, "unacked_restore_interval": 0.2}
    late = {**LATE_ACKS, "broker_transport_options": transport}
    first = workers("--concurrency", "1", celery=late)
    client = redis.Redis.from_url(redis_url)
    with web.app_context():
        future = threadctx.submit(ctx_tasks.runs_again_once_killed, "vanish", redis_url)
        assert client.blpop(["vanish"], timeout=60) is not None
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
        workers("--concurrency", "1", celery=late)
        assert future.result(60) == 2
        assert future.task.state == "succeeded"


def test_a_task_holding_the_gil_past_the_heartbeat_is_left_alone(
    workers: StartWorker, fast_web: flask.Flask, redis_url: str, tmp_path: Path
) -> None:
    """A long C call (or regular expression) starves every thread of its process, that of
    its heartbeat too: the worker's main process beats for it. The task is not declared lost
    and is booked once, succeeded."""
    workers("--concurrency", "1", config=FAST)
    client = redis.Redis.from_url(redis_url)
    fifo = tmp_path / "gil"
    os.mkfifo(fifo)
    with fast_web.app_context():
        future = threadctx.submit(ctx_tasks.holds_the_gil, "gil", redis_url, str(fifo))
        popped = client.blpop(["gil"], timeout=60)
        assert popped is not None
        # Four heartbeats without a beat of its own process: lost, if nobody else beat.
        done, _ = concurrent.futures.wait([future], timeout=4)
        assert (done, future.running()) == (set(), True)
        release = os.open(fifo, os.O_WRONLY)
        os.write(release, b"!")
        os.close(release)
        assert future.result(30) == int(popped[1])
        stats = threadctx.stats()
    assert (stats["succeeded"], stats["failed"], stats["running"]) == (1, 0, 0)


def wait_for_log(path: Path, text: bytes, count: int) -> None:
    deadline = time.monotonic() + 60
    while path.read_bytes().count(text) < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"{count} x {text!r} not in the worker's log:\n{path.read_text()}")
        time.sleep(0.05)  # the worker tells only its log


def test_pool_processes_killed_while_the_main_process_looks_away_are_booked_once(
    workers: StartWorker, fast_web: flask.Flask, redis_url: str, tmp_path: Path
) -> None:
    """The submitter finds the tasks lost first; the worker's main process, which notices
    its dead pool processes late, says so too: each task is counted failed once."""
    worker = workers("--concurrency", "2", config=FAST)
    client = redis.Redis.from_url(redis_url)
    with fast_web.app_context():
        futures = [
            threadctx.submit(ctx_tasks.wait_for_signal, f"pool-{n}", redis_url) for n in range(2)
        ]
        pids = [client.blpop([f"pool-{n}"], timeout=60) for n in range(2)]
        worker.send_signal(signal.SIGSTOP)
        try:
            for popped in pids:
                assert popped is not None
                os.kill(int(popped[1]), signal.SIGKILL)
            for future in futures:
                with pytest.raises(celery.exceptions.WorkerLostError, match="no sign of"):
                    future.result(30)
        finally:
            worker.send_signal(signal.SIGCONT)
        # The main process's own word, after the submitter's verdict.
        wait_for_log(tmp_path / "worker-0.log", b"raised error: WorkerLostError", 2)
        stats = threadctx.stats()
    assert (stats["failed"], stats["running"], stats["succeeded"], stats["queued"]) == (
        2,
        0,
        0,
        0,
    )


def test_a_task_that_ends_while_redis_restarts_is_not_reported_lost(
    worker_env: dict[str, str], redis_url: str, tmp_path: Path
) -> None:
    """Redis (saving its data, as in production) stops as the task returns, and comes back
    after the task's sign of life would have run out: the worker stores the result once Redis
    is back, and the submitter gets it, not a lost worker."""
    heartbeat = 1
    fast = {"THREADCTX_CELERY_HEARTBEAT": heartbeat}
    server = RedisServer(tmp_path, persist=True)
    server.start()
    env = {**worker_env, "THREADCTX_TEST_REDIS": server.url}
    env["THREADCTX_TEST_CONFIG"] = json.dumps(fast)
    os.environ["THREADCTX_TEST_REDIS"] = server.url
    web = ctx_tasks.create_app(fast)
    log_path = tmp_path / "worker.log"
    with log_path.open("wb") as log:
        worker = start_cli_worker(env, log, "--concurrency", "1")
    signals = redis.Redis.from_url(redis_url)  # another Redis, which stays up
    try:
        wait_until_ready(worker, log_path)
        with web.app_context():
            future = threadctx.submit(ctx_tasks.returns_after_signal, "end", redis_url)
            popped = signals.blpop(["end"], timeout=60)
            assert popped is not None
            server.stop()
            signals.rpush("end:go", 1)
            assert signals.blpop(["end:returning"], timeout=60) is not None
            # The outage outlasts a sign of life: it has run out when Redis reads it back.
            time.sleep(2 * heartbeat)
            server.start()
            assert future.result(60) == int(popped[1])
            assert future.task.state == "succeeded"
            stats = threadctx.stats()
        assert (stats["succeeded"], stats["failed"], stats["running"]) == (1, 0, 0)
    finally:
        stop(worker)
        with web.app_context():
            threadctx.shutdown()
        server.stop()


def test_tasks_a_lost_worker_had_received_say_when_they_come_again(
    workers: StartWorker, worker_env: dict[str, str], redis_url: str
) -> None:
    """A worker prefetches tasks it has not started; killed, it leaves them to the broker,
    which delivers them again after its visibility timeout. Meanwhile their futures, and
    the records in every process, say when; then they run, and say nothing more."""
    fast = {"THREADCTX_CELERY_HEARTBEAT": 1}
    transport = {"visibility_timeout": 6, "unacked_restore_interval": 0.2}
    # By when at the latest: the visibility timeout, then a period of the workers' sweep for
    # such messages (the interval times kombu's default throttle, 10).
    after = 6 + 0.2 * 10
    celery_config = {"broker_transport_options": transport}
    os.environ["THREADCTX_TEST_REDIS"] = redis_url
    web = ctx_tasks.create_app(
        {
            **fast,
            "THREADCTX_CELERY": {
                "broker_url": redis_url,
                "result_backend": redis_url,
                **celery_config,
            },
        }
    )
    other = ctx_tasks.create_app(fast)  # another web process, for its view of the records
    first = workers("--concurrency", "1", celery=celery_config, config=fast)
    client = redis.Redis.from_url(redis_url)
    try:
        with web.app_context():
            blocker = threadctx.submit(ctx_tasks.wait_for_signal, "held", redis_url)
            assert client.blpop(["held"], timeout=60) is not None
            held = [threadctx.submit(ctx_tasks.add, n, 1) for n in range(2)]
            keys = [f"threadctx:ctx_tasks:task:{future.task.id}" for future in held]
            deadline = time.monotonic() + 30
            while not all(client.hexists(key, "held_at") for key in keys):  # prefetched
                assert time.monotonic() < deadline
                time.sleep(0.05)  # the worker says so only in Redis
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
            with pytest.raises(celery.exceptions.WorkerLostError):
                blocker.result(30)
            while not all(future.task.redelivery_at for future in held):
                assert time.monotonic() < deadline + 30
                time.sleep(0.05)  # the listener's check sets it
            held_at = [float(client.hget(key, "held_at")) for key in keys]  # type: ignore[arg-type]
            assert [future.task.redelivery_at for future in held] == [at + after for at in held_at]
            assert [future.task.state for future in held] == ["pending", "pending"]
        with other.app_context():
            seen = [threadctx.get_task(future.task.id) for future in held]
            assert [f.task.redelivery_at for f in seen if f] == [at + after for at in held_at]
            records = app_state(other).backend("celery").records
            found = [records.get(f.task.id) for f in held]
            assert [r and r.as_dict()["redelivery_at"] for r in found] == [
                at + after for at in held_at
            ]
            shown = other.test_cli_runner().invoke(args=["threadctx", "show", held[0].task.id])
            assert shown.exit_code == 0
            assert f"\nredelivery_at {_when(held_at[0] + after)}\n" in shown.output
        workers("--concurrency", "1", celery=celery_config, config=fast)
        with web.app_context():
            assert [future.result(60) for future in held] == [1, 2]
            assert [future.task.redelivery_at for future in held] == [None, None]
            found = [records.get(f.task.id) for f in held]
            assert [r and r.redelivery_at for r in found] == [None, None]
            stats = threadctx.stats()
        assert (stats["submitted"], stats["failed"], stats["succeeded"], stats["running"]) == (
            3,
            1,
            2,
            0,
        )
    finally:
        for app in (web, other):
            with app.app_context():
                threadctx.shutdown()


def test_tasks_a_stopping_worker_gives_back_wait_in_the_queue_without_a_word(
    workers: StartWorker, fast_web: flask.Flask, redis_url: str
) -> None:
    """A warm shutdown gives the tasks the worker received and did not start back to the
    broker at once: they are not said to wait for a redelivery, and the next worker runs
    them."""
    first = workers("--concurrency", "1", config=FAST)
    client = redis.Redis.from_url(redis_url)
    with fast_web.app_context():
        blocker = threadctx.submit(ctx_tasks.wait_for_signal, "back", redis_url)
        popped = client.blpop(["back"], timeout=60)
        assert popped is not None
        held = [threadctx.submit(ctx_tasks.add, n, 1) for n in range(2)]
        keys = [f"threadctx:ctx_tasks:task:{future.task.id}" for future in held]
        deadline = time.monotonic() + 30
        while not all(client.hexists(key, "held_at") for key in keys):  # prefetched
            assert time.monotonic() < deadline
            time.sleep(0.05)  # the worker says so only in Redis
        first.send_signal(signal.SIGTERM)
        client.rpush("back:go", 1)
        assert blocker.result(30) == int(popped[1])
        first.wait(30)
        assert [client.hexists(key, "held_at") for key in keys] == [False, False]
        # Several heartbeats: time enough for a word of redelivery, were one to come.
        done, _ = concurrent.futures.wait(held, timeout=4)
        assert done == set()
        assert [future.task.redelivery_at for future in held] == [None, None]
        workers("--concurrency", "1", config=FAST)
        assert [future.result(60) for future in held] == [1, 2]
