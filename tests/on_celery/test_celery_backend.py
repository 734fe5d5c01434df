"""The Celery backend against a real Redis, with a worker in the test process (threads pool)."""

from __future__ import annotations

import collections.abc as cabc
import concurrent.futures
import datetime
import gc
import io
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
import types
import typing as t

import celery.contrib.testing.worker
import celery.exceptions
import ctx_tasks
import flask
import kombu.transport.redis
import pytest
import redis
import redis.backoff
import redis.retry
from celery._state import _set_task_join_will_block
from flask_threadctx import BrokerUnavailable
from flask_threadctx import Progress
from flask_threadctx import progress as progress_module
from flask_threadctx import RemoteTaskError
from flask_threadctx import Task
from flask_threadctx import task_finished
from flask_threadctx import task_rejected
from flask_threadctx import task_started
from flask_threadctx import task_submitted
from flask_threadctx import TaskFuture
from flask_threadctx.app_state import app_state
from flask_threadctx.backends.celery import listener as celery_listener
from flask_threadctx.backends.celery.claims import CeleryRecords as RedisTaskRecords
from flask_threadctx.backends.celery.claims import PROGRESS_MESSAGE
from flask_threadctx.contexts.wire import RemoteTraceback
from flask_threadctx.model import TaskInfo
from harness import free_port
from harness import HERE
from harness import RedisServer

threadctx = ctx_tasks.threadctx


def start_worker(app: flask.Flask) -> t.ContextManager[t.Any]:
    made = app_state(app).backend("celery").celery
    made.conf.worker_redirect_stdouts = False  # pytest's output would go to the worker's log
    # What Celery sets in each process of a prefork worker: a retry sent from a task does not
    # subscribe for its result (which, here, would outlive the Redis server of the test).
    _set_task_join_will_block(True)
    return celery.contrib.testing.worker.start_worker(  # type: ignore[no-any-return]
        made, pool="threads", concurrency=2, perform_ping_check=False, loglevel="WARNING"
    )


@pytest.fixture(scope="module")
def app(redis_server: RedisServer) -> cabc.Iterator[flask.Flask]:
    os.environ["THREADCTX_TEST_REDIS"] = redis_server.url
    made = ctx_tasks.create_app()
    with start_worker(made):
        yield made
    app_state(made).default.shutdown()


@pytest.fixture
def app_ctx(app: flask.Flask) -> cabc.Iterator[None]:
    with app.app_context():
        yield


def submit_from_request(
    app: flask.Flask, fn: t.Callable[..., t.Any], *args: t.Any, **request: t.Any
) -> TaskFuture[t.Any]:
    with app.test_request_context(**request):
        return threadctx.submit(fn, *args)


@pytest.mark.usefixtures("app_ctx")
def test_result_and_task_info() -> None:
    future = threadctx.submit(ctx_tasks.add, 2, 3)
    assert isinstance(future, TaskFuture)
    assert future.result(30) == 5
    assert future.task.state == "succeeded"
    assert future.task.name == "add"
    assert threadctx.get_task(future.task.id) is future


def test_request_is_rebuilt_on_the_worker(app: flask.Flask) -> None:
    client = app.test_client()
    client.set_cookie("other", "secret-cookie")
    response = client.post(
        "/orders/7?x=1&x=2",
        json={"a": 1},
        headers={"X-Custom": "yes", "Authorization": "Bearer secret"},
        base_url="https://shop.example:8443/root",
    )
    with app.app_context():
        seen = threadctx.get_task(response.json["task"]).result(30)  # type: ignore[union-attr,index]
    assert seen["pid"] == os.getpid()
    del seen["pid"], seen["task"]
    assert seen == {
        "tag": "from-view",
        "parent": None,
        "label": "POST /orders/7",
        "g": {"user": "ada"},
        "method": "POST",
        "path": "/orders/7",
        "args": {"x": ["1", "2"]},
        "json": {"a": 1},
        "form": {},
        "content_type": "application/json",
        "custom_header": "yes",
        "cookie": None,
        "authorization": None,
        "remote_addr": "127.0.0.1",
        "view_args": {"order_id": 7},
        "endpoint": "order",
        "url": "https://shop.example:8443/root/hello/x",
        "session": {"cart": [1, 2]},
    }


