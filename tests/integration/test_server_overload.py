"""A flood of requests against a bounded queue: refused with 503, memory flat, still serving."""

from __future__ import annotations

import json
import subprocess
import sys
import typing as t
import urllib.request
from pathlib import Path

import servers

servers.require_servers()

MAX_QUEUE = 20


def _stats(url: str) -> dict[str, t.Any]:
    with urllib.request.urlopen(f"{url}/stats", timeout=30) as response:
        return t.cast(dict[str, t.Any], json.load(response))


def _flood(url: str, requests: int) -> dict[str, t.Any]:
    load = subprocess.run(
        [sys.executable, str(servers.HERE / "loadgen.py"), url, "32", str(requests), "/slow"],
        capture_output=True, text=True, timeout=300, check=True, cwd=servers.HERE,
    )  # fmt: skip
    return t.cast(dict[str, t.Any], json.loads(load.stdout))


def test_overload(tmp_path: Path, figures: dict[str, t.Any]) -> None:
    server = servers.start(
        "gunicorn-gthread",
        tmp_path / "overload.sqlite",
        workers=1,
        THREADCTX_TEST_MAX_QUEUE=str(MAX_QUEUE),
        THREADCTX_TEST_MAX_WORKERS="2",
    )
    try:
        warm = _flood(server.url, 2000)
        before = _stats(server.url)
        flood = _flood(server.url, 4000)
        after = _stats(server.url)
    finally:
        code, _ = server.stop()
    statuses = flood["statuses"]
    growth_kb = after["rss_kb"] - before["rss_kb"]
    figures.update(
        requests=flood["sent"],
        served=statuses.get("200", 0),
        rejected_503=statuses.get("503", 0),
        rejected_by_pool=after["rejected"] - before["rejected"],
        rss_before_mb=round(before["rss_kb"] / 1024, 1),
        rss_after_mb=round(after["rss_kb"] / 1024, 1),
    )
    assert code == 0, server.log
    for result in (warm, flood):
        assert result["error_count"] == 0, result["errors"]
        assert set(result["statuses"]) <= {"200", "503"}
    assert statuses.get("503", 0) > 0
    assert flood["503_with_retry_after"] == statuses["503"]
    assert after["rejected"] - before["rejected"] == statuses["503"]
    assert before["pid"] == after["pid"]
    assert after["submitted"] == (
        after["queued"] + after["running"] + after["succeeded"] + after["failed"]
        + after["cancelled"] + after["rejected"]
    )  # fmt: skip
    assert growth_kb < 4 * 1024, f"resident memory grew by {growth_kb} KiB"
