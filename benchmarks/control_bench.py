"""What control over tasks costs on the thread engine (see ``docs/control.rst``).

    python benchmarks/control_bench.py [--stops 200] [--delayed 10000]

- Stop latency: a task reports its progress every 10 ms; from ``cancel_task`` to the end of
  its future, p50 and p99 over ``--stops`` tasks. Goal: under 50 ms.
- Delayed tasks: ``--delayed`` tasks submitted with a ``countdown`` of one second. The memory a
  waiting task holds (traced allocations, divided by the count), the threads the pool has
  while they wait, and how late each starts against its ``due_at``: p50, p99 and the latest.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import statistics
import threading
import time
import tracemalloc
import typing as t

import flask
from flask_threadctx import report_progress
from flask_threadctx import TaskCancelled
from flask_threadctx import ThreadContext


def _percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def _reports_until_stopped(started: threading.Event) -> None:
    started.set()
    step = threading.Event()
    n = 0
    while True:
        n += 1
        report_progress(n)
        step.wait(0.01)


def stop_latency(stops: int) -> dict[str, float]:
    app = flask.Flask("bench_stop")
    ext = ThreadContext(app)
    waits: list[float] = []
    with app.app_context():
        for _ in range(stops):
            started = threading.Event()
            future = ext.submit(_reports_until_stopped, started)
            started.wait(10)
            asked = time.perf_counter()
            assert ext.cancel_task(future.task.id) is True
            concurrent.futures.wait([future], timeout=10)
            waits.append(time.perf_counter() - asked)
            assert isinstance(future.exception(), TaskCancelled)
        ext.shutdown()
    return {
        "p50_ms": statistics.median(waits) * 1000,
        "p99_ms": _percentile(waits, 0.99) * 1000,
    }


def delayed(count: int) -> dict[str, float]:
    app = flask.Flask("bench_delayed")
    app.config["THREADCTX_MAX_WORKERS"] = 8
    ext = ThreadContext(app)
    later = ext.task(countdown=1.0)(len)
    with app.app_context():
        tracemalloc.start()
        before = tracemalloc.take_snapshot()
        futures = [later.submit("") for _ in range(count)]
        after = tracemalloc.take_snapshot()
        tracemalloc.stop()
        held = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
        threads_waiting = threading.active_count()
        due = {future.task.id: t.cast(float, future.task.due_at) for future in futures}
        done, _ = concurrent.futures.wait(futures, timeout=120)
        assert len(done) == count
        ext.shutdown()
    lateness = [t.cast(float, future.task.started_at) - due[future.task.id] for future in futures]
    return {
        "bytes_per_task": held / count,
        "threads_while_waiting": float(threads_waiting),
        "late_p50_ms": statistics.median(lateness) * 1000,
        "late_p99_ms": _percentile(lateness, 0.99) * 1000,
        "late_max_ms": max(lateness) * 1000,
    }


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stops", type=int, default=200)
    parser.add_argument("--delayed", type=int, default=10_000)
    args = parser.parse_args(argv)
    results = {"stop": stop_latency(args.stops), "delayed": delayed(args.delayed)}
    stop = results["stop"]
    print(
        f"stop of a task reporting every 10 ms: p50 {stop['p50_ms']:.1f} ms,"
        f" p99 {stop['p99_ms']:.1f} ms (goal: under 50 ms)"
    )
    late = results["delayed"]
    print(
        f"{args.delayed} delayed tasks: {late['bytes_per_task']:.0f} bytes each while waiting,"
        f" {late['threads_while_waiting']:.0f} threads in the process meanwhile; started late"
        f" by p50 {late['late_p50_ms']:.1f} ms, p99 {late['late_p99_ms']:.1f} ms,"
        f" at most {late['late_max_ms']:.1f} ms"
    )
    return results


if __name__ == "__main__":
    main()
