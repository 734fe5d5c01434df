"""The Celery options of ``task(backend="celery", ...)`` (``messages.check_options``): checked
where the task is declared, kept as Celery is sent them, and honoured by the worker."""

from __future__ import annotations

import datetime
import os
import typing as t

import ctx_tasks
import pytest
from flask_threadctx import Task
from harness import RedisServer

threadctx = ctx_tasks.threadctx


IN_TWO_DAYS = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=2)


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"time_limit": "60"}, TypeError, "'time_limit' must be a number of seconds, not '60'."),
        ({"soft_time_limit": True}, TypeError, "'soft_time_limit' must be a number of seconds"),
        ({"time_limit": 0}, ValueError, "'time_limit' must be a number of seconds above 0, not 0."),
        (
            {"soft_time_limit": float("inf")},
            ValueError,
            "'soft_time_limit' must be at most 31536000 seconds (365 days), not inf. Leave it"
            " out for no limit.",
        ),
        # Beyond a float: it killed every worker that took the task.
        (
            {"time_limit": 10**400},
            ValueError,
            "'time_limit' must be at most 31536000 seconds (365 days), not an integer of about"
            " 10**400. Leave it out for no limit.",
        ),
        ({"time_limit": 1e300}, ValueError, "at most 31536000 seconds (365 days), not 1e+300."),
        ({"time_limit": float("nan")}, ValueError, "seconds above 0, not nan."),
        # These made every submit fail with 'BrokerUnavailable'.
        (
            {"countdown": 10**400},
            ValueError,
            "'countdown' must be at most 31536000 seconds (365 days), not an integer of about"
            " 10**400.",
        ),
        ({"countdown": 1e300}, ValueError, "'countdown' must be at most 31536000 seconds"),
        ({"expires": 10**400}, ValueError, "'expires' must be at most 31536000 seconds"),
        ({"expires": 1e300}, ValueError, "'expires' must be at most 31536000 seconds"),
        ({"countdown": -1}, ValueError, "'countdown' must be a number of seconds 0 or more, not"),
        ({"expires": 0}, ValueError, "'expires' must be a number of seconds above 0, not 0."),
        (
            {"expires": "1h"},
            TypeError,
            "'expires' must be a number of seconds or an aware datetime, not '1h'.",
        ),
        (
            {"expires": datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc)},
            ValueError,
            "'expires' must lie ahead, not at 2020-01-01T00:00:00+00:00: every task would",
        ),
        (
            {"retry_for": (OSError,), "retry_delay": 10**400},
            ValueError,
            "'retry_delay' must be at most 31536000 seconds (365 days), not an integer of about",
        ),
        # This left every task pending for ever: the worker refused the message.
        (
            {"eta": "tomorrow"},
            TypeError,
            "'eta' must be an aware datetime, such as 'datetime.now(timezone.utc) +"
            " timedelta(hours=1)', not 'tomorrow'. For a delay, give 'countdown' in seconds.",
        ),
        (
            {"eta": datetime.datetime(2030, 1, 1)},
            ValueError,
            "'eta' must be an aware datetime, such as 'datetime.now(timezone.utc) +"
            " timedelta(hours=1)', not the naive datetime.datetime(2030, 1, 1, 0, 0): its time"
            " zone would be a guess.",
        ),
        (
            {"eta": datetime.datetime.max.replace(tzinfo=datetime.timezone.utc)},
            ValueError,
            "'eta' must lie at most 365 days ahead, not at 9999-12-31T23:59:59.999999+00:00.",
        ),
        (
            {"eta": datetime.datetime.now(datetime.timezone.utc), "countdown": 5},
            TypeError,
            "Give 'countdown' or 'eta', not both",
        ),
        (
            {"countdown": 60, "expires": 30},
            ValueError,
            "'expires' (30 s) must come after the start ('countdown' or 'eta', 60 s): every"
            " task would expire before it runs.",
        ),
        (
            {"eta": IN_TWO_DAYS, "expires": IN_TWO_DAYS - datetime.timedelta(seconds=1)},
            ValueError,
            f"'expires' ({(IN_TWO_DAYS - datetime.timedelta(seconds=1)).isoformat()}) must come"
            f" after the start ('countdown' or 'eta', {IN_TWO_DAYS.isoformat()}): every task",
        ),
        ({"priority": 10**400}, ValueError, "'priority' must be an integer from 0 to 255, not"),
        ({"priority": 1.5}, TypeError, "'priority' must be an integer, not 1.5."),
        ({"max_retries": -1}, ValueError, "'max_retries' must be an integer 0 or more, not -1."),
        ({"queue": 5}, TypeError, "'queue' must be a str or a Queue, not 5."),
        (
            {"soft_time_limit": 60, "time_limit": 60},
            ValueError,
            "'soft_time_limit' (60) must be less than 'time_limit' (60): the soft limit lets",
        ),
        ({"timelimit": 60}, TypeError, "'task(backend=\"celery\")' does not take 'timelimit'."),
    ],
)
def test_bad_task_options_fail_where_the_task_is_declared(
    options: dict[str, t.Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error) as caught:
        threadctx.task(backend="celery", **options)
    assert message in str(caught.value)
    threadctx.task(backend="celery", soft_time_limit=0.5, time_limit=2)  # these are fine


def test_task_options_are_kept_as_celery_is_sent_them() -> None:
    soon = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=1)
    declared = threadctx.task(
        backend="celery", soft_time_limit=1, time_limit=2**3, countdown=0, expires=soon
    )(ctx_tasks.add)
    assert declared.options == {
        "soft_time_limit": 1.0,
        "time_limit": 8.0,
        "countdown": 0.0,
        "expires": soon,
    }
    assert [type(declared.options[name]) for name in ("time_limit", "countdown")] == [float] * 2
    with pytest.raises(TypeError):
        declared.options["time_limit"] = 10**400  # type: ignore[index]


@pytest.mark.usefixtures("app_ctx")
def test_options_of_a_task_made_without_the_decorator_are_checked_too() -> None:
    before = threadctx.stats()
    with pytest.raises(ValueError, match=r"^'countdown' must be at most 31536000 seconds"):
        Task(threadctx, ctx_tasks.add, "celery", {"countdown": 1e300})
    assert threadctx.stats() == before


@pytest.mark.usefixtures("app_ctx")
def test_tasks_with_an_eta_and_an_expiry_date_run() -> None:
    assert ctx_tasks.dated.submit(2, 3).result(30) == 5


@pytest.mark.usefixtures("app_ctx")
def test_retries_go_through_celery(redis_server: RedisServer) -> None:
    key = f"flaky-{os.getpid()}-{id(object())}"
    assert ctx_tasks.flaky.submit(key, redis_server.url).result(30) == 3
