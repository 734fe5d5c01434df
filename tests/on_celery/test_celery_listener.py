"""The listener (``listener.py``): what it does with messages it cannot read, and when it says a
task will be delivered again. What it reads back from Redis: ``test_celery_read_back.py``."""

from __future__ import annotations

import ctx_tasks
import flask
import kombu.transport.redis
import pytest
import redis
from flask_threadctx.app_state import app_state
from flask_threadctx.backends.celery import listener as celery_listener
from harness import RedisServer

threadctx = ctx_tasks.threadctx


@pytest.mark.usefixtures("app_ctx")
def test_malformed_messages_on_the_reply_channel_leave_the_listener_listening(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    backend = app_state(flask.current_app).backend("celery")
    assert threadctx.submit(ctx_tasks.add, 1, 1).result(30) == 2  # the listener is up
    client = redis.Redis.from_url(redis_server.url)
    garbage = [b"threadctx-progress:not json", b"threadctx-progress:[1]", b"\xff\x00", b"{}"]
    for data in garbage:
        assert client.publish(backend.reply_channel, data) == 1
    for n in range(5):  # after the garbage, on the same connection
        assert threadctx.submit(ctx_tasks.add, n, 1).result(30) == n + 1
    ignored = [r for r in caplog.records if r.getMessage().startswith("Ignored a message on")]
    assert len(ignored) == len(garbage)
    assert all(
        f"'data': {data!r}" in r.getMessage() for data, r in zip(garbage, ignored, strict=True)
    )


@pytest.mark.parametrize(
    ("options", "seconds"),
    [
        ({}, 3600 + 10 * 10),
        ({"visibility_timeout": 60}, 60 + 10 * 10),
        ({"visibility_timeout": 6, "unacked_restore_interval": 0.5}, 6 + 0.5 * 10),
        ({"unacked_restore_interval": 2, "unacked_restore_throttle": 1}, 3600 + 2),
        ({"unacked_restore_interval": 0, "unacked_restore_throttle": 0}, 3600 + 10),
    ],
)
def test_redelivery_is_said_by_the_latest_sweep_of_the_redis_transport(
    options: dict[str, float], seconds: float
) -> None:
    # The defaults are the installed kombu's: a new kombu that changes them fails this test.
    channel = kombu.transport.redis.Channel
    assert (channel.unacked_restore_interval, channel.unacked_restore_throttle) == (10, 10)
    assert celery_listener._redelivery_after(options) == seconds
