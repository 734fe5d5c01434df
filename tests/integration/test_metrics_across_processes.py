"""Metrics from a gunicorn with two worker processes, in prometheus_client's multiprocess mode:
whichever process is scraped, the counters add up to the tasks that all of them ran."""

from __future__ import annotations

import collections
import json
import re
import time
import typing as t
import urllib.request
from pathlib import Path

import servers

JOBS = 40
SCRAPES = 10


def fetch(url: str) -> str:
    return scrape(url)[0]


def scrape(url: str) -> tuple[str, str | None]:
    """The body, and the ``X-Pid`` of the process that answered."""
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read().decode(), response.headers.get("X-Pid")


def samples(text: str) -> dict[str, float]:
    """``{'name{labels}': value}`` of the lines of Prometheus's text format."""
    return {
        match[1]: float(match[2])
        for match in re.finditer(r"^(\w+(?:\{[^}]*\})?) (\S+)$", text, re.MULTILINE)
    }


def test_counters_add_up_over_processes(tmp_path: Path, figures: dict[str, t.Any]) -> None:
    folder = tmp_path / "prometheus"
    folder.mkdir()
    server = servers.start(
        "gunicorn-gthread",
        tmp_path / "seen.sqlite",
        PROMETHEUS_MULTIPROC_DIR=str(folder),
        THREADCTX_TEST_METRICS="1",
        THREADCTX_TEST_STORE=f"sqlite:///{tmp_path / 'tasks.db'}",
    )
    try:
        for _ in range(JOBS):
            request = urllib.request.Request(f"{server.url}/job", method="POST")
            urllib.request.urlopen(request, timeout=30).close()
        # The store says when every task of both processes is done; the deadline only keeps
        # a broken server from hanging the test.
        deadline = time.monotonic() + 60
        while (stats := json.loads(fetch(f"{server.url}/stats")))["succeeded"] != 2 * JOBS:
            assert time.monotonic() < deadline, stats
        # Scraped until each process has answered at least SCRAPES / 2 times (which one takes
        # a connection is the kernel's choice).
        scrapes, by = [], collections.Counter[str | None]()
        while min(by.values(), default=0) < SCRAPES // 2 or len(by) < 2:
            text, pid = scrape(f"{server.url}/metrics")
            scrapes.append(samples(text))
            by[pid] += 1
            assert time.monotonic() < deadline, by
        pids = set(by)
        # Each process samples its gauges every second (and the one scraped, for the answer):
        # they come down to 0 once both have sampled after their last task.
        while True:
            idle = samples(fetch(f"{server.url}/metrics"))
            if idle['threadctx_tasks_running{app="wsgi_app"}'] == 0:
                break
            assert time.monotonic() < deadline, idle
    finally:
        server.stop()
    assert len(pids) == 2
    app = 'app="wsgi_app"'
    for scraped in scrapes:
        for name in ("_parent_job", "_child_job"):
            labels = f'{app},name="{name}"'
            assert scraped[f"threadctx_tasks_submitted_total{{{labels}}}"] == JOBS
            assert (
                scraped[f'threadctx_tasks_finished_total{{{labels},outcome="succeeded"}}'] == JOBS
            )
            assert scraped[f"threadctx_task_queue_seconds_count{{{labels}}}"] == JOBS
            assert scraped[f"threadctx_task_run_seconds_count{{{labels}}}"] == JOBS
    assert (
        idle[f"threadctx_tasks_running{{{app}}}"],
        idle[f"threadctx_tasks_queued{{{app}}}"],
    ) == (
        0,
        0,
    )
    figures.update(tasks=2 * JOBS, scrapes=len(scrapes), processes=len(pids))
