"""What control over tasks costs on the thread engine (see ``docs/control.rst``).

    python benchmarks/control_bench.py [--stops 200] [--delayed 10000] [--celery-stops 200]

- Stop latency: a task reports its progress every 10 ms; from ``cancel_task`` to the end of
  its future, p50 and p99 over ``--stops`` tasks. Goal: under 50 ms.
- The same on Celery, over ``--celery-stops`` tasks (default 0: not measured, as ``tox -e
  bench`` has neither Celery nor a Redis server; ``requirements/tests.txt`` has both): a Redis
  server and a ``flask threadctx worker`` (prefork, 2 processes) started for it, the stop asked
  from the submitting process, the end heard there. Goal: under 1 s.
- Delayed tasks: ``--delayed`` tasks submitted with a ``countdown`` of one second. The memory a
  waiting task holds (traced allocations, divided by the count), the threads the pool has
  while they wait, and how late each starts against its ``due_at``: p50, p99 and the latest.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
import typing as t
from pathlib import Path

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


HERE = Path(__file__).parent


def celery_stop_latency(stops: int) -> dict[str, float]:
    """:func:`stop_latency` on the Celery backend, with a worker of its own."""
    sys.path[:0] = [str(HERE), str(HERE.parent / "tests" / "on_celery")]
    import redis
    from redis_server import RedisServer

    import celery_apps

    waits: list[float] = []
    with tempfile.TemporaryDirectory() as folder:
        server = RedisServer(Path(folder))
        server.start()
        celery_apps.REDIS = server.url.removesuffix("/0")  # read by 'create_app' when called
        env = {**os.environ, "BENCH_REDIS": celery_apps.REDIS}
        env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
        log = open(Path(folder, "worker.log"), "wb")  # noqa: SIM115  # closed below
        worker = subprocess.Popen(
            [
                *(sys.executable, "-m", "flask", "--app", "celery_apps:create_app"),
                *("threadctx", "worker", "--pool", "prefork", "--concurrency", "2"),
                *("--without-mingle", "--without-gossip", "--loglevel", "WARNING"),
            ],
            cwd=HERE,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its pool processes too can be stopped as one group
        )
        app = celery_apps.create_app()
        ext = celery_apps.threadctx
        client = redis.Redis.from_url(f"{celery_apps.REDIS}/3")
        try:
            with app.test_request_context("/bench/path"):
                assert ext.submit(celery_apps.read_path).result(60) == "/bench/path"  # ready
                for _ in range(stops):
                    future = ext.submit(celery_apps.reports_until_stopped)
                    assert client.blpop(["bench-started"], timeout=60) is not None
                    asked = time.perf_counter()
                    assert ext.cancel_task(future.task.id) is True
                    concurrent.futures.wait([future], timeout=30)
                    waits.append(time.perf_counter() - asked)
                    assert isinstance(future.exception(), TaskCancelled)
                ext.shutdown()
        finally:
            os.killpg(worker.pid, signal.SIGTERM)
            try:
                worker.wait(10)
            except subprocess.TimeoutExpired:  # a pool process waiting on billiard's exit check
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait()
            log.close()
            client.close()
            server.stop()
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
    parser.add_argument("--celery-stops", type=int, default=0, help="0: no Celery row")
    args = parser.parse_args(argv)
    results = {"stop": stop_latency(args.stops), "delayed": delayed(args.delayed)}
    if args.celery_stops:
        results["celery_stop"] = celery_stop_latency(args.celery_stops)
    stop = results["stop"]
    print(
        f"stop of a task reporting every 10 ms: p50 {stop['p50_ms']:.1f} ms,"
        f" p99 {stop['p99_ms']:.1f} ms (goal: under 50 ms)"
    )
    if args.celery_stops:
        stop = results["celery_stop"]
        print(
            f"stop of a Celery task reporting every 10 ms: p50 {stop['p50_ms']:.1f} ms,"
            f" p99 {stop['p99_ms']:.1f} ms (goal: under 1 s)"
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