@pytest.mark.parametrize(
    ("url", "options", "expected"),
    [
        ("/read/café?q=café", {}, {"name": "café", "q": ["café"]}),
        ("/read/caf%C3%A9?q=caf%C3%A9&r=a+b%26", {}, {"name": "café", "q": ["café"]}),
        (
            "/read/x",
            {"environ_overrides": {"QUERY_STRING": "q=caf\xc3\xa9&e=%E2%82%AC"}},
            {"q": ["café"], "e": ["€"]},
        ),
        (
            "/read/x",
            # A path left percent-encoded by its server, a query that is not UTF-8.
            {"environ_overrides": {"PATH_INFO": "/read/caf%C3%A9", "QUERY_STRING": "q=%E9"}},
            {"name": "caf%C3%A9", "q": ["%E9"]},
        ),
        (
            "/read/x",
            {"method": "POST", "data": {"f": "naïve ☃"}, "headers": {"X-Name": "Ã©"}},
            {"form": {"f": ["naïve ☃"]}, "header": "Ã©"},
        ),
        (
            "/read/x?q=caf%C3%A9",
            {"method": "POST", "data": {"f": "ü", "up": (io.BytesIO(b"1"), "a.txt")}},
            {"form": {"f": ["ü"]}, "q": ["café"]},
        ),
    ],
)
def test_request_reads_on_the_worker_as_in_the_view(
    app: flask.Flask, url: str, options: dict[str, t.Any], expected: dict[str, t.Any]
) -> None:
    """The URL crosses as the WSGI server handed it over, whatever its encoding."""
    response = app.test_client().open(url, base_url="http://shop.example/sh%C3%B6p", **options)
    seen = response.json
    assert seen is not None
    view = seen["view"]
    assert seen["task"] == view
    if "name" in expected:
        assert view["view_args"] == {"name": expected["name"]}
    if "q" in expected:
        assert view["args"]["q"] == expected["q"]
    if "e" in expected:
        assert view["args"]["e"] == expected["e"]
    if "form" in expected:
        assert view["form"] == expected["form"]
    if "header" in expected:
        assert view["headers"] == [["X-Name", expected["header"]]]
    assert view["root_path"] == "/shöp"


SECRET_HEADERS = {
    "X-Api-Key": "k",
    "X-Auth-Token": "t",
    "X-CSRF-Token": "c",
    "X-Session-Id": "s",
    "X-Hub-Signature-256": "sha256=x",
    "X-Client-Secret": "x",
    "X-Password": "p",
    "X-Passwd": "p",
    "X-Pass": "p",
    "X-Jwt": "j",
    "X-Credentials": "c",
    "X-Bearer": "b",
    "Cookie": "a=b",
    "Authorization": "Bearer x",
    "Proxy-Authorization": "Basic x",
    "WWW-Authenticate-Hint": "h",
}


def test_headers_whose_name_suggests_a_secret_stay_behind(
    app: flask.Flask, redis_server: RedisServer
) -> None:
    sent = {"X-Custom": "yes", "Accept-Language": "fr", **SECRET_HEADERS}
    future = submit_from_request(app, ctx_tasks.headers, headers=sent)
    assert future.result(30) == [
        ["Host", "localhost"],
        ["X-Custom", "yes"],
        ["Accept-Language", "fr"],
    ]
    # Names to let through, or to keep back, besides the words.
    url = redis_server.url
    chosen = ctx_tasks.create_app(
        {
            # 'Cookie' is in the default private list: public wins, named by the app.
            "THREADCTX_CELERY_PUBLIC_HEADERS": ["x-session-id", "Cookie"],
            "THREADCTX_CELERY_PRIVATE_HEADERS": ["X-Custom"],
            "THREADCTX_CELERY": {"broker_url": url, "result_backend": url},
        }
    )
    future = submit_from_request(chosen, ctx_tasks.headers, headers=sent)
    assert future.result(30) == [
        ["Host", "localhost"],
        ["Accept-Language", "fr"],
        ["X-Session-Id", "s"],
        ["Cookie", "a=b"],
    ]
    app_state(chosen).default.shutdown()


def test_form_crosses_and_files_explain_themselves(app: flask.Flask) -> None:
    data = {"name": "ada", "upload": (io.BytesIO(b"bytes"), "a.txt")}
    future = submit_from_request(app, ctx_tasks.describe, "form", method="POST", data=data)
    seen = future.result(30)
    assert seen["form"] == {"name": ["ada"]}
    assert seen["content_type"].startswith("multipart/form-data; boundary=")
    data = {"name": "ada", "upload": (io.BytesIO(b"bytes"), "a.txt")}
    future = submit_from_request(app, ctx_tasks.read_upload, method="POST", data=data)
    with pytest.raises(RuntimeError, match=r"uploaded files \(upload\), which do not cross"):
        future.result(30)


