"""Re-running a task on threads, with the SQLite store: what is kept, what comes back, and what
is refused. The same with Redis, and on Celery: tests/on_celery/test_celery_rerun.py."""

from __future__ import annotations

import collections.abc as cabc
import contextlib
import datetime
import io
import json
import os
import sqlite3
import subprocess
import sys
import types
import typing as t
from pathlib import Path

import flask
import pytest
from flask_threadctx import TaskFuture
from flask_threadctx import ThreadContext
from flask_threadctx.app_state import app_state
from flask_threadctx.stores import flush

import rerun_app
from rerun_app import echo
from rerun_app import flaky
from rerun_app import plain
from rerun_app import threadctx

HERE = Path(__file__).parent

HEADERS = {
    "X-Trace": "t-1",
    "Accept-Language": "fr",
    "Authorization": "Bearer s3cret-token",
    "Cookie": "session=c00kie-value",
    "X-Api-Key": "k3y-value",
}
SECRETS = ("s3cret-token", "c00kie-value", "k3y-value")


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/tasks.db"


@pytest.fixture
def made() -> cabc.Iterator[list[flask.Flask]]:
    apps: list[flask.Flask] = []
    yield apps
    for app in apps:
        app_state(app).default.shutdown(wait=True)


@pytest.fixture
def rapp(store_url: str, made: list[flask.Flask]) -> flask.Flask:
    app = rerun_app.create_app(store_url)
    made.append(app)
    return app


def raw_rerun(path: str, task_id: str) -> str | None:
    """The stored payload of a task, read from the SQLite file itself."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        row = db.execute("SELECT rerun FROM threadctx_tasks WHERE id = ?", (task_id,)).fetchone()
    return None if row is None else t.cast("str | None", row[0])


def without_secrets(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The headers a re-run sees, as a Celery worker would: without the credentials, which
    stay behind."""
    assert {"Authorization", "Cookie", "X-Api-Key"} <= {name for name, _ in headers}
    return [(k, v) for k, v in headers if k not in ("Authorization", "Cookie", "X-Api-Key")]


def seen(future: TaskFuture[t.Any]) -> dict[str, t.Any]:
    """What a task of :mod:`rerun_app` saw."""
    return t.cast("dict[str, t.Any]", future.result(timeout=30))


def db_path(url: str) -> str:
    return url[len("sqlite:///") :]


def submit_in_request(app: flask.Flask, *args: t.Any, **kwargs: t.Any) -> t.Any:
    with app.test_request_context(
        "/orders/7?page=2&tag=a&tag=b",
        method="POST",
        json={"qty": 3},
        headers=HEADERS,
        base_url="https://shop.example",
    ):
        return echo.submit(*args, **kwargs)


def test_a_rerun_gets_the_arguments_and_request_and_is_linked(
    rapp: flask.Flask, store_url: str
) -> None:
    original = submit_in_request(rapp, 1, "two", [3.5, None], key={"a": [True]})
    first = original.result(timeout=30)
    with rapp.app_context():
        again = threadctx.rerun(original.task.id)
        second = seen(again)
        flush(rapp)
        record = app_state(rapp).recorder.store.get(again.task.id)  # type: ignore[union-attr]
    assert again.task.id != original.task.id
    assert again.task.rerun_of == original.task.id
    assert original.task.rerun_of is None
    assert record is not None and record.rerun_of == original.task.id
    assert record.as_dict()["rerun_of"] == original.task.id
    assert "rerun" not in record.as_dict()
    assert second["args"] == first["args"] == [1, "two", [3.5, None]]
    assert second["kwargs"] == first["kwargs"] == {"key": {"a": [True]}}
    request = second["request"]
    assert request["method"] == "POST"
    assert request["path"] == "/orders/7"
    assert request["url"] == "https://shop.example/orders/7?page=2&tag=a&tag=b"
    assert request["args"] == {"page": ["2"], "tag": ["a", "b"]}
    assert request["data"] == '{"qty": 3}'
    assert request["headers"] == without_secrets(first["request"]["headers"])
    assert original.task.request == again.task.request == "POST /orders/7"
    stored = raw_rerun(db_path(store_url), original.task.id)
    assert stored is not None and "t-1" in stored
    assert not any(secret in stored for secret in SECRETS)
    assert raw_rerun(db_path(store_url), again.task.id) is not None


