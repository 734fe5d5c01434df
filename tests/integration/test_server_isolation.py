"""Isolation under load on real servers: every request's task and grandchild see that request's
user in every field, exactly once, with nothing lost."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import subprocess
import sys
import typing as t
from pathlib import Path

import pytest

import servers

CLIENTS = 32
REQUESTS = 3000

servers.require_servers()


@pytest.mark.parametrize("kind", servers.KINDS)
def test_isolation_under_load(kind: str, tmp_path: Path, figures: dict[str, t.Any]) -> None:
    db = tmp_path / "seen.sqlite"
    server = servers.start(kind, db)
    try:
        load = subprocess.run(
            [sys.executable, str(servers.HERE / "loadgen.py"), server.url, str(CLIENTS),
             str(REQUESTS)],
            capture_output=True, text=True, timeout=300, check=True, cwd=servers.HERE,
        )  # fmt: skip
    finally:
        code, _ = server.stop()
    summary = json.loads(load.stdout)
    with contextlib.closing(sqlite3.connect(db)) as conn:
        rows = conn.execute(
            "SELECT request_id, level, query, body, header, session, g, task_id, parent_id"
            " FROM seen"
        ).fetchall()

    by_request: dict[str, list[tuple[t.Any, ...]]] = {}
    for row in rows:
        by_request.setdefault(row[0], []).append(row)
    cross_talk = [row for row in rows if len(set(row[2:7]) | {row[0]}) != 1]
    wrong_count = {rid: len(rs) for rid, rs in by_request.items() if len(rs) != 2}
    unlinked = [
        rid
        for rid, rs in by_request.items()
        if len(rs) == 2
        and {r[1] for r in rs} == {1, 2}
        and next(r for r in rs if r[1] == 2)[8] != next(r for r in rs if r[1] == 1)[7]
    ]
    lost = 2 * REQUESTS - len(rows)
    figures.update(
        server=kind,
        requests_served=summary["statuses"].get("200", 0),
        tasks_recorded=len(rows),
        cross_talk=len(cross_talk),
        tasks_lost=lost,
        seconds=round(summary["seconds"], 1),
    )
    assert code == 0, server.log
    assert summary["statuses"] == {"200": REQUESTS}, summary
    assert summary["error_count"] == 0, summary["errors"]
    assert cross_talk == []
    assert wrong_count == {}
    assert unlinked == []
    assert sorted(by_request) == sorted(f"u{n}" for n in range(REQUESTS))
    assert lost == 0
