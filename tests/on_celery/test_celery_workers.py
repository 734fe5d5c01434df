"""The Celery backend with separate ``flask threadctx worker`` processes (prefork pool)."""

from __future__ import annotations

import collections.abc as cabc
import concurrent.futures
import gc
import itertools
import json
import logging
import os
import signal
import subprocess
import threading
import time
import typing as t
from pathlib import Path

import celery.exceptions
import ctx_tasks
import flask
import pytest
import redis
from flask_threadctx import Progress
from flask_threadctx import TaskFuture
from flask_threadctx.app_state import app_state
from flask_threadctx.backends.celery.state import CeleryTaskInfo
from flask_threadctx.cli import _when
from harness import RedisServer
from harness import start_cli_worker

pytestmark = pytest.mark.integration  # separate worker processes: not in the fast loop

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
        worker.wait(10)
    except subprocess.TimeoutExpired:
        # Now and then a pool process waits up to 30 s for the main process to read its last
        # messages (billiard's exit check); every result is in Redis already.
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()


@pytest.fixture
def web(worker_env: dict[str, str]) -> cabc.Iterator[flask.Flask]:
    os.environ["THREADCTX_TEST_REDIS"] = worker_env["THREADCTX_TEST_REDIS"]
    app = ctx_tasks.create_app()
    yield app
    app_state(app).default.shutdown()


@pytest.fixture
def workers(worker_env: dict[str, str], tmp_path: Path) -> cabc.Iterator[StartWorker]:
    started: list[tuple[subprocess.Popen[bytes], t.IO[bytes]]] = []

    def start(
        *options: str,
        app: str = "ctx_tasks",
        celery: dict[str, t.Any] | None = None,
        config: dict[str, t.Any] | None = None,
    ) -> subprocess.Popen[bytes]:
        path = tmp_path / f"worker-{len(started)}.log"
        log = path.open("wb")
        env = {
            **worker_env,
            "THREADCTX_TEST_CELERY": json.dumps(celery or {}),
            "THREADCTX_TEST_CONFIG": json.dumps(config or {}),
        }
        worker = start_cli_worker(env, log, *options, app=app)
        started.append((worker, log))
        wait_until_ready(worker, path)
        return worker

    yield start
    for worker, log in started:
        if worker.poll() is None:
            stop(worker)
        log.close()


class StartWorker(t.Protocol):
    def __call__(
        self,
        *options: str,
        app: str = ...,
        celery: dict[str, t.Any] | None = ...,
        config: dict[str, t.Any] | None = ...,
    ) -> subprocess.Popen[bytes]: ...


def test_nested_waits_on_a_worker_with_one_process(web: flask.Flask, workers: StartWorker) -> None:
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


def test_progress_of_a_child_its_parent_ran_reaches_the_records(
    web: flask.Flask, workers: StartWorker
) -> None:
    workers("--concurrency", "1")  # the one process runs the parent: it runs the child too
    with web.app_context():
        child_id = threadctx.submit(ctx_tasks.parent_of_reporter).result(60)
        child = threadctx.get_task(child_id)
    assert child is not None and child.done()
    assert (child.task.state, child.task.progress) == ("succeeded", Progress(3, 4, "child"))


def test_a_function_missing_on_the_worker_fails_its_task_at_once(
    worker_env: dict[str, str], workers: StartWorker
) -> None:
    """Deploy skew: the worker's own LookupError, as the task's error, not a lost worker."""
    worker_env["THREADCTX_TEST_SKEW"] = "1"
    workers("--concurrency", "1")
    os.environ["THREADCTX_TEST_REDIS"] = worker_env["THREADCTX_TEST_REDIS"]
    web = ctx_tasks.create_app({"THREADCTX_CELERY_HEARTBEAT": 3600})  # no verdict meanwhile
    try:
        with web.app_context():
            future = threadctx.submit(ctx_tasks.only_in_web)
            with pytest.raises(
                LookupError,
                match=r"^The task function 'ctx_tasks:only_in_web' cannot be imported in this"
                r" process: module 'ctx_tasks' has no attribute 'only_in_web'\. Deploy the same"
                r" code to the web and worker processes\.$",
            ):
                future.result(60)
            assert future.task.state == "failed"
            counts = threadctx.stats()
            assert (counts["failed"], counts["succeeded"], counts["running"]) == (1, 0, 0)
    finally:
        app_state(web).default.shutdown()


