"""``cancel_task`` of a thread task of another process, through a real Redis: the Redis task
store, and the Celery backend's records (``THREADCTX_TASK_STORE = "celery"``), which inherit
its stop requests. The cases are those of stop_cases.py, as on SQLite."""

from __future__ import annotations

import collections.abc as cabc
import threading
import time
import typing as t
from pathlib import Path

import ctx_tasks
import flask
import pytest
import redis
from flask_threadctx import ThreadContext
from flask_threadctx.app_state import app_state
from flask_threadctx.stores.stops import STALE
from redis_server import RedisServer

import stop_cases


@pytest.fixture(params=["redis", "celery"])
def pair(
    request: pytest.FixtureRequest, redis_url: str
) -> cabc.Iterator[tuple[flask.Flask, flask.Flask]]:
    apps: list[flask.Flask] = []
    for _ in "ab":
        if request.param == "redis":
            app = flask.Flask("shop")
            app.config.update(
                TESTING=True, THREADCTX_TASK_STORE=redis_url, THREADCTX_CANCEL_TIMEOUT=0.2
            )
            ThreadContext(app)
        else:
            app = ctx_tasks.create_app(
                {
                    "THREADCTX_CELERY": {"broker_url": redis_url, "result_backend": redis_url},
                    "THREADCTX_TASK_STORE": "celery",
                    "THREADCTX_CANCEL_TIMEOUT": 0.2,
                }
            )
        apps.append(app)
    yield apps[0], apps[1]
    for app in apps:
        for backend in app_state(app).backends.values():
            backend.shutdown()


def _leftovers(redis_url: str) -> cabc.Callable[[], int]:
    def count() -> int:
        client = redis.Redis.from_url(redis_url)
        try:
            return len(t.cast(list[bytes], client.keys("threadctx:*:stops:*")))
        finally:
            client.close()

    return count


def test_a_running_task_is_stopped_from_another_process(
    pair: tuple[flask.Flask, flask.Flask], redis_url: str
) -> None:
    stop_cases.check_a_running_task_is_stopped_from_another_process(*pair)
    assert _leftovers(redis_url)() == 0  # Redis deletes a hash whose last field goes


def test_a_delayed_task_is_cancelled_from_another_process(
    pair: tuple[flask.Flask, flask.Flask],
) -> None:
    stop_cases.check_a_delayed_task_is_cancelled_from_another_process(*pair)


def test_a_finished_task_answers_false(pair: tuple[flask.Flask, flask.Flask]) -> None:
    stop_cases.check_a_finished_task_answers_false(*pair)


def test_unknown_and_hostile_ids_are_unknown(
    pair: tuple[flask.Flask, flask.Flask], redis_url: str
) -> None:
    stop_cases.check_unknown_and_hostile_ids(*pair)
    assert _leftovers(redis_url)() == 0


def test_a_process_that_never_answers_times_out_and_leaves_nothing(
    pair: tuple[flask.Flask, flask.Flask], redis_url: str
) -> None:
    stop_cases.check_a_process_that_never_answers_times_out(pair[1], _leftovers(redis_url))


def test_a_request_taken_but_not_answered(
    pair: tuple[flask.Flask, flask.Flask], redis_url: str
) -> None:
    stop_cases.check_a_request_taken_but_not_answered(pair[1], _leftovers(redis_url))


def test_a_task_that_ends_before_its_process_takes_the_request(
    pair: tuple[flask.Flask, flask.Flask], redis_url: str
) -> None:
    stop_cases.check_a_task_that_ends_before_its_process_takes_the_request(
        pair[1], _leftovers(redis_url)
    )


def test_two_askers_are_each_answered(pair: tuple[flask.Flask, flask.Flask]) -> None:
    stop_cases.check_two_askers_are_each_answered(*pair)


def test_a_request_whose_asker_died_is_removed_once_stale(
    pair: tuple[flask.Flask, flask.Flask], redis_url: str
) -> None:
    stops = stop_cases.stops(pair[1])
    stops.ask("old", "t1", "host:1")
    client = redis.Redis.from_url(redis_url)
    try:
        (key,) = t.cast(list[bytes], client.keys("threadctx:*:stops:host:1"))
        client.hset(key, "old", f"asked {time.time() - STALE - 1!r} t1")
        assert 0 < client.ttl(key) <= STALE  # gone with its process, too
    finally:
        client.close()
    stops.ask("new", "t2", "host:1")
    assert stops.asked("host:1") == [("new", "t2")]
    assert stops.withdraw("new", "host:1", only_asked=True) == "asked"
    assert _leftovers(redis_url)() == 0


def test_a_store_that_goes_away_while_the_asker_waits(tmp_path: Path) -> None:
    """The store fails the looks for the answer, then the withdrawal: TimeoutError at the
    timeout, naming the task and its process and saying that the request may still act,
    rather than the store's own error."""
    server = RedisServer(tmp_path)
    server.start()
    try:
        app = flask.Flask("shop")
        app.config.update(
            TESTING=True, THREADCTX_TASK_STORE=server.url, THREADCTX_CANCEL_TIMEOUT=0.5
        )
        ThreadContext(app)
        recorder = app_state(app).recorder
        assert recorder is not None
        recorder.store.write([stop_cases.record_of("gone.example:4242")])
        asked = _leftovers(server.url)

        def take_the_store_away() -> None:
            while not asked():  # the request is in: the asker now waits for its answer
                pass
            server.stop()

        away = threading.Thread(target=take_the_store_away)
        away.start()
        with app.app_context(), pytest.raises(TimeoutError) as raised:
            app_state(app).extension.cancel_task("t-elsewhere")
        away.join()
        assert str(raised.value).startswith(
            "Task t-elsewhere runs in the process gone.example:4242, which did not answer the"
            " request to stop it within 'THREADCTX_CANCEL_TIMEOUT' (0.5 s), and the task"
            " store could not be reached to withdraw the request ("  # the client's error
        )
        assert str(raised.value).endswith(
            "The request may still act: if that process takes it once the store is back, the"
            " task stops. 'get_task' shows how it ended."
        )
        app_state(app).default.shutdown()
    finally:
        server.stop()
