"""Flask-ThreadCtx against the alternatives, in one process, in interleaved rounds.

    python benchmarks/bench.py --json bench-results/latest.json --plot docs/_static/performance.png

Contenders, each fed from a request context and reading ``request.path`` in the task (except the
bare pool, the floor, which carries no context and reads nothing):

- ``bare``: :class:`concurrent.futures.ThreadPoolExecutor`;
- ``threadctx``: Flask-ThreadCtx, also with three signal receivers, with five ``g`` values,
  with a SQLite task store (``threadctx+sqlite store``; its ``written_us`` is the time per task
  until the store has every task, finished) and with a task that reports its progress 100 times
  (``threadctx+progress x100``);
- ``executor``: Flask-Executor (installed in the ``bench`` tox environment only);
- ``copy_ctx``: a bare pool with :func:`flask.copy_current_request_context` per task.

Every case runs once per contender per round, contenders interleaved, each after a full garbage
collection, and reports the median and the min-max over the rounds. Times are wall-clock;
nothing here is a test threshold.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import gc
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import tracemalloc
import typing as t

import flask
from flask import copy_current_request_context
from flask import request
from flask_threadctx import report_progress
from flask_threadctx import signals
from flask_threadctx import ThreadContext
from flask_threadctx.app_state import app_state

Submitter = t.Callable[[t.Callable[[], t.Any]], concurrent.futures.Future[t.Any]]


def read_path() -> str:
    return request.path


def read_nothing() -> None:
    return None


class Contender:
    """One way of running tasks: a pool that can be started, fed and stopped."""

    def __init__(self, name: str, app: flask.Flask) -> None:
        self.name = name
        self.app = app

    submit: Submitter
    """The contender's submit, bound when it starts."""
    task: t.Callable[[], t.Any] = staticmethod(read_path)

    def start(self, workers: int) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError


class Bare(Contender):
    task = staticmethod(read_nothing)

    def start(self, workers: int) -> None:
        self.pool = concurrent.futures.ThreadPoolExecutor(workers)
        self.submit = self.pool.submit

    def stop(self) -> None:
        self.pool.shutdown(wait=True)


class CopyContext(Contender):
    def start(self, workers: int) -> None:
        pool = self.pool = concurrent.futures.ThreadPoolExecutor(workers)
        self.submit = lambda fn: pool.submit(copy_current_request_context(fn))

    def stop(self) -> None:
        self.pool.shutdown(wait=True)


def report_progress_100() -> str:
    for done in range(1, 101):
        report_progress(done, 100)
    return request.path


class ThreadCtx(Contender):
    def __init__(
        self,
        name: str,
        app: flask.Flask,
        receivers: int = 0,
        g_values: int = 0,
        store: str | None = None,
        progress: bool = False,
    ):
        super().__init__(name, app)
        self.receivers = [self._receiver for _ in range(receivers)]
        self.g_values = g_values
        self.store = store
        if progress:
            self.task = staticmethod(report_progress_100)

    @staticmethod
    def _receiver(sender: t.Any, **kwargs: t.Any) -> None:
        return None

    def start(self, workers: int) -> None:
        self.app = flask.Flask(self.name)
        self.app.config["THREADCTX_MAX_WORKERS"] = workers
        self.app.config["THREADCTX_TASK_STORE"] = self.store
        self.ext = ThreadContext(self.app)
        self.submit = self.ext.submit
        for n, receiver in enumerate(self.receivers):
            signal = (signals.task_submitted, signals.task_started, signals.task_finished)[n % 3]
            signal.connect(receiver, self.app, weak=False)

    def stop(self) -> None:
        for n, receiver in enumerate(self.receivers):
            signal = (signals.task_submitted, signals.task_started, signals.task_finished)[n % 3]
            signal.disconnect(receiver, self.app)
        self.ext.shutdown(wait=True)

    def request_context(self) -> t.Any:
        ctx = self.app.test_request_context("/bench/path")
        return _with_g(ctx, self.g_values)

    def written(self) -> None:
        recorder = app_state(self.app).recorder
        if recorder is not None:
            recorder.flush(600)


