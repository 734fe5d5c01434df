"""The options of a task, as both engines read them: checks, starts, expiry, retry delays."""

from __future__ import annotations

import datetime
import typing as t

import pytest
from flask_threadctx.options import check_options
from flask_threadctx.options import MAX_SECONDS
from flask_threadctx.options import Policy

UTC = datetime.timezone.utc


def policy(**options: object) -> Policy:
    return Policy(check_options(options, "threads"))


def test_backoff_doubles_from_its_base_up_to_its_most() -> None:
    backoff = policy(retry_backoff=2, retry_backoff_max=20, retry_jitter=False)
    assert [backoff.retry_delay(n) for n in range(6)] == [2.0, 4.0, 8.0, 16.0, 20.0, 20.0]


def test_backoff_true_is_a_base_of_one_second_and_most_ten_minutes() -> None:
    backoff = policy(retry_backoff=True, retry_jitter=False)
    assert [backoff.retry_delay(n) for n in (0, 1, 9, 10, 10**6)] == [1.0, 2.0, 512.0, 600.0, 600.0]


def test_jitter_draws_from_zero_to_the_delay() -> None:
    backoff = policy(retry_backoff=4)
    draws = iter((0.0, 0.25, 0.999))
    assert [backoff.retry_delay(2, draws.__next__) for _ in range(3)] == [0.0, 4.0, 15.984]


def test_without_backoff_each_retry_waits_retry_delay() -> None:
    assert [policy(retry_delay=3).retry_delay(n) for n in range(3)] == [3.0, 3.0, 3.0]
    assert policy().retry_delay(5) == 0.0


def test_retries_only_for_its_errors_and_up_to_its_most() -> None:
    retried = policy(retry_for=(KeyError,), max_retries=2)
    assert [retried.retries(KeyError("k"), n) for n in range(3)] == [True, True, False]
    assert retried.retries(ValueError("v"), 0) is False
    assert policy(retry_for=(OSError,)).retries(ConnectionError(), 2) is True  # a subclass; 3
    assert policy(retry_for=(OSError,)).retries(ConnectionError(), 3) is False
    assert policy().retries(Exception(), 0) is False


def test_an_option_given_as_none_is_its_default() -> None:
    given_none = policy(
        retry_for=(KeyError,),
        max_retries=None,
        retry_delay=None,
        retry_backoff_max=None,
        countdown=None,
        expires=None,
        time_limit=None,
    )
    assert [given_none.retries(KeyError("k"), n) for n in range(4)] == [True, True, True, False]
    assert given_none.retry_delay(0) == 0.0
    assert (given_none.start_at(1.0), given_none.expires_at(1.0), given_none.time_limit) == (
        None,
        None,
        None,
    )
    backoff = policy(retry_backoff=True, retry_backoff_max=None, retry_jitter=False)
    assert backoff.retry_delay(20) == 600.0


def test_a_start_and_an_expiry_in_different_forms_are_compared() -> None:
    tomorrow = datetime.datetime.now(UTC) + datetime.timedelta(days=1)
    assert check_options({"countdown": 3600, "expires": tomorrow}, "threads") == {
        "countdown": 3600.0,
        "expires": tomorrow,
    }
    assert check_options({"eta": tomorrow, "expires": 2 * 86400}, "threads")["expires"] == 172800


def test_start_and_expiry_count_from_the_submit() -> None:
    submitted = 1_000_000.0
    assert policy(countdown=5, expires=30).start_at(submitted) == 1_000_005.0
    assert policy(countdown=5, expires=30).expires_at(submitted) == 1_000_030.0
    at = datetime.datetime.now(UTC) + datetime.timedelta(hours=1)
    assert policy(eta=at, expires=at + datetime.timedelta(seconds=1)).start_at(0) == at.timestamp()
    assert policy(expires=at).expires_at(submitted) == at.timestamp()
    assert (policy().start_at(submitted), policy().expires_at(submitted)) == (None, None)
    assert policy(time_limit=2).time_limit == 2.0


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"queue": "x"}, TypeError, "'task()' does not take 'queue'."),
        ({"retry_backoff": "yes"}, TypeError, "'retry_backoff' must be True, False or a number"),
        ({"retry_backoff": 0}, ValueError, "'retry_backoff' must be a number of seconds above 0"),
        ({"retry_backoff": 10**400}, ValueError, f"'retry_backoff' must be at most {MAX_SECONDS}"),
        ({"retry_backoff_max": float("nan")}, ValueError, "'retry_backoff_max' must be a number"),
        ({"retry_jitter": 1}, TypeError, "'retry_jitter' must be True or False, not 1."),
        ({"max_retries": True}, TypeError, "'max_retries' must be an integer, not True."),
        ({"time_limit": -1}, ValueError, "'time_limit' must be a number of seconds above 0"),
        ({"retry_for": [OSError]}, TypeError, "'retry_for' must be a tuple of exception classes"),
        ({"eta": datetime.datetime(2030, 1, 1)}, ValueError, "'eta' must be an aware datetime"),
        (
            {"eta": datetime.datetime.now(UTC) + datetime.timedelta(hours=1), "expires": 60},
            ValueError,
            "'expires' (60 s) must come after the start ('countdown' or 'eta', 20",
        ),
        (
            {
                "countdown": 7200,
                "expires": datetime.datetime.now(UTC) + datetime.timedelta(hours=1),
            },
            ValueError,
            "'expires' (20",
        ),
    ],
)
def test_bad_options_say_what_is_wrong(
    options: dict[str, t.Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error) as info:
        check_options(options, "threads")
    assert str(info.value).startswith(message)


def test_celery_only_options_are_named_as_such() -> None:
    with pytest.raises(TypeError) as info:
        check_options({"priority": 1, "soft_time_limit": 1}, "threads")
    assert str(info.value).endswith(
        " 'priority', 'soft_time_limit' only with 'backend=\"celery\"'."
    )
    assert check_options({"priority": 1, "soft_time_limit": 1}, "celery") == {
        "priority": 1,
        "soft_time_limit": 1.0,
    }
