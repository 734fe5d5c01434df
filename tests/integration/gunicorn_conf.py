"""gunicorn settings for the integration suite."""

from __future__ import annotations

import typing as t


def post_worker_init(worker: t.Any) -> None:
    # A worker that is sent SIGTERM before its signal handlers are installed can miss it, and
    # the master then waits out the graceful timeout. The suite waits for this line from every
    # worker before it starts a test.
    print(f"WORKER READY {worker.pid}", flush=True)


def child_exit(server: t.Any, worker: t.Any) -> None:
    # What the docs tell users of THREADCTX_METRICS to write: a dead worker's gauges no longer
    # count.
    import os

    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]
