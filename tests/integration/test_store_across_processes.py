"""Status across processes: two gunicorn servers with two worker processes each and one shared
task store (SQLite, then a real Redis). Tasks submitted through one server are known, with their
kept results, through the store, to every process of the other, which never saw them (the kernel
decides which worker of a server takes a connection, and may give them all to one: two servers
make the test certain)."""

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
POLLS = 10


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


def test_every_process_answers_for_every_task(
    store_url: str, tmp_path: Path, figures: dict[str, t.Any]
) -> None:
    db = tmp_path / "seen.sqlite"
    submitting = servers.start("gunicorn-gthread", db, THREADCTX_TEST_STORE=store_url)
    try:
        other = servers.start("gunicorn-gthread", db, THREADCTX_TEST_STORE=store_url)
    except BaseException:
        submitting.stop()
        raise
    try:
        ids = []
        for _ in range(TASKS):
            request = urllib.request.Request(f"{submitting.url}/job", method="POST")
            with urllib.request.urlopen(request, timeout=30) as response:
                ids.append(json.load(response)["task"])
        # Every process counts every task once the last is written (the writers batch every
        # 50 ms); the deadline only keeps a broken store from hanging the test.
        deadline = time.monotonic() + 60
        for server in (submitting, other):
            while (stats := servers.get_json(f"{server.url}/stats")[1])["succeeded"] < 2 * TASKS:
                assert time.monotonic() < deadline, stats
        answers = {
            server.url: [
                servers.get_json(f"{server.url}/status/{i}") for i in ids for _ in range(POLLS)
            ]
            for server in (submitting, other)
        }
        counts = [
            servers.get_json(f"{server.url}/stats")[1] for server in (submitting, other) * POLLS
        ]
    finally:
        submitting.stop()
        other.stop()
    for polls in answers.values():  # the result too: the task keeps it in the store
        assert [(code, body["state"], body["result"]) for code, body in polls] == [
            (200, "succeeded", "done")
        ] * (TASKS * POLLS)
    pids = {body["pid"] for polls in answers.values() for _, body in polls}
    for stats in counts:
        assert (stats["submitted"], stats["succeeded"], stats["queued"], stats["running"]) == (
            2 * TASKS,
            2 * TASKS,
            0,
            0,
        )
    kind = store_url.split(":", maxsplit=1)[0]
    figures.update(store=kind, tasks=2 * TASKS, polls=2 * TASKS * POLLS, processes=len(pids))
