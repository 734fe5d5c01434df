"""``flask threadctx``: what its commands print, and how they fail when the store cannot be
read, and reading a store that other processes wrote."""

from __future__ import annotations

import collections.abc as cabc
import importlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import typing as t
import uuid
from pathlib import Path

import flask
import pytest
from flask_threadctx import check_cancelled
from flask_threadctx import Progress
from flask_threadctx import TaskCancelled
from flask_threadctx.app_state import app_state
from flask_threadctx.stores import store_of
from flask_threadctx.stores.base import Record

import rerun_app
from family import broken
from family import COUNTS_OF_TOP_AND_BROKEN
from family import recorder
from family import top
from shop import make
from stop_cases import record_of

AT = 1796534118.27
"""2026-12-06 05:15:18.270 UTC."""


@pytest.fixture
def india(monkeypatch: pytest.MonkeyPatch) -> cabc.Iterator[None]:
    """A local time zone of UTC+05:30, which no machine's default is likely to be."""
    monkeypatch.setenv("TZ", "IST-5:30")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


Shop = t.Callable[..., flask.Flask]


@pytest.fixture
def shop(tmp_path: Path) -> cabc.Iterator[Shop]:
    """Makes the app "shop" in ``tmp_path`` with the config given (see shop.py); its pool is
    shut down after the test."""
    made: list[flask.Flask] = []

    def make_shop(**config: t.Any) -> flask.Flask:
        made.append(make(tmp_path, **config))
        return made[-1]

    yield make_shop
    for app in made:
        app_state(app).default.shutdown()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def record(task_id: str, **fields: t.Any) -> Record:
    made = Record(
        task_id, "send_receipt", None, "POST /orders", "succeeded",
        AT, AT + 0.004, AT + 30.518, None, None, "web-1:4242", "celery",
    )  # fmt: skip
    return made._replace(**fields)


def cli(app: flask.Flask, *args: str) -> tuple[int, str]:
    out = app.test_cli_runner().invoke(args=["threadctx", *args])
    return out.exit_code, out.output


@pytest.mark.usefixtures("india")
def test_show_prints_local_times_and_durations(shop: Shop) -> None:
    app = shop()
    task_id = str(uuid.UUID(int=1))
    store = store_of(app)
    assert store is not None
    progress = Progress(3, 4, "counted tea")
    store.write([record(task_id, progress=progress, error="ValueError: no stock")])
    assert cli(app, "show", task_id) == (
        0,
        f"id            {task_id}\n"
        "name          send_receipt\n"
        "state         succeeded\n"
        "request       POST /orders\n"
        "submitted_at  2026-12-06T10:45:18.270+05:30\n"
        "started_at    2026-12-06T10:45:18.274+05:30\n"
        "finished_at   2026-12-06T10:45:48.788+05:30\n"
        "waited        0.004 s\n"
        "ran           30.5 s\n"
        "progress      3 of 4 (counted tea)\n"
        "error         ValueError: no stock\n"
        "process       web-1:4242\n"
        "backend       celery\n",
    )


@pytest.mark.usefixtures("india")
def test_tasks_sizes_the_id_column_to_the_ids(shop: Shop) -> None:
    app = shop()
    store = store_of(app)
    assert store is not None
    celery_id = "0f6a2c1e-9b7d-4c55-8f0e-3a1d2b4c6e8f"
    store.write([record("6c1f09aa-812", submitted_at=AT - 1), record(celery_id)])
    store.write([record("1b2c3d4e-7", submitted_at=AT - 2, started_at=AT + 130, finished_at=None,
                        state="running")])  # fmt: skip
    assert cli(app, "tasks") == (
        0,
        "ID                                    STATE      SUBMITTED                WAITED"
        "         RAN  NAME\n"
        "1b2c3d4e-7                            running    2026-12-06 10:45:16  2 min 12 s"
        "           -  send_receipt\n"
        f"{celery_id}  succeeded  2026-12-06 10:45:18     0.004 s      30.5 s  send_receipt\n"
        "6c1f09aa-812                          succeeded  2026-12-06 10:45:17     1.004 s"
        "      30.5 s  send_receipt\n",
    )


