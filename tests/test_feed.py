"""The recorder (``stores/feed.py``): what it writes of an app's tasks, from the signals, when
the task ended before its submit said so, in a forked child, once its app is gone, and when
one record cannot be made. Each store's own tests: ``test_store.py`` (SQLite),
``on_celery/test_redis_store.py``."""

from __future__ import annotations

import concurrent.futures
import gc
import json
import logging
import os
import subprocess
import sys
import threading
import time
import typing as t
import weakref
from pathlib import Path

import flask
import pytest
from flask_threadctx.app_state import app_state

from family import receipt
from family import recorder
from shop import make


def test_a_kept_result_is_kept_when_the_task_ended_before_its_submit_said_so(
    tmp_path: Path,
) -> None:
    """A worker may run a task to its end before its submit sends ``task_submitted``: the
    store still keeps its result (under gunicorn, one poll in 800 missed it)."""
    from flask_threadctx import task_submitted

    holding = threading.Event()

    def ended_first(sender: flask.Flask, task: t.Any, **kwargs: t.Any) -> None:
        # Connected before the app's recorder, so called first: hold the signal until the
        # task has ended and left the live tasks.
        if not holding.is_set():
            return
        backend = app_state(sender).backend("threads")
        deadline = time.monotonic() + 10
        while backend.live_future(task.id) is not None:
            assert time.monotonic() < deadline
            time.sleep(0.001)

    task_submitted.connect(ended_first)
    try:
        here, there = (make(tmp_path) for _ in "ab")
        ext = app_state(here).extension
        with here.app_context():
            ext.submit(receipt, 0).result()  # a worker is there to take the next tasks at once
            holding.set()
            futures = [ext.task(keep_result=True)(receipt).submit(n) for n in range(20)]
            concurrent.futures.wait(futures)
            recorder(here).flush()
        with there.app_context():
            seen = [app_state(there).extension.get_task(f.task.id) for f in futures]
        assert [f.result()["order"] if f else None for f in seen] == list(range(20))
    finally:
        task_submitted.disconnect(ended_first)
        for app in (here, there):
            app_state(app).default.shutdown()


# Python 3.12 and later warn about any fork with threads running: that is what is tested.
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_forked_child_writes_through_a_writer_of_its_own(tmp_path: Path) -> None:
    app = make(tmp_path)
    ext = app_state(app).extension
    with app.app_context():
        ext.submit(int, 1).result()
    recorder(app).flush()  # the parent's writer is running when it forks
    pid = os.fork()
    if pid == 0:  # the child: report through the exit status, never return into pytest
        code = 3
        try:
            with app.app_context():
                future = ext.submit(int, 2)
                future.result()
            recorder(app).flush()
            record = recorder(app).store.get(future.task.id)
            writer = recorder(app)._writer
            code = (
                0 if record is not None and writer is not None and writer.pid == os.getpid() else 1
            )
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    with app.app_context():
        assert ext.stats()["succeeded"] == 2
    app_state(app).default.shutdown()


def test_an_app_that_is_gone_leaves_no_writer_and_no_receivers(tmp_path: Path) -> None:
    app = make(tmp_path)
    with app.app_context():
        app_state(app).extension.submit(int, 1).result()
    recorder(app).flush()
    writer = recorder(app)._writer
    assert writer is not None and writer.is_alive()
    gone = weakref.ref(recorder(app))
    app_state(app).default.shutdown()
    del app
    gc.collect()
    assert gone() is None  # nothing but the app kept it: not the signals, not its thread
    writer.join(10)  # it looks for its recorder every 50 ms
    assert not writer.is_alive()


def test_a_record_that_cannot_be_made_drops_that_task_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A bug of ours while one task's record is made: that task is dropped, counted and warned
    # of; every other one, and every later batch, is written.
    def kept_result(value: object, max_bytes: int) -> str:
        if value == "bug":
            raise AttributeError("a bug")
        return json.dumps({"value": value})

    monkeypatch.setattr("flask_threadctx.stores.feed.kept_result", kept_result)
    here, there = (make(tmp_path, THREADCTX_KEEP_RESULTS=True) for _ in "ab")
    try:
        with here.app_context(), caplog.at_level(logging.WARNING, "flask_threadctx.recorder"):
            ext = app_state(here).extension
            futures = [ext.submit(str, n) for n in ("a", "bug", "b")]
            concurrent.futures.wait(futures)
            recorder(here).flush()
            later = ext.submit(str, "c")
            later.result(10)
            recorder(here).flush()
        assert recorder(here).dropped == 1
        assert [r.getMessage() for r in caplog.records] == [
            f"The task store of 'shop' was not given task {futures[1].task.id}, whose record"
            " failed (AttributeError('a bug')): 1 tasks dropped from it so far (1 since the last"
            " warning). The tasks themselves are not affected."
        ]
        with there.app_context():
            get = app_state(there).extension.get_task
            seen = [get(f.task.id) for f in [*futures, later]]
        assert seen[1] is None
        assert [f and f.result() for f in seen] == ["a", None, "b", "c"]
    finally:
        for app in (here, there):
            app_state(app).default.shutdown()


def test_a_process_that_exits_right_after_its_tasks_writes_their_ends(tmp_path: Path) -> None:
    """A script, or 'flask shell', that exits as soon as it has its results: the writer's last
    batch is written at exit, and the store is not closed under the writer."""
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from shop import make\n"
        "from flask_threadctx.app_state import app_state\n"
        "app = make(Path(sys.argv[1]))\n"
        "with app.app_context():\n"
        "    ext = app_state(app).extension\n"
        "    futures = [ext.submit(pow, 2, n) for n in range(20)]\n"
        "    print(sum(future.result(30) for future in futures))\n"
        "    print(' '.join(future.task.id for future in futures))\n"
    )
    path = os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        env=dict(os.environ, PYTHONPATH=path),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    total, ids = done.stdout.splitlines()
    assert (total, done.stderr) == (str(2**20 - 1), "")
    reader = make(tmp_path)
    written = recorder(reader).store
    records = [written.get(task_id) for task_id in ids.split()]
    app_state(reader).default.shutdown()
    assert [None if r is None else r.state for r in records] == ["succeeded"] * 20
