"""What crosses to a Celery worker with a task (``contexts/wire.py``, ``messages.py``): the
request rebuilt there, ``g``, the session, the arguments, the result and the exception on the
way back; and what cannot cross, refused at submit or failing the task with its name."""

from __future__ import annotations

import io
import os
import types
import typing as t

import ctx_tasks
import flask
import pytest
from flask_threadctx import Progress
from flask_threadctx import RemoteTaskError
from flask_threadctx.app_state import app_state
from flask_threadctx.contexts.wire import RemoteTraceback
from harness import RedisServer
from harness import submit_from_request

threadctx = ctx_tasks.threadctx


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
    "X-Shopify-Hmac-Sha256": "webhook signature",
    "DPoP": "proof",
    "X-Client-Cert": "forwarded by the proxy",
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


def test_g_that_cannot_cross_is_named(app: flask.Flask) -> None:
    with app.test_request_context():
        flask.g.tags = {"a"}
        with pytest.raises(TypeError, match=r"The 'g.tags' of 'add', \{'a'\}, cannot cross"):
            threadctx.submit(ctx_tasks.add, 1, 2)


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


def test_a_chunked_body_crosses_whole(app: flask.Flask) -> None:
    """A body that came chunked is read on the worker as in the view: its
    'Transfer-Encoding' stays behind, beside which the rebuilt request read it as empty."""
    body = b'{"order": 42}'
    future = submit_from_request(
        app,
        ctx_tasks.describe,
        "chunked",
        path="/orders",
        method="POST",
        input_stream=io.BytesIO(body),
        headers={"Transfer-Encoding": "chunked", "Content-Type": "application/json"},
        environ_overrides={"wsgi.input_terminated": True},
    )
    seen = future.result(30)
    assert (seen["json"], seen["content_type"]) == ({"order": 42}, "application/json")
