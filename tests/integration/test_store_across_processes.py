"""Status across processes: gunicorn with two worker processes and a shared task store
(SQLite, then a real Redis). Whichever process serves a status poll, it knows every task."""

from __future__ import annotations

import collections.abc as cabc
import json
import sys
import time
import typing as t
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import servers

sys.path.insert(0, str(servers.HERE.parent / "on_celery"))
from redis_server import RedisServer

TASKS = 40
POLLS = 20


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


def get(url: str) -> tuple[int, dict[str, t.Any]]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def test_every_process_answers_for_every_task(
    store_url: str, tmp_path: Path, figures: dict[str, t.Any]
) -> None:
    server = servers.start(
        "gunicorn-gthread", tmp_path / "seen.sqlite", THREADCTX_TEST_STORE=store_url
    )
    try:
        ids = []
        for _ in range(TASKS):
            request = urllib.request.Request(f"{server.url}/job", method="POST")
            with urllib.request.urlopen(request, timeout=30) as response:
                ids.append(json.load(response)["task"])
        # Each process counts every task once the last of them is written (the writers batch
        # every 50 ms); the deadline only keeps a broken store from hanging the test.
        deadline = time.monotonic() + 60
        while get(f"{server.url}/stats")[1]["succeeded"] != 2 * TASKS:
            assert time.monotonic() < deadline, get(f"{server.url}/stats")
        answers = [get(f"{server.url}/status/{task_id}") for task_id in ids for _ in range(POLLS)]
        counts = [get(f"{server.url}/stats")[1] for _ in range(POLLS)]
    finally:
        server.stop()
    pids = {body["pid"] for _, body in answers}
    assert len(pids) == 2, f"every poll went to one process: {pids}"
    assert [(code, body["state"]) for code, body in answers] == [(200, "succeeded")] * (
        TASKS * POLLS
    )
    for stats in counts:
        assert (stats["submitted"], stats["succeeded"], stats["queued"], stats["running"]) == (
            2 * TASKS,
            2 * TASKS,
            0,
            0,
        )
    assert len({stats["pid"] for stats in counts}) == 2
    figures.update(
        store=store_url.split(":", maxsplit=1)[0],
        tasks=2 * TASKS,
        polls=len(answers),
        processes=len(pids),
    )
