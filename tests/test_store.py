"""The shared task store, on SQLite: what one process records, another reads."""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import sqlite3
import threading
import typing as t
from pathlib import Path

import flask
import pytest
from flask_threadctx import Progress
from flask_threadctx import TaskFuture
from flask_threadctx import ThreadContext
from flask_threadctx.app_state import app_state
from flask_threadctx.errors import ResultElsewhere
from flask_threadctx.stores import sqlite as sqlite_store

from family import a_set
from family import broken
from family import check_odd_results_are_recorded_not_kept
from family import check_one_tasks_odd_values_never_drop_the_batch
from family import halves
from family import receipt
from family import recorder
from family import sizable
from family import top
from family import UNDECODABLE
from shop import make


def test_another_process_reads_state_times_progress_and_error(
    two: tuple[flask.Flask, flask.Flask], tmp_path: Path
) -> None:
    here, there = two
    with here.test_request_context("/orders", method="POST"):
        ext = app_state(here).extension
        done = ext.submit(halves, 10)
        failed = ext.submit(broken)
        assert done.result() == 10
        assert isinstance(failed.exception(), ValueError)
        stats = ext.stats()
    assert (tmp_path / "tasks.db").is_file()
    with there.app_context():
        ext = app_state(there).extension
        seen = ext.get_task(done.task.id)
        assert seen is not None and seen is not done
        info = seen.task
        assert (info.id, info.name, info.state, info.request) == (
            done.task.id,
            "halves",
            "succeeded",
            "POST /orders",
        )
        assert (info.submitted_at, info.started_at, info.finished_at) == (
            done.task.submitted_at,
            done.task.started_at,
            done.task.finished_at,
        )
        assert info.progress == Progress(5, 10, "halfway")
        assert seen.done()
        with pytest.raises(ResultElsewhere, match="succeeded in another process"):
            seen.result()
        assert seen.exception() is None
        lost = ext.get_task(failed.task.id)
        assert lost is not None and lost.task.state == "failed"
        # As the process that ran it has it: one task, one answer, whichever process is asked.
        assert (
            repr(lost.exception())
            == repr(failed.exception())
            == ("ValueError(\"no stock for 'lamp'\")")
        )
        assert lost.cancel() is False
        assert ext.get_task("nope") is None
        assert ext.stats() == stats
    assert stats == {
        "submitted": 2,
        "queued": 0,
        "running": 0,
        "succeeded": 1,
        "failed": 1,
        "cancelled": 0,
        "rejected": 0,
        "retrying": 0,
        "expired": 0,
        "timed_out": 0,
        "max_workers": stats["max_workers"],
    }


def test_one_tasks_odd_values_never_drop_the_batch(two: tuple[flask.Flask, flask.Flask]) -> None:
    check_one_tasks_odd_values_never_drop_the_batch(*two)


def test_a_kept_result_is_read_from_another_process(tmp_path: Path) -> None:
    here, there = (make(tmp_path, THREADCTX_RESULT_MAX_BYTES=100) for _ in "ab")
    ext = app_state(here).extension
    kept = ext.task(keep_result=True)
    try:
        with here.app_context():
            futures: list[TaskFuture[t.Any]] = [
                kept(receipt).submit(7),
                kept(sizable).submit(98),  # '"' and 98 x and '"': 100 bytes of JSON
                kept(sizable).submit(99),
                kept(a_set).submit(),
                ext.submit(receipt, 8),  # not asked to be kept
                ext.task(keep_result=False)(receipt).submit(9),
            ]
            concurrent.futures.wait(futures)
            recorder(here).flush()
        with there.app_context():
            seen = [app_state(there).extension.get_task(f.task.id) for f in futures]
        assert all(f is not None and f.task.state == "succeeded" for f in seen)
        found = [f for f in seen if f is not None]
        assert found[0].result() == {
            "order": 7,
            "items": ["lamp", "café"],
            "file": UNDECODABLE,
            "paid": True,
        }
        assert found[1].result() == "x" * 98
        with pytest.raises(ResultElsewhere) as too_large:
            found[2].result()
        assert str(too_large.value) == (
            f"task {futures[2].task.id} (sizable) succeeded in another process, but its"
            " result, 101 bytes of JSON, was over 'THREADCTX_RESULT_MAX_BYTES' (100) and was"
            " not kept. Raise the limit, or keep a large result in your own storage (a"
            " database, a file) and return its key."
        )
        with pytest.raises(ResultElsewhere) as not_json:
            found[3].result()
        assert str(not_json.value) == (
            f"task {futures[3].task.id} (a_set) succeeded in another process, but its result"
            " was not kept: JSON cannot carry it (set: Object of type set is not JSON"
            " serializable). Return plain data (strings, numbers, lists, dicts with string"
            " keys)."
        )
        for future in found[4:]:
            with pytest.raises(ResultElsewhere, match=r"keep_result=True\)', or set"):
                future.result()
        assert [f.exception() for f in found] == [None] * 6
    finally:
        for app in (here, there):
            app_state(app).default.shutdown()