def test_body_over_the_limit_fails_the_submit(redis_server: RedisServer) -> None:
    url = redis_server.url
    small = ctx_tasks.create_app(
        {
            "THREADCTX_CELERY_MAX_BODY": 10,
            "THREADCTX_CELERY": {"broker_url": url, "result_backend": url},
        }
    )
    with pytest.raises(
        TypeError, match=r"is 11 bytes, more than 'THREADCTX_CELERY_MAX_BODY' \(10\)"
    ):
        submit_from_request(small, ctx_tasks.add, 1, 2, method="POST", data=b"x" * 11)
    assert submit_from_request(small, ctx_tasks.add, 1, 2, method="POST", data=b"x" * 10)
    app_state(small).default.shutdown(cancel_futures=True)


def _closure() -> t.Callable[[], None]:
    def inner() -> None: ...

    return inner


class Holder:
    def method(self) -> None: ...


@pytest.mark.usefixtures("app_ctx")
@pytest.mark.parametrize(
    ("fn", "args", "message"),
    [
        (lambda: None, (), "'<lambda>' cannot be sent .* it is a lambda"),
        (_closure(), (), "'_closure.<locals>.inner' .* defined inside another function"),
        (
            types.FunctionType(ctx_tasks.add.__code__, {"__name__": "__main__"}),
            (1, 2),
            "'add' .* defined in '__main__'",
        ),
        (Holder().method, (), "only functions defined at the top level of a module"),
        (
            ctx_tasks.add,
            (object(), 1),
            "The argument 0 of 'add', <object object at .*>, cannot cross",
        ),
        (ctx_tasks.add, ({1, 2}, 1), r"The argument 0 of 'add', \{1, 2\}, cannot cross"),
    ],
)
def test_what_cannot_cross_fails_at_submit(
    fn: t.Callable[..., t.Any], args: tuple[t.Any, ...], message: str
) -> None:
    before = threadctx.stats()["submitted"]
    with pytest.raises(TypeError, match=message):
        threadctx.submit(fn, *args)
    assert threadctx.stats()["submitted"] == before


@pytest.mark.usefixtures("app_ctx")
@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        (
            ({1: "a", "1": "b"},),
            {},
            r"^The argument 0 of 'echo' has the dict key 1 at argument 0: JSON would turn it into"
            r" the string '1', and drop its value if that string is a key too. Use string keys.$",
        ),
        (
            ([{"ok": {"deep": {(1, 2): "x"}}}],),
            {},
            r"The argument 0 of 'echo' has the dict key \(1, 2\) at argument 0\[0\]\['ok'\]"
            r"\['deep'\]: JSON cannot carry it\.",
        ),
        (
            (),
            {"data": {"rows": [{}, {None: 1}]}},
            r"The argument 'data' of 'echo' has the dict key None at"
            r" argument 'data'\['rows'\]\[1\]: JSON would turn it into the string 'null'",
        ),
    ],
)
def test_dict_keys_that_json_would_change_fail_at_submit(
    args: tuple[t.Any, ...], kwargs: dict[str, t.Any], message: str
) -> None:
    before = threadctx.stats()["submitted"]
    with pytest.raises(TypeError, match=message):
        threadctx.submit(ctx_tasks.echo, *args, **kwargs)
    assert threadctx.stats()["submitted"] == before
    # String keys, and keys of a str subclass, cross as they are.
    value = {"1": {"a": [1, {"b": 2}]}, ctx_tasks.Colour.RED: 3}
    assert threadctx.submit(ctx_tasks.echo, value).result(30) == [
        [{"1": {"a": [1, {"b": 2}]}, "red": 3}],
        {},
    ]


def test_g_with_a_key_json_would_change_is_named(app: flask.Flask) -> None:
    with app.test_request_context():
        flask.g.by_id = {7: "x"}
        with pytest.raises(TypeError, match=r"The 'g.by_id' of 'add' has the dict key 7 at"):
            threadctx.submit(ctx_tasks.add, 1, 2)


