"""What one task costs on its own: submitted and run in one thread, with no queue and no other
thread to hand the GIL to, so that a profiler sees only the library's own work.

    python benchmarks/hot_path.py               # microseconds per task
    python benchmarks/hot_path.py --profile     # and where they go, by cProfile

Flask-ThreadCtx runs with ``THREADCTX_EAGER``, which runs each task in the submitting thread
through the same code a worker runs. ``--future`` measures the floor instead: a
:class:`concurrent.futures.Future` made, started and finished around the same call, which is what
a :class:`~concurrent.futures.ThreadPoolExecutor` does for each task besides queueing it.

Instructions per task, which unlike times repeat exactly from run to run, are the difference of
two runs under callgrind, divided by the task count of the second::

    valgrind --tool=callgrind --callgrind-out-file=/dev/null \
        python benchmarks/hot_path.py --tasks 0      # then --tasks 2000
"""

from __future__ import annotations

import argparse
import concurrent.futures
import cProfile
import pstats
import time
import typing as t

import flask
from flask import request
from flask_threadctx import ThreadContext

WARM_UP = 200


def read_path() -> str:
    return request.path


def read_nothing() -> None:
    return None


def threadctx_loop(tasks: int) -> t.Callable[[], None]:
    app = flask.Flask("hot_path")
    app.config["THREADCTX_EAGER"] = True
    ext = ThreadContext(app)
    submit = ext.submit

    def loop() -> None:
        with app.test_request_context("/hot/path"):
            for _ in range(tasks):
                submit(read_path)

    return loop


def future_loop(tasks: int) -> t.Callable[[], None]:
    future_class = concurrent.futures.Future

    def loop() -> None:
        for _ in range(tasks):
            future: concurrent.futures.Future[None] = future_class()
            future.set_running_or_notify_cancel()
            read_nothing()
            future.set_result(None)

    return loop


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--future", action="store_true", help="measure the stdlib Future instead")
    parser.add_argument("--profile", action="store_true", help="print where the time goes")
    args = parser.parse_args(argv)
    make = future_loop if args.future else threadctx_loop
    make(WARM_UP)()
    loop = make(args.tasks)
    start = time.perf_counter()
    if args.profile:
        profile = cProfile.Profile()
        profile.runcall(loop)
    else:
        loop()
    per_task_us: float = (time.perf_counter() - start) / max(args.tasks, 1) * 1e6
    slowed = ", slowed down by the profiler" if args.profile else ""
    print(f"{per_task_us:.2f} us per task over {args.tasks} tasks{slowed}")
    if args.profile:
        pstats.Stats(profile).sort_stats("tottime").print_stats(20)
    return per_task_us


if __name__ == "__main__":
    main()