def test_a_worker_names_itself_without_a_stray_comma() -> None:
    pytest.importorskip("celery")
    from flask_threadctx.backends.celery.worker import worker_name as _worker_name

    assert _worker_name("celery@box") == f"celery@box:{os.getpid()}"


@pytest.mark.parametrize("command", [["stats"], ["tasks"], ["show", "x"]])
def test_a_redis_store_that_is_down_is_one_line_naming_it(shop: Shop, command: list[str]) -> None:
    pytest.importorskip("redis")
    port = free_port()  # nothing listens there
    app = shop(THREADCTX_TASK_STORE=f"redis://:s3cret@127.0.0.1:{port}/0")
    code, output = cli(app, *command)
    assert code == 1
    (line,) = output.splitlines()
    assert line.startswith(
        f"Error: Cannot read the task store, Redis redis://:***@127.0.0.1:{port}/0: Error 111"
        f" connecting to 127.0.0.1:{port}."
    )
    assert "s3cret" not in output


def test_the_celery_records_down_are_one_line_naming_them(shop: Shop) -> None:
    pytest.importorskip("celery")
    url = f"redis://:s3cret@127.0.0.1:{free_port()}/0"
    app = shop(
        THREADCTX_TASK_STORE="celery",
        THREADCTX_BACKEND="celery",
        THREADCTX_CELERY={"broker_url": url, "result_backend": url},
    )
    code, output = cli(app, "stats")
    assert code == 1
    (line,) = output.splitlines()
    assert line.startswith(
        f"Error: Cannot read the task store, Redis {url.replace('s3cret', '***')}"
        " (Celery records): Error 111 connecting to"
    )


def test_a_sqlite_store_that_cannot_be_read_is_one_line_naming_it(
    tmp_path: Path, shop: Shop
) -> None:
    app = shop()
    path = tmp_path / "tasks.db"
    for name in os.listdir(tmp_path):  # the database, and its journal if any
        if name.startswith("tasks.db"):
            (tmp_path / name).unlink()
    path.write_bytes(b"not a database, " * 100)
    for command in (["stats"], ["tasks"], ["show", "x"]):
        assert cli(app, *command) == (
            1,
            f"Error: Cannot read the task store, SQLite {path}: file is not a database\n",
        )


