"""Registration and the THREADCTX_* config keys."""

from __future__ import annotations

import fractions
import typing as t

import flask
import pytest
from flask_threadctx import ThreadContext
from flask_threadctx.app_state import app_state
from flask_threadctx.config import default_max_workers
from flask_threadctx.config import DEFAULTS
from flask_threadctx.config import UnknownConfigKeyWarning
from hypothesis import given
from hypothesis import strategies as st


def new_app(**config: t.Any) -> flask.Flask:
    app = flask.Flask("config")
    app.config.update(config)
    return app


def test_defaults_are_set() -> None:
    app = new_app()
    ThreadContext().init_app(app)
    assert {key: app.config[key] for key in DEFAULTS} == DEFAULTS


def test_default_max_workers() -> None:
    app = new_app()
    ext = ThreadContext(app)
    assert ext.stats()["max_workers"] == default_max_workers()


def test_init_app_twice() -> None:
    app = new_app()
    ext = ThreadContext(app)
    with pytest.raises(RuntimeError, match="already registered on 'config'"):
        ext.init_app(app)
    with pytest.raises(RuntimeError, match="already registered"):
        ThreadContext().init_app(app)


# fmt: off
BAD_TYPES = [
    ('THREADCTX_MAX_WORKERS', '4', TypeError, "'THREADCTX_MAX_WORKERS' must be a whole number or None, not '4'"),
    ('THREADCTX_MAX_WORKERS', 2.0, TypeError, 'must be a whole number or None, not 2.0'),
    ('THREADCTX_MAX_WORKERS', True, TypeError, 'must be a whole number or None, not True'),
    ('THREADCTX_MAX_WORKERS', 0, ValueError, "'THREADCTX_MAX_WORKERS' must be 1 or more, not 0"),
    ('THREADCTX_MAX_QUEUE', -1, ValueError, "'THREADCTX_MAX_QUEUE' must be 1 or more, not -1"),
    ('THREADCTX_MAX_QUEUE', [], TypeError, "'THREADCTX_MAX_QUEUE' must be a whole number or None"),
    ('THREADCTX_COPY_G', 'all', ValueError, '\'THREADCTX_COPY_G\' must be "data", True, False'),
    ('THREADCTX_COPY_G', 1, TypeError, '\'THREADCTX_COPY_G\' must be "data", True, False'),
    ('THREADCTX_COPY_G', ['ok', 'not ok'], ValueError, "not attribute names: ['not ok']"),
    ('THREADCTX_PRELOAD_BODY', 'yes', TypeError, "'THREADCTX_PRELOAD_BODY' must be True or False, not 'yes'"),
    ('THREADCTX_COPY_FILES', 1, TypeError, "'THREADCTX_COPY_FILES' must be True or False, not 1"),
    ('THREADCTX_TEARDOWN_REQUEST', None, TypeError, "'THREADCTX_TEARDOWN_REQUEST' must be True"),
    ('THREADCTX_EAGER', 'False', TypeError, "'THREADCTX_EAGER' must be True or False"),
    ('THREADCTX_SHUTDOWN_TIMEOUT', '30', TypeError, "'THREADCTX_SHUTDOWN_TIMEOUT' must be a number of seconds, not '30'"),
    ('THREADCTX_SHUTDOWN_TIMEOUT', -1, ValueError, 'must be a finite number of seconds >= 0, not -1'),
    ('THREADCTX_SHUTDOWN_TIMEOUT', float('inf'), ValueError, 'not inf'),
    ('THREADCTX_SHUTDOWN_TIMEOUT', 10**400, ValueError, "'THREADCTX_SHUTDOWN_TIMEOUT' must be at most 86400 seconds (a day), not an integer of about 10**400."),
    ('THREADCTX_SHUTDOWN_TIMEOUT', -10**400, ValueError, "'THREADCTX_SHUTDOWN_TIMEOUT' must be a finite number of seconds >= 0, not an integer of about -10**400."),
    ('THREADCTX_SHUTDOWN_TIMEOUT', 1e300, ValueError, "'THREADCTX_SHUTDOWN_TIMEOUT' must be at most 86400 seconds (a day), not 1e+300."),
    ('THREADCTX_THREAD_NAME_PREFIX', 5, TypeError, "'THREADCTX_THREAD_NAME_PREFIX' must be a string, not 5"),
    ('THREADCTX_THREAD_NAME_PREFIX', '', ValueError, "'THREADCTX_THREAD_NAME_PREFIX' must not be empty"),
    ('THREADCTX_KEEP_FINISHED', -5, ValueError, "'THREADCTX_KEEP_FINISHED' must be 0 or more, not -5"),
    ('THREADCTX_KEEP_FINISHED', 10**400, ValueError, "'THREADCTX_KEEP_FINISHED' must be at most 1_000_000_000, not an integer of about 10**400."),
    ('THREADCTX_KEEP_FINISHED', None, TypeError, "'THREADCTX_KEEP_FINISHED' must be a whole number, not None"),
    ('THREADCTX_LOG_EXCEPTIONS', 0, TypeError, "'THREADCTX_LOG_EXCEPTIONS' must be True or False"),
    ('THREADCTX_BACKEND', 'rq', ValueError, '\'THREADCTX_BACKEND\' must be "threads" or "celery", not \'rq\''),
    ('THREADCTX_BACKEND', None, ValueError, '\'THREADCTX_BACKEND\' must be "threads" or "celery", not None'),
    ('THREADCTX_CELERY', 'redis://localhost', TypeError, "'THREADCTX_CELERY' must be a dict of Celery settings, such as {'broker_url': 'redis://localhost:6379/0', ...}, not 'redis://localhost'"),
    ('THREADCTX_CELERY', {1: 'x'}, TypeError, "'THREADCTX_CELERY' must be a dict of Celery settings"),
    ('THREADCTX_CELERY_APP', 'tasks.celery', ValueError, "'THREADCTX_CELERY_APP' must be the import path of a Celery app, such as 'myproject.tasks:celery', not 'tasks.celery'"),
    ('THREADCTX_CELERY_APP', 5, ValueError, "'THREADCTX_CELERY_APP' must be the import path of a Celery app"),
    ('THREADCTX_CELERY_MAX_BODY', -1, ValueError, "'THREADCTX_CELERY_MAX_BODY' must be 0 or more, not -1"),
    ('THREADCTX_CELERY_MAX_BODY', '1M', TypeError, "'THREADCTX_CELERY_MAX_BODY' must be a whole number, not '1M'"),
    ('THREADCTX_CELERY_PRIVATE_HEADERS', 'Cookie', TypeError, "'THREADCTX_CELERY_PRIVATE_HEADERS' must be a list of header names, not 'Cookie'"),
    ('THREADCTX_CELERY_PRIVATE_HEADERS', ['Cookie', ''], ValueError, "'THREADCTX_CELERY_PRIVATE_HEADERS' lists invalid names: ['']"),
    ('THREADCTX_CELERY_PUBLIC_HEADERS', 'X-Api-Key', TypeError, "'THREADCTX_CELERY_PUBLIC_HEADERS' must be a list of header names, not 'X-Api-Key'"),
    ('THREADCTX_CELERY_PUBLIC_HEADERS', [None], ValueError, "'THREADCTX_CELERY_PUBLIC_HEADERS' lists invalid names: [None]"),
    ('THREADCTX_CELERY_HEARTBEAT', 0.5, ValueError, "'THREADCTX_CELERY_HEARTBEAT' must be at least 1 second, not 0.5: a busy worker process must have time to show it is alive."),
    ('THREADCTX_CELERY_HEARTBEAT', '30', TypeError, "'THREADCTX_CELERY_HEARTBEAT' must be a number of seconds, not '30'"),
    ('THREADCTX_CELERY_SUBMIT_TIMEOUT', 0, ValueError, "'THREADCTX_CELERY_SUBMIT_TIMEOUT' must be more than 0 seconds, not 0.0: a submit needs time to reach Redis."),
    ('THREADCTX_CELERY_SUBMIT_TIMEOUT', None, TypeError, "'THREADCTX_CELERY_SUBMIT_TIMEOUT' must be a number of seconds, not None"),
    ('THREADCTX_CELERY_SUBMIT_TIMEOUT', 10**400, ValueError, "'THREADCTX_CELERY_SUBMIT_TIMEOUT' must be at most 3600 seconds (an hour), not an integer of about 10**400."),
    ('THREADCTX_CELERY_SUBMIT_TIMEOUT', 3601, ValueError, "'THREADCTX_CELERY_SUBMIT_TIMEOUT' must be at most 3600 seconds (an hour), not 3601."),
    ('THREADCTX_CELERY_HEARTBEAT', 10**400, ValueError, "'THREADCTX_CELERY_HEARTBEAT' must be at most 86400 seconds (a day), not an integer of about 10**400."),
    ('THREADCTX_CELERY_HEARTBEAT', 1e300, ValueError, "'THREADCTX_CELERY_HEARTBEAT' must be at most 86400 seconds (a day), not 1e+300."),
    ('THREADCTX_CELERY_HEARTBEAT', float('nan'), ValueError, "'THREADCTX_CELERY_HEARTBEAT' must be a finite number of seconds >= 0, not nan."),
]
# fmt: on