def deep(depth: int, value: t.Any) -> t.Any:
    """``value`` inside ``depth`` lists."""
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.usefixtures("app_ctx")
def test_a_key_deep_down_is_found_as_deep_as_json_encodes() -> None:
    # Deeper than the check once looked (100), not as deep as JSON refuses (about 1000).
    for depth in (101, 150, 600):
        with pytest.raises(TypeError) as caught:
            threadctx.submit(ctx_tasks.echo, deep(depth, {"1": "b", 1: "a"}))
        assert str(caught.value) == (
            f"The argument 0 of 'echo' has the dict key 1 at argument 0{'[0]' * depth}: JSON"
            " would turn it into the string '1', and drop its value if that string is a key"
            " too. Use string keys."
        )
    future = threadctx.submit(ctx_tasks.nested_keys, 600)
    with pytest.raises(TypeError) as caught:
        future.result(30)
    assert str(caught.value).startswith(
        f"'nested_keys' returned a dict key 2 at result{'[0]' * 600}: JSON would turn it"
    )
    # A value that loops back on itself is refused by JSON, not searched for ever.
    looped: list[t.Any] = [{"a": 1}]
    looped.append(looped)
    with pytest.raises(TypeError, match=r"^The argument 0 of 'echo', \[\{'a': 1\}, \[\.\.\.\]\],"):
        threadctx.submit(ctx_tasks.echo, looped, {1, 2})


def test_a_session_key_json_would_change_is_named(app: flask.Flask) -> None:
    with app.test_request_context():
        flask.session[1] = "int"  # type: ignore[index]
        flask.session["1"] = "str"
        with pytest.raises(TypeError) as caught:
            threadctx.submit(ctx_tasks.add, 1, 2)
        assert str(caught.value) == (
            "The session of 'add' has the key 1: JSON would turn it into the string '1', and"
            " drop its value if that string is a key too. Use string keys."
        )
    with app.test_request_context():
        flask.session[(1, 2)] = "tuple"  # type: ignore[index]
        with pytest.raises(TypeError, match=r"^The session of 'add' has the key \(1, 2\): JSON"):
            threadctx.submit(ctx_tasks.add, 1, 2)


@pytest.mark.usefixtures("app_ctx")
def test_result_with_a_key_json_would_change_fails_the_task() -> None:
    future = threadctx.submit(ctx_tasks.echo, {"x": 1}, as_keys=True)
    with pytest.raises(
        TypeError, match=r"^'echo' returned a dict key 1 at result\['x'\]: JSON would turn it into"
    ):
        future.result(30)


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


def test_g_that_cannot_cross_is_named(app: flask.Flask) -> None:
    with app.test_request_context():
        flask.g.tags = {"a"}
        with pytest.raises(TypeError, match=r"The 'g.tags' of 'add', \{'a'\}, cannot cross"):
            threadctx.submit(ctx_tasks.add, 1, 2)


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
def test_result_that_cannot_cross_fails_the_task() -> None:
    future = threadctx.submit(ctx_tasks.returns_object)
    with pytest.raises(TypeError, match=r"'returns_object' returned <object object at .*>, which"):
        future.result(30)


@pytest.mark.usefixtures("app_ctx")
def test_what_utf8_cannot_carry_crosses_escaped_or_as_it_is() -> None:
    """A lone surrogate (a file name that is not UTF-8) in an error or a progress note."""
    records = app_state(flask.current_app).backend("celery").records
    failed = threadctx.submit(ctx_tasks.raise_undecodable)
    with pytest.raises(FileNotFoundError) as caught:
        failed.result(10)  # less than the heartbeat, after which the worker would be lost
    assert caught.value.args == ("no such file: caf\udce9",)
    record = records.get(failed.task.id)
    assert record is not None
    assert (record.state, record.error) == ("failed", "FileNotFoundError: no such file: caf\\udce9")
    reported = threadctx.submit(ctx_tasks.report_undecodable)
    assert reported.result(10) == "ok"
    assert reported.task.progress == Progress(1.0, 2.0, "caf\\udce9")
    record = records.get(reported.task.id)
    assert record is not None
    assert record.progress == Progress(1.0, 2.0, "caf\\udce9")


@pytest.mark.usefixtures("app_ctx")
def test_exceptions_keep_their_type_or_name_it() -> None:
    with pytest.raises(ctx_tasks.CustomError, match=r"^custom$") as caught:
        threadctx.submit(ctx_tasks.raise_custom).result(30)
    assert isinstance(caught.value.__cause__, RemoteTraceback)
    assert 'raise CustomError("custom")' in caught.value.__cause__.text
    with pytest.raises(RemoteTaskError, match=r"^gone.module.Vanished: it went") as named:
        threadctx.submit(ctx_tasks.raise_vanished).result(30)
    assert named.value.type_name == "gone.module.Vanished"