def test_a_rerun_of_a_rerun_links_to_the_one_it_reran(rapp: flask.Flask) -> None:
    with rapp.app_context():
        original = echo.submit("x")
        original.result(timeout=30)
        ids = [original.task.id]
        for _ in range(3):
            again = threadctx.rerun(ids[-1])
            assert seen(again)["args"] == ["x"]
            assert again.task.rerun_of == ids[-1]
            ids.append(again.task.id)
        flush(rapp)
        store = app_state(rapp).recorder.store  # type: ignore[union-attr]
        assert [store.get(i).rerun_of for i in ids] == [None, *ids[:-1]]  # type: ignore[union-attr]
        assert again.task.request is None


def test_options_are_kept_but_not_when_it_starts(rapp: flask.Flask) -> None:
    with rapp.app_context():
        first = flaky.submit("k1")
        assert first.result(timeout=30) == 2
        assert first.task.retries == 1
        again = threadctx.rerun(first.task.id)
        assert again.result(timeout=30) == 4  # failed once and was retried, as the first
        assert again.task.retries == 1
        # A re-run is asked for now: the original's countdown is not the re-run's. And a task
        # that has not run yet (or runs still) may be re-run: the original goes on.
        later = echo.submit_with_options(args=("later",), countdown=3600)
        now = threadctx.rerun(later.task.id)
        assert seen(now)["args"] == ["later"]
        assert later.task.state == "pending"
        assert threadctx.cancel_task(later.task.id) is True


def test_a_task_not_rerunnable_is_refused_and_says_how(rapp: flask.Flask) -> None:
    with rapp.app_context():
        future = plain.submit(1)
        future.result(timeout=30)
        per_call = echo.submit_with_options(args=(1,), rerunnable=False)
        per_call.result(timeout=30)
        submitted = threadctx.stats()["submitted"]
        for task_id in (future.task.id, per_call.task.id):
            with pytest.raises(ValueError, match=r"rerunnable=True\)'") as caught:
                threadctx.rerun(task_id)
            assert task_id in str(caught.value)
        with pytest.raises(LookupError, match="No task 'nope'"):
            threadctx.rerun("nope")
        with pytest.raises(TypeError, match="task id string"):
            threadctx.rerun(7)  # type: ignore[arg-type]
        assert threadctx.stats()["submitted"] == submitted


def test_a_removed_or_renamed_function_is_refused_and_nothing_submitted(
    rapp: flask.Flask,
) -> None:
    module: t.Any = types.ModuleType("rerun_gone")
    sys.modules["rerun_gone"] = module
    try:
        for how in ("removed", "renamed", "undecorated", "module gone"):
            exec(
                "from rerun_app import threadctx\n"
                "@threadctx.task(rerunnable=True)\n"
                "def job(n):\n    return n * 2\n",
                vars(module),
            )
            with rapp.app_context():
                future = module.job.submit(21)
                assert future.result(timeout=30) == 42
                if how == "removed":
                    del module.job
                elif how == "renamed":
                    module.new_job = module.job
                    del module.job
                elif how == "undecorated":
                    module.job = module.job.fn
                else:
                    del sys.modules["rerun_gone"]
                submitted = threadctx.stats()["submitted"]
                with pytest.raises(LookupError, match="'rerun_gone:job'") as caught:
                    threadctx.rerun(future.task.id)
                assert "nothing was submitted" in str(caught.value)
                assert threadctx.stats()["submitted"] == submitted
                sys.modules["rerun_gone"] = module
    finally:
        sys.modules.pop("rerun_gone", None)


