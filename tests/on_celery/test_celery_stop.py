"""Stopping running Celery tasks (``stopping.py``) and their time limits, with real worker
processes (a prefork pool, as in production): from another process, under load, against the
task's end, while it waits for a child, with its worker frozen or killed, before it starts."""

from __future__ import annotations

import collections
import collections.abc as cabc
import concurrent.futures
import os
import random
import signal
import subprocess
import sys
import typing as t
import uuid

import celery.exceptions
import ctx_tasks
import flask
import pytest
import redis
import stop_tasks
from flask_threadctx import TaskCancelled
from flask_threadctx import TaskFuture
from flask_threadctx import TaskTimeout
from flask_threadctx.app_state import app_state
from harness import HERE
from harness import StartWorker
from lagging import Lagging
from lagging import lagging_fixture  # noqa: F401

pytestmark = pytest.mark.integration  # separate worker processes: not in the fast loop

threadctx = ctx_tasks.threadctx

CONFIG = {"THREADCTX_CANCEL_TIMEOUT": 1, "THREADCTX_TIME_LIMIT_GRACE": 1}
"""An answer to a stop within 1 s; a grace of 1 s after a time limit."""
FAST = {**CONFIG, "THREADCTX_CELERY_HEARTBEAT": 1}
"""And a sign of life every second, for a test that kills its worker."""


MakeWeb = cabc.Callable[[dict[str, t.Any]], flask.Flask]


@pytest.fixture
def make_web(worker_env: dict[str, str]) -> cabc.Iterator[MakeWeb]:
    """Web apps of the test, each with its config: shut down after it, before its workers."""
    os.environ["THREADCTX_TEST_REDIS"] = worker_env["THREADCTX_TEST_REDIS"]
    made: list[flask.Flask] = []

    def make(config: dict[str, t.Any]) -> flask.Flask:
        made.append(ctx_tasks.create_app(config))
        return made[-1]

    yield make
    for app in made:
        app_state(app).default.shutdown()


@pytest.fixture
def client(redis_url: str) -> cabc.Iterator[redis.Redis]:
    made = redis.Redis.from_url(redis_url)
    yield made
    made.close()


def started(client: redis.Redis, n: int = 1) -> list[tuple[str, int]]:
    """The next ``n`` tasks of ``stop_tasks`` to start: their ids and processes."""
    found = []
    for _ in range(n):
        popped = client.blpop(["started"], timeout=60)
        assert popped is not None, "no task started"
        task_id, pid = _text(popped[1]).split()
        found.append((task_id, int(pid)))
    return found


def told(client: redis.Redis) -> list[str]:
    """What ``task_cancelled`` and ``task_failed`` said in the workers, in order."""
    return [_text(item) for item in client.lrange("signals", 0, -1)]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def record_state(app: flask.Flask, task_id: str) -> str:
    record = app_state(app).backend("celery").records.get(task_id)
    assert record is not None
    return record.state


def counts_of(**counts: int) -> dict[str, int]:
    base = dict.fromkeys(
        ("queued", "running", "retrying", "succeeded", "failed", "cancelled", "rejected"), 0
    )
    base.update(expired=0, timed_out=0)
    base.update(counts)
    base["submitted"] = sum(base[k] for k in base if k != "submitted")
    return base


ASK_ELSEWHERE = """
import sys
import ctx_tasks
app = ctx_tasks.create_app()
with app.app_context():
    threadctx = ctx_tasks.threadctx
    print(threadctx.cancel_task(sys.argv[1]))
    future = threadctx.get_task(sys.argv[1])
    print(type(future.exception(30)).__name__, future.task.state)
    threadctx.shutdown()
"""


