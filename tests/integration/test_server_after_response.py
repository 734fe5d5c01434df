"""Tasks that read the request after the response was sent, on every server."""

from __future__ import annotations

import contextlib
import http.client
import json
import sqlite3
import typing as t
import uuid
from pathlib import Path

import pytest

import servers

servers.require_servers()

BOUNDARY = uuid.uuid4().hex
BODIES = {
    "json": ("application/json", json.dumps({"user": 7}).encode()),
    "form": ("application/x-www-form-urlencoded", b"a=1&b=2"),
    "file": (
        f"multipart/form-data; boundary={BOUNDARY}",
        (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="note"\r\n\r\nhi\r\n'
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="upload"; filename="a.txt"\r\n'
            f"Content-Type: text/plain\r\n\r\nfile body\r\n--{BOUNDARY}--\r\n"
        ).encode(),
    ),
}
EXPECTED = {
    "json": ("{'user': 7}", "{}", '{"user": 7}', None),
    "form": ("None", "{'a': '1', 'b': '2'}", "a=1&b=2", None),
    "file": ("None", "{'note': 'hi'}", "", "file body"),
}


@pytest.mark.parametrize("kind", servers.KINDS)
def test_body_after_response(kind: str, tmp_path: Path, figures: dict[str, t.Any]) -> None:
    db = tmp_path / "after.sqlite"
    server = servers.start(kind, db)
    try:
        for name, (content_type, body) in BODIES.items():
            http_conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
            http_conn.request(
                "POST",
                "/after",
                body=body,
                headers={"Content-Type": content_type, "X-Request-Id": name},
            )
            response = http_conn.getresponse()
            assert response.status == 200, response.read()
            response.read()
            http_conn.close()
    finally:
        code, exit_seconds = server.stop()
    with contextlib.closing(sqlite3.connect(db)) as conn:
        rows = {row[0]: row[1:] for row in conn.execute("SELECT * FROM after")}
    figures.update(
        server=kind, bodies_read_after_response=len(rows), exit_seconds=round(exit_seconds, 1)
    )
    assert code == 0, server.log
    assert rows == EXPECTED, server.log