def test_an_exception_that_cannot_say_what_it_is_arrives_as_itself(
    worker_env: dict[str, str], workers: StartWorker
) -> None:
    """Its ``str()`` raises (and its ``repr()``): it is the task's error all the same, not a
    lost worker a heartbeat later."""
    workers("--concurrency", "1")
    os.environ["THREADCTX_TEST_REDIS"] = worker_env["THREADCTX_TEST_REDIS"]
    web = ctx_tasks.create_app({"THREADCTX_CELERY_HEARTBEAT": 3600})  # no verdict meanwhile
    try:
        with web.app_context():
            for cls in (ctx_tasks.NoStr, ctx_tasks.NoText):
                future = threadctx.submit(ctx_tasks.raise_no_text, cls.__name__)
                error = future.exception(30)
                assert (type(error), error.args) == (cls, ("code 7",))  # type: ignore[union-attr]
                assert future.task.state == "failed"
                records = app_state(web).backend("celery").records
                record = records.get(future.task.id)
                assert record is not None
                assert (record.state, record.error) == (
                    "failed",
                    f"{cls.__name__}: <exception str() failed>",
                )
            counts = threadctx.stats()
            assert (counts["failed"], counts["succeeded"], counts["running"]) == (2, 0, 0)
    finally:
        app_state(web).default.shutdown()


def test_time_limits_reach_the_worker(web: flask.Flask, workers: StartWorker) -> None:
    """A hard limit's kill fails the future at once, with a clear error, booked once; a soft
    limit interrupts the task, which may clean up."""
    workers("--concurrency", "1")
    url = os.environ["THREADCTX_TEST_REDIS"]
    with web.app_context():
        killed = ctx_tasks.past_hard_limit.submit("hard", url)
        with pytest.raises(celery.exceptions.TimeLimitExceeded) as caught:
            killed.result(60)
        assert caught.value.args[0].startswith(
            f"task {killed.task.id} (past_hard_limit) ran past its hard time limit"
            " ('time_limit', 1 s) on "
        )
        assert ctx_tasks.past_soft_limit.submit("soft", url).result(60) == "cleaned up"
        # By now the worker's main process has handled the kill, and booked it.
        counts = threadctx.stats()
        assert (counts["failed"], counts["succeeded"], counts["running"]) == (1, 1, 0)
        record = threadctx.get_task(killed.task.id)
        assert record is not None and record.task.state == "failed"


def test_timed_waits_on_a_saturated_prefork_worker(web: flask.Flask, workers: StartWorker) -> None:
    """Six parents on two processes, each waiting for its children with a timeout."""
    workers("--concurrency", "2")
    with web.app_context():
        parents = [threadctx.submit(ctx_tasks.parent_of_timed, 2, 30) for _ in range(6)]
        assert [parent.result(60) for parent in parents] == [[1, 2]] * 6


