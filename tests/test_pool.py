"""The pool: results, errors, bookkeeping, bounds, shutdown, fork and exit."""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys
import textwrap
import threading
import typing as t
import warnings

import pytest
from flask import current_app
from flask import g
from flask import request
from flask_threadctx import QueueFull
from flask_threadctx import TaskFuture
from flask_threadctx import ThreadContext
from flask_threadctx.backends.workers import Worker as _Worker
from flask_threadctx.signals import task_cancelled
from flask_threadctx.signals import task_rejected

if t.TYPE_CHECKING:
    import flask

    from conftest import AppFactory

REPEAT = 500


def _block(started: threading.Event, gate: threading.Event) -> bool:
    started.set()
    return gate.wait(10)


def boom(message: str) -> None:
    raise ValueError(message)


def test_result_and_task_info(app: flask.Flask, ext: ThreadContext) -> None:
    future = ext.submit(pow, 2, 10)
    assert isinstance(future, TaskFuture)
    assert future.result(timeout=5) == 1024
    info = future.task
    assert (info.name, info.state, info.parent_id, info.request) == (
        "pow",
        "succeeded",
        None,
        "GET /",
    )
    assert isinstance(info.id, str)
    assert info.submitted_at <= info.started_at <= info.finished_at  # type: ignore[operator]


def _current_app_object() -> flask.Flask:
    app: flask.Flask = current_app._get_current_object()  # type: ignore[attr-defined]
    return app