class NotJSON:
    pass


@pytest.mark.parametrize(
    ("args", "kwargs", "named"),
    [
        ((NotJSON(),), {}, "argument 0"),
        ((1,), {"when": {1, 2}}, "argument 'when'"),
        (({1: "a"},), {}, "dict key 1 at argument 0"),
        # Plain data a client can send, which kombu's JSON would read back as a datetime.
        (
            ({"at": [{"__type__": "datetime", "__value__": "2020-01-01T00:00:00"}]},),
            {},
            "A dict at argument 0['at'][0] has the keys '__type__' and '__value__'",
        ),
        ((b"bytes?",), {}, None),
    ],
)
def test_arguments_that_are_not_json_are_refused_at_the_submit(
    rapp: flask.Flask, args: tuple[t.Any, ...], kwargs: dict[str, t.Any], named: str | None
) -> None:
    with rapp.app_context():
        submitted = threadctx.stats()["submitted"]
        if named is None:  # kombu's JSON carries bytes, as Celery does: kept as they are
            future = echo.submit(*args, **kwargs)
            assert future.result(timeout=30)["args"] == list(args)
            assert seen(threadctx.rerun(future.task.id))["args"] == list(args)
            return
        with pytest.raises(TypeError) as caught:
            echo.submit(*args, **kwargs)
        assert str(caught.value).startswith("'echo' was not submitted: it is rerunnable")
        assert named in str(caught.value)
        assert threadctx.stats()["submitted"] == submitted


def test_a_body_over_the_limit_is_refused_at_the_submit(
    store_url: str, made: list[flask.Flask]
) -> None:
    app = rerun_app.create_app(store_url, THREADCTX_CELERY_MAX_BODY=1000)
    made.append(app)
    with app.app_context():
        submitted = threadctx.stats()["submitted"]
    with app.test_request_context("/upload", method="POST", data=b"x" * 1001):
        with pytest.raises(TypeError, match=r"1001 bytes, more than 'THREADCTX_CELERY_MAX_BODY'"):
            echo.submit(1)
        assert threadctx.stats()["submitted"] == submitted
    with app.test_request_context("/upload", method="POST", data=b"x" * 1000):
        future = echo.submit(1)
        assert future.result(timeout=30)["request"]["data"] == "x" * 1000
        assert seen(threadctx.rerun(future.task.id))["request"]["data"] == "x" * 1000


def test_surrogates_in_arguments_and_headers_come_back_the_same(
    rapp: flask.Flask, store_url: str
) -> None:
    name = "caf\udce9.txt"  # an undecodable byte of a file name, as os.fsdecode gives it
    with rapp.test_request_context(
        "/files/caf%E9",  # not UTF-8: Werkzeug decodes the path with replacements
        headers={"X-File": "caf\xe9", "X-Name": name},
        query_string={"q": "\u00e9\U0001f600"},
    ):
        original = echo.submit(name, note={"k\udcff": "\U0001f600"})
    first = original.result(timeout=30)
    with rapp.app_context():
        second = seen(threadctx.rerun(original.task.id))
    assert second["args"] == first["args"] == [name]
    assert second["kwargs"] == first["kwargs"] == {"note": {"k\udcff": "\U0001f600"}}
    assert second["request"]["args"] == first["request"]["args"] == {"q": ["\u00e9\U0001f600"]}
    assert second["request"]["headers"] == first["request"]["headers"]
    assert ("X-File", "caf\xe9") in second["request"]["headers"]
    assert ("X-Name", name) in second["request"]["headers"]
    assert second["request"]["path"] == first["request"]["path"] == "/files/caf\ufffd"
    assert second["request"]["url"] == first["request"]["url"]
    assert raw_rerun(db_path(store_url), original.task.id).isascii()  # type: ignore[union-attr]