class FlaskExecutor(Contender):
    def start(self, workers: int) -> None:
        from flask_executor import Executor

        self.app = flask.Flask(self.name)
        self.app.config["EXECUTOR_MAX_WORKERS"] = workers
        self.executor = Executor(self.app)
        self.submit = self.executor.submit

    def stop(self) -> None:
        self.executor.shutdown(wait=True)


class _with_g:
    def __init__(self, ctx: t.Any, values: int) -> None:
        self.ctx = ctx
        self.values = values

    def __enter__(self) -> t.Any:
        self.ctx.__enter__()
        for n in range(self.values):
            setattr(flask.g, f"value{n}", ("user", n, 1.5, None, [n, "x"])[n % 5])
        return self.ctx

    def __exit__(self, *exc: t.Any) -> None:
        self.ctx.__exit__(*exc)


def request_context(contender: Contender) -> t.Any:
    if isinstance(contender, ThreadCtx):
        return contender.request_context()
    return contender.app.test_request_context("/bench/path")


# -- the cases -------------------------------------------------------------------------------


def throughput(c: Contender, tasks: int) -> dict[str, float]:
    """Wall time per task and submit-loop time per task, in microseconds."""
    c.start(4)
    try:
        with request_context(c):
            task = c.task
            submit = c.submit
            start = time.perf_counter()
            futures = [submit(task) for _ in range(tasks)]
            submitted = time.perf_counter()
            for future in futures:
                future.result()
            end = time.perf_counter()
            if isinstance(c, ThreadCtx) and c.store is not None:
                c.written()
                written = {"written_us": (time.perf_counter() - start) / tasks * 1e6}
            else:
                written = {}
    finally:
        c.stop()
    return {
        "per_task_us": (end - start) / tasks * 1e6,
        "submit_us": (submitted - start) / tasks * 1e6,
        "tasks_per_s": tasks / (end - start),
        **written,
    }


def memory(c: Contender, tasks: int) -> dict[str, float]:
    """Bytes retained per task queued behind blocked workers."""
    c.start(4)
    gate = threading.Event()
    try:
        with request_context(c):
            blockers = [c.submit(gate.wait) for _ in range(4)]
            task = c.task
            gc.collect()
            tracemalloc.start()
            before = tracemalloc.get_traced_memory()[0]
            futures = [c.submit(task) for _ in range(tasks)]
            after = tracemalloc.get_traced_memory()[0]
            tracemalloc.stop()
            gate.set()
            for future in [*blockers, *futures]:
                future.result()
    finally:
        gate.set()
        c.stop()
    return {"bytes_per_task": (after - before) / tasks}


