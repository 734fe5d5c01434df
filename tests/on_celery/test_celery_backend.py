"""The Celery backend's submitting side against a real Redis, with a worker in the test process
(threads pool): results, cancelling, signals, lookups from another process, eager mode, the
Celery app it loads, and ``flask threadctx worker --help``."""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys
import typing as t

import ctx_tasks
import flask
import pytest
import redis
from flask_threadctx import task_finished
from flask_threadctx import task_started
from flask_threadctx import task_submitted
from flask_threadctx import TaskFuture
from harness import HERE
from harness import RedisServer
from harness import submit_from_request

threadctx = ctx_tasks.threadctx


@pytest.mark.usefixtures("app_ctx")
def test_result_and_task_info() -> None:
    future = threadctx.submit(ctx_tasks.add, 2, 3)
    assert isinstance(future, TaskFuture)
    assert future.result(30) == 5
    assert future.task.state == "succeeded"
    assert future.task.name == "add"
    assert threadctx.get_task(future.task.id) is future


def test_submits_from_many_threads_at_once(app: flask.Flask) -> None:
    """Each thread subscribes on the listener's connection while it reads: no result is lost
    or given to the wrong future."""

    def submit_many(base: int) -> list[TaskFuture[int]]:
        with app.app_context():
            return [threadctx.submit(ctx_tasks.add, base, i) for i in range(25)]

    for _ in range(3):
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            batches = list(pool.map(submit_many, range(0, 8000, 1000)))
        results = [[future.result(60) for future in batch] for batch in batches]
        assert results == [[base + i for i in range(25)] for base in range(0, 8000, 1000)]


@pytest.mark.usefixtures("app_ctx")
def test_cancel_before_start_and_not_after(redis_server: RedisServer) -> None:
    before = threadctx.stats()
    waiting = ctx_tasks.later.submit(1)
    assert waiting.cancel() is True
    assert waiting.cancelled()
    with pytest.raises(concurrent.futures.CancelledError):
        waiting.result(0)
    assert waiting.task.state == "cancelled"

    client = redis.Redis.from_url(redis_server.url)
    key = f"started-{id(waiting)}"
    running = threadctx.submit(ctx_tasks.wait_for_signal, key, redis_server.url)
    assert client.blpop([key], timeout=30) is not None  # the task runs
    assert running.cancel() is False
    client.rpush(key + ":go", 1)
    assert running.result(30) == os.getpid()
    after = threadctx.stats()
    assert after["cancelled"] - before["cancelled"] == 1
    assert after["succeeded"] - before["succeeded"] == 1
    with flask.current_app.app_context():
        assert threadctx.get_task(waiting.task.id).cancelled()  # type: ignore[union-attr]


def test_signals_on_both_sides(app: flask.Flask) -> None:
    seen: list[tuple[str, t.Any]] = []

    def submitted(sender: flask.Flask, task: t.Any) -> None:
        seen.append(("submitted", task.id))

    def started(sender: flask.Flask, task: t.Any) -> None:
        seen.append(("started", flask.request.path))

    def finished(sender: flask.Flask, task: t.Any, result: t.Any, exception: t.Any) -> None:
        seen.append(("finished", result))

    with (
        task_submitted.connected_to(submitted, app),
        task_started.connected_to(started, app),
        task_finished.connected_to(finished, app),
    ):
        future = submit_from_request(app, ctx_tasks.add, 1, 1, path="/signals")
        future.result(30)
    # The worker runs in another thread and may start the task before 'task_submitted' is sent.
    assert sorted(seen) == [("finished", 2), ("started", "/signals"), ("submitted", future.task.id)]
    assert seen.index(("started", "/signals")) < seen.index(("finished", 2))


