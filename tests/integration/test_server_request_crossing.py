"""A request rebuilt for the Celery backend reads as in the view, for the bytes each real server
hands over: raw UTF-8 or percent-encoded in the path and query, UTF-8 in headers and forms."""

from __future__ import annotations

import json
import os
import socket
import typing as t
from pathlib import Path

import pytest

import servers

servers.require_servers()

ON_CELERY = servers.HERE.parent / "on_celery"

REQUESTS = {
    "raw UTF-8": b"GET /read/caf\xc3\xa9?q=caf\xc3\xa9&e=%E2%82%AC HTTP/1.1\r\n",
    "percent-encoded": b"GET /read/caf%C3%A9?q=caf%C3%A9&r=a+b%26 HTTP/1.1\r\n",
    "UTF-8 header and form": b"POST /read/x?q=%C3%A9 HTTP/1.1\r\nX-Name: caf\xc3\xa9\r\n"
    b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 22\r\n",
}
BODIES = {"UTF-8 header and form": b"f=na%C3%AFve+%E2%98%83"}


def send(port: int, head: bytes, body: bytes = b"") -> tuple[int, dict[str, t.Any]]:
    """Send one request as these bytes; return its status and JSON body."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
        connection.sendall(head + b"Host: 127.0.0.1\r\nConnection: close\r\n\r\n" + body)
        chunks = []
        while chunk := connection.recv(65536):
            chunks.append(chunk)
    response = b"".join(chunks)
    status_line, _, rest = response.partition(b"\r\n")
    headers, _, content = rest.partition(b"\r\n\r\n")
    assert b"chunked" not in headers.lower(), response
    status = int(status_line.split()[1])
    if status != 200:
        return status, {"response": response.decode("latin-1")}
    return status, json.loads(content)


@pytest.mark.parametrize("kind", servers.KINDS)
def test_request_reads_in_the_task_as_in_the_view(kind: str, tmp_path: Path) -> None:
    server = servers.start(
        kind,
        tmp_path / "unused.sqlite",
        workers=1,
        app="ctx_tasks:create_app()",
        environment={
            # The Celery backend in eager mode: the task runs here, from the message a worker
            # would get, decoded from JSON.
            "THREADCTX_TEST_CONFIG": json.dumps({"THREADCTX_EAGER": True}),
            "PYTHONPATH": os.pathsep.join(
                [str(ON_CELERY), str(servers.HERE), str(servers.HERE.parents[1])]
            ),
        },
    )
    try:
        seen = {
            name: send(server.port, head, BODIES.get(name, b"")) for name, head in REQUESTS.items()
        }
    finally:
        server.stop()
    status, raw = seen.pop("raw UTF-8")
    if kind == "werkzeug":  # it takes raw UTF-8 in the request line (and reads it as latin-1)
        assert raw["view"]["args"]["e"] == ["€"]
        seen["raw UTF-8"] = status, raw
    else:  # gunicorn and waitress refuse it
        assert status == 400, raw
    for name, (status, answer) in seen.items():
        assert status == 200, (name, answer)
        assert answer["task"] == answer["view"], name
    encoded = seen["percent-encoded"][1]["view"]
    assert encoded["view_args"] == {"name": "café"}
    assert encoded["args"] == {"q": ["café"], "r": ["a b&"]}
    form = seen["UTF-8 header and form"][1]["view"]
    assert form["form"] == {"f": ["naïve ☃"]}
    assert form["args"] == {"q": ["é"]}
    # A header's value reads as the server hands it over: its bytes, decoded as latin-1.
    assert form["headers"] == [["X-Name", "caf\xc3\xa9"]]