def test_cli_reads_the_store(two: tuple[flask.Flask, flask.Flask]) -> None:
    here, there = two
    with here.test_request_context("/orders", method="POST"):
        ext = app_state(here).extension
        root = ext.submit(top)
        failed = ext.submit(broken)
        assert root.result() == "leaf" and failed.exception() is not None
        recorder(here).flush()
    runner = there.test_cli_runner()
    out = runner.invoke(args=["threadctx", "stats", "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output) == COUNTS_OF_TOP_AND_BROKEN
    out = runner.invoke(args=["threadctx", "stats"])
    assert "failed            1" in out.output.splitlines()
    out = runner.invoke(args=["threadctx", "tasks", "--state", "succeeded", "--limit", "2"])
    lines = out.output.splitlines()
    assert lines[0].split() == ["ID", "STATE", "SUBMITTED", "WAITED", "RAN", "NAME"]
    assert [line.split()[-1] for line in lines[1:]] == ["leaf", "middle"]
    out = runner.invoke(args=["threadctx", "tasks", "--name", "broken", "--json"])
    (line,) = out.output.splitlines()
    data = json.loads(line)
    assert (data["id"], data["state"], data["error"], data["request"]) == (
        failed.task.id,
        "failed",
        "ValueError: no stock for 'lamp'",
        "POST /orders",
    )
    assert failed.task.finished_at is not None and failed.task.started_at is not None
    assert data["ran"] == pytest.approx(failed.task.finished_at - failed.task.started_at)
    out = runner.invoke(args=["threadctx", "show", root.task.id])
    lines = out.output.splitlines()
    assert lines[:4] == [
        f"id            {root.task.id}",
        "name          top",
        "state         succeeded",
        "request       POST /orders",
    ]
    kid = recorder(there).store.children(root.task.id)[0]
    (grandkid,) = recorder(there).store.children(kid.id)
    assert lines[-3:] == [
        "children:",
        f"  {kid.id} succeeded middle",
        f"    {grandkid.id} succeeded leaf",
    ]
    out = runner.invoke(args=["threadctx", "show", root.task.id, "--json"])
    shown = json.loads(out.output)
    assert [
        shown["name"],
        shown["children"][0]["name"],
        shown["children"][0]["children"][0]["name"],
    ] == ["top", "middle", "leaf"]
    out = runner.invoke(args=["threadctx", "show", "nope"])
    assert (out.exit_code, out.output) == (
        1,
        "Error: No task 'nope' in the store (or it expired).\n",
    )
    out = runner.invoke(args=["threadctx", "tasks", "--state", "done"])
    assert out.exit_code == 2 and "'done' is not one of 'pending'" in out.output


def test_cli_without_a_store_says_what_to_set(shop: Shop) -> None:
    app = shop(THREADCTX_TASK_STORE=None)
    out = app.test_cli_runner().invoke(args=["threadctx", "tasks"])
    assert out.exit_code == 2
    assert "'shop' has no task store to read: set 'THREADCTX_TASK_STORE'" in out.output


def test_cli_with_a_store_refused_at_init_fails_at_app_load_naming_the_key(
    tmp_path: Path,
) -> None:
    # What docs/monitoring.rst says: the factory fails, and flask's output ends in the message.
    (tmp_path / "tasks.db").write_text("not a database")
    (tmp_path / "shop.py").write_text(
        "import flask\n"
        "from flask_threadctx import ThreadContext\n"
        "def create_app():\n"
        f"    app = flask.Flask('shop', instance_path={str(tmp_path)!r})\n"
        "    app.config.update(THREADCTX_TASK_STORE='sqlite:///tasks.db')\n"
        "    ThreadContext(app)\n"
        "    return app\n"
    )
    command = [sys.executable, "-m", "flask", "--app", "shop:create_app", "threadctx", "stats"]
    done = subprocess.run(
        command, check=False, cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1
    assert done.stderr.startswith("Traceback (most recent call last):\n")
    assert done.stderr.splitlines()[-1] == (
        f"ValueError: 'THREADCTX_TASK_STORE' is 'sqlite:///tasks.db', but the SQLite file"
        f" '{tmp_path}/tasks.db' cannot be opened (file is not a database): the file is not a"
        " SQLite database this process may write. Name another file."
    )


def test_cancel_stops_a_running_task_then_says_it_had_finished(shop: Shop) -> None:
    """The command in the process that runs the task (another process's: see docs/control.rst,
    "Where it works today")."""
    app = shop()
    started, release = threading.Event(), threading.Event()

    def import_feed() -> None:
        started.set()
        while not release.wait(0.005):
            check_cancelled()

    with app.app_context():
        future = app_state(app).extension.submit(import_feed)
    started.wait()
    try:
        assert cli(app, "cancel", future.task.id) == (0, "stopped\n")
        with pytest.raises(TaskCancelled):
            future.result()
    finally:
        release.set()
    assert cli(app, "cancel", future.task.id) == (0, "already finished\n")


def test_cancel_of_a_task_another_process_ran_says_it_had_finished(
    two: tuple[flask.Flask, flask.Flask],
) -> None:
    here, there = two
    with here.app_context():
        future = app_state(here).extension.submit(top)
        assert future.result() == "leaf"
    recorder(here).flush()
    assert cli(there, "cancel", future.task.id) == (0, "already finished\n")


@pytest.mark.parametrize(
    ("task_id", "shown"),
    [
        ("nope", "'nope'"),
        ("a\nstopped\n", "'a\\nstopped\\n'"),
        ("-" + "x" * 500, "'-" + "x" * 75 + "..."),
    ],
    ids=["unknown", "newlines", "long-and-dashed"],
)
def test_cancel_of_an_unknown_id_is_one_line_and_status_1(
    shop: Shop, task_id: str, shown: str
) -> None:
    app = shop()
    out = app.test_cli_runner().invoke(args=["threadctx", "cancel", "--", task_id])
    assert (out.exit_code, out.output) == (
        1,
        f"Error: No task {shown} of 'shop' is known here: not among its pending, running or"
        " last finished tasks, nor in its task store.\n",
    )


def test_cancel_without_a_store_says_what_to_set(shop: Shop) -> None:
    app = shop(THREADCTX_TASK_STORE=None)
    code, output = cli(app, "cancel", "abc")
    assert code == 2
    assert "'shop' has no task store to read: set 'THREADCTX_TASK_STORE'" in output


@rerun_app.threadctx.task(rerunnable=True)
def out_of_stock(item: str) -> None:
    """A rerunnable task that fails, found by its import path ``test_cli:out_of_stock``."""
    raise LookupError(f"{item!r} is out of stock.")


@pytest.fixture
def rerun_shops(tmp_path: Path) -> cabc.Iterator[tuple[flask.Flask, flask.Flask]]:
    """Two processes of tests/rerun_app.py's app sharing a SQLite store: one ran the tasks, the
    other runs the command."""
    url = f"sqlite:///{tmp_path}/tasks.db"
    apps = rerun_app.create_app(url), rerun_app.create_app(url)
    yield apps
    for app in apps:
        app_state(app).default.shutdown()


def test_rerun_of_a_thread_task_waits_for_it_and_prints_how_it_ended(
    rerun_shops: tuple[flask.Flask, flask.Flask],
) -> None:
    here, there = rerun_shops
    with here.app_context():
        good, bad = rerun_app.echo.submit(1, item="tea"), out_of_stock.submit("lamp")
        assert good.result(timeout=30)["args"] == [1]
        assert isinstance(bad.exception(timeout=30), LookupError)
    recorder(here).flush()
    out = there.test_cli_runner().invoke(args=["threadctx", "rerun", good.task.id])
    new_id, *rest = out.stdout.splitlines()
    assert (out.exit_code, rest) == (0, ["succeeded"])
    assert out.stderr == "A thread task: it runs in this process, which waits for it to end.\n"
    out = there.test_cli_runner().invoke(args=["threadctx", "rerun", bad.task.id])
    failed_id, *rest = out.stdout.splitlines()
    assert (out.exit_code, rest) == (3, ["failed: LookupError: 'lamp' is out of stock."])
    # The store had each end before the command did: every process sees them.
    store = recorder(here).store
    for task_id, original_id, state in [
        (new_id, good.task.id, "succeeded"),
        (failed_id, bad.task.id, "failed"),
    ]:
        made = store.get(task_id)
        assert made is not None
        assert (made.rerun_of, made.state) == (original_id, state)
    shown = there.test_cli_runner().invoke(args=["threadctx", "show", new_id]).output
    assert shown.splitlines()[3] == f"rerun_of      {good.task.id}"


def test_rerun_refusals_are_one_line_and_status_1(
    rerun_shops: tuple[flask.Flask, flask.Flask],
) -> None:
    here, there = rerun_shops
    with here.app_context():
        plain = rerun_app.plain.submit(1)
        plain.result(timeout=30)
    recorder(here).flush()
    for task_id, starts in [
        (plain.task.id, f"Error: Task {plain.task.id} (plain) cannot be re-run: it was not"),
        ("nope", "Error: No task 'nope'"),
        ("a\nsucceeded\n", "Error: No task 'a\\nsucceeded\\n'"),
    ]:
        out = there.test_cli_runner().invoke(args=["threadctx", "rerun", "--", task_id])
        assert out.exit_code == 1, out.output
        (line,) = out.output.splitlines()
        assert line.startswith(starts)
    with there.app_context():
        assert rerun_app.threadctx.stats()["submitted"] == 1  # nothing was submitted


def test_rerun_without_a_store_says_what_to_set(shop: Shop) -> None:
    app = shop(THREADCTX_TASK_STORE=None)
    code, output = cli(app, "rerun", "abc")
    assert code == 2
    assert "'shop' has no task store to read: set 'THREADCTX_TASK_STORE'" in output


CLI_SHOP = """
import threading
import flask
from flask_threadctx import check_cancelled, ThreadContext

threadctx = ThreadContext()

def create_app():
    app = flask.Flask("cli_shop", instance_path={folder!r})
    app.config.update(THREADCTX_TASK_STORE="sqlite:///tasks.db")
    threadctx.init_app(app)
    return app

@threadctx.task(rerunnable=True)
def import_feed():
    never = threading.Event()
    while not never.wait(0.01):
        check_cancelled()
"""


def test_ctrl_c_during_a_rerun_asks_the_task_to_stop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In a real process, as an operator would: SIGINT while the command waits for its thread
    task stops the task at its next check; the command says so, and exits with status 3."""
    import concurrent.futures
    import signal

    from flask_threadctx.stores.sqlite import SQLiteTaskStore

    (tmp_path / "cli_shop.py").write_text(CLI_SHOP.format(folder=str(tmp_path)))
    monkeypatch.syspath_prepend(str(tmp_path))
    cli_shop = importlib.import_module("cli_shop")

    app = cli_shop.create_app()
    try:
        with app.app_context():
            original = cli_shop.import_feed.submit()
            assert cli_shop.threadctx.cancel_task(original.task.id)
            concurrent.futures.wait([original], timeout=30)
        recorder(app).flush()
    finally:
        app_state(app).default.shutdown()
        sys.modules.pop("cli_shop", None)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    command = [sys.executable, "-m", "flask", "--app", "cli_shop:create_app", "threadctx",
               "rerun", original.task.id]  # fmt: skip
    process = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None and process.stderr is not None
        new_id = process.stdout.readline().strip()
        waiting = process.stderr.readline()
        assert waiting == "A thread task: it runs in this process, which waits for it to end.\n"
        store = SQLiteTaskStore(str(tmp_path / "tasks.db"), "cli_shop", 1000)
        deadline = time.monotonic() + 60  # only so that a broken store cannot hang the test
        while (record := store.get(new_id)) is None or record.state != "running":
            assert time.monotonic() < deadline
            time.sleep(0.05)  # the store tells nobody when it was written
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert (process.returncode, out) == (
        3,
        f"cancelled: TaskCancelled: Task {new_id} was asked to stop ('cancel_task').\n",
    )
    assert err == f"Interrupted: asked task {new_id} to stop.\n"
    ended = store.get(new_id)
    assert ended is not None and (ended.state, ended.rerun_of) == ("cancelled", original.task.id)


def test_cancel_of_a_task_whose_process_does_not_answer_is_one_line_and_status_1(
    shop: Shop,
) -> None:
    """A task recorded running in a process that is gone: the stop times out, and says so."""
    app = shop(THREADCTX_CANCEL_TIMEOUT=0.05)
    store = store_of(app)
    assert store is not None
    store.write([record_of("gone.example:4242")])
    code, output = cli(app, "cancel", "t-elsewhere")
    assert code == 1
    assert output.startswith(
        "Error: Task t-elsewhere runs in the process gone.example:4242, which did not answer"
        " the request to stop it within 'THREADCTX_CANCEL_TIMEOUT' (0.05 s)"
    )
    assert output.count("\n") == 1