def test_get_task_and_stats_from_another_process(
    app: flask.Flask, worker_env: dict[str, str]
) -> None:
    with app.app_context():
        done = threadctx.submit(ctx_tasks.add, 20, 22)
        done.result(30)
        failed = threadctx.submit(ctx_tasks.fail, "no")
        with pytest.raises(LookupError):
            failed.result(30)
        stats = threadctx.stats()
    script = (
        "import json, sys, ctx_tasks\n"
        "app = ctx_tasks.create_app()\n"
        "with app.app_context():\n"
        "    ext = ctx_tasks.threadctx\n"
        "    done, failed = (ext.get_task(i) for i in sys.argv[1:3])\n"
        "    print(json.dumps([done.task.state, done.result(30), failed.task.state,\n"
        "        repr(failed.exception(30)), ext.get_task('nope'), ext.stats()]))\n"
    )
    env = dict(worker_env, THREADCTX_TEST_REDIS=app.config["THREADCTX_CELERY"]["result_backend"])
    out = subprocess.run(
        [sys.executable, "-c", script, done.task.id, failed.task.id],
        env=env,
        cwd=HERE,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert json.loads(out) == ["succeeded", 42, "failed", "LookupError('no')", None, stats]


@pytest.mark.usefixtures("app_ctx")
def test_timed_waits_on_a_saturated_worker_run_the_child_and_hold_the_timeout() -> None:
    """Both worker threads run a parent that waits for a child with a timeout: each runs its
    child on a helper thread. With a timeout long enough, the child's result; with a short
    one, the timeout, while the child runs on and ends later."""
    url = os.environ["THREADCTX_TEST_REDIS"]
    client = redis.Redis.from_url(url)
    for round_, timeout in enumerate([30.0, 0.2, 30.0, 0.2]):
        key = f"timed-{round_}"
        if timeout > 1:
            client.rpush(key + ":child:go", "go", "go")  # the children return at once
        parents = [threadctx.submit(ctx_tasks.timed_parent, key, url, timeout) for _ in range(2)]
        for _ in parents:  # both worker threads are taken: no worker can take a child
            assert client.blpop([key], timeout=30) is not None
        client.rpush(key + ":go", "go", "go")
        outcomes = [parent.result(60) for parent in parents]
        if timeout > 1:
            assert [outcome[0] for outcome in outcomes] == ["done", "done"]
            for outcome in outcomes:
                assert outcome[1].startswith("threadctx-helper-")
        else:
            assert [outcome[0] for outcome in outcomes] == ["timed out", "timed out"]
            client.rpush(key + ":child:go", "go", "go")
            for _, child_id in outcomes:
                child = threadctx.get_task(child_id)
                assert child is not None
                assert child.result(30) == f"threadctx-helper-{child_id}"
                assert child.task.state == "succeeded"


def test_eager_checks_the_boundary_and_runs_in_fresh_contexts() -> None:
    app = ctx_tasks.create_app(
        {
            "THREADCTX_EAGER": True,
            "THREADCTX_CELERY": {
                "broker_url": "redis://127.0.0.1:1/0",
                "result_backend": "redis://127.0.0.1:1/0",
            },
        }
    )
    with app.test_request_context("/orders/1?q=1", method="POST", json={"k": "v"}):
        view_request = flask.request._get_current_object()  # type: ignore[attr-defined]
        flask.g.user = "ada"
        future = threadctx.submit(ctx_tasks.describe, "eager")
        assert future.done()
        seen = future.result()
        assert (seen["args"], seen["json"], seen["g"]) == (
            {"q": ["1"]},
            {"k": "v"},
            {"user": "ada"},
        )
        current = flask.request._get_current_object()  # type: ignore[attr-defined]
        assert current is view_request
        assert threadctx.get_task(future.task.id) is future
        with pytest.raises(TypeError, match="it is a lambda"):
            threadctx.submit(lambda: None)
        with pytest.raises(TypeError, match="returned <object"):
            threadctx.submit(ctx_tasks.returns_object).result()
        assert threadctx.stats()["succeeded"] == 1


@pytest.mark.parametrize(
    ("path", "error", "message"),
    [
        (
            "ctx_tasks:no_such_celery",
            RuntimeError,
            "'THREADCTX_CELERY_APP' = 'ctx_tasks:no_such_celery': ",
        ),
        (
            "ctx_tasks:add",
            TypeError,
            "'THREADCTX_CELERY_APP' = 'ctx_tasks:add' is <function add at ",
        ),
    ],
)
def test_a_wrong_celery_app_path_is_named_at_first_use(
    path: str, error: type[Exception], message: str
) -> None:
    # Found at first use, not by init_app: the module of a Celery app often imports the
    # Flask app's own modules, which would be a circular import there.
    app = ctx_tasks.create_app({"THREADCTX_CELERY": None, "THREADCTX_CELERY_APP": path})
    with app.app_context(), pytest.raises(error) as caught:
        threadctx.submit(ctx_tasks.add, 1, 2)
    assert str(caught.value).startswith(message)
    with app.app_context():
        threadctx.shutdown()


def test_worker_help_says_whose_options_follow(app: flask.Flask) -> None:
    result = app.test_cli_runner().invoke(args=["threadctx", "worker", "--help"])
    assert result.exit_code == 0, result.output
    ours, celerys = result.output.split("The options of 'celery worker':")
    assert ours.startswith("Usage: ctx_tasks threadctx worker [OPTIONS]")  # the runner's name
    assert "Any options are those of 'celery worker', listed below" in " ".join(ours.split())
    assert "--concurrency" in celerys