def test_isolation_between_requests_on_two_worker_processes(
    web: flask.Flask, workers: StartWorker
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


def test_the_first_submits_of_a_process_from_many_threads_all_get_their_results(
    worker_env: dict[str, str], workers: StartWorker
) -> None:
    """The burst a freshly forked server process sees: its first submits come from several
    request threads at once, and each must name the reply channel the one listener hears.
    (Once, each thread made a channel of its own and one result in a burst went unheard.)"""
    workers("--concurrency", "2")
    os.environ["THREADCTX_TEST_REDIS"] = worker_env["THREADCTX_TEST_REDIS"]
    threads = 8

    def first_submit(app: flask.Flask, start: threading.Barrier, a: int, b: int) -> int:
        with app.app_context():
            start.wait()
            return threadctx.submit(ctx_tasks.add, a, b).result(30)

    for burst in range(100):
        app = ctx_tasks.create_app()
        start = threading.Barrier(threads)
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            results = [
                future.result()
                for future in [
                    pool.submit(first_submit, app, start, 100 * burst, i) for i in range(threads)
                ]
            ]
        assert results == [100 * burst + i for i in range(threads)]
        app_state(app).default.shutdown()


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
    workers: StartWorker, worker_env: dict[str, str], redis_url: str
) -> None:
    """With Celery's default early acknowledgement nobody would ever run the task again: once
    its sign of life runs out, the submitter fails its future naming the lost worker, and the
    records count it failed. A task that only runs long is left alone."""
    fast = {"THREADCTX_CELERY_HEARTBEAT": 1}
    os.environ["THREADCTX_TEST_REDIS"] = worker_env["THREADCTX_TEST_REDIS"]
    web = ctx_tasks.create_app(fast)
    worker = workers("--concurrency", "2", config=fast)
    client = redis.Redis.from_url(redis_url)
    try:
        with web.app_context():
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
            _, records = app_state(web).backend("celery")._connect()
            record = records.get(doomed.task.id)
            assert record is not None and record.started_at is not None
            assert record.finished_at is not None
            assert record.started_at <= record.finished_at <= heard - 1
            stats = threadctx.stats()
            assert (stats["failed"], stats["running"]) == (2, 0)
            with pytest.raises(celery.exceptions.WorkerLostError):
                slow.result(30)
    finally:
        with web.app_context():
            threadctx.shutdown()


def test_a_frozen_worker_is_said_gone_or_frozen_and_its_late_end_is_logged_not_booked(
    workers: StartWorker, worker_env: dict[str, str], redis_url: str, tmp_path: Path
) -> None:
    """A worker stopped (SIGSTOP of its process group: docker pause, a VM frozen) for two
    heartbeats cannot be told from a lost one: the verdict says both, and the end the task
    reaches once its worker goes on is ignored, in the worker's log, booked once."""
    fast = {"THREADCTX_CELERY_HEARTBEAT": 1}
    os.environ["THREADCTX_TEST_REDIS"] = worker_env["THREADCTX_TEST_REDIS"]
    web = ctx_tasks.create_app(fast)
    worker = workers("--concurrency", "1", config=fast)
    client = redis.Redis.from_url(redis_url)
    try:
        with web.app_context():
            before = threadctx.stats()
            frozen = threadctx.submit(ctx_tasks.wait_for_signal, "frozen", redis_url)
            assert client.blpop(["frozen"], timeout=60) is not None
            _, records = app_state(web).backend("celery")._connect()
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
    finally:
        with web.app_context():
            threadctx.shutdown()


def test_a_task_revoked_with_celerys_own_tools_is_cancelled(
    web: flask.Flask, workers: StartWorker, redis_url: str
) -> None:
    workers("--concurrency", "1")
    client = redis.Redis.from_url(redis_url)
    with web.app_context():
        blocker = threadctx.submit(ctx_tasks.wait_for_signal, "busy", redis_url)
        popped = client.blpop(["busy"], timeout=60)  # the one process is busy
        assert popped is not None
        before = threadctx.stats()
        queued = threadctx.submit(ctx_tasks.add, 1, 2)
        made = app_state(web).backend("celery").celery
        replies = made.control.revoke(queued.task.id, reply=True, timeout=10, limit=1)
        assert len(replies) == 1  # the worker knows before it could start the task
        client.rpush("busy:go", 1)
        assert blocker.result(60) == int(popped[1])
        with pytest.raises(concurrent.futures.CancelledError):
            queued.result(60)
        assert queued.task.state == "cancelled"
        after = threadctx.stats()
    assert {key: after[key] - before[key] for key in after} == {
        "submitted": 1,
        "queued": 0,
        "running": -1,  # the blocker
        "succeeded": 1,
        "failed": 0,
        "cancelled": 1,
        "rejected": 0,
    }


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