@pytest.mark.usefixtures("app_ctx")
def test_retries_go_through_celery(redis_server: RedisServer) -> None:
    key = f"flaky-{os.getpid()}-{id(object())}"
    assert ctx_tasks.flaky.submit(key, redis_server.url).result(30) == 3


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


def test_broker_down_rejects_and_sends_nothing(redis_server: RedisServer) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    app = ctx_tasks.create_app(
        {"THREADCTX_CELERY": {"broker_url": dead, "result_backend": redis_server.url}}
    )
    reasons: list[Exception] = []

    def rejected(sender: flask.Flask, task: t.Any, reason: Exception) -> None:
        reasons.append(reason)

    with app.app_context(), task_rejected.connected_to(rejected, app):
        before = threadctx.stats()
        with pytest.raises(BrokerUnavailable, match="the broker cannot be reached") as caught:
            threadctx.submit(ctx_tasks.add, 1, 2)
        after = threadctx.stats()
    assert reasons == [caught.value]
    assert after["rejected"] - before["rejected"] == 1
    assert after["submitted"] - before["submitted"] == 1
    assert after["queued"] == before["queued"]


def test_a_redis_that_hangs_fails_the_submit_at_its_bound(tmp_path: t.Any) -> None:
    """Redis stopped, not closed: a submit raises ``BrokerUnavailable`` after
    ``THREADCTX_CELERY_SUBMIT_TIMEOUT``, while Redis still hangs, in a process that was
    connected and in one that was not (its listener connects first); each is booked rejected
    once Redis answers. A message the broker took after all is not run: the rejection holds."""
    server = RedisServer(tmp_path)
    server.start()
    assert server.process is not None
    config = {
        "THREADCTX_CELERY": {"broker_url": server.url, "result_backend": server.url},
        "THREADCTX_CELERY_SUBMIT_TIMEOUT": 1,
    }
    connected, fresh = ctx_tasks.create_app(config), ctx_tasks.create_app(config)
    bound = r"^The task was not sent: Redis did not answer within 1 s \('THREADCTX_CELERY_SUB"
    rejected: list[TaskInfo] = []

    def on_rejected(sender: flask.Flask, task: TaskInfo, reason: Exception) -> None:
        rejected.append(task)

    task_rejected.connect(on_rejected)
    try:
        with connected.app_context():
            sent = threadctx.submit(ctx_tasks.add, 1, 2)  # no worker takes it
            assert threadctx.stats()["queued"] == 1  # its record written
        server.process.send_signal(signal.SIGSTOP)
        try:
            for app in (connected, fresh):
                with app.app_context(), pytest.raises(BrokerUnavailable, match=bound):
                    threadctx.submit(ctx_tasks.add, 3, 4)
        finally:
            server.process.send_signal(signal.SIGCONT)
        app_state(fresh).backend("celery").flush_records()
        with connected.app_context():
            stats = threadctx.stats()
        assert (stats["submitted"], stats["queued"], stats["rejected"]) == (3, 1, 2)
        records = app_state(connected).backend("celery")._connect()[1]
        found = [records.get(task.id) for task in rejected]
        assert [r and r.state for r in found] == ["rejected"] * 2
        client = redis.Redis.from_url(server.url)
        queued = [
            json.loads(message)["headers"]["id"] for message in client.lrange("celery", 0, -1)
        ]
        client.close()
        # One was published as Redis hung and reached the queue once it went on: a worker
        # that takes it finds it rejected. The other's listener was still connecting: its
        # submit gave up before it was published.
        assert set(queued) <= {sent.task.id, rejected[0].id}
        assert [records.claim(task.id, "run") for task in rejected] == ["rejected"] * 2
    finally:
        task_rejected.disconnect(on_rejected)
        for app in (connected, fresh):
            app_state(app).default.shutdown(wait=False)
        server.process.send_signal(signal.SIGCONT)
        server.stop()


