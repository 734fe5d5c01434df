"""SIGTERM to gunicorn with 500 queued 20 ms tasks: nothing is lost without a word."""

from __future__ import annotations

import contextlib
import re
import sqlite3
import typing as t
import urllib.request
from pathlib import Path

import servers

servers.require_servers()

TASKS = 500


def _flood_then_stop(tmp_path: Path, timeout: float) -> tuple[dict[str, int], int, float, str]:
    db = tmp_path / "flood.sqlite"
    server = servers.start(
        "gunicorn-gthread",
        db,
        workers=1,
        THREADCTX_TEST_SHUTDOWN_TIMEOUT=str(timeout),
        THREADCTX_TEST_MAX_WORKERS="4",
    )
    try:
        request = urllib.request.Request(f"{server.url}/flood?n={TASKS}&ms=20", method="POST")
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.status == 200
    finally:
        code, seconds = server.stop()
    with contextlib.closing(sqlite3.connect(db)) as conn:
        outcomes = dict(conn.execute("SELECT outcome, count(*) FROM flood GROUP BY outcome"))
    return outcomes, code, seconds, server.log


def test_long_timeout_lets_every_task_finish(tmp_path: Path, figures: dict[str, t.Any]) -> None:
    outcomes, code, seconds, log = _flood_then_stop(tmp_path, timeout=60)
    figures.update(
        submitted=TASKS, finished=outcomes.get("finished", 0), exit_seconds=round(seconds, 1)
    )
    assert code == 0, log
    assert outcomes == {"finished": TASKS}
    assert "Cancelled" not in log and "Abandoned" not in log


def test_short_timeout_cancels_and_says_so(tmp_path: Path, figures: dict[str, t.Any]) -> None:
    timeout = 0.5
    outcomes, code, seconds, log = _flood_then_stop(tmp_path, timeout=timeout)
    finished, cancelled = outcomes.get("finished", 0), outcomes.get("cancelled", 0)
    logged = re.search(r"Cancelled (\d+) task\(s\) of 'wsgi_app' that had not started", log)
    figures.update(
        submitted=TASKS,
        finished=finished,
        cancelled=cancelled,
        exit_seconds=round(seconds, 1),
    )
    assert code == 0, log
    assert finished + cancelled == TASKS
    assert cancelled > 0
    assert logged is not None and int(logged.group(1)) == cancelled, log
    assert "Abandoned" not in log  # 20 ms tasks all finish within the grace period
    # The drain takes at most the timeout plus the grace (at least 1 s); the rest is gunicorn
    # stopping its worker and master.
    assert seconds < timeout + max(timeout, 1.0) + 10, seconds