@pytest.mark.parametrize(("key", "value", "error", "message"), BAD_TYPES)
def test_bad_values(key: str, value: t.Any, error: type[Exception], message: str) -> None:
    app = new_app(**{key: value})
    with pytest.raises(error) as info:
        ThreadContext().init_app(app)
    assert message in str(info.value)
    assert "threadctx" not in app.extensions
    app.config[key] = DEFAULTS[key]
    ThreadContext().init_app(app)  # fixing the value is all it takes


@given(st.integers())
def test_max_workers_any_int(value: int) -> None:
    app = new_app(THREADCTX_MAX_WORKERS=value)
    if value >= 1:
        ThreadContext().init_app(app)
        assert app_state(app).settings.max_workers == value
    else:
        with pytest.raises(ValueError, match=f"must be 1 or more, not {value}"):
            ThreadContext().init_app(app)


@given(st.one_of(st.text(), st.floats(), st.none(), st.lists(st.integers()), st.binary()))
def test_max_queue_non_int(value: t.Any) -> None:
    app = new_app(THREADCTX_MAX_QUEUE=value)
    if value is None:
        ThreadContext().init_app(app)
        assert app_state(app).settings.max_queue is None
    else:
        with pytest.raises(TypeError, match="'THREADCTX_MAX_QUEUE' must be a whole number or None"):
            ThreadContext().init_app(app)