def test_reads_of_the_records_give_up_at_the_bound_on_a_redis_that_hangs(
    tmp_path: t.Any,
) -> None:
    """Redis stopped, not closed: get_task, stats and 'flask threadctx stats' raise (one line
    for the CLI) within ``THREADCTX_CELERY_SUBMIT_TIMEOUT``, not when Redis goes on."""
    server = RedisServer(tmp_path)
    server.start()
    assert server.process is not None
    config = {
        "THREADCTX_CELERY": {"broker_url": server.url, "result_backend": server.url},
        "THREADCTX_CELERY_SUBMIT_TIMEOUT": 1,
        "THREADCTX_TASK_STORE": "celery",
    }
    app, other = ctx_tasks.create_app(config), ctx_tasks.create_app(config)
    reads = concurrent.futures.ThreadPoolExecutor(1)
    try:
        with app.app_context():
            sent = threadctx.submit(ctx_tasks.add, 1, 2)  # no worker takes it
            assert threadctx.stats()["queued"] == 1
        with other.app_context():
            assert threadctx.stats()["queued"] == 1  # connected
        server.process.send_signal(signal.SIGSTOP)
        try:

            def read(what: t.Callable[[], object]) -> object:
                with other.app_context():
                    return what()

            def cli() -> t.Any:
                return other.test_cli_runner().invoke(args=["threadctx", "stats"])

            answers = [
                reads.submit(read, lambda: threadctx.get_task(sent.task.id)),
                reads.submit(read, threadctx.stats),
                reads.submit(cli),
            ]
            # A guard against a hang, far beyond the bound: not what the test measures.
            done, _ = concurrent.futures.wait(answers, timeout=60)
            assert len(done) == 3, "a read waited for Redis to go on"
            errors = [answers[0].exception(), answers[1].exception()]
            result: t.Any = answers[2].result()
        finally:
            server.process.send_signal(signal.SIGCONT)
        assert [type(e) for e in errors] == [redis.exceptions.TimeoutError] * 2
        # redis-py names the server from 8.2 on ("... from socket" before).
        assert [str(e).startswith("Timeout reading from ") for e in errors] == [True, True]
        assert (result.exit_code, result.output.count("\n")) == (1, 1), result.output
        assert result.output.startswith("Error: Cannot read the task store, ")
        assert ": Timeout reading from " in result.output
    finally:
        reads.shutdown(wait=False)
        for made in (app, other):
            app_state(made).default.shutdown(wait=False)
        server.process.send_signal(signal.SIGCONT)
        server.stop()


def test_a_submit_refused_while_redis_is_down_is_counted_once_it_is_back(
    tmp_path: t.Any,
) -> None:
    server = RedisServer(tmp_path)
    server.start()
    app = ctx_tasks.create_app(
        {"THREADCTX_CELERY": {"broker_url": server.url, "result_backend": server.url}}
    )
    try:
        with app.app_context():
            threadctx.submit(ctx_tasks.add, 1, 2)  # connected; no worker takes it
            server.stop()  # and its data with it
            for _ in range(3):
                with pytest.raises(BrokerUnavailable, match="cannot be reached"):
                    threadctx.submit(ctx_tasks.add, 3, 4)
            listener = app_state(app).backend("celery")._listener
            assert listener is not None
            deadline = time.monotonic() + 60
            while listener._attempts < 7:  # its backoff is at its longest, 5 s, now
                assert time.monotonic() < deadline
                time.sleep(0.05)  # a poll of the listener's attempts
            server.start()
            # Taken at once, not when the listener's backoff ends: the submit has it try now.
            taken = threadctx.submit(ctx_tasks.add, 5, 6)
            assert taken.task.state == "pending"
            stats = threadctx.stats()
        assert (stats["submitted"], stats["queued"], stats["rejected"]) == (4, 1, 3)
    finally:
        app_state(app).default.shutdown(wait=False)
        server.stop()


def test_password_protected_redis(tmp_path: t.Any) -> None:
    """Publishing, the records and the cancel claim all go through a Redis with a password."""
    server = RedisServer(tmp_path, password="s3cret")
    server.start()
    try:
        app = ctx_tasks.create_app(
            {"THREADCTX_CELERY": {"broker_url": server.url, "result_backend": server.url}}
        )
        with app.app_context():
            future = ctx_tasks.later.submit(1)
            assert redis.Redis.from_url(server.url).llen("celery") == 1  # published
            assert future.cancel() is True
            assert threadctx.stats()["cancelled"] == 1
        app_state(app).default.shutdown()
        listener = app_state(app).backend("celery")._listener
        assert listener is not None
        listener.join(10)
        gc.collect()
    finally:
        server.stop()


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


def test_worker_help_says_whose_options_follow(app: flask.Flask) -> None:
    result = app.test_cli_runner().invoke(args=["threadctx", "worker", "--help"])
    assert result.exit_code == 0, result.output
    ours, celerys = result.output.split("The options of 'celery worker':")
    assert ours.startswith("Usage: ctx_tasks threadctx worker [OPTIONS]")  # the runner's name
    assert "Any options are those of 'celery worker', listed below" in " ".join(ours.split())
    assert "--concurrency" in celerys