def test_a_running_task_stops_when_another_process_asks(
    make_web: MakeWeb,
    workers: StartWorker,
    worker_env: dict[str, str],
    client: redis.Redis,
) -> None:
    web = make_web(CONFIG)
    workers("--concurrency", "1", config=CONFIG)
    with web.app_context():
        future = threadctx.submit(stop_tasks.checking, "one")
        [(task_id, pid)] = started(client)
        assert task_id == future.task.id
        asked = subprocess.run(
            [sys.executable, "-c", ASK_ELSEWHERE, task_id],
            env=worker_env,
            cwd=HERE,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        assert asked.stdout.split() == ["True", "TaskCancelled", "cancelled"]
        with pytest.raises(TaskCancelled, match=rf"^Task {task_id} was asked to stop"):
            future.result(30)
        assert future.task.state == "cancelled"
        assert told(client) == [f"{task_id} cancelled"]
        assert threadctx.stats() == counts_of(cancelled=1)
        assert record_state(web, task_id) == "cancelled"
        assert client.exists(f"threadctx:ctx_tasks:stop:{task_id}") == 0
        # Asked again, it had finished; its worker process runs the next task.
        assert threadctx.cancel_task(task_id) is False
        assert threadctx.submit(ctx_tasks.os_pid).result(30) == pid


RUNNING = 8
"""Tasks running at once on the worker of the load test: one per pool process."""
STOPS = 1000


def test_a_thousand_stops_reach_only_the_tasks_named(
    make_web: MakeWeb, workers: StartWorker, client: redis.Redis
) -> None:
    """Stops of random tasks among ``RUNNING`` running ones, up to four at once from
    threads of this process: each stops the task named, none other; the books are exact."""
    web = make_web(CONFIG)
    workers("--concurrency", str(RUNNING), config=CONFIG)
    draw = random.Random(17)
    running: dict[str, tuple[str, TaskFuture[str]]] = {}
    submitted = 0

    def start(n: int) -> None:
        nonlocal submitted
        for _ in range(n):
            tag = f"load-{submitted}"
            submitted += 1
            future = threadctx.submit(stop_tasks.checking, tag)
            running[future.task.id] = (tag, future)
        assert {task_id for task_id, _ in started(client, n)} <= set(running)

    def cancel(task_id: str) -> bool:
        with web.app_context():
            return threadctx.cancel_task(task_id)

    stopped: list[str] = []
    with web.app_context(), concurrent.futures.ThreadPoolExecutor(4) as askers:
        start(RUNNING)
        while len(stopped) < STOPS:
            chosen = draw.sample(sorted(running), min(draw.randint(1, 4), STOPS - len(stopped)))
            assert list(askers.map(cancel, chosen)) == [True] * len(chosen)
            for task_id in chosen:
                _, future = running.pop(task_id)
                with pytest.raises(TaskCancelled):
                    future.result(30)
                assert future.task.state == "cancelled"
                stopped.append(task_id)
            start(len(chosen))
        for tag, _ in running.values():
            client.rpush(tag + ":go", 1)
        for task_id, (_, future) in running.items():
            assert (future.result(30), future.task.state) == (task_id, "succeeded")
        assert sorted(told(client)) == sorted(f"{task_id} cancelled" for task_id in stopped)
        assert threadctx.stats() == counts_of(cancelled=STOPS, succeeded=RUNNING)


def test_a_stop_racing_the_tasks_end_is_decided_once(
    make_web: MakeWeb, workers: StartWorker, client: redis.Redis
) -> None:
    """Told to go on, and asked to stop, at once: either it stopped and the answer is
    ``True``, or it succeeded and the answer is ``False``; booked once, either way."""
    web = make_web(CONFIG)
    workers("--concurrency", "2", config=CONFIG)
    outcomes: collections.Counter[bool] = collections.Counter()
    with web.app_context():
        for i in range(100):
            future = threadctx.submit(stop_tasks.checking, f"race-{i}")
            started(client)
            client.rpush(f"race-{i}:go", 1)
            answer = threadctx.cancel_task(future.task.id)
            outcomes[answer] += 1
            if answer:
                with pytest.raises(TaskCancelled):
                    future.result(30)
                assert future.task.state == "cancelled"
            else:
                assert (future.result(30), future.task.state) == (future.task.id, "succeeded")
            assert record_state(web, future.task.id) == future.task.state
            assert threadctx.cancel_task(future.task.id) is False
        assert threadctx.stats() == counts_of(cancelled=outcomes[True], succeeded=outcomes[False])
        assert len(told(client)) == outcomes[True]
    print(f"stops that took: {outcomes[True]}, ends that came first: {outcomes[False]}")


def test_a_task_asked_to_stop_while_it_waits_for_a_child_stops_once_the_wait_ends(
    make_web: MakeWeb, workers: StartWorker, client: redis.Redis
) -> None:
    web = make_web(CONFIG)
    workers("--concurrency", "2", config=CONFIG)
    with web.app_context():
        parent = threadctx.submit(stop_tasks.parent_waiting, "family")
        started(client)
        popped = client.blpop(["family:child-id"], timeout=60)
        assert popped is not None
        child_id = _text(popped[1])
        [(started_id, _)] = started(client)
        assert started_id == child_id
        assert threadctx.cancel_task(parent.task.id) is True
        assert not parent.done()  # it waits for its child, which waits for the test
        client.rpush("family:child:go", 1)
        with pytest.raises(TaskCancelled):
            parent.result(30)
        child = threadctx.get_task(child_id)
        assert child is not None
        assert (child.result(30), child.task.state) == (child_id, "succeeded")
        assert threadctx.stats() == counts_of(cancelled=1, succeeded=1)
        assert told(client) == [f"{parent.task.id} cancelled"]


def test_a_stop_of_an_unknown_task_raises_lookup_error(
    make_web: MakeWeb,
) -> None:
    web = make_web(CONFIG)
    unknown = str(uuid.uuid4())
    with web.app_context(), pytest.raises(LookupError, match=rf"^No task '{unknown}' of "):
        threadctx.cancel_task(unknown)


def test_a_stop_before_the_start_keeps_the_task_from_running(
    make_web: MakeWeb, workers: StartWorker, client: redis.Redis
) -> None:
    web = make_web(CONFIG)
    workers("--concurrency", "1", config=CONFIG)
    with web.app_context():
        blocker = threadctx.submit(stop_tasks.ignoring, "busy")
        [(blocker_id, _)] = started(client)
        queued = threadctx.submit(stop_tasks.checking, "never")
        assert threadctx.cancel_task(queued.task.id) is True
        client.rpush("busy:go", 1)
        assert blocker.result(30) == blocker_id
        assert threadctx.submit(ctx_tasks.add, 1, 2).result(30) == 3  # the queue went on
        assert client.llen("started") == 0  # 'never' never started
        with pytest.raises(concurrent.futures.CancelledError):
            queued.result(30)
        assert threadctx.stats() == counts_of(cancelled=1, succeeded=2)


def test_a_task_waiting_for_its_retry_is_stopped_and_never_runs_again(
    make_web: MakeWeb, workers: StartWorker, client: redis.Redis
) -> None:
    web = make_web(CONFIG)
    workers("--concurrency", "1", config=CONFIG)
    with web.app_context():
        future = stop_tasks.failing.submit("retry")
        popped = client.blpop(["retried"], timeout=60)  # its record says "retrying" by now
        assert popped is not None and _text(popped[1]) == future.task.id
        assert threadctx.cancel_task(future.task.id) is True  # answered by the records
        with pytest.raises(TaskCancelled):
            future.result(30)  # its next attempt, 2 s later, found the request at its claim
        assert client.llen("retry:attempts") == 1
        assert future.task.state == record_state(web, future.task.id) == "cancelled"
        assert threadctx.stats() == counts_of(cancelled=1)
        # As on threads, a failed attempt that is retried sends 'task_retried', not 'task_failed'.
        assert told(client) == [f"{future.task.id} cancelled"]


def test_a_stop_asked_of_a_frozen_worker_times_out_and_takes_once_it_goes_on(
    make_web: MakeWeb, workers: StartWorker, client: redis.Redis
) -> None:
    web = make_web(CONFIG)
    worker = workers("--concurrency", "1", config=CONFIG)
    with web.app_context():
        future = threadctx.submit(stop_tasks.checking, "frozen")
        [(task_id, pid)] = started(client)
        os.killpg(worker.pid, signal.SIGSTOP)
        try:
            with pytest.raises(TimeoutError) as caught:
                threadctx.cancel_task(task_id)
        finally:
            os.killpg(worker.pid, signal.SIGCONT)
        message = str(caught.value)
        assert message.startswith(f"Task {task_id} runs on celery@")
        assert f":{pid}, which did not answer the request to stop it within 1 s" in message
        assert "The request stays in Redis" in message
        # As the message says: once the worker goes on, the task stops at its next check.
        with pytest.raises(TaskCancelled):
            future.result(30)
        assert threadctx.stats() == counts_of(cancelled=1)


def test_a_stop_asked_of_a_killed_worker_times_out_and_the_task_is_found_lost(
    make_web: MakeWeb, workers: StartWorker, client: redis.Redis
) -> None:
    web = make_web(FAST)
    worker = workers("--concurrency", "1", config=FAST)
    with web.app_context():
        future = threadctx.submit(stop_tasks.checking, "killed")
        [(task_id, _)] = started(client)
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()
        with pytest.raises(TimeoutError, match=rf"^Task {task_id} runs on celery@"):
            threadctx.cancel_task(task_id)
        with pytest.raises(celery.exceptions.WorkerLostError):
            future.result(30)
        assert client.exists(f"threadctx:ctx_tasks:stop:{task_id}") == 0  # gone with its end
        assert threadctx.stats() == counts_of(failed=1)


def test_time_limits_stop_a_task_that_checks_and_kill_one_that_does_not(
    make_web: MakeWeb, workers: StartWorker, client: redis.Redis
) -> None:
    """At its limit a task is asked to stop; one that does not is killed by Celery's hard
    limit after the grace of the app that submitted it: ``timed_out`` either way."""
    web = make_web(CONFIG)
    workers("--concurrency", "1", config=CONFIG)
    with web.app_context():
        checking = stop_tasks.checking_within.submit("limit")
        [(checking_id, pid)] = started(client)
        with pytest.raises(TaskTimeout, match=r"ran past its time limit \('time_limit'\) and st"):
            checking.result(30)
        assert checking.task.state == "timed_out"
        assert stop_tasks.quick_within.submit(2, 3).result(30) == 5
        ignoring = stop_tasks.ignoring_past.submit("ignored")
        [(ignoring_id, same_pid)] = started(client)
        assert same_pid == pid  # the first stopped: its process was not killed
        with pytest.raises(TaskTimeout) as caught:
            ignoring.result(30)
        assert str(caught.value).startswith(
            f"Task {ignoring_id} (ignoring_past) ran past its time limit ('time_limit', 1 s) and"
            " did not stop within its grace ('THREADCTX_TIME_LIMIT_GRACE'): at 2 s its worker"
        )
        assert ignoring.task.state == "timed_out"
        assert [record_state(web, i) for i in (checking_id, ignoring_id)] == ["timed_out"] * 2
        assert told(client) == [f"{checking_id} timed_out"]  # the killed one says nothing
        assert threadctx.stats() == counts_of(timed_out=2, succeeded=1)


KILLS = 4
"""Tasks killed by their hard time limit, one after another, in the test of the race."""


def test_a_task_killed_by_its_hard_time_limit_sends_no_signal_and_is_timed_out(
    make_web: MakeWeb, workers: StartWorker, client: redis.Redis
) -> None:
    """Celery's SIGTERM raises ``SystemExit`` in the task 0.1 s before its SIGKILL: the task
    is not booked or signalled as failed meanwhile, in the killed process; its worker's main
    process books it ``timed_out``. With one pool process, each task starts only once the
    one before it was killed, and whatever that one sent had been sent."""
    web = make_web(CONFIG)
    workers("--concurrency", "1", config=CONFIG)
    killed = []
    with web.app_context():
        for _ in range(KILLS):
            future = stop_tasks.sleeping_past.submit()
            [(task_id, _)] = started(client)
            with pytest.raises(TaskTimeout, match=rf"^Task {task_id} \(sleeping_past\) ran past"):
                future.result(30)
            assert future.task.state == "timed_out"
            killed.append(task_id)
        assert stop_tasks.quick_within.submit(2, 3).result(30) == 5  # the last one is gone
        assert [record_state(web, task_id) for task_id in killed] == ["timed_out"] * KILLS
        assert told(client) == []
        [quick] = [_text(item) for item in client.lrange("finished", 0, -1)]
        assert quick.endswith(" succeeded")
        assert threadctx.stats() == counts_of(timed_out=KILLS, succeeded=1)


AGAIN = 10
"""Tasks stopped, then asked to stop again by a process that has not heard of their end."""


def test_a_stop_of_a_task_stopped_before_returns_false_where_its_end_is_not_heard_yet(
    make_web: MakeWeb, workers: StartWorker, lagging: Lagging, client: redis.Redis
) -> None:
    """The other process watches each task as it runs, and its listener is held before it
    applies the task's end (as a listener that lags): the end recorded before its request,
    it answers ``False``, as for any task that had finished."""
    web = make_web(CONFIG)
    workers("--concurrency", "1", config=CONFIG)
    lagged, stopped = 0, []
    with web.app_context():
        for i in range(AGAIN):
            future = threadctx.submit(stop_tasks.checking, f"again-{i}")
            [(task_id, _)] = started(client)
            assert lagging.ask("watch", task_id) == ["running"]
            assert threadctx.cancel_task(task_id) is True
            with pytest.raises(TaskCancelled):
                future.result(30)
            assert record_state(web, task_id) == "cancelled"
            stopped.append(task_id)
            answer, heard = lagging.ask("cancel", task_id)
            assert answer == "False"
            lagged += heard == "False"
        # task_cancelled once each, where it ran: the second stop changed nothing
        assert told(client) == [f"{task_id} cancelled" for task_id in stopped]
        assert threadctx.stats() == counts_of(cancelled=AGAIN)
    print(f"asked before the other process heard of the end: {lagged} of {AGAIN}")


def test_a_cancel_of_a_task_cancelled_before_it_started_returns_false_and_sends_nothing(
    make_web: MakeWeb, lagging: Lagging, client: redis.Redis
) -> None:
    """Each task, delayed, is cancelled here; the other process, which had its future and
    whose listener is held before it hears the cancel (as a listener that lags), cancels
    it again: ``False``, as for any task that had finished; its future is cancelled there
    too; ``task_cancelled`` was sent once, here, by the cancel that took."""
    web = make_web(CONFIG)
    cancelled = []
    with web.app_context():
        for _ in range(AGAIN):
            future = stop_tasks.quick_within.submit_with_options(args=(2, 3), countdown=3600)
            task_id = future.task.id
            app_state(web).backend("celery").flush_records()  # the other process knows it
            assert lagging.ask("watch", task_id) == ["pending"]
            assert threadctx.cancel_task(task_id) is True
            assert future.cancelled() is True
            cancelled.append(task_id)
            assert lagging.ask("cancel", task_id) == ["False", "True"]
        assert [record_state(web, task_id) for task_id in cancelled] == ["cancelled"] * AGAIN
        assert told(client) == [f"{task_id} cancelled" for task_id in cancelled]
        assert threadctx.stats() == counts_of(cancelled=AGAIN)


def test_cancels_racing_in_threads_of_one_process_book_the_task_once(
    make_web: MakeWeb, client: redis.Redis
) -> None:
    """Four threads cancel each delayed task at once: it is cancelled, booked and signalled
    once, whichever claim won."""
    web = make_web(CONFIG)
    cancelled = []

    def cancel(future: TaskFuture[int]) -> bool:
        with web.app_context():
            return future.cancel()

    with web.app_context(), concurrent.futures.ThreadPoolExecutor(4) as cancellers:
        for _ in range(AGAIN * 3):
            future = stop_tasks.quick_within.submit_with_options(args=(2, 3), countdown=3600)
            answers = list(cancellers.map(cancel, [future] * 4))
            assert (True in answers, future.cancelled()) == (True, True)
            cancelled.append(future.task.id)
        assert told(client) == [f"{task_id} cancelled" for task_id in cancelled]
        assert [record_state(web, task_id) for task_id in cancelled] == ["cancelled"] * AGAIN * 3
        assert threadctx.stats() == counts_of(cancelled=AGAIN * 3)
