"""Flask-ThreadCtx's Celery backend against bare Celery and Flask's documented Celery pattern.

    tox -e bench-celery

(``python benchmarks/celery_bench.py --json docs/_static/scaling.json --table
docs/_static/scaling.txt``.)

Starts a Redis server on a free port, then, for each of three runs, one worker per contender
(prefork, 2 processes), all three on that server, and measures in interleaved rounds, each task
submitted from its own request context as a view would:

- ``celery``: bare Celery, ``nothing.delay().get()`` of a task that returns ``None``;
- ``flask_pattern``: Flask's "Background Tasks with Celery" pattern, a task class that pushes an
  app context, the task reading ``current_app.name``;
- ``threadctx``: ``threadctx.submit(read_path).result()`` on the Celery backend, the task reading
  ``request.path`` from the request rebuilt on the worker.

Round-trip latency is one task at a time, submit to result; throughput is a burst of tasks
submitted, then all results awaited. Times are wall-clock; nothing here is a test threshold.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.metadata
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import typing as t
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
# The Redis server the Celery tests start, so that both find and run it the same way.
sys.path.insert(0, str(HERE.parent / "tests" / "on_celery"))

from redis_server import RedisServer  # noqa: E402

from bench import summarize_all  # noqa: E402

if t.TYPE_CHECKING:
    import flask

Submit = t.Callable[[], t.Callable[..., t.Any]]
"""Sends one task and returns what waits for its result (called with ``timeout=``)."""


class Contender(t.NamedTuple):
    name: str
    app: flask.Flask
    submit: Submit
    expected: t.Any
    worker: list[str]


def contenders() -> list[Contender]:
    import celery_apps

    def bare() -> t.Callable[..., t.Any]:
        return celery_apps.nothing.delay().get  # type: ignore[no-any-return]

    def flask_pattern() -> t.Callable[..., t.Any]:
        return celery_apps.app_name.delay().get  # type: ignore[no-any-return]

    threadctx_app = celery_apps.create_app()

    def threadctx() -> t.Callable[..., t.Any]:
        return celery_apps.threadctx.submit(celery_apps.read_path).result

    celery_worker = [sys.executable, "-m", "celery", "-A"]
    return [
        Contender(
            "celery", celery_apps.pattern_app, bare, None, [*celery_worker, "celery_apps:bare"]
        ),
        Contender(
            "flask_pattern",
            celery_apps.pattern_app,
            flask_pattern,
            "pattern",
            [*celery_worker, "celery_apps:pattern"],
        ),
        Contender(
            "threadctx",
            threadctx_app,
            threadctx,
            "/bench/path",
            [sys.executable, "-m", "flask", "--app", "celery_apps:create_app", "threadctx"],
        ),
    ]


def start_worker(c: Contender, processes: int, log: t.IO[bytes]) -> subprocess.Popen[bytes]:
    options = ["--pool", "prefork", "--concurrency", str(processes)]
    options += ["--without-mingle", "--without-gossip", "--loglevel", "WARNING"]
    worker = subprocess.Popen(
        [*c.worker, "worker", *options],
        cwd=HERE,
        env={**os.environ, "PYTHONPATH": str(HERE)},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its pool processes too can be stopped as one group
    )
    # Ready once it answers: the first task also warms up both ends' connections.
    with c.app.test_request_context("/bench/path"):
        result = c.submit()
    try:
        assert result(timeout=60) == c.expected
    except BaseException:
        os.killpg(worker.pid, signal.SIGKILL)
        raise
    return worker


def latency(c: Contender, tasks: int) -> dict[str, float]:
    """One task at a time, submit to result: p50 and p99 in milliseconds."""
    samples = []
    for _ in range(tasks):
        with c.app.test_request_context("/bench/path"):
            before = time.perf_counter()
            value = c.submit()(timeout=30)
            samples.append((time.perf_counter() - before) * 1e3)
        assert value == c.expected
    samples.sort()
    return {"p50_ms": samples[len(samples) // 2], "p99_ms": samples[int(len(samples) * 0.99)]}


def throughput(c: Contender, tasks: int) -> dict[str, float]:
    """A burst of tasks, each from its own request, then every result: tasks per second."""
    start = time.perf_counter()
    waits = []
    for _ in range(tasks):
        with c.app.test_request_context("/bench/path"):
            waits.append(c.submit())
    values = [wait(timeout=60) for wait in waits]
    wall = time.perf_counter() - start
    assert values == [c.expected] * tasks
    return {"tasks_per_s": tasks / wall}


def run(args: argparse.Namespace, folder: str) -> dict[str, t.Any]:
    """One run: a worker per contender, started and stopped, on the Redis of ``BENCH_REDIS``."""
    raw: dict[str, dict[str, dict[str, list[float]]]] = {}
    with contextlib.ExitStack() as stack:
        log = stack.enter_context(open(Path(folder, "workers.log"), "wb"))
        everyone = contenders()
        try:
            for c in everyone:
                worker = start_worker(c, args.processes, log)
                stack.callback(_stop, worker)
            for round_no in range(args.rounds):
                print(f"round {round_no + 1}/{args.rounds}", file=sys.stderr, flush=True)
                for c in everyone:
                    for case, measure, size in (
                        ("latency", latency, args.latency_tasks),
                        ("throughput", throughput, args.tasks),
                    ):
                        gc.collect()
                        for key, value in measure(c, size).items():
                            raw.setdefault(case, {}).setdefault(c.name, {}).setdefault(
                                key, []
                            ).append(value)
        except BaseException:
            log.flush()
            sys.stderr.write(Path(folder, "workers.log").read_text(errors="replace"))
            raise
        finally:
            from flask_threadctx.app_state import app_state

            app_state(everyone[-1].app).default.shutdown(wait=True)
    results = summarize_all(raw)
    return {
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "celery": importlib.metadata.version("celery"),
            "flask": importlib.metadata.version("flask"),
            "flask_threadctx": importlib.metadata.version("flask-threadctx"),
        },
        "settings": {
            "rounds": args.rounds,
            "tasks": args.tasks,
            "latency_tasks": args.latency_tasks,
            "processes": args.processes,
        },
        "results": results,
    }


def _stop(worker: subprocess.Popen[bytes]) -> None:
    worker.terminate()
    try:
        worker.wait(10)
    except subprocess.TimeoutExpired:  # a pool process waiting on billiard's exit check
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()


# (what, case, metric, op, limit): Flask-ThreadCtx over bare Celery, medians of this run.
TARGETS = [
    ("latency p50 vs bare Celery", "latency", "p50_ms", "<=", 1.2),
    ("throughput vs bare Celery", "throughput", "tasks_per_s", ">=", 0.8),
]


def targets(runs: list[dict[str, t.Any]]) -> list[dict[str, t.Any]]:
    """The targets, checked on the median over the runs of each run's ratio of medians: on a
    small machine one run swings by a tenth either way."""
    checked = []
    for what, case, metric, op, limit in TARGETS:
        values = [
            results[case]["threadctx"][metric]["median"] / results[case]["celery"][metric]["median"]
            for results in runs
        ]
        value = statistics.median(values)
        met = value >= limit if op == ">=" else value <= limit
        checked.append(
            {"target": what, "value": value, "runs": values, "op": op, "limit": limit, "met": met}
        )
    return checked


def table(report: dict[str, t.Any]) -> str:
    results = report["results"]
    lines = [f"{'case':<20}{'contender':<16}{'median':>10}{'min-max':>18}{'vs celery':>11}"]
    for case, key, unit, higher_is_better in (
        ("latency", "p50_ms", "p50 ms", False),
        ("latency", "p99_ms", "p99 ms", False),
        ("throughput", "tasks_per_s", "/s", True),
    ):
        base = results[case]["celery"][key]["median"]
        for name, metrics in results[case].items():
            s = metrics[key]
            ratio = s["median"] / base if higher_is_better else base / s["median"]
            spread = f"{s['min']:.2f}-{s['max']:.2f}"
            lines.append(
                f"{case + ' ' + unit:<20}{name:<16}{s['median']:>10.2f}{spread:>18}{ratio:>10.2f}x"
            )
    lines += ["", "'vs celery' is a speed-up over bare Celery; above 1 is better.", ""]
    for check in report["targets"]:
        mark = "met" if check["met"] else "MISSED"
        runs = ", ".join(f"{value:.2f}" for value in check["runs"])
        lines.append(
            f"target {check['target']}: {check['value']:.2f} ({check['op']} {check['limit']})"
            f" {mark}; the runs: {runs}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, t.Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", required=True, help="where to write the results as JSON")
    parser.add_argument("--table", help="where to write the table, with the machine, as text")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tasks", type=int, default=1_000, help="tasks per throughput burst")
    parser.add_argument("--latency-tasks", type=int, default=300)
    parser.add_argument("--processes", type=int, default=2, help="pool processes per worker")
    parser.add_argument(
        "--runs", type=int, default=3, help="whole runs, each with its own Redis and workers"
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        server = RedisServer(Path(folder))
        server.start()
        try:
            # Read when 'celery_apps' is first imported: one server for every run.
            os.environ["BENCH_REDIS"] = server.url.removesuffix("/0")
            runs = [run(args, folder) for _ in range(args.runs)]
        finally:
            server.stop()
    report = runs[-1]  # the machine, and the table of the last run
    report["settings"]["runs"] = args.runs
    report["runs"] = [one["results"] for one in runs]
    report["targets"] = targets(report["runs"])
    print(table(report))
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(report, f, indent=2)
    if args.table:
        write_table(report, args.table)
    return report


def write_table(report: dict[str, t.Any], path: str) -> None:
    """The table, under a line saying where it was measured (for the docs)."""
    m = report["machine"]
    s = report["settings"]
    header = (
        f"{m['cpus']} CPUs, {m['platform']}, CPython {m['python']}, Celery {m['celery']},"
        f" Flask {m['flask']}, Flask-ThreadCtx {m['flask_threadctx']}; {s['runs']} runs of"
        f" {s['rounds']} rounds, {s['processes']} worker processes per contender; the table is"
        " the last run's."
    )
    with open(path, "w") as f:
        f.write(f"{header}\n\n{table(report)}\n")


if __name__ == "__main__":
    main()