def latency(c: Contender, tasks: int) -> dict[str, float]:
    """Submit to first line of the task, on an idle pool: p50 and p99 in microseconds."""
    c.start(4)
    samples = []
    try:
        with request_context(c):
            started: list[float] = []
            record = started.append

            def first_line() -> None:
                record(time.perf_counter())

            c.submit(first_line).result()
            started.clear()
            for _ in range(tasks):
                before = time.perf_counter()
                c.submit(first_line).result()
                samples.append((started.pop() - before) * 1e6)
    finally:
        c.stop()
    samples.sort()
    return {"p50_us": samples[len(samples) // 2], "p99_us": samples[int(len(samples) * 0.99)]}


def io_scaling(c: Contender, tasks: int, workers: int, seconds: float) -> dict[str, float]:
    """Wall time of sleeping tasks against the ideal ``tasks * seconds / workers``."""
    c.start(workers)
    try:
        with request_context(c):
            start = time.perf_counter()
            futures = [c.submit(lambda: time.sleep(seconds)) for _ in range(tasks)]
            for future in futures:
                future.result()
            wall = time.perf_counter() - start
    finally:
        c.stop()
    return {"wall_s": wall, "vs_ideal": wall / (tasks * seconds / workers)}


def contention(c: Contender, threads: int, tasks: int) -> dict[str, float]:
    """Several request threads submitting at once: wall time per task in microseconds."""
    c.start(4)
    barrier = threading.Barrier(threads + 1)
    all_futures: list[list[concurrent.futures.Future[t.Any]]] = []

    def request_thread() -> None:
        with request_context(c):
            barrier.wait()
            all_futures.append([c.submit(c.task) for _ in range(tasks)])

    try:
        workers = [threading.Thread(target=request_thread) for _ in range(threads)]
        for worker in workers:
            worker.start()
        barrier.wait()
        start = time.perf_counter()
        for worker in workers:
            worker.join()
        for futures in all_futures:
            for future in futures:
                future.result()
        wall = time.perf_counter() - start
    finally:
        c.stop()
    return {"per_task_us": wall / (threads * tasks) * 1e6, "tasks_per_s": threads * tasks / wall}


def nesting(c: ThreadCtx, depth: int, children: int) -> dict[str, float]:
    """A chain of submits ``depth`` deep, and a fan-out of children each waiting on two
    grandchildren, with four workers. Only Flask-ThreadCtx runs these without deadlock."""
    c.start(4)
    ext = c.ext
    try:
        with request_context(c):

            def chain(n: int) -> int:
                return n if n == depth else ext.submit(chain, n + 1).result()

            start = time.perf_counter()
            assert ext.submit(chain, 1).result(timeout=60) == depth
            chain_s = time.perf_counter() - start

            def child(n: int) -> int:
                return sum(f.result() for f in (ext.submit(abs, n), ext.submit(abs, -n)))

            start = time.perf_counter()
            results = [
                f.result(timeout=60) for f in [ext.submit(child, n) for n in range(children)]
            ]
            fan_out_s = time.perf_counter() - start
            assert results == [2 * n for n in range(children)]
    finally:
        c.stop()
    return {"chain_ms": chain_s * 1e3, "fan_out_ms": fan_out_s * 1e3}


# -- running and reporting -------------------------------------------------------------------


def summarize(samples: list[float]) -> dict[str, float]:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples)}


def summarize_all(raw: dict[str, dict[str, dict[str, list[float]]]]) -> dict[str, t.Any]:
    """Each metric of each contender in each case: the samples of the rounds, summarized."""
    return {
        case: {
            name: {key: summarize(values) for key, values in metrics.items()}
            for name, metrics in by_name.items()
        }
        for case, by_name in raw.items()
    }


def run(args: argparse.Namespace) -> dict[str, t.Any]:
    app = flask.Flask("bench")
    contenders: list[Contender] = [
        Bare("bare", app),
        ThreadCtx("threadctx", app),
        CopyContext("copy_ctx", app),
        ThreadCtx("threadctx+3 receivers", app, receivers=3),
        ThreadCtx("threadctx+5 g values", app, g_values=5),
        ThreadCtx("threadctx+sqlite store", app, store=f"sqlite:///{args.store_folder}/bench.db"),
        ThreadCtx("threadctx+progress x100", app, progress=True),
    ]
    if not args.without_flask_executor:
        contenders.insert(2, FlaskExecutor("executor", app))
    main = [c for c in contenders if "+" not in c.name]
    receivers = next(c for c in contenders if c.name == "threadctx+3 receivers")
    ours = contenders[1]
    assert isinstance(ours, ThreadCtx)

    raw: dict[str, dict[str, dict[str, list[float]]]] = {}

    def record(case: str, name: str, values: dict[str, float]) -> None:
        for key, value in values.items():
            raw.setdefault(case, {}).setdefault(name, {}).setdefault(key, []).append(value)

    def measure(case: str, c: Contender, fn: t.Callable[..., dict[str, float]], *a: t.Any) -> None:
        # A full collection first, so that no contender pays for the garbage the one before
        # left: otherwise whichever case the next full collection falls in loses 30-80 ms.
        gc.collect()
        record(case, c.name, fn(c, *a))

    for round_no in range(args.rounds):
        print(f"round {round_no + 1}/{args.rounds}", file=sys.stderr, flush=True)
        for c in contenders:
            measure("throughput", c, throughput, args.tasks)
        for c in main:
            measure("memory", c, memory, args.tasks)
            measure("latency", c, latency, args.latency_tasks)
            measure("contention", c, contention, 8, args.contention_tasks)
        measure("contention", receivers, contention, 8, args.contention_tasks)
        for workers in (8, 32, 128):
            for c in (contenders[0], ours):
                measure(f"io_{workers}", c, io_scaling, args.io_tasks, workers, 0.01)
        measure("nesting", ours, nesting, 10, args.fan_out)

    results = summarize_all(raw)
    return {
        "machine": {
            "python": platform.python_version(),
            "implementation": platform.python_implementation(),
            "platform": platform.platform(),
            "processor": platform.machine(),
            "cpus": os.cpu_count(),
            "flask": importlib.metadata.version("flask"),
            "flask_threadctx": importlib.metadata.version("flask-threadctx"),
            "flask_executor": None
            if args.without_flask_executor
            else importlib.metadata.version("flask-executor"),
        },
        "settings": {
            "rounds": args.rounds,
            "tasks": args.tasks,
            "latency_tasks": args.latency_tasks,
            "contention_tasks": args.contention_tasks,
            "io_tasks": args.io_tasks,
            "fan_out": args.fan_out,
        },
        "results": results,
        "targets": targets(results),
    }


