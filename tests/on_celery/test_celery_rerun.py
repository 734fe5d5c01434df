"""Re-running a task with Redis: on threads with the Redis store, and a Celery task on a real
worker, its request snapshot arriving there as the original's did."""

from __future__ import annotations

import base64
import collections.abc as cabc
import json
import os
import subprocess
import sys
import typing as t
from pathlib import Path

import flask
import pytest
import redis
import rerun_tasks
from flask_threadctx import TaskFuture
from flask_threadctx.app_state import app_state
from flask_threadctx.stores import flush
from harness import StartWorker
from rerun_tasks import echo
from rerun_tasks import threadctx

pytestmark = pytest.mark.integration  # separate worker processes: not in the fast loop

HERE = Path(__file__).parent

HEADERS = {
    "X-Trace": "t-1",
    "Accept-Language": "fr",
    "Authorization": "Bearer s3cret-token",
    "Cookie": "session=c00kie-value",
    "Proxy-Authorization": "Basic pr0xy",
    "X-Csrf-Token": "csrf-value",
}
SECRETS = ("s3cret-token", "c00kie-value", "pr0xy", "csrf-value")
LEFT_BEHIND = {"Authorization", "Cookie", "Proxy-Authorization", "X-Csrf-Token"}


def seen(future: TaskFuture[t.Any]) -> dict[str, t.Any]:
    return t.cast("dict[str, t.Any]", future.result(timeout=60))


def submit_in_request(app: flask.Flask, *args: t.Any, **kwargs: t.Any) -> TaskFuture[t.Any]:
    with app.test_request_context(
        "/orders/7?page=2&tag=a&tag=b",
        method="POST",
        json={"qty": 3, "note": "caf\u00e9"},
        headers=HEADERS,
        base_url="https://shop.example",
    ):
        return echo.submit(*args, **kwargs)


def raw(redis_url: str, task_id: str, field: str) -> str | None:
    client = redis.Redis.from_url(redis_url)
    try:
        value = client.hget(f"threadctx:rerun_tasks:task:{task_id}", field)
    finally:
        client.close()
    return None if value is None else t.cast(bytes, value).decode()


@pytest.fixture
def made(redis_url: str) -> cabc.Iterator[list[flask.Flask]]:
    os.environ["THREADCTX_TEST_REDIS"] = redis_url
    apps: list[flask.Flask] = []
    yield apps
    for app in apps:
        app_state(app).default.shutdown()


def test_a_thread_task_rerun_with_the_redis_store(redis_url: str, made: list[flask.Flask]) -> None:
    app = rerun_tasks.create_app(
        {
            "THREADCTX_BACKEND": "threads",
            "THREADCTX_CELERY": None,
            "THREADCTX_TASK_STORE": redis_url,
        }
    )
    made.append(app)
    original = submit_in_request(app, 1, "caf\udce9", key={"a": [True, None]})
    first = seen(original)
    with app.app_context():
        again = threadctx.rerun(original.task.id)
        second = seen(again)
        twice = threadctx.rerun(again.task.id)
        seen(twice)
        flush(app)
        store = app_state(app).recorder.store  # type: ignore[union-attr]
        records = [store.get(f.task.id) for f in (original, again, twice)]
        plain = threadctx.submit(rerun_tasks.echo.fn, 1)
        plain.result(timeout=60)
        with pytest.raises(ValueError, match="not submitted rerunnable"):
            threadctx.rerun(plain.task.id)
        with pytest.raises(LookupError, match="No task 'gone'"):
            threadctx.rerun("gone")
    assert second["backend"] == first["backend"] == "threads"
    assert second["args"] == first["args"] == [1, "caf\udce9"]
    assert second["kwargs"] == first["kwargs"]
    for name in ("method", "path", "url", "args", "json"):
        assert second["request"][name] == first["request"][name], name
    headers = [(k, v) for k, v in first["request"]["headers"] if k not in LEFT_BEHIND]
    assert second["request"]["headers"] == headers
    assert [r.rerun_of for r in records] == [None, original.task.id, again.task.id]  # type: ignore[union-attr]
    assert all("rerun" not in r.as_dict() for r in records)  # type: ignore[union-attr]
    stored = raw(redis_url, original.task.id, "rerun")
    assert stored is not None and "t-1" in stored and stored.isascii()
    assert not any(secret in stored for secret in SECRETS)
    assert raw(redis_url, again.task.id, "rerun_of") == original.task.id


def test_a_celery_task_rerun_on_a_worker(
    redis_url: str, made: list[flask.Flask], workers: StartWorker, worker_env: dict[str, str]
) -> None:
    workers(app="rerun_tasks")
    app = rerun_tasks.create_app()
    made.append(app)
    original = submit_in_request(app, 1, "two", key={"a": [1.5]})
    first = seen(original)
    with app.app_context():
        again = threadctx.rerun(original.task.id)
        second = seen(again)
        flush(app)
        record = app_state(app).recorder.store.get(again.task.id)  # type: ignore[union-attr]
        found = threadctx.get_task(again.task.id)
    assert first["backend"] == second["backend"] == "celery"
    assert first["pid"] != os.getpid() and second["pid"] != os.getpid()
    # The request arrives on the worker as the original's did, exactly.
    for name in ("method", "path", "url", "args", "headers", "json"):
        assert second["request"][name] == first["request"][name], name
    assert first["request"]["path"] == "/orders/7"
    assert first["request"]["args"] == {"page": ["2"], "tag": ["a", "b"]}
    assert ["X-Trace", "t-1"] in first["request"]["headers"]
    assert not LEFT_BEHIND & {name for name, _ in first["request"]["headers"]}
    assert (second["args"], second["kwargs"]) == ([1, "two"], {"key": {"a": [1.5]}})
    assert again.task.rerun_of == original.task.id
    assert record is not None and record.rerun_of == original.task.id
    assert record.state == "succeeded" and record.backend == "celery"
    assert found is not None and found.task.rerun_of == original.task.id
    assert "rerun" not in record.as_dict()
    for task_id in (original.task.id, again.task.id):
        stored = raw(redis_url, task_id, "rerun")
        assert stored is not None and not any(secret in stored for secret in SECRETS)
        _, path, args, kwargs, meta = json.loads(stored)
        assert (path, args, kwargs) == ("rerun_tasks:echo", [1, "two"], {"key": {"a": [1.5]}})
        kept = meta["context"]["request"]
        assert ["X-Trace", "t-1"] in kept["headers"]
        assert json.loads(base64.b64decode(kept["body"])) == {"qty": 3, "note": "caf\u00e9"}
        assert set(meta["context"]) == {"request"}  # no g, no session
        assert meta["options"] == {
            "max_retries": 1,
            "retry_for": ["builtins:LookupError"],
            "rerunnable": True,
        }
    # From another process (a CLI, say): a re-run of the re-run, linked to it.
    script = (
        "import json, sys, rerun_tasks\n"
        "app = rerun_tasks.create_app()\n"
        "with app.app_context():\n"
        "    future = rerun_tasks.threadctx.rerun(sys.argv[1])\n"
        "    print(json.dumps([future.task.rerun_of, future.result(60)]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, again.task.id],
        env=worker_env,
        cwd=HERE,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    rerun_of, third = json.loads(done.stdout.splitlines()[-1])
    assert rerun_of == again.task.id
    assert third["backend"] == "celery"
    for name in ("method", "path", "url", "args", "headers", "json"):
        assert third["request"][name] == first["request"][name], name
