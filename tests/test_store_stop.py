"""``cancel_task`` of a thread task of another process, through a SQLite task store: the cases
of stop_cases.py, and what is SQLite's own (a file of an earlier version, stale requests)."""

from __future__ import annotations

import collections.abc as cabc
import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import flask
import pytest
from flask_threadctx import TaskCancelled
from flask_threadctx.app_state import app_state
from flask_threadctx.stores.base import Here
from flask_threadctx.stores.sqlite import SQLiteTaskStore
from flask_threadctx.stores.stops import STALE

import stop_cases
from family import recorder
from shop import make


@pytest.fixture
def pair(tmp_path: Path) -> cabc.Iterator[tuple[flask.Flask, flask.Flask]]:
    apps = tuple(make(tmp_path, THREADCTX_CANCEL_TIMEOUT=0.2) for _ in "ab")
    yield apps[0], apps[1]
    for app in apps:
        app_state(app).default.shutdown()


def _leftovers(path: Path) -> cabc.Callable[[], int]:
    def count() -> int:
        with contextlib.closing(sqlite3.connect(path)) as db:
            return int(db.execute("SELECT count(*) FROM threadctx_stops").fetchone()[0])

    return count


def test_a_running_task_is_stopped_from_another_process(
    pair: tuple[flask.Flask, flask.Flask], tmp_path: Path
) -> None:
    stop_cases.check_a_running_task_is_stopped_from_another_process(*pair)
    assert _leftovers(tmp_path / "tasks.db")() == 0


def test_a_delayed_task_is_cancelled_from_another_process(
    pair: tuple[flask.Flask, flask.Flask],
) -> None:
    stop_cases.check_a_delayed_task_is_cancelled_from_another_process(*pair)


def test_a_finished_task_answers_false(pair: tuple[flask.Flask, flask.Flask]) -> None:
    stop_cases.check_a_finished_task_answers_false(*pair)


def test_unknown_and_hostile_ids_are_unknown(pair: tuple[flask.Flask, flask.Flask]) -> None:
    stop_cases.check_unknown_and_hostile_ids(*pair)


def test_a_process_that_never_answers_times_out_and_leaves_nothing(
    pair: tuple[flask.Flask, flask.Flask], tmp_path: Path
) -> None:
    stop_cases.check_a_process_that_never_answers_times_out(
        pair[1], _leftovers(tmp_path / "tasks.db")
    )


def test_a_request_taken_but_not_answered(
    pair: tuple[flask.Flask, flask.Flask], tmp_path: Path
) -> None:
    stop_cases.check_a_request_taken_but_not_answered(pair[1], _leftovers(tmp_path / "tasks.db"))


def test_a_task_that_ends_before_its_process_takes_the_request(
    pair: tuple[flask.Flask, flask.Flask], tmp_path: Path
) -> None:
    stop_cases.check_a_task_that_ends_before_its_process_takes_the_request(
        pair[1], _leftovers(tmp_path / "tasks.db")
    )


def test_two_askers_are_each_answered(pair: tuple[flask.Flask, flask.Flask]) -> None:
    stop_cases.check_two_askers_are_each_answered(*pair)


def test_a_file_of_an_earlier_version_gets_the_table_of_requests(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    SQLiteTaskStore(str(path), "shop", 10)
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("DROP TABLE threadctx_stops")  # as a file written before stop requests
        db.commit()
    stops = SQLiteTaskStore(str(path), "shop", 10).stop_requests()
    stops.ask("r1", "t1", "host:1")
    assert stops.asked("host:1") == [("r1", "t1")]


def test_a_request_whose_asker_died_is_removed_once_stale(tmp_path: Path) -> None:
    path = tmp_path / "tasks.db"
    stops = SQLiteTaskStore(str(path), "shop", 10).stop_requests()
    stops.ask("old", "t1", "host:1")
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("UPDATE threadctx_stops SET asked_at = ?", (time.time() - STALE - 1,))
        db.commit()
    stops.ask("new", "t2", "host:2")  # to another process: the stale one goes all the same
    assert (stops.asked("host:1"), stops.asked("host:2")) == ([], [("new", "t2")])
    assert stops.withdraw("new", "host:2", only_asked=True) == "asked"
    assert _leftovers(path)() == 0


def test_the_writer_reads_requests_only_while_it_follows_unfinished_tasks(
    pair: tuple[flask.Flask, flask.Flask],
) -> None:
    """A process with no task running pays nothing for stop requests; one with tasks reads
    them once per round of its writer, in the same round as its batch."""
    here = pair[0]
    writer = recorder(here)
    with here.app_context():
        assert stop_cases.on_threads(here, stop_cases.seven).result(10) == 7
        writer.flush()  # written and no longer followed
        statements: list[str] = []
        store = writer.store
        assert isinstance(store, SQLiteTaskStore)
        store._writer_connection().set_trace_callback(statements.append)
        for _ in range(3):
            writer.flush()  # a round of the writer each
        assert statements == []
        ready = threading.Event()
        future = stop_cases.on_threads(here, stop_cases.report_until_stopped, ready)
        assert ready.wait(10)
        writer.flush()
        # One read per round (a round of its own may have come before the flush's).
        assert {s for s in statements if "threadctx_stops" in s} == {
            "SELECT request, id FROM threadctx_stops WHERE app = 'shop' AND process = "
            f"'{Here.name}' AND state = 'asked'"
        }
        assert future.cancel() is False and app_state(here).extension.cancel_task(future.task.id)
        with pytest.raises(TaskCancelled):
            future.result(10)


def test_an_asker_interrupted_while_it_waits_withdraws_its_request(tmp_path: Path) -> None:
    """Ctrl+C in 'cancel_task' (a shell, 'flask threadctx cancel'): the request goes with the
    asker, rather than stopping the task later when nobody waits for the answer."""
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from shop import make\n"
        "from stop_cases import record_of\n"
        "from flask_threadctx.app_state import app_state\n"
        "app = make(Path(sys.argv[1]), THREADCTX_CANCEL_TIMEOUT=600)\n"
        "app_state(app).recorder.store.write([record_of('gone.example:4242')])\n"
        "with app.app_context():\n"
        "    app_state(app).extension.cancel_task('t-elsewhere')\n"
    )
    tests = Path(__file__).parent
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(tests), os.environ.get("PYTHONPATH", "")])
    )
    asker = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path)], env=env, stderr=subprocess.PIPE, text=True
    )
    leftovers = _leftovers(tmp_path / "tasks.db")
    try:
        deadline = time.monotonic() + 60  # only so that a broken asker cannot hang the suite
        while not (tmp_path / "tasks.db").exists() or not _has_table(tmp_path) or not leftovers():
            assert asker.poll() is None and time.monotonic() < deadline, asker.stderr
            time.sleep(0.01)  # polling the file another process writes: no event to wait on
        asker.send_signal(signal.SIGINT)
        _, errors = asker.communicate(timeout=60)
    finally:
        if asker.poll() is None:
            asker.kill()
    assert asker.returncode != 0
    assert errors.rstrip().endswith("KeyboardInterrupt")
    assert leftovers() == 0


def _has_table(folder: Path) -> bool:
    with contextlib.closing(sqlite3.connect(folder / "tasks.db")) as db:
        found = db.execute("SELECT 1 FROM sqlite_master WHERE name = 'threadctx_stops'")
        return found.fetchone() is not None