@given(st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers()))
def test_shutdown_timeout_numbers(value: float) -> None:
    app = new_app(THREADCTX_SHUTDOWN_TIMEOUT=value)
    if 0 <= value <= 86400:
        ThreadContext().init_app(app)
        assert app_state(app).settings.shutdown_timeout == value
    elif 86400 < value < float("inf"):
        with pytest.raises(ValueError, match=r"'THREADCTX_SHUTDOWN_TIMEOUT' must be at most 86400"):
            ThreadContext().init_app(app)
    else:
        with pytest.raises(ValueError, match="'THREADCTX_SHUTDOWN_TIMEOUT' must be a finite"):
            ThreadContext().init_app(app)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(fractions.Fraction(1, 4), 0.25), (fractions.Fraction(3600), 3600.0), (True, None)],
)
def test_a_time_limit_is_any_real_number_as_the_option_is(
    value: object, seconds: float | None
) -> None:
    """The per-task ``time_limit`` takes a Fraction; the config's default takes what it takes."""
    app = new_app(THREADCTX_TIME_LIMIT=value, THREADCTX_CANCEL_TIMEOUT=value)
    if seconds is None:
        with pytest.raises(TypeError, match="'THREADCTX_TIME_LIMIT' must be a number of seconds"):
            ThreadContext().init_app(app)
        return
    ThreadContext().init_app(app)
    settings = app_state(app).settings
    assert (settings.time_limit, settings.cancel_timeout) == (seconds, seconds)
    assert type(settings.time_limit) is float


def test_a_huge_fraction_is_refused_by_its_size() -> None:
    app = new_app(THREADCTX_TIME_LIMIT=fractions.Fraction(10**400, 3))
    with pytest.raises(ValueError, match=r"'THREADCTX_TIME_LIMIT' must be at most 86400 seconds"):
        ThreadContext().init_app(app)


def test_copy_g_list_is_kept_as_tuple() -> None:
    app = new_app(THREADCTX_COPY_G=["user", "locale"])
    ThreadContext().init_app(app)
    assert app_state(app).settings.copy_g == ("user", "locale")


def test_an_unknown_key_warns_naming_the_closest() -> None:
    app = new_app(THREADCTX_MAX_WORKER=3, THREADCTX_COPYG="data", THREADCTX_ZZZ=1, OTHER_KEY=1)
    with pytest.warns(UnknownConfigKeyWarning) as record:
        ThreadContext().init_app(app)
    messages = [str(w.message) for w in record]
    assert [m.split(" is not")[0] for m in messages] == [
        "'THREADCTX_MAX_WORKER'",
        "'THREADCTX_COPYG'",
        "'THREADCTX_ZZZ'",
    ]
    assert "Did you mean 'THREADCTX_MAX_WORKERS'?" in messages[0]
    assert "Did you mean 'THREADCTX_COPY_G'?" in messages[1]
    assert "Did you mean" not in messages[2]
    assert all(w.filename == __file__ for w in record)


def test_celery_settings_and_app_are_one_or_the_other() -> None:
    app = new_app(
        THREADCTX_CELERY={"broker_url": "redis://localhost"},
        THREADCTX_CELERY_APP="myproject.tasks:celery",
    )
    with pytest.raises(ValueError, match="Set one of 'THREADCTX_CELERY'") as info:
        ThreadContext().init_app(app)
    assert "and 'THREADCTX_CELERY_APP' (your own Celery app), not both." in str(info.value)
    assert "threadctx" not in app.extensions


def test_the_celery_backend_needs_a_celery() -> None:
    app = new_app(THREADCTX_BACKEND="celery")
    with pytest.raises(ValueError, match="neither 'THREADCTX_CELERY' nor") as info:
        ThreadContext().init_app(app)
    assert "Set 'THREADCTX_CELERY' to {'broker_url': ..., 'result_backend': ...}." in str(
        info.value
    )
    app.config["THREADCTX_EAGER"] = True  # tests need no broker
    ext = ThreadContext(app)
    assert ext.stats() == {
        "submitted": 0,
        "queued": 0,
        "running": 0,
        "succeeded": 0,
        "failed": 0,
        "cancelled": 0,
        "rejected": 0,
        "retrying": 0,
        "expired": 0,
        "timed_out": 0,
    }