def test_users_own_celery_app_takes_the_tasks_marked_for_it(
    workers: StartWorker, worker_env: dict[str, str]
) -> None:
    """A threads-first app (``THREADCTX_CELERY_APP``, the user's own Celery app) sends what
    ``task(backend="celery")`` marks to a worker, with the request, from a view."""
    os.environ["THREADCTX_TEST_REDIS"] = worker_env["THREADCTX_TEST_REDIS"]
    web = ctx_tasks.create_mixed_app()
    workers("--concurrency", "1", app="ctx_tasks:create_mixed_app")
    try:
        response = web.test_client().post("/heavy?x=1", json={"n": 1}, headers={"X-Custom": "c"})
        with web.app_context():
            heavy = threadctx.get_task(response.json["task"])  # type: ignore[index]
            here = threadctx.get_task(response.json["here"])  # type: ignore[index]
            assert heavy is not None and here is not None
            seen = heavy.result(60)
            assert here.result(60) == os.getpid()  # the default backend: a thread here
            assert threadctx.stats(backend="celery")["succeeded"] == 1
        assert seen["pid"] != os.getpid()
        assert (seen["tag"], seen["path"], seen["args"], seen["json"]) == (
            "heavy",
            "/heavy",
            {"x": ["1"]},
            {"n": 1},
        )
        assert (seen["g"], seen["custom_header"], seen["label"]) == (
            {"user": "ada"},
            "c",
            "POST /heavy",
        )
        assert ctx_tasks.own_celery.tasks["flask_threadctx.run"].name == "flask_threadctx.run"
    finally:
        with web.app_context():
            threadctx.shutdown()  # both backends


def test_a_task_holding_the_gil_past_the_heartbeat_is_left_alone(
    workers: StartWorker, worker_env: dict[str, str], redis_url: str, tmp_path: Path
) -> None:
    """A long C call (or regular expression) starves every thread of its process, that of
    its heartbeat too: the worker's main process beats for it. The task is not declared lost
    and is booked once, succeeded."""
    fast = {"THREADCTX_CELERY_HEARTBEAT": 1}
    os.environ["THREADCTX_TEST_REDIS"] = worker_env["THREADCTX_TEST_REDIS"]
    web = ctx_tasks.create_app(fast)
    workers("--concurrency", "1", config=fast)
    client = redis.Redis.from_url(redis_url)
    fifo = tmp_path / "gil"
    os.mkfifo(fifo)
    try:
        with web.app_context():
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
    finally:
        with web.app_context():
            threadctx.shutdown()


def wait_for_log(path: Path, text: bytes, count: int) -> None:
    deadline = time.monotonic() + 60
    while path.read_bytes().count(text) < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"{count} x {text!r} not in the worker's log:\n{path.read_text()}")
        time.sleep(0.05)  # the worker tells only its log


def test_pool_processes_killed_while_the_main_process_looks_away_are_booked_once(
    workers: StartWorker, worker_env: dict[str, str], redis_url: str, tmp_path: Path
) -> None:
    """The submitter finds the tasks lost first; the worker's main process, which notices
    its dead pool processes late, says so too: each task is counted failed once."""
    fast = {"THREADCTX_CELERY_HEARTBEAT": 1}
    os.environ["THREADCTX_TEST_REDIS"] = worker_env["THREADCTX_TEST_REDIS"]
    web = ctx_tasks.create_app(fast)
    worker = workers("--concurrency", "2", config=fast)
    client = redis.Redis.from_url(redis_url)
    try:
        with web.app_context():
            futures = [
                threadctx.submit(ctx_tasks.wait_for_signal, f"pool-{n}", redis_url)
                for n in range(2)
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
    finally:
        with web.app_context():
            threadctx.shutdown()


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
    workers: StartWorker, worker_env: dict[str, str], redis_url: str
) -> None:
    """A warm shutdown gives the tasks the worker received and did not start back to the
    broker at once: they are not said to wait for a redelivery, and the next worker runs
    them."""
    fast = {"THREADCTX_CELERY_HEARTBEAT": 1}
    os.environ["THREADCTX_TEST_REDIS"] = worker_env["THREADCTX_TEST_REDIS"]
    web = ctx_tasks.create_app(fast)
    first = workers("--concurrency", "1", config=fast)
    client = redis.Redis.from_url(redis_url)
    try:
        with web.app_context():
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
            workers("--concurrency", "1", config=fast)
            assert [future.result(60) for future in held] == [1, 2]
    finally:
        with web.app_context():
            threadctx.shutdown()