def test_records_written_in_the_background_are_read_back_after_flush(
    redis_server: RedisServer,
) -> None:
    client = redis.Redis.from_url(redis_server.url)
    records = RedisTaskRecords(client, f"flush-{os.getpid()}", 60, 30.0)
    infos = [TaskInfo(f"t{n}", "add", None, "GET /") for n in range(500)]
    for info in infos[:-1]:
        records.add_soon(info, "replies")
    records.reject_soon(infos[-1], "replies")  # added and booked at once
    records.progress_soon(infos[0], Progress(1, 2, "half"), None)
    records.progress_soon(infos[0], Progress(2, 2, None), None)  # the note goes too
    records.flush()
    assert records.get(infos[0].id).progress == Progress(2, 2, None)  # type: ignore[union-attr]
    assert [records.get(info.id).state for info in infos] == ["pending"] * 499 + ["rejected"]  # type: ignore[union-attr]
    assert (records.counts()["submitted"], records.counts()["rejected"]) == (500, 1)


def test_an_end_is_booked_once_by_whoever_books_it_first(redis_server: RedisServer) -> None:
    """The worker's own end, its main process's word that the pool process died and a
    submitter's verdict that the task was lost, in every order and racing: each task is booked
    once, by the first, and a duplicate delivery of a task that ended does not run again."""
    client = redis.Redis.from_url(redis_server.url)
    records = RedisTaskRecords(client, f"once-{os.getpid()}", 60, 30.0)
    error = celery.exceptions.WorkerLostError("gone")
    ends: dict[str, t.Callable[[str], bool]] = {
        "succeeded": lambda task_id: records.finish(task_id, None, (f"r-{task_id}", "{}", 60)),
        "died": lambda task_id: records.finish(task_id, error, (f"r-{task_id}", "{}", 60)),
        "lost": lambda task_id: records.finish(
            task_id, error, (f"r-{task_id}", "{}", 60), lost_since=time.time()
        ),
    }
    orders = list(itertools.permutations(ends))
    racing = 300
    infos = [TaskInfo(f"t{n}", "add", None, None) for n in range(len(orders) + racing)]
    for info in infos:
        records.add_soon(info, "replies")
    records.flush()
    for info in infos:
        assert records.claim(info.id, "run") == "run"
    client.delete(*(records._alive_key(info.id) for info in infos))  # its process is gone
    booked: dict[str, list[str]] = {}
    for info, order in zip(infos, orders, strict=False):
        booked[info.id] = [how for how in order if ends[how](info.id)]
    assert [booked[info.id] for info in infos[: len(orders)]] == [[order[0]] for order in orders]

    def race(task_id: str, how: str, start: threading.Barrier) -> str | None:
        start.wait()
        return how if ends[how](task_id) else None

    with concurrent.futures.ThreadPoolExecutor(len(ends)) as pool:
        for info in infos[len(orders) :]:
            start = threading.Barrier(len(ends))
            found = [pool.submit(race, info.id, how, start) for how in ends]
            booked[info.id] = [how for f in found if (how := f.result()) is not None]
    assert [len(booked[info.id]) for info in infos] == [1] * len(infos)
    states = {"succeeded": "succeeded", "died": "failed", "lost": "failed"}
    assert [records.get(info.id).state for info in infos] == [  # type: ignore[union-attr]
        states[booked[info.id][0]] for info in infos
    ]
    assert [records.claim(info.id, "run") for info in infos] == ["finished"] * len(infos)
    counts = records.counts()
    succeeded = sum(booked[info.id] == ["succeeded"] for info in infos)
    assert (counts["queued"], counts["running"], counts["succeeded"], counts["failed"]) == (
        0,
        0,
        succeeded,
        len(infos) - succeeded,
    )
    client.close()


def test_records_that_cannot_be_written_are_given_up_with_an_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    records = RedisTaskRecords(
        redis.Redis(port=free_port(), retry=redis.retry.Retry(redis.backoff.NoBackoff(), 0)),
        "away",
        60,
        30.0,
    )
    records.add_soon(TaskInfo("t1", "add", None, None), "replies")  # returns at once
    records.flush(timeout=30)
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == [
        "Gave up writing 1 task records to Redis (Error 111 connecting to localhost:"
        f"{records.client.connection_pool.connection_kwargs['port']}. Connection refused.);"
        " the tasks are not affected, but their records and counts are incomplete."
    ]


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


