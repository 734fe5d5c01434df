"""50,000 tasks through one app: memory settles, threads stay bounded, the window stays bounded."""

from __future__ import annotations

import gc
import threading
import typing as t

import flask
from flask import g
from flask import request
from flask_threadctx import ThreadContext
from flask_threadctx.backends.workers import Worker as _Worker

TASKS = 50_000
BATCH = 1_000
MAX_WORKERS = 8
KEEP = 500


def rss_kb() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


def work(n: int) -> int:
    g.scratch = [n] * 10
    return n + len(request.path)


def test_soak(figures: dict[str, t.Any]) -> None:
    app = flask.Flask("soak")
    app.config.update(THREADCTX_MAX_WORKERS=MAX_WORKERS, THREADCTX_KEEP_FINISHED=KEEP)
    ext = ThreadContext(app)
    samples: list[int] = []
    most_threads = 0
    futures: list[t.Any] = []
    try:
        for start in range(0, TASKS, BATCH):
            with app.test_request_context(f"/soak/{start}"):
                g.batch = start
                futures = [ext.submit(work, n) for n in range(start, start + BATCH)]
                path = len(f"/soak/{start}")
                assert [f.result(timeout=60) for f in futures] == [
                    n + path for n in range(start, start + BATCH)
                ]
            most_threads = max(
                most_threads, sum(isinstance(t, _Worker) for t in threading.enumerate())
            )
            gc.collect()
            samples.append(rss_kb())
        with app.app_context():
            window = [ext.get_task(f.task.id) for f in futures]
            stats = ext.stats()
    finally:
        ext.shutdown()

    warm = samples[len(samples) // 5]  # after 10,000 tasks
    growth_kb = max(samples[len(samples) // 5 :]) - warm
    figures.update(
        tasks=stats["succeeded"],
        rss_after_warmup_mb=round(warm / 1024, 1),
        rss_peak_mb=round(max(samples) / 1024, 1),
        growth_after_warmup_kb=growth_kb,
        most_worker_threads=most_threads,
    )
    assert stats["succeeded"] == TASKS
    assert most_threads == MAX_WORKERS
    # The window holds the last KEEP tasks to finish, in whatever order the workers ended them.
    assert [f for f in window if f is not None] == [f for f in futures if f in window]
    assert sum(f is not None for f in window) == KEEP
    assert growth_kb < 3 * 1024, samples