def test_keep_results_is_the_default_that_a_task_may_turn_off(tmp_path: Path) -> None:
    here, there = (make(tmp_path, THREADCTX_KEEP_RESULTS=True) for _ in "ab")
    ext = app_state(here).extension
    try:
        with here.app_context():
            futures = [ext.submit(halves, 4), ext.task(keep_result=False)(halves).submit(6)]
            concurrent.futures.wait(futures)
            recorder(here).flush()
        with there.app_context():
            on, off = (app_state(there).extension.get_task(f.task.id) for f in futures)
        assert on is not None and on.result() == 4
        assert off is not None
        with pytest.raises(ResultElsewhere):
            off.result()
    finally:
        for app in (here, there):
            app_state(app).default.shutdown()


@pytest.mark.parametrize(
    ("config", "error", "message"),
    [
        (
            {"THREADCTX_KEEP_RESULTS": True, "THREADCTX_TASK_STORE": None},
            ValueError,
            "'THREADCTX_KEEP_RESULTS' is True, but there is no store to keep results in: set"
            " 'THREADCTX_TASK_STORE' too, or leave results in the process that ran the task.",
        ),
        ({"THREADCTX_KEEP_RESULTS": 1}, TypeError, "'THREADCTX_KEEP_RESULTS' must be True or"),
        ({"THREADCTX_RESULT_MAX_BYTES": 0}, ValueError, "'THREADCTX_RESULT_MAX_BYTES' must be 1"),
    ],
)
def test_result_settings_are_checked(
    tmp_path: Path, config: dict[str, t.Any], error: type, message: str
) -> None:
    with pytest.raises(error) as caught:
        make(tmp_path, **config)
    assert str(caught.value).startswith(message)


def test_keep_result_takes_a_flag(tmp_path: Path) -> None:
    ext = app_state(make(tmp_path)).extension
    with pytest.raises(TypeError) as caught:
        ext.task(keep_result="yes")  # type: ignore[call-overload]
    assert str(caught.value) == "'keep_result' must be True, False or None, not 'yes'."


def test_an_earlier_store_file_gets_the_columns_added_since(tmp_path: Path) -> None:
    with contextlib.closing(sqlite3.connect(tmp_path / "tasks.db")) as db:
        db.executescript(sqlite_store._SCHEMA)
        for column in ("result", "retries", "due_at"):
            db.execute(f"ALTER TABLE threadctx_tasks DROP COLUMN {column}")
    here, there = make(tmp_path, THREADCTX_KEEP_RESULTS=True), make(tmp_path)
    try:
        with here.app_context():
            future = app_state(here).extension.submit(halves, 2)
            future.result()
            recorder(here).flush()
        with there.app_context():
            seen = app_state(there).extension.get_task(future.task.id)
        assert seen is not None and seen.result() == 2
    finally:
        for app in (here, there):
            app_state(app).default.shutdown()