@pytest.mark.usefixtures("app_ctx")
def test_progress_reaches_the_submitter_and_the_records(redis_server: RedisServer) -> None:
    client = redis.Redis.from_url(redis_server.url)
    key = f"progress-{os.getpid()}"
    future = threadctx.submit(ctx_tasks.reports_then_waits, key, redis_server.url)
    assert client.blpop([key], timeout=30) is not None
    records = app_state(flask.current_app).backend("celery")._connect()[1]
    records.flush()  # the worker here writes through this process's writer
    seen = records.get(future.task.id)
    assert seen is not None and seen.progress == Progress(3, 10, "rows")
    deadline = time.monotonic() + 30
    while future.task.progress is None and time.monotonic() < deadline:
        time.sleep(0.01)  # the listener thread hears it: nothing to wait on from here
    assert future.task.progress == Progress(3, 10, "rows")
    client.rpush(key + ":go", 1)
    assert future.result(30) == "ok"
    assert future.task.progress == Progress(10, 10, "done")  # heard before the result


@pytest.fixture
def every_report_passed_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each report a second after the last, for the clock of report_progress: every one is
    passed on, however fast the test goes."""
    ticks = itertools.count(step=1.0)
    monkeypatch.setattr(progress_module, "_clock", lambda: next(ticks))


@pytest.mark.usefixtures("every_report_passed_on")
def test_progress_seen_from_another_process_follows_the_task(
    app: flask.Flask, redis_server: RedisServer
) -> None:
    client = redis.Redis.from_url(redis_server.url)
    key = f"steps-{os.getpid()}"
    with app.app_context():
        future = threadctx.submit(ctx_tasks.steps, key, redis_server.url, 4)
    # Another web process: an app of its own, with its own Celery backend and listener.
    there = ctx_tasks.create_app()
    records = app_state(app).backend("celery")._connect()[1]
    try:
        seen = []
        for _ in range(4):
            client.rpush(key + ":go", 1)
            assert client.blpop([key], timeout=30) is not None
            records.flush()  # the worker here writes through this process's writer
            with there.app_context():
                other = threadctx.get_task(future.task.id)
            assert other is not None and other.task.progress is not None
            seen.append(other.task.progress)
            assert type(other.task.progress.done) is int
        assert seen == [Progress(i, 4, f"step {i}") for i in range(1, 5)]
        assert future.result(30) == "done"
        assert future.task.progress == Progress(4, 4, "step 4")
    finally:
        app_state(there).default.shutdown()


@pytest.mark.usefixtures("app_ctx")
def test_an_earlier_report_never_replaces_a_later_one(redis_server: RedisServer) -> None:
    client = redis.Redis.from_url(redis_server.url)
    backend = app_state(flask.current_app).backend("celery")
    key = f"later-{os.getpid()}"
    first, second = (
        threadctx.submit(ctx_tasks.wait_for_signal, key, redis_server.url) for _ in "ab"
    )
    for _ in "ab":
        assert client.blpop([key], timeout=30) is not None
    try:

        def report(future: TaskFuture[t.Any], done: int, seq: int) -> None:
            data = [future.task.id, done, 10, f"report {seq}", seq]
            client.publish(backend.reply_channel, PROGRESS_MESSAGE + json.dumps(data))

        def heard(future: TaskFuture[t.Any], done: int) -> None:
            deadline = time.monotonic() + 30
            while getattr(future.task.progress, "done", None) != done:
                assert time.monotonic() < deadline
                time.sleep(0.01)  # the listener thread hears it: nothing to wait on from here

        report(first, 6, 2)
        heard(first, 6)
        report(first, 5, 1)  # late, or sent again
        report(second, 1, 1)  # heard after it, in order
        heard(second, 1)
        assert first.task.progress == Progress(6, 10, "report 2")
        # The records keep the later one too, whatever order the writes come in.
        records = backend._connect()[1]
        records.progress_soon(first.task, Progress(8, 10, "report 4"), None, 4)
        records.progress_soon(first.task, Progress(7, 10, "report 3"), None, 3)
        records.flush()
        kept = records.get(first.task.id)
        assert kept is not None and kept.progress == Progress(8, 10, "report 4")
    finally:
        client.rpush(key + ":go", 1, 1)
    assert (first.result(30), second.result(30)) == (os.getpid(), os.getpid())


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
