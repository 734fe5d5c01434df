"""Another process of the deployment, for ``test_control_both.py``: a real one, which calls
``cancel_task``, ``get_task`` and ``rerun`` with the apps of :mod:`both_tasks` for a test, told
through Redis as the tasks tell the test. The thread engine's stops and re-runs from another
process go through the task store, and only a real other process shows that they do.
"""

from __future__ import annotations

import builtins
import collections.abc as cabc
import concurrent.futures
import json
import os
import subprocess
import sys
import typing as t
import uuid

import both_tasks
import flask
import pytest
import redis
from both_engines import end_app
from both_engines import EngineName
from both_engines import WAIT
from harness import HERE
from redis_server import RedisServer


class Elsewhere:
    """Another process of the deployment, real: ``python -c`` running :func:`serve_elsewhere`,
    with an app of each engine (made as :attr:`Engine.app` is: same name, engine and store),
    which calls ``cancel_task``, ``get_task`` and ``rerun`` there for the test. Started once for
    the module (:func:`elsewhere_fixture`); told through Redis, as the tasks tell the test."""

    def __init__(self, client: redis.Redis, inbox: str, pid: int) -> None:
        self.client = client
        self.inbox = inbox
        self.pid = pid
        """The process's id."""

    def ask(self, engine: EngineName, op: str, **fields: t.Any) -> dict[str, t.Any]:
        """Have the process do ``op`` with the app of ``engine``; its answer (at most
        :data:`WAIT` seconds on)."""
        reply = f"{self.inbox}:reply:{uuid.uuid4().hex}"
        command = {"op": op, "engine": engine, "reply": reply, **fields}
        self.client.rpush(self.inbox, json.dumps(command))
        popped = self.client.blpop([reply], timeout=WAIT)
        assert popped is not None, f"no answer to {command!r} within {WAIT} s"
        answer: dict[str, t.Any] = json.loads(popped[1])
        return answer

    def cancel_task(self, engine: EngineName, task_id: str) -> bool:
        """``cancel_task(task_id)`` there: its answer, or what it raised, raised here."""
        answer = self.ask(engine, "cancel", task_id=task_id)
        _raise(answer)
        return t.cast(bool, answer["answer"])

    def state(self, engine: EngineName, task_id: str) -> str | None:
        """The state of ``get_task(task_id)`` there once it is done, at most :data:`WAIT`
        seconds on (``None``: it has no such task)."""
        answer = self.ask(engine, "state", task_id=task_id)
        _raise(answer)
        return t.cast("str | None", answer["state"])

    def rerun(
        self, engine: EngineName, task_id: str, without: cabc.Sequence[str] = ()
    ) -> dict[str, t.Any]:
        """``rerun(task_id)`` there, with the names ``without`` gone from :mod:`both_tasks` (as
        a deploy that removed them), in an app of its own made for it (a CLI command's), shut
        down once the re-run ended: the new task's ``id``, ``rerun_of``, ``backend``,
        ``state`` and ``result``, or the ``error`` and ``message`` that ``rerun`` raised;
        either way ``own``, the counts of that app's engine (``stats(engine)``)."""
        return self.ask(engine, "rerun", task_id=task_id, without=list(without))


def _raise(answer: dict[str, t.Any]) -> None:
    """Raise the error that an answer of :func:`serve_elsewhere` says, of the same builtin
    class, with the same message."""
    if "error" not in answer:
        return
    kind = getattr(builtins, answer["error"], None)
    if not (isinstance(kind, type) and issubclass(kind, Exception)):
        raise AssertionError(f"{answer['error']}: {answer['message']}")
    raise kind(answer["message"])


def serve_elsewhere(redis_url: str, inbox: str) -> None:
    """The loop of :class:`Elsewhere`'s process: do each command pushed to ``inbox`` and push
    its answer, until told to exit or its parent (the test process) is gone."""
    client = redis.Redis.from_url(redis_url)
    parent = os.getppid()
    apps: dict[EngineName, flask.Flask] = {}
    client.rpush(f"{inbox}:ready", os.getpid())
    try:
        while os.getppid() == parent:
            popped = client.blpop([inbox], timeout=1)
            if popped is None:
                continue
            command = json.loads(popped[1])
            if command["op"] == "exit":
                break
            try:
                answer = _do(command, apps, redis_url)
            except Exception as error:
                answer = {"error": type(error).__name__, "message": str(error)}
            client.rpush(command["reply"], json.dumps(answer))
    finally:
        for name, app in apps.items():
            end_app(app, name)
        client.close()


def _do(
    command: dict[str, t.Any], apps: dict[EngineName, flask.Flask], redis_url: str
) -> dict[str, t.Any]:
    """Do one command in :func:`serve_elsewhere`'s process."""
    name: EngineName = command["engine"]
    ext = both_tasks.threadctx
    if command["op"] == "rerun":
        app = both_tasks.create_app(name, redis_url)
        try:
            with app.app_context():
                answer = _rerun(command["task_id"], command["without"])
                own = ext.stats(name)
            own.pop("max_workers", None)
            return {**answer, "own": own}
        finally:
            end_app(app, name)
    if name not in apps:
        apps[name] = both_tasks.create_app(name, redis_url)
    with apps[name].app_context():
        if command["op"] == "cancel":
            return {"answer": ext.cancel_task(command["task_id"])}
        found = ext.get_task(command["task_id"])
        if found is None:
            return {"state": None}
        # Once this process heard of the end too: its listener may be a little behind.
        concurrent.futures.wait([found], timeout=WAIT)
        return {"state": found.task.state}


def _rerun(task_id: str, without: list[str]) -> dict[str, t.Any]:
    removed = {name: getattr(both_tasks, name) for name in without}
    for name in removed:
        delattr(both_tasks, name)
    try:
        future = both_tasks.threadctx.rerun(task_id)
    except Exception as error:
        return {"error": type(error).__name__, "message": str(error)}
    finally:
        for name, value in removed.items():
            setattr(both_tasks, name, value)
    result = future.result(WAIT)
    info = future.task
    return {
        "id": info.id,
        "rerun_of": info.rerun_of,
        "backend": info.backend,
        "state": info.state,
        "result": result,
    }


SERVE = "import sys, both_elsewhere; both_elsewhere.serve_elsewhere(*sys.argv[1:])"


@pytest.fixture(scope="module", name="elsewhere")
def elsewhere_fixture(
    redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> cabc.Iterator[Elsewhere]:
    """Another process of the deployment (:class:`Elsewhere`), for the whole module."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
    inbox = f"both-elsewhere:{uuid.uuid4().hex[:8]}"
    path = tmp_path_factory.mktemp("elsewhere") / "process.log"
    client = redis.Redis.from_url(redis_server.url)
    with path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-c", SERVE, redis_server.url, inbox],
            env=env,
            cwd=HERE,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            popped = client.blpop([f"{inbox}:ready"], timeout=60)
            assert popped is not None, f"the other process did not start:\n{path.read_text()}"
            yield Elsewhere(client, inbox, int(popped[1]))
        finally:
            client.rpush(inbox, json.dumps({"op": "exit"}))
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            client.close()