def test_rerunnable_needs_a_store_and_a_bool(made: list[flask.Flask]) -> None:
    app = rerun_app.create_app(None)
    made.append(app)
    with app.app_context():
        with pytest.raises(RuntimeError, match=r"has no task store .* 'THREADCTX_TASK_STORE'"):
            echo.submit(1)
        assert threadctx.stats()["submitted"] == 0
        with pytest.raises(RuntimeError, match=r"'rerun' reads .* 'THREADCTX_TASK_STORE'"):
            threadctx.rerun("any")
        assert echo.submit_with_options(args=(1,), rerunnable=False).result(timeout=30)
    with pytest.raises(ValueError, match="'THREADCTX_RERUNNABLE' is True, but"):
        ThreadContext(_app_with(THREADCTX_RERUNNABLE=True))
    ext = ThreadContext()
    with pytest.raises(TypeError, match="'rerunnable' must be True or False, not 'yes'"):
        ext.task(rerunnable="yes")
    with pytest.raises(TypeError, match="'rerunnable' must be True or False, not 1"):
        echo.submit_with_options(args=(1,), rerunnable=1)


def _app_with(**config: t.Any) -> flask.Flask:
    app = flask.Flask("configured")
    app.config.update(config)
    return app


def test_a_function_other_processes_cannot_find_is_refused(rapp: flask.Flask) -> None:
    def local(n: int) -> int:
        return n

    task = threadctx.task(rerunnable=True)(local)
    with rapp.app_context(), pytest.raises(TypeError, match=r"rerunnable.*inside another"):
        task.submit(1)


def test_the_config_default_makes_declared_tasks_rerunnable(
    store_url: str, made: list[flask.Flask]
) -> None:
    app = rerun_app.create_app(store_url, THREADCTX_RERUNNABLE=True)
    made.append(app)
    with app.app_context():
        declared = plain.submit(5)
        declared.result(timeout=30)
        assert seen(threadctx.rerun(declared.task.id))["args"] == [5]
        refused = plain.submit_with_options(args=(6,), rerunnable=False)
        bare = threadctx.submit(rerun_app.what_it_saw, 7)
        for future in (refused, bare):
            future.result(timeout=30)
            with pytest.raises(ValueError, match="not submitted rerunnable"):
                threadctx.rerun(future.task.id)