def test_a_task_running_elsewhere_is_never_waited_for(
    two: tuple[flask.Flask, flask.Flask],
) -> None:
    here, there = two
    started, release = threading.Event(), threading.Event()

    def wait() -> bool:
        started.set()
        return release.wait()

    with here.app_context():
        future = app_state(here).extension.submit(wait)
    try:
        started.wait()
        recorder(here).flush()  # it is running: what the writer reads and writes
        with there.app_context():
            seen = app_state(there).extension.get_task(future.task.id)
            assert seen is not None and seen.running() and not seen.done()
            with pytest.raises(ResultElsewhere, match="running in another process"):
                seen.result()
            with pytest.raises(ResultElsewhere):
                seen.exception(timeout=60)
    finally:
        release.set()
    assert future.result() is True


def test_children_and_grandchildren_are_found(two: tuple[flask.Flask, flask.Flask]) -> None:
    here, there = two
    with here.app_context():
        root = app_state(here).extension.submit(top)
        assert root.result() == "leaf"
        recorder(here).flush()
    store = recorder(there).store
    (kid,) = store.children(root.task.id)
    (grandkid,) = store.children(kid.id)
    assert (kid.name, kid.parent_id, kid.state) == ("middle", root.task.id, "succeeded")
    assert (grandkid.name, grandkid.parent_id) == ("leaf", kid.id)
    assert [r.name for r in store.recent()] == ["leaf", "middle", "top"]
    assert [r.name for r in store.recent(name="middle")] == ["middle"]
    assert store.recent(state="failed") == []
    assert len(store.recent(limit=2)) == 2


@pytest.mark.parametrize("keep", [5, 1, 0])
def test_only_the_last_finished_tasks_are_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, keep: int
) -> None:
    monkeypatch.setattr(sqlite_store, "TRIM_INTERVAL", 0)  # trim with every batch
    app = make(tmp_path, THREADCTX_KEEP_FINISHED=keep)
    ext = app_state(app).extension
    with app.app_context():
        futures = [ext.submit(int, i) for i in range(40)]
        assert [f.result() for f in futures] == list(range(40))
        recorder(app).flush()
        ext.submit(int, 40).result()  # a batch after all 40 finished: it trims them
        recorder(app).flush()
        kept = recorder(app).store.recent(limit=100)
        assert [int(r.id.rsplit("-", 1)[1]) for r in kept] == list(range(41, 41 - keep, -1))
        assert ext.stats()["succeeded"] == 41  # counts are kept apart: never trimmed
    app_state(app).default.shutdown()