# (what, case, metric, ours, theirs or None, how, limit): "ratio" is ours / theirs,
# "excess" is ours - theirs, "value" is ours alone; medians of this run.
# fmt: off
TARGETS: list[tuple[str, str, str, str, str | None, str, str, float]] = [
    ('throughput vs Flask-Executor', 'throughput', 'tasks_per_s', 'threadctx', 'executor', 'ratio', '>=', 3.0),
    ('throughput vs copy_current_request_context', 'throughput', 'tasks_per_s', 'threadctx', 'copy_ctx', 'ratio', '>=', 2.0),
    ('throughput vs the bare pool', 'throughput', 'tasks_per_s', 'threadctx', 'bare', 'ratio', '>=', 0.7),
    ('throughput, 3 receivers, vs Flask-Executor', 'throughput', 'tasks_per_s', 'threadctx+3 receivers', 'executor', 'ratio', '>=', 2.0),
    ('contention vs Flask-Executor', 'contention', 'tasks_per_s', 'threadctx', 'executor', 'ratio', '>=', 2.0),
    ('contention, 3 receivers, vs Flask-Executor', 'contention', 'tasks_per_s', 'threadctx+3 receivers', 'executor', 'ratio', '>=', 2.0),
    ('memory per queued task over the bare pool (B)', 'memory', 'bytes_per_task', 'threadctx', 'bare', 'excess', '<=', 512.0),
    ('start latency p50 vs the bare pool', 'latency', 'p50_us', 'threadctx', 'bare', 'ratio', '<=', 1.5),
    ('I/O wall time vs ideal, 32 workers', 'io_32', 'vs_ideal', 'threadctx', None, 'value', '<=', 1.1),
    ('per-task cost with a SQLite store vs without', 'throughput', 'per_task_us', 'threadctx+sqlite store', 'threadctx', 'ratio', '<=', 1.3),
]
# fmt: on


def targets(results: dict[str, t.Any]) -> list[dict[str, t.Any]]:
    """The targets of the performance issue, checked on the medians of this run."""

    def median(case: str, name: str | None, metric: str) -> float | None:
        try:
            return float(results[case][name][metric]["median"])
        except KeyError:
            return None

    checked = []
    for what, case, metric, ours, theirs, how, op, limit in TARGETS:
        mine = median(case, ours, metric)
        other = median(case, theirs, metric) if theirs else None
        value: float | None
        if how == "value":
            value = mine
        elif mine is None or other is None:
            value = None
        else:
            value = mine / other if how == "ratio" else mine - other
        met = None if value is None else (value >= limit if op == ">=" else value <= limit)
        checked.append({"target": what, "value": value, "op": op, "limit": limit, "met": met})
    return checked