def test_a_rerun_from_another_process(rapp: flask.Flask, store_url: str) -> None:
    original = submit_in_request(rapp, "from", {"the": "web"})
    first = original.result(timeout=30)
    with rapp.app_context():
        flush(rapp)
    script = (
        "import json, sys, rerun_app\n"
        "app = rerun_app.create_app(sys.argv[1])\n"
        "with app.app_context():\n"
        "    future = rerun_app.threadctx.rerun(sys.argv[2])\n"
        "    print(json.dumps([future.task.id, future.task.rerun_of, future.result(30)]))\n"
        "    try:\n"
        "        rerun_app.threadctx.rerun('missing')\n"
        "    except LookupError as error:\n"
        "        print(json.dumps(str(error)))\n"
    )
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])
    )
    done = subprocess.run(
        [sys.executable, "-c", script, store_url, original.task.id],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    lines = done.stdout.splitlines()
    task_id, rerun_of, second = json.loads(lines[0])
    assert rerun_of == original.task.id
    first["request"]["headers"] = without_secrets(first["request"]["headers"])
    assert second == json.loads(json.dumps(first))
    assert "No task 'missing'" in json.loads(lines[1])
    with rapp.app_context():
        record = app_state(rapp).recorder.store.get(task_id)  # type: ignore[union-attr]
    assert record is not None
    assert (record.state, record.rerun_of) == ("succeeded", original.task.id)
    assert record.process != app_state(rapp).recorder.store.get(original.task.id).process  # type: ignore[union-attr]


def test_an_earlier_store_file_gets_the_rerun_columns(
    tmp_path: Path, made: list[flask.Flask]
) -> None:
    from flask_threadctx.stores import sqlite as sqlite_store

    path = tmp_path / "old.db"
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.executescript(sqlite_store._SCHEMA)
        for column in ("rerun", "rerun_of", "due_at", "retries", "result"):
            db.execute(f"ALTER TABLE threadctx_tasks DROP COLUMN {column}")
        db.execute(
            "INSERT INTO threadctx_tasks (app, id, name, state, submitted_at, process, backend)"
            " VALUES (?, 'old-1', 'echo', 'succeeded', 1.0, 'h:1', 'threads')",
            (rerun_app.APP_NAME,),
        )
        db.commit()
    app = rerun_app.create_app(f"sqlite:///{path}")
    made.append(app)
    with app.app_context():
        with pytest.raises(ValueError, match="not submitted rerunnable"):
            threadctx.rerun("old-1")
        future = echo.submit("new")
        future.result(timeout=30)
        assert seen(threadctx.rerun(future.task.id))["args"] == ["new"]


def test_a_rerun_in_a_request_sees_the_original_request_not_its_own(
    rapp: flask.Flask,
) -> None:
    original = submit_in_request(rapp, "r")
    first = seen(original)
    with rapp.test_request_context(
        "/admin/rerun", method="POST", headers={"Authorization": "Bearer admin"}
    ):
        flask.g.user = "admin"  # the caller's g and session stay the caller's
        flask.session["admin"] = True
        again = seen(threadctx.rerun(original.task.id))
        assert flask.request.path == "/admin/rerun"
    assert again["request"]["path"] == first["request"]["path"] == "/orders/7"
    assert again["request"]["headers"] == without_secrets(first["request"]["headers"])


def test_what_is_kept_belongs_to_the_task_submitted_never_its_children(
    rapp: flask.Flask, frequent_switches: None
) -> None:
    with rapp.app_context():
        parents: list[TaskFuture[t.Any]] = [rerun_app.parent.submit(4) for _ in range(200)]
        parents.append(threadctx.rerun(parents[0].task.id))
        children = [child for future in parents for child in future.result(30)]
        app_state(rapp).default.shutdown(wait=True)  # every child has ended
        flush(rapp)
        store = app_state(rapp).recorder.store  # type: ignore[union-attr]
        for future in parents:
            record = store.get(future.task.id)
            assert record is not None and record.rerun is not None
            assert json.loads(record.rerun)[1:4] == ["rerun_app:parent", [4], {}]
        assert store.get(parents[-1].task.id).rerun_of == parents[0].task.id  # type: ignore[union-attr]
        for child in children:
            record = store.get(child)
            assert record is not None and record.rerun_of is None
            if record.name == "plain":
                assert record.rerun is None
            else:
                assert json.loads(t.cast(str, record.rerun))[1] == "rerun_app:echo"


@pytest.mark.parametrize(
    "payload",
    ["{not json", '["rerun_app", "rerun_app:echo"]', '[1, 2, 3, 4, {"context": {}}]', "null"],
)
def test_a_payload_changed_in_the_store_is_refused(
    rapp: flask.Flask, store_url: str, payload: str
) -> None:
    with rapp.app_context():
        future = echo.submit(1)
        future.result(timeout=30)
        flush(rapp)
        with contextlib.closing(sqlite3.connect(db_path(store_url))) as db:
            db.execute(
                "UPDATE threadctx_tasks SET rerun = ? WHERE id = ?", (payload, future.task.id)
            )
            db.commit()
        submitted = threadctx.stats()["submitted"]
        with pytest.raises(ValueError, match="cannot be read") as caught:
            threadctx.rerun(future.task.id)
        assert "nothing was submitted" in str(caught.value)
        assert threadctx.stats()["submitted"] == submitted


def test_the_monitor_and_the_cli_never_show_what_a_rerun_needs(rapp: flask.Flask) -> None:
    rapp.register_blueprint(threadctx.monitor(), url_prefix="/tasks")
    marker = "only-in-the-arguments"
    original = submit_in_request(rapp, marker)
    seen(original)
    with rapp.app_context():
        again = threadctx.rerun(original.task.id)
        seen(again)
        flush(rapp)
    client = rapp.test_client()
    listed = client.get("/tasks/api/tasks")
    one = client.get(f"/tasks/api/tasks/{again.task.id}")
    shown = rapp.test_cli_runner().invoke(args=["threadctx", "show", "--json", again.task.id])
    listed_text = rapp.test_cli_runner().invoke(args=["threadctx", "tasks", "--json"])
    for text in (listed.text, one.text, shown.output, listed_text.output):
        assert marker not in text and "t-1" not in text and '"rerun"' not in text
    by_id = {task["id"]: task for task in listed.json["tasks"]}  # type: ignore[index]
    assert by_id[again.task.id]["rerun_of"] == original.task.id
    assert by_id[original.task.id]["rerun_of"] is None
    assert one.json["rerun_of"] == original.task.id  # type: ignore[index]
    assert json.loads(shown.output)["rerun_of"] == original.task.id


def test_without_kombu_tasks_are_rerun_with_the_standard_librarys_json(tmp_path: Path) -> None:
    """A threads-only app, without Celery's kombu, keeps and re-runs tasks all the same; what
    kombu tagged (a date), kept by a process that has it, is refused there, saying why."""
    url = f"sqlite:///{tmp_path}/tasks.db"
    tagged = rerun_app.create_app(url)
    with tagged.app_context():
        dated = echo.submit(datetime.date(2026, 12, 6))
        dated.result(timeout=30)
        flush(tagged)
    app_state(tagged).default.shutdown()
    script = (
        "import sys\n"
        "sys.modules['kombu'] = None  # as if the 'celery' extra were not installed\n"
        "import rerun_app\n"
        "app = rerun_app.create_app(sys.argv[1])\n"
        "with app.app_context():\n"
        "    future = rerun_app.echo.submit(1, 'é', {'n': [2.5, None]})\n"
        "    print(future.result(30)['args'])\n"
        "    again = rerun_app.threadctx.rerun(future.task.id)\n"
        "    print(again.result(30)['args'], again.task.rerun_of == future.task.id)\n"
        "    try:\n"
        "        rerun_app.threadctx.rerun(sys.argv[2])\n"
        "    except ValueError as error:\n"
        "        print(error)\n"
        "    print(rerun_app.threadctx.stats()['submitted'])\n"
    )
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])
    )
    done = subprocess.run(
        [sys.executable, "-c", script, url, dated.task.id],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert done.stdout.splitlines() == [
        "[1, 'é', {'n': [2.5, None]}]",
        "[1, 'é', {'n': [2.5, None]}] True",
        f"Task {dated.task.id} cannot be re-run here; nothing was submitted. This JSON holds a"
        " 'date' as kombu writes one, and kombu is not installed here to read it: 'pip install"
        " Flask-ThreadCtx[celery]'.",
        "3",  # the store's count, of both processes: the dated task, the task, its re-run
    ]


def test_a_chunked_body_is_kept_and_read_by_the_rerun(rapp: flask.Flask) -> None:
    """A body that came chunked, as a proxy or 'curl -T -' sends one, crosses whole, without
    its 'Transfer-Encoding', beside which the rebuilt request read it as empty."""
    body = b'{"order": 42}'
    with rapp.test_request_context(
        "/orders",
        method="POST",
        input_stream=io.BytesIO(body),
        headers={"Transfer-Encoding": "chunked", "Content-Type": "application/json"},
        environ_overrides={"wsgi.input_terminated": True},
    ):
        original = echo.submit()
    assert seen(original)["request"]["data"] == body.decode()
    with rapp.app_context():
        again = seen(threadctx.rerun(original.task.id))["request"]
    assert again["data"] == body.decode()
    assert [tuple(pair) for pair in again["headers"]] == [
        ("Content-Length", str(len(body))),
        ("Content-Type", "application/json"),
        ("Host", "localhost"),
    ]
