"""``cancel_task`` of a thread task that runs in another process: a real server process
(stop_app.py, Werkzeug's threaded server, one process) runs the tasks; the test process is
another process of the same app, sharing its task store (a SQLite file, then a real Redis), and
stops them. Also a stop racing the task's end, a stopped (SIGSTOP) and a killed process."""

from __future__ import annotations

import collections.abc as cabc
import concurrent.futures
import contextlib
import json
import os
import random
import signal
import sqlite3
import sys
import threading
import time
import typing as t
import urllib.request
from pathlib import Path

import flask
import pytest
import redis
from flask_threadctx import ThreadContext
from flask_threadctx.app_state import app_state

import servers

sys.path.insert(0, str(servers.HERE.parent / "on_celery"))
sys.path.insert(0, str(servers.HERE.parent))
from redis_server import RedisServer

from family import until_seen

RACES = 300


@pytest.fixture(params=["sqlite", "redis"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> cabc.Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'tasks.db'}"
        return
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def runner(store_url: str, tmp_path: Path) -> cabc.Iterator[servers.Server]:
    """The process that runs the tasks."""
    server = servers.start(
        "werkzeug", tmp_path / "seen.sqlite", app="stop_app:create_app()",
        THREADCTX_TEST_STORE=store_url,
    )  # fmt: skip
    yield server
    server.stop()


def asker(store_url: str, **config: t.Any) -> flask.Flask:
    """This process, as another process of the runner's app."""
    app = flask.Flask("stop_app")
    app.config.update(THREADCTX_TASK_STORE=store_url, **config)
    ThreadContext(app)
    return app


@pytest.fixture
def here(store_url: str) -> cabc.Iterator[flask.Flask]:
    app = asker(store_url)
    with app.app_context():
        yield app
    app_state(app).default.shutdown()


def _post(url: str) -> t.Any:
    request = urllib.request.Request(url, method="POST")
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def _leftovers(store_url: str) -> int:
    """The stop requests left in the store."""
    if store_url.startswith("sqlite"):
        path = store_url[len("sqlite:///") :]
        with contextlib.closing(sqlite3.connect(path)) as db:
            return int(db.execute("SELECT count(*) FROM threadctx_stops").fetchone()[0])
    client = redis.Redis.from_url(store_url)
    try:
        return len(t.cast(list[bytes], client.keys("threadctx:*:stops:*")))
    finally:
        client.close()


def _ext(app: flask.Flask) -> ThreadContext:
    return app_state(app).extension


def test_a_running_task_is_stopped_from_another_process(
    runner: servers.Server, here: flask.Flask, store_url: str
) -> None:
    ext = _ext(here)
    task_id = _post(f"{runner.url}/loop")["task"]
    until_seen(ext, task_id, "running")
    assert ext.cancel_task(task_id) is True
    outcome = servers.get_json(f"{runner.url}/outcome/{task_id}")
    assert outcome == (200, {"state": "cancelled", "error": "TaskCancelled", "result": None})
    until_seen(ext, task_id, "cancelled")
    counts = ext.stats()
    assert (counts["submitted"], counts["cancelled"], counts["running"]) == (1, 1, 0)
    assert ext.cancel_task(task_id) is False  # finished: no one is asked
    assert _leftovers(store_url) == 0


def test_a_finished_unknown_or_hostile_task(
    runner: servers.Server, here: flask.Flask, store_url: str
) -> None:
    ext = _ext(here)
    task_id = _post(f"{runner.url}/timed?ms=0")["task"]
    until_seen(ext, task_id, "succeeded")
    assert ext.cancel_task(task_id) is False
    for hostile in ("nope", "\ud800", "x" * 100_000, "' OR 1=1; --", "*", "a\x00b"):
        with pytest.raises(LookupError, match=r"^No task .* of 'stop_app' is known here"):
            ext.cancel_task(hostile)
    assert _leftovers(store_url) == 0


def test_a_stop_racing_the_tasks_end_is_decided_once(
    runner: servers.Server, here: flask.Flask, store_url: str, figures: dict[str, t.Any]
) -> None:
    """Tasks that end 0 to 150 ms after they start, each stopped as soon as the store shows
    it: about as long as a record takes to be seen and a request to be taken, so that the stop
    and the end cross every way. Each answer is the task's end, in the store and in its own
    future: True, cancelled; False, succeeded."""
    ext = _ext(here)
    draw = random.Random(17)

    def race(ms: int) -> tuple[bool, str, t.Any]:
        task_id = _post(f"{runner.url}/timed?ms={ms}")["task"]
        with here.app_context():
            deadline = time.monotonic() + 30
            while ext.get_task(task_id) is None:  # the runner's writer writes every 50 ms
                assert time.monotonic() < deadline
                threading.Event().wait(0.002)
            answer = ext.cancel_task(task_id)
            seen = until_seen(ext, task_id, "cancelled" if answer else "succeeded")
        outcome = servers.get_json(f"{runner.url}/outcome/{task_id}")
        return answer, seen.task.state, outcome

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(race, [draw.randrange(0, 150) for _ in range(RACES)]))
    expected = {
        True: (
            "cancelled",
            (200, {"state": "cancelled", "error": "TaskCancelled", "result": None}),
        ),
        False: ("succeeded", (200, {"state": "succeeded", "error": None, "result": "done"})),
    }
    assert [(state, outcome) for _, state, outcome in results] == [
        expected[answer] for answer, _, _ in results
    ]
    stopped = sum(answer for answer, _, _ in results)
    assert 0 < stopped < RACES  # the stop and the end crossed both ways
    counts = ext.stats()
    assert (counts["cancelled"], counts["succeeded"], counts["running"]) == (
        stopped,
        RACES - stopped,
        0,
    )
    assert _leftovers(store_url) == 0
    figures.update(store=store_url.split(":", maxsplit=1)[0], races=RACES, stopped=stopped)