def test_a_locked_store_costs_tasks_nothing_and_catches_up(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    request: pytest.FixtureRequest,
) -> None:
    monkeypatch.setattr(sqlite_store, "BUSY_TIMEOUT", 0.05)
    app = make(tmp_path)
    ext = app_state(app).extension
    lock = sqlite3.connect(tmp_path / "tasks.db", isolation_level=None)
    request.addfinalizer(lock.close)
    lock.execute("BEGIN EXCLUSIVE")  # another process holding the file
    with app.app_context(), caplog.at_level(logging.WARNING, "flask_threadctx.recorder"):
        futures = [ext.submit(int, i) for i in range(300)]
        assert [f.result() for f in futures] == list(range(300))
        recorder(app).flush()
        assert recorder(app).dropped == 300  # every task: its end never reached the store
        (warning,) = [r.getMessage() for r in caplog.records]  # one in 10 seconds
        assert "task store of 'shop' is not taking writes (database is locked)" in warning
        assert "tasks dropped from it so far" in warning
        lock.execute("ROLLBACK")
        after = ext.submit(int, 7)
        assert after.result() == 7
        recorder(app).flush()
        record = recorder(app).store.get(after.task.id)
        assert record is not None and record.state == "succeeded"
        assert recorder(app).dropped == 300
        assert ext.stats()["succeeded"] == 1  # only what the store took
    app_state(app).default.shutdown()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("postgres://db/tasks", "must be the URL of a SQLite file"),
        ("sqlite:///", "must be the URL of a SQLite file"),
        (3, "must be the URL of a SQLite file"),
        ("celery", "Celery is not configured"),
    ],
)
def test_a_wrong_store_url_is_refused_at_init(tmp_path: Path, url: t.Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make(tmp_path, THREADCTX_TASK_STORE=url)


@pytest.mark.parametrize(
    ("where", "why"),
    [
        ("missing/tasks.db", "the folder '{tmp}/missing' does not exist. Create it"),
        ("missing/deeper/tasks.db", "the folder '{tmp}/missing/deeper' does not exist."),
        ("file/tasks.db", "'{tmp}/file' is a file, not a folder. Name a path in a folder."),
        ("file/deeper/tasks.db", "'{tmp}/file' is a file, not a folder."),
        ("folder", "it is a folder. Name a file in it, such as 'tasks.db'."),
        ("file", "the file is not a SQLite database this process may write."),
    ],
)
def test_a_sqlite_file_that_cannot_be_opened_is_refused_at_init(
    tmp_path: Path, where: str, why: str
) -> None:
    (tmp_path / "file").write_text("not a database")
    (tmp_path / "folder").mkdir()
    url = f"sqlite:///{tmp_path}/{where}"
    app = flask.Flask("shop", instance_path=str(tmp_path))
    app.config.update(THREADCTX_TASK_STORE=url)
    with pytest.raises(ValueError) as caught:
        ThreadContext(app)
    message = str(caught.value)
    assert message.startswith(
        f"'THREADCTX_TASK_STORE' is {url!r}, but the SQLite file '{tmp_path}/{where}' cannot"
        " be opened ("
    )
    assert why.format(tmp=tmp_path) in message
    assert app.extensions == {}  # nothing registered: it can be set right and tried again


def test_a_sqlite_file_in_a_folder_that_cannot_be_written_is_refused_at_init(
    tmp_path: Path,
) -> None:
    # /proc takes no new files, even from root, whom the permissions of a folder never stop.
    app = flask.Flask("shop", instance_path=str(tmp_path))
    app.config.update(THREADCTX_TASK_STORE="sqlite:////proc/tasks.db")
    with pytest.raises(ValueError) as caught:
        ThreadContext(app)
    assert str(caught.value) == (
        "'THREADCTX_TASK_STORE' is 'sqlite:////proc/tasks.db', but the SQLite file"
        " '/proc/tasks.db' cannot be opened (unable to open database file): this process may"
        " not create files in the folder '/proc' (its permissions, or a read-only file"
        " system). Name a path in a folder it can write to."
    )


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("unix://", "which names no socket: write the absolute path"),
        ("unix://localhost:6379", "which names no socket: write the absolute path"),
        ("unix:///nowhere/redis.sock", "but there is no socket at '/nowhere/redis.sock' (No"),
        ("unix:///proc/version", "but '/proc/version' is not a socket."),
        ("redis://host:port/0", "which is not a Redis URL that redis-py can read (Port"),
    ],
)
def test_a_redis_url_that_names_no_store_is_refused_at_init(url: str, message: str) -> None:
    pytest.importorskip("redis")
    app = flask.Flask("shop")
    app.config.update(THREADCTX_TASK_STORE=url)
    with pytest.raises(ValueError) as caught:
        ThreadContext(app)
    assert str(caught.value).startswith(f"'THREADCTX_TASK_STORE' is {url!r}, ")
    assert message in str(caught.value)


def test_absolute_path(tmp_path: Path) -> None:
    path = tmp_path / "elsewhere" / "t.db"
    path.parent.mkdir()
    app = make(tmp_path / "instance", THREADCTX_TASK_STORE=f"sqlite:///{path}")
    with app.app_context():
        future = app_state(app).extension.submit(int, 1)
        future.result()
        recorder(app).flush()
    with contextlib.closing(sqlite3.connect(path)) as db:
        rows = db.execute("SELECT id FROM threadctx_tasks").fetchall()
    assert rows == [(future.task.id,)]
    app_state(app).default.shutdown()


def test_a_result_whose_encoding_raises_anything_is_recorded_not_kept(tmp_path: Path) -> None:
    here, there = (make(tmp_path, THREADCTX_KEEP_RESULTS=True) for _ in "ab")
    try:
        check_odd_results_are_recorded_not_kept(here, there)
    finally:
        for app in (here, there):
            app_state(app).default.shutdown()