def test_exception_is_kept_logged_once_and_worker_survives(
    make_app: AppFactory, ext: ThreadContext, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app(ext, THREADCTX_MAX_WORKERS=1)
    with app.app_context():
        failed = ext.submit(boom, "bad input")
        with pytest.raises(ValueError, match="bad input"):
            failed.result()
        assert ext.submit(_current_app_object).result() is app
    assert failed.task.state == "failed"
    records = [r for r in caplog.records if "raised an exception" in r.getMessage()]
    assert len(records) == 1
    assert records[0].exc_info is not None and records[0].exc_info[1] is failed.exception()
    assert records[0].name == app.name


def test_exceptions_not_logged_when_disabled(
    make_app: AppFactory, ext: ThreadContext, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app(ext, THREADCTX_LOG_EXCEPTIONS=False)
    with app.app_context():
        assert isinstance(ext.submit(boom, "quiet").exception(), ValueError)
    assert "raised an exception" not in caplog.text


def test_base_exception_does_not_kill_worker(make_app: AppFactory, ext: ThreadContext) -> None:
    app = make_app(ext, THREADCTX_MAX_WORKERS=1, THREADCTX_LOG_EXCEPTIONS=False)
    with app.app_context():
        assert isinstance(ext.submit(sys.exit, 3).exception(), SystemExit)
        assert ext.submit(int, "7").result() == 7


@pytest.mark.parametrize("not_callable", [None, 3, "print"])
def test_submit_not_callable(app: flask.Flask, ext: ThreadContext, not_callable: t.Any) -> None:
    with pytest.raises(TypeError, match=r"'submit' takes a callable to run, not"):
        ext.submit(not_callable)
    assert ext.stats()["submitted"] == 0


def test_waiting_on_a_child_with_one_worker(make_app: AppFactory, ext: ThreadContext) -> None:
    app = make_app(ext, THREADCTX_MAX_WORKERS=1)

    def parent() -> list[int]:
        children = [ext.submit(pow, 2, n) for n in range(5)]
        return [child.result() for child in children] + list(ext.map(abs, [-1, -2]))

    with app.app_context():
        for _ in range(50):
            assert ext.submit(parent).result(timeout=10) == [1, 2, 4, 8, 16, 1, 2]


def test_fan_out_with_grandchildren(make_app: AppFactory, ext: ThreadContext) -> None:
    app = make_app(ext, THREADCTX_MAX_WORKERS=4)

    def child(n: int) -> int:
        return sum(f.result() for f in [ext.submit(pow, n, 2), ext.submit(pow, n, 3)])

    with app.app_context():
        results = [f.result(timeout=30) for f in [ext.submit(child, n) for n in range(100)]]
    assert results == [n**2 + n**3 for n in range(100)]


def test_stats_add_up(make_app: AppFactory, ext: ThreadContext) -> None:
    app = make_app(
        ext, THREADCTX_MAX_WORKERS=1, THREADCTX_MAX_QUEUE=2, THREADCTX_LOG_EXCEPTIONS=False
    )
    gate = threading.Event()
    started = threading.Event()

    def blocker() -> None:
        started.set()
        gate.wait(10)

    with app.app_context():
        running = ext.submit(blocker)
        started.wait(10)
        waiting = ext.submit(int)
        doomed = ext.submit(int)
        with pytest.raises(QueueFull, match="THREADCTX_MAX_QUEUE"):
            ext.submit(int)
        assert doomed.cancel() is True
        assert ext.stats() == {
            "submitted": 4,
            "queued": 1,
            "running": 1,
            "succeeded": 0,
            "failed": 0,
            "cancelled": 1,
            "rejected": 1,
            "retrying": 0,
            "expired": 0,
            "timed_out": 0,
            "max_workers": 1,
        }
        gate.set()
        running.result()
        waiting.result()
        ext.submit(boom, "x").exception()
        stats = ext.stats()
    assert stats == {
        "submitted": 5,
        "queued": 0,
        "running": 0,
        "succeeded": 2,
        "failed": 1,
        "cancelled": 1,
        "rejected": 1,
        "retrying": 0,
        "expired": 0,
        "timed_out": 0,
        "max_workers": 1,
    }


def test_stats_under_concurrency(make_app: AppFactory, ext: ThreadContext) -> None:
    app = make_app(ext, THREADCTX_LOG_EXCEPTIONS=False)

    def submitter() -> None:
        with app.app_context():
            for n in range(REPEAT):
                ext.submit(boom if n % 5 == 0 else int, "1")

    threads = [threading.Thread(target=submitter) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    with app.app_context():
        ext.shutdown(wait=True)
        assert ext.stats() == {
            "submitted": 4 * REPEAT,
            "queued": 0,
            "running": 0,
            "succeeded": 4 * REPEAT * 4 // 5,
            "failed": 4 * REPEAT // 5,
            "cancelled": 0,
            "rejected": 0,
            "retrying": 0,
            "expired": 0,
            "timed_out": 0,
            "max_workers": 4,
        }


def test_queue_full_leaves_the_pool_usable(make_app: AppFactory, ext: ThreadContext) -> None:
    app = make_app(ext, THREADCTX_MAX_WORKERS=1, THREADCTX_MAX_QUEUE=1)
    gate = threading.Event()
    started = threading.Event()
    rejected: list[t.Any] = []
    with (
        task_rejected.connected_to(lambda sender, **kw: rejected.append(kw), app),
        app.app_context(),
    ):
        first = ext.submit(lambda: _block(started, gate))
        started.wait(10)
        queued = ext.submit(int, "5")
        for _ in range(3):
            with pytest.raises(QueueFull):
                ext.submit(int)
        gate.set()
        assert (first.result(), queued.result()) == (True, 5)
        assert ext.submit(int, "6").result() == 6
    assert [kw["task"].state for kw in rejected] == ["rejected"] * 3
    assert all(isinstance(kw["reason"], QueueFull) for kw in rejected)


def test_get_task_keeps_a_bounded_window(make_app: AppFactory, ext: ThreadContext) -> None:
    app = make_app(ext, THREADCTX_MAX_WORKERS=1, THREADCTX_KEEP_FINISHED=3)  # finish in order
    with app.app_context():
        futures = [ext.submit(int, str(n)) for n in range(6)]
        for future in futures:
            future.result()
        found = [ext.get_task(f.task.id) for f in futures]
        assert found == [None, None, None, *futures[3:]]
        assert ext.get_task("no-such-task") is None
        with pytest.raises(TypeError, match="'get_task' takes a task id string, not 5"):
            ext.get_task(5)  # type: ignore[arg-type]


def test_get_task_finds_pending_and_running(make_app: AppFactory, ext: ThreadContext) -> None:
    app = make_app(ext, THREADCTX_MAX_WORKERS=1, THREADCTX_KEEP_FINISHED=0)
    gate = threading.Event()
    started = threading.Event()
    with app.app_context():
        running = ext.submit(lambda: _block(started, gate))
        started.wait(10)
        pending = ext.submit(int)
        assert ext.get_task(running.task.id) is running
        assert ext.get_task(pending.task.id) is pending
        assert (running.task.state, pending.task.state) == ("running", "pending")
        gate.set()
        pending.result()
        assert ext.get_task(pending.task.id) is None


def test_map(app: flask.Flask, ext: ThreadContext) -> None:
    assert list(ext.map(pow, [2, 3, 4], [2, 2, 2])) == [4, 9, 16]
    assert list(ext.map(lambda: g.get("x"), [])) == []


def test_map_each_item_in_its_own_contexts(app: flask.Flask, ext: ThreadContext) -> None:
    def mark(n: int) -> list[int]:
        g.marks = [*g.get("marks", []), n]
        return list(g.marks)

    assert list(ext.map(mark, range(20))) == [[n] for n in range(20)]


def test_map_bad_input(app: flask.Flask, ext: ThreadContext) -> None:
    with pytest.raises(ValueError, match="'map' takes iterables of the same length: iterable 2"):
        ext.map(pow, [1, 2], [1])
    with pytest.raises(TypeError, match="at least one iterable"):
        ext.map(pow)

    def broken() -> t.Iterator[int]:
        yield 1
        raise ValueError("the iterable's own error")

    with pytest.raises(ValueError, match="the iterable's own error"):
        ext.map(abs, broken())
    with pytest.raises(TypeError, match="'map' takes a callable"):
        ext.map(None, [1])  # type: ignore[arg-type]
    assert ext.stats()["submitted"] == 0


def test_map_timeout(make_app: AppFactory, ext: ThreadContext) -> None:
    app = make_app(ext, THREADCTX_MAX_WORKERS=1)
    gate = threading.Event()
    with app.app_context():
        results = ext.map(gate.wait, [10, 10], timeout=0)
        with pytest.raises(concurrent.futures.TimeoutError):
            next(results)
        gate.set()


def test_cancel_pending(make_app: AppFactory, ext: ThreadContext) -> None:
    app = make_app(ext, THREADCTX_MAX_WORKERS=1)
    gate = threading.Event()
    started = threading.Event()
    ran: list[int] = []
    cancelled: list[str] = []
    with (
        task_cancelled.connected_to(lambda s, task: cancelled.append(task.state), app),
        app.app_context(),
    ):
        first = ext.submit(lambda: _block(started, gate))
        started.wait(10)
        victim = ext.submit(ran.append, 1)
        assert (victim.cancel(), victim.cancel(), first.cancel()) == (True, True, False)
        gate.set()
        first.result()
        ext.shutdown(wait=True)
        assert (ran, cancelled, ext.stats()["cancelled"]) == ([], ["cancelled"], 1)


def test_shutdown(make_app: AppFactory, ext: ThreadContext) -> None:
    app = make_app(ext, THREADCTX_MAX_WORKERS=1)
    with app.app_context():
        queued = [ext.submit(int, str(n)) for n in range(20)]
        ext.shutdown(wait=True)
        assert [f.result() for f in queued] == list(range(20))
        with pytest.raises(RuntimeError, match="was shut down"):
            ext.submit(int)
        assert ext.stats()["rejected"] == 1


def test_shutdown_cancel_futures(make_app: AppFactory, ext: ThreadContext) -> None:
    app = make_app(ext, THREADCTX_MAX_WORKERS=1)
    gate = threading.Event()
    started = threading.Event()
    with app.app_context():
        first = ext.submit(lambda: _block(started, gate))
        started.wait(10)
        rest = [ext.submit(int) for _ in range(5)]
        ext.shutdown(wait=False, cancel_futures=True)
        gate.set()
        assert first.result() is True
        assert [f.cancelled() for f in rest] == [True] * 5


def test_threads_named_and_bounded(make_app: AppFactory, ext: ThreadContext) -> None:
    app = make_app(ext, THREADCTX_MAX_WORKERS=3, THREADCTX_THREAD_NAME_PREFIX="mail")
    with app.app_context():
        names = {
            f.result()
            for f in [ext.submit(lambda: threading.current_thread().name) for _ in range(200)]
        }
    assert names <= {"mail-0", "mail-1", "mail-2"}
    assert sorted(t.name for t in threading.enumerate() if t.name.startswith("mail-")) == [
        "mail-0",
        "mail-1",
        "mail-2",
    ]


def _workers_named(prefix: str) -> list[str]:
    return sorted(t.name for t in threading.enumerate() if t.name.startswith(f"{prefix}-"))


def test_a_thread_starts_with_each_submit_up_to_the_limit(
    make_app: AppFactory, ext: ThreadContext
) -> None:
    app = make_app(ext, THREADCTX_MAX_WORKERS=3, THREADCTX_THREAD_NAME_PREFIX="ramp")
    gate = threading.Event()
    with app.app_context():
        seen = [_workers_named("ramp")]
        futures = []
        for _ in range(5):
            futures.append(ext.submit(gate.wait, 10))
            seen.append(_workers_named("ramp"))
        gate.set()
        assert [f.result(10) for f in futures] == [True] * 5
    three = ["ramp-0", "ramp-1", "ramp-2"]
    assert seen == [[], three[:1], three[:2], three, three, three]


def test_when_no_more_threads_can_start(
    make_app: AppFactory, ext: ThreadContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As at interpreter exit on Python 3.12: the workers already there run the task, and with
    none, submit refuses the task instead of queueing it for nobody."""
    app = make_app(ext, THREADCTX_MAX_WORKERS=3, THREADCTX_THREAD_NAME_PREFIX="nomore")
    start = _Worker.start

    def refuse(self: _Worker) -> None:
        raise RuntimeError("can't create new thread at interpreter shutdown")

    with app.app_context():
        monkeypatch.setattr(_Worker, "start", refuse)
        with pytest.raises(RuntimeError, match="can't create new thread"):
            ext.submit(int, "1")
        assert (ext.stats()["rejected"], ext.stats()["queued"]) == (1, 0)
        monkeypatch.setattr(_Worker, "start", start)
        assert ext.submit(int, "2").result(10) == 2
        monkeypatch.setattr(_Worker, "start", refuse)
        assert [ext.submit(int, str(n)).result(10) for n in range(5)] == list(range(5))
        assert _workers_named("nomore") == ["nomore-0"]


def test_shutdown_waiting_in_its_own_task_says_what_to_do(
    make_app: AppFactory, ext: ThreadContext
) -> None:
    app = make_app(ext, THREADCTX_MAX_WORKERS=2)
    with app.app_context():
        future = ext.submit(ext.shutdown)
        with pytest.raises(RuntimeError, match=r"'shutdown\(wait=False\)' in a task"):
            future.result(10)
        assert ext.submit(int, "3").result(10) == 3  # the pool was not shut down
        assert ext.submit(ext.shutdown, wait=False).result(10) is None
        with pytest.raises(RuntimeError, match="was shut down"):
            ext.submit(int)


@pytest.mark.usefixtures("frequent_switches")
def test_shutdown_racing_the_first_submits(make_app: AppFactory) -> None:
    """Every task that ``submit`` accepts runs before ``shutdown(wait=True)`` returns, and no
    worker outlives it, however the two interleave on a pool that has few threads or none."""
    accepted_counts = set()
    for n in range(REPEAT // 5):
        ext = ThreadContext()
        prefix = f"race{n}"
        app = make_app(ext, THREADCTX_MAX_WORKERS=3, THREADCTX_THREAD_NAME_PREFIX=prefix)
        race = _FirstSubmitsAndShutdown(app, ext, prefix, head_start=n % 4)
        threads = [threading.Thread(target=race.submit), threading.Thread(target=race.shut_down)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert race.after_shutdown == [([], True)]
        assert len(race.accepted) + len(race.refused) == 20
        assert [f.result(0) for f in race.accepted] == list(range(len(race.accepted)))
        with app.app_context():
            stats = ext.stats()
        assert (stats["succeeded"], stats["rejected"]) == (len(race.accepted), len(race.refused))
        accepted_counts.add(len(race.accepted))
    assert len(accepted_counts) > 4  # the shutdown landed in many places


class _FirstSubmitsAndShutdown:
    def __init__(self, app: flask.Flask, ext: ThreadContext, prefix: str, head_start: int) -> None:
        self.app, self.ext, self.prefix = app, ext, prefix
        self.head_start = head_start
        self.go = threading.Event()
        self.accepted: list[TaskFuture[int]] = []
        self.refused: list[RuntimeError] = []
        self.after_shutdown: list[tuple[list[str], bool]] = []

    def submit(self) -> None:
        with self.app.app_context():
            for m in range(20):
                if m == self.head_start:
                    self.go.set()
                try:
                    self.accepted.append(self.ext.submit(abs, -m))
                except RuntimeError as exc:
                    self.refused.append(exc)

    def shut_down(self) -> None:
        with self.app.app_context():
            self.go.wait(10)
            self.ext.shutdown(wait=True)
            done = all(f.done() for f in list(self.accepted))
            self.after_shutdown.append((_workers_named(self.prefix), done))


def test_eager(make_app: AppFactory, ext: ThreadContext) -> None:
    app = make_app(ext, THREADCTX_EAGER=True)

    @app.get("/")
    def view() -> t.Any:
        g.user = "ada"
        future = ext.submit(
            lambda: (threading.current_thread().name, request_path(), g.user, g.setdefault("n", 1))
        )
        assert future.done()
        return {"seen": future.result(), "view_n": g.get("n")}

    assert app.test_client().get("/").json == {
        "seen": [threading.current_thread().name, "/", "ada", 1],
        "view_n": None,
    }


def request_path() -> str:
    return request.path


def test_one_extension_many_apps(make_app: AppFactory, ext: ThreadContext) -> None:
    first = make_app(ext, THREADCTX_MAX_WORKERS=1)
    second = make_app(ext, THREADCTX_MAX_WORKERS=2)
    with first.app_context():
        assert ext.submit(lambda: current_app.name).result() == first.name
        assert ext.stats()["max_workers"] == 1
    with second.app_context():
        assert ext.submit(lambda: current_app.name).result() == second.name
        assert (ext.stats()["submitted"], ext.stats()["max_workers"]) == (1, 2)


def test_pool_replaced_after_fork(make_app: AppFactory, ext: ThreadContext) -> None:
    app = make_app(ext)
    with app.app_context():
        assert ext.submit(os.getpid).result() == os.getpid()
        read_end, write_end = os.pipe()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads: on purpose
            pid = os.fork()
        if pid == 0:  # pragma: no cover - the child reports through the pipe
            try:
                result = ext.submit(os.getpid).result(timeout=10)
                stats = ext.stats()
                message = f"{result == os.getpid()} {stats['submitted']}"
            except BaseException as exc:
                message = repr(exc)
            os.write(write_end, message.encode())
            os._exit(0)
        os.close(write_end)
        _, status = os.waitpid(pid, 0)
        with os.fdopen(read_end) as pipe:
            assert pipe.read() == "True 1"
        assert status == 0


EXIT_SCRIPT = """
import atexit, logging, sys, threading
import flask
from flask_threadctx import ThreadContext
from flask_threadctx.signals import task_cancelled

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stdout)
app = flask.Flask("exiting")
app.config.update(THREADCTX_MAX_WORKERS=2, THREADCTX_SHUTDOWN_TIMEOUT={timeout})
ext = ThreadContext(app)
task_cancelled.connect(lambda sender, task: print("signal cancelled", task.id), app, weak=False)
started = threading.Semaphore(0)
never = threading.Event()
done = []
# Registered before the pool's exit hook, so it runs after it: atexit runs last-in, first-out.
atexit.register(lambda: print("finished", len(done)))
def work(block):
    started.release()
    if block:
        never.wait(60)
    done.append(1)
for _ in range({count}):
    ext.submit(work, {block})
if {block}:
    started.acquire()
    started.acquire()
"""


def _run_exit_script(timeout: float, count: int, block: bool) -> str:
    script = textwrap.dedent(EXIT_SCRIPT).format(timeout=timeout, count=count, block=block)
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    return result.stdout


def test_exit_drains_queued_tasks() -> None:
    out = _run_exit_script(timeout=30, count=200, block=False)
    assert out.splitlines()[-1] == "finished 200"
    assert "Cancelled" not in out


def test_exit_cancels_what_never_started_and_names_the_abandoned() -> None:
    out = _run_exit_script(timeout=0.1, count=10, block=True)
    lines = out.splitlines()
    assert "WARNING Cancelled 8 task(s) of 'exiting' that had not started" in out
    assert len([line for line in lines if line.startswith("signal cancelled")]) == 8
    abandoned = [line for line in lines if line.startswith("ERROR Abandoned task")]
    assert len(abandoned) == 2
    assert all("(work) of 'exiting': still running 1.0s" in line for line in abandoned)
    assert lines[-1] == "finished 0"


def test_concurrent_futures_interop(app: flask.Flask, ext: ThreadContext) -> None:
    futures = [ext.submit(int, str(n)) for n in range(10)]
    done, not_done = concurrent.futures.wait(futures, timeout=10)
    assert (len(done), not_done) == (10, set())


def _parent_of_one_child(
    ext: ThreadContext, started: threading.Event, gate: threading.Event
) -> int:
    _block(started, gate)
    return int(ext.submit(pow, 2, 5).result())


def test_children_of_running_tasks_run_after_shutdown(make_app: AppFactory) -> None:
    for _ in range(20):
        ext = ThreadContext()
        app = make_app(ext, THREADCTX_MAX_WORKERS=2)
        gate = threading.Event()
        started = threading.Event()
        with app.app_context():
            future = ext.submit(_parent_of_one_child, ext, started, gate)
            started.wait(10)
            ext.shutdown(wait=False)
            with pytest.raises(RuntimeError, match="was shut down"):
                ext.submit(int)
            gate.set()
            assert future.result(timeout=10) == 32
            ext.shutdown(wait=True)
            assert ext.stats()["succeeded"] == 2


FORK_SCRIPT = """
import os, sys, threading
import flask
from flask_threadctx import ThreadContext

app = flask.Flask("forking")
app.config.update(THREADCTX_MAX_WORKERS=1, THREADCTX_LOG_EXCEPTIONS=False)
ext = ThreadContext(app)
log = {log!r}
go = threading.Event()

def record(name):
    with open(log, "a") as f:
        f.write(f"{{name}} {{os.getpid()}}\\n")

def fork_and_exit():
    go.wait(10)
    pid = os.fork()
    if pid == 0:
        record("child")
        {child_ends}
    return os.waitpid(pid, 0)[1]

def outer():
    status = ext.submit(fork_and_exit).result()  # runs in this worker: a fork in a nested task
    record("outer")
    return status

with app.app_context():
    forker = ext.submit({first})
    after = [ext.submit(record, f"queued{{n}}") for n in range(3)]
    go.set()
    status = forker.result(timeout=30)
    for future in after:
        future.result(timeout=30)
print(os.waitstatus_to_exitcode(status))
"""


@pytest.mark.parametrize(
    ("child_ends", "status"),
    [("sys.exit(0)", 0), ("sys.exit(3)", 3), ("raise ValueError('x')", 1), ("return None", 0)],
)
@pytest.mark.parametrize("nested", [False, True])
def test_a_task_that_forks_runs_nothing_else_in_the_child(
    tmp_path: t.Any, child_ends: str, status: int, nested: bool
) -> None:
    log = tmp_path / "log"
    script = textwrap.dedent(FORK_SCRIPT).format(
        log=str(log), child_ends=child_ends, first="outer" if nested else "fork_and_exit"
    )
    result = subprocess.run(
        [sys.executable, "-W", "ignore::DeprecationWarning", "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert result.stdout.splitlines() == [str(status)]
    names = [line.split()[0] for line in log.read_text().splitlines()]
    expected = ["child", "queued0", "queued1", "queued2"]
    assert sorted(names) == (["child", "outer", *expected[1:]] if nested else expected)


SHUTDOWN_THEN_EXIT_SCRIPT = """
import threading
import flask
from flask_threadctx import ThreadContext

app = flask.Flask("exiting")
app.config.update(THREADCTX_MAX_WORKERS=1)
ext = ThreadContext(app)
gate = threading.Event()
done = []
import atexit
atexit.register(lambda: print("ran", len(done)))  # registered first, so it runs last
with app.app_context():
    ext.submit(gate.wait, 10)
    for n in range(19):
        ext.submit(done.append, n)
    ext.shutdown(wait=False)
gate.set()
"""


def test_tasks_queued_at_shutdown_without_waiting_still_run_at_exit() -> None:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(SHUTDOWN_THEN_EXIT_SCRIPT)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert result.stdout.splitlines() == ["ran 19"]