def table(report: dict[str, t.Any]) -> str:
    results = report["results"]
    lines = [
        f"{'case':<22}{'contender':<24}{'median':>12}{'min-max':>22}{'vs bare':>9}{'vs F-E':>8}",
    ]

    def row(case: str, key: str, unit: str, higher_is_better: bool) -> None:
        by_name = results.get(case, {})
        base = by_name.get("bare", {}).get(key, {}).get("median")
        fe = by_name.get("executor", {}).get(key, {}).get("median")
        for name, metrics in by_name.items():
            if key not in metrics:
                continue
            s = metrics[key]
            spread = f"{s['min']:.2f}-{s['max']:.2f}"
            lines.append(
                f"{case + ' ' + unit:<22}{name:<24}{s['median']:>12.2f}{spread:>22}"
                f"{_speedup(s['median'], base, higher_is_better):>9}"
                f"{_speedup(s['median'], fe, higher_is_better):>8}"
            )

    row("throughput", "tasks_per_s", "/s", True)
    row("throughput", "per_task_us", "us", False)
    row("throughput", "submit_us", "submit us", False)
    row("throughput", "written_us", "stored us", False)
    row("memory", "bytes_per_task", "B", False)
    row("latency", "p50_us", "p50 us", False)
    row("latency", "p99_us", "p99 us", False)
    row("contention", "tasks_per_s", "/s", True)
    for workers in (8, 32, 128):
        row(f"io_{workers}", "vs_ideal", "x ideal", False)
    row("nesting", "chain_ms", "chain ms", False)
    row("nesting", "fan_out_ms", "fan ms", False)
    lines.append("")
    lines.append(
        "ratios: 'vs bare' and 'vs F-E' (Flask-Executor) are speed-ups; above 1 is better."
    )
    lines.append("")
    for check in report["targets"]:
        value = "n/a" if check["value"] is None else f"{check['value']:.2f}"
        mark = {True: "met", False: "MISSED", None: "not measured"}[check["met"]]
        lines.append(f"target {check['target']}: {value} ({check['op']} {check['limit']}) {mark}")
    return "\n".join(lines)


def _speedup(value: float, other: float | None, higher_is_better: bool) -> str:
    if not other:
        return ""
    return f"{(value / other if higher_is_better else other / value):.2f}x"


def plot(report: dict[str, t.Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]["throughput"]
    names = [n for n in ("bare", "threadctx", "executor", "copy_ctx") if n in results]
    labels = {
        "bare": "bare pool\n(no contexts)",
        "threadctx": "Flask-ThreadCtx",
        "executor": "Flask-Executor",
        "copy_ctx": "copy_current_\nrequest_context",
    }
    colours = {
        "bare": "#999999",
        "threadctx": "#2b6cb0",
        "executor": "#dd6b20",
        "copy_ctx": "#718096",
    }
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for axis, key, title in (
        (left, "tasks_per_s", "Throughput (tasks/s, higher is better)"),
        (right, "per_task_us", "Time per task (µs, lower is better)"),
    ):
        medians = [results[n][key]["median"] for n in names]
        lows = [m - results[n][key]["min"] for n, m in zip(names, medians, strict=True)]
        highs = [results[n][key]["max"] - m for n, m in zip(names, medians, strict=True)]
        axis.bar(
            [labels[n] for n in names],
            medians,
            yerr=[lows, highs],
            capsize=4,
            color=[colours[n] for n in names],
        )
        axis.set_title(title)
        axis.tick_params(axis="x", labelsize=8)
    settings = report["settings"]
    fig.suptitle(
        f"{settings['tasks']:,} trivial tasks from a request context, 4 workers,"
        f" {settings['rounds']} rounds (median, min-max)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict[str, t.Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", required=True, help="where to write the results as JSON")
    parser.add_argument("--plot", help="where to write the throughput plot (PNG; needs matplotlib)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--latency-tasks", type=int, default=2_000)
    parser.add_argument("--contention-tasks", type=int, default=2_000)
    parser.add_argument("--io-tasks", type=int, default=2_000)
    parser.add_argument("--fan-out", type=int, default=100)
    parser.add_argument(
        "--without-flask-executor",
        action="store_true",
        help="leave Flask-Executor out (the test suite's smoke run, where it is not installed)",
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as args.store_folder:
        report = run(args)
    print(table(report))
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(report, f, indent=2)
    if args.plot:
        plot(report, args.plot)
    return report


if __name__ == "__main__":
    main()
