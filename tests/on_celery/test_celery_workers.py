"""Tasks on separate ``flask threadctx worker`` processes (prefork pool), as in production: what
runs there and how it comes back, time limits, requests kept apart, Celery's own revoke, and
the user's own Celery app."""

from __future__ import annotations

import concurrent.futures
import itertools
import os
import threading

import ctx_tasks
import flask
import pytest
import redis
from flask_threadctx import Progress
from flask_threadctx import TaskCancelled
from flask_threadctx import TaskTimeout
from flask_threadctx.app_state import app_state
from harness import StartWorker

pytestmark = pytest.mark.integration  # separate worker processes: not in the fast loop

threadctx = ctx_tasks.threadctx


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
    """A hard limit's kill (at 'time_limit' plus the submitting app's grace) fails the future
    at once, with a clear error, booked once; a soft limit interrupts the task, which may
    clean up."""
    workers("--concurrency", "1")
    url = os.environ["THREADCTX_TEST_REDIS"]
    # A grace of 1 s: the task's Redis client gives up on its wait after 5 s.
    graced = ctx_tasks.create_app({"THREADCTX_TIME_LIMIT_GRACE": 1})
    with graced.app_context():
        killed = ctx_tasks.past_hard_limit.submit("hard", url)
        with pytest.raises(TaskTimeout) as caught:
            killed.result(60)
        assert str(caught.value).startswith(
            f"Task {killed.task.id} (past_hard_limit) ran past its time limit ('time_limit',"
            " 1 s) and did not stop within its grace ('THREADCTX_TIME_LIMIT_GRACE'): at 2 s"
        )
        assert ctx_tasks.past_soft_limit.submit("soft", url).result(60) == "cleaned up"
        # By now the worker's main process has handled the kill, and booked it.
        counts = threadctx.stats()
        assert (counts["timed_out"], counts["succeeded"], counts["running"]) == (1, 1, 0)
        record = threadctx.get_task(killed.task.id)
        assert record is not None and record.task.state == "timed_out"
        threadctx.shutdown()


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
        "retrying": 0,
        "expired": 0,
        "timed_out": 0,
    }


def test_cancel_task_cancels_a_queued_celery_task_and_stops_a_running_one(
    web: flask.Flask, workers: StartWorker, redis_url: str
) -> None:
    workers("--concurrency", "1")
    client = redis.Redis.from_url(redis_url)
    with web.app_context():
        blocker = threadctx.submit(ctx_tasks.wait_for_signal, "busy", redis_url)
        popped = client.blpop(["busy"], timeout=60)  # the one process is busy
        assert popped is not None
        queued = threadctx.submit(ctx_tasks.add, 1, 2)
        assert threadctx.cancel_task(queued.task.id) is True
        # It never checks: it is booked stopped as it returns, its result dropped.
        assert threadctx.cancel_task(blocker.task.id) is True
        client.rpush("busy:go", 1)
        with pytest.raises(TaskCancelled):
            blocker.result(60)
        with pytest.raises(concurrent.futures.CancelledError):
            queued.result(60)
        assert (queued.task.state, threadctx.cancel_task(queued.task.id)) == ("cancelled", False)
        assert threadctx.cancel_task(blocker.task.id) is False  # it finished
        with pytest.raises(LookupError, match=r"^No task 'nope' of "):
            threadctx.cancel_task("nope")


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
