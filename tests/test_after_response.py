"""Tasks that read the request after the response was sent, on a real server
(pytest-flask's ``live_server``, Werkzeug's threaded server in its own process)."""

from __future__ import annotations

import io
import json
import threading
import typing as t
import urllib.request
import uuid

import flask
import pytest
from flask import after_this_request
from flask import request
from flask_threadctx import ThreadContext

if t.TYPE_CHECKING:
    from pytest_flask.live_server import LiveServer


@pytest.fixture
def app(make_app: t.Callable[..., flask.Flask], ext: ThreadContext) -> flask.Flask:
    app = make_app(ext, THREADCTX_COPY_FILES=True, LIVESERVER_PORT=0)

    @app.post("/submit")
    def submit() -> t.Any:
        sent = threading.Event()

        @after_this_request
        def signal_when_sent(response: flask.Response) -> flask.Response:
            response.call_on_close(sent.set)
            return response

        def read_later() -> dict[str, t.Any]:
            assert sent.wait(10), "the response was never closed"
            upload = request.files.get("upload")
            return {
                "json": request.get_json(silent=True),
                "form": request.form.to_dict(),
                "data": request.get_data(as_text=True),
                "file": None if upload is None else upload.read().decode(),
            }

        return {"id": ext.submit(read_later).task.id}

    @app.get("/result/<task_id>")
    def result(task_id: str) -> t.Any:
        future = ext.get_task(task_id)
        assert future is not None
        return future.result(timeout=10)

    return app


def _post(server: LiveServer, body: bytes, content_type: str) -> dict[str, t.Any]:
    base = server.url()
    submitted = urllib.request.Request(
        f"{base}/submit", data=body, headers={"Content-Type": content_type}, method="POST"
    )
    with urllib.request.urlopen(submitted, timeout=10) as response:
        task_id = json.load(response)["id"]
    with urllib.request.urlopen(f"{base}/result/{task_id}", timeout=10) as response:
        return t.cast(dict[str, t.Any], json.load(response))


def test_json_after_response(live_server: LiveServer) -> None:
    body = json.dumps({"user": 7}).encode()
    assert _post(live_server, body, "application/json") == {
        "json": {"user": 7},
        "form": {},
        "data": '{"user": 7}',
        "file": None,
    }


def test_form_after_response(live_server: LiveServer) -> None:
    assert _post(live_server, b"a=1&b=2", "application/x-www-form-urlencoded") == {
        "json": None,
        "form": {"a": "1", "b": "2"},
        "data": "a=1&b=2",
        "file": None,
    }


def test_files_after_response(live_server: LiveServer) -> None:
    boundary = uuid.uuid4().hex
    body = io.BytesIO()
    body.write(
        f'--{boundary}\r\nContent-Disposition: form-data; name="note"\r\n\r\nhi\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="upload"; filename="a.txt"\r\n'
        f"Content-Type: text/plain\r\n\r\nfile body\r\n--{boundary}--\r\n".encode()
    )
    assert _post(live_server, body.getvalue(), f"multipart/form-data; boundary={boundary}") == {
        "json": None,
        "form": {"note": "hi"},
        "data": "",
        "file": "file body",
    }
