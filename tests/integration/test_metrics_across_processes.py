"""Metrics in prometheus_client's multiprocess mode: two gunicorn servers with two worker
processes each share one metrics folder, as the workers of one deployment do. Tasks run in the
first server's processes; every scrape, from either server, counts all of them (the kernel
decides which worker takes a connection: the second server makes certain that the scraped
process is not one that ran the tasks)."""

from __future__ import annotations

import re
import time
import typing as t
import urllib.request
from pathlib import Path

import servers

JOBS = 40
SCRAPES = 10


def scrape(url: str) -> dict[str, float]:
    """``{'name{labels}': value}`` of the lines of Prometheus's text format."""
    with urllib.request.urlopen(url, timeout=30) as response:
        text = response.read().decode()
    return {
        match[1]: float(match[2])
        for match in re.finditer(r"^(\w+(?:\{[^}]*\})?) (\S+)$", text, re.MULTILINE)
    }


def test_counters_add_up_over_processes(tmp_path: Path, figures: dict[str, t.Any]) -> None:
    folder = tmp_path / "prometheus"
    folder.mkdir()
    env = {"PROMETHEUS_MULTIPROC_DIR": str(folder), "THREADCTX_TEST_METRICS": "1"}
    running = servers.start("gunicorn-gthread", tmp_path / "seen.sqlite", environment=env)
    try:
        scraped = servers.start("gunicorn-gthread", tmp_path / "seen.sqlite", environment=env)
    except BaseException:
        running.stop()
        raise
    app = 'app="wsgi_app"'
    done = f'threadctx_tasks_finished_total{{{app},name="_child_job",outcome="succeeded"}}'
    try:
        for _ in range(JOBS):
            request = urllib.request.Request(f"{running.url}/job", method="POST")
            urllib.request.urlopen(request, timeout=30).close()
        # Until the other server counts the last child; the deadline only keeps a broken
        # server from hanging the test.
        deadline = time.monotonic() + 60
        while scrape(f"{scraped.url}/metrics").get(done) != JOBS:
            assert time.monotonic() < deadline
        scrapes = [scrape(f"{server.url}/metrics") for server in (running, scraped) * SCRAPES]
        # Each process samples its gauges every second (and the one scraped, for the answer):
        # they come down to 0 once every process has sampled after its last task. Both gauges:
        # a sample taken between a task's submit and its start counts it queued, not running,
        # until the next sample.
        gauges = [f"threadctx_tasks_running{{{app}}}", f"threadctx_tasks_queued{{{app}}}"]
        while any((idle := scrape(f"{scraped.url}/metrics"))[gauge] for gauge in gauges):
            assert time.monotonic() < deadline, idle
    finally:
        running.stop()
        scraped.stop()
    for sample in scrapes:
        for name in ("_parent_job", "_child_job"):
            labels = f'{app},name="{name}"'
            assert sample[f"threadctx_tasks_submitted_total{{{labels}}}"] == JOBS
            assert sample[f'threadctx_tasks_finished_total{{{labels},outcome="succeeded"}}'] == JOBS
            assert sample[f"threadctx_task_queue_seconds_count{{{labels}}}"] == JOBS
            assert sample[f"threadctx_task_run_seconds_count{{{labels}}}"] == JOBS
    figures.update(tasks=2 * JOBS, scrapes=len(scrapes), servers=2, processes=4)