def test_a_stopped_process_times_out_and_the_withdrawn_request_never_acts(
    runner: servers.Server, store_url: str
) -> None:
    app = asker(store_url, THREADCTX_CANCEL_TIMEOUT=1)
    ext = _ext(app)
    with app.app_context():
        task_id = _post(f"{runner.url}/loop")["task"]
        until_seen(ext, task_id, "running")
        os.kill(runner.process.pid, signal.SIGSTOP)
        try:
            with pytest.raises(TimeoutError) as raised:
                ext.cancel_task(task_id)
        finally:
            os.kill(runner.process.pid, signal.SIGCONT)
        assert str(raised.value).startswith(f"Task {task_id} runs in the process ")
        assert "(1 s): it is stopped, hung, or gone. The request was withdrawn" in str(raised.value)
        # Two rounds of the runner's writer, each of which reads the requests to it: its
        # progress, written by each, moves on twice.
        seen: list[float] = []
        deadline = time.monotonic() + 30
        while len(seen) < 3:
            future = ext.get_task(task_id)
            assert future is not None and time.monotonic() < deadline
            progress = future.task.progress
            if progress is not None and (not seen or progress.done > seen[-1]):
                seen.append(progress.done)
            threading.Event().wait(0.01)
        _post(f"{runner.url}/finish/{task_id}")
        outcome = servers.get_json(f"{runner.url}/outcome/{task_id}")
        assert outcome == (200, {"state": "succeeded", "error": None, "result": "done"})
        until_seen(ext, task_id, "succeeded")
    app_state(app).default.shutdown()
    assert _leftovers(store_url) == 0


def test_a_killed_process_times_out_and_leaves_nothing(
    runner: servers.Server, store_url: str
) -> None:
    app = asker(store_url, THREADCTX_CANCEL_TIMEOUT=0.5)
    ext = _ext(app)
    with app.app_context():
        task_id = _post(f"{runner.url}/loop")["task"]
        until_seen(ext, task_id, "running")
        os.kill(runner.process.pid, signal.SIGKILL)
        runner.process.wait(30)
        with pytest.raises(TimeoutError, match=r"it is stopped, hung, or gone\. The request was"):
            ext.cancel_task(task_id)
        future = ext.get_task(task_id)
        assert future is not None and future.task.state == "running"  # as the store had it
    app_state(app).default.shutdown()
    assert _leftovers(store_url) == 0
