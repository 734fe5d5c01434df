from __future__ import annotations

import collections.abc as cabc
import threading
import typing as t

import flask
import pytest
from flask import globals as flask_globals
from flask_threadctx import ThreadContext
from flask_threadctx.executor import _Worker

pytest_plugins = ["pytester"]

AppFactory = t.Callable[..., flask.Flask]


@pytest.fixture
def make_app() -> cabc.Iterator[AppFactory]:
    """Make apps with the extension registered; their pools are shut down after the test."""
    made: list[flask.Flask] = []

    def make(extension: ThreadContext | None = None, **config: t.Any) -> flask.Flask:
        app = flask.Flask(f"app{len(made)}")
        app.config.update(TESTING=True, SECRET_KEY="test", THREADCTX_MAX_WORKERS=4)
        app.config.update(config)
        (extension or ThreadContext()).init_app(app)
        made.append(app)
        return app

    yield make
    for app in made:
        app.extensions["threadctx"].shutdown(wait=True)


@pytest.fixture
def ext() -> ThreadContext:
    return ThreadContext()


@pytest.fixture
def app(make_app: AppFactory, ext: ThreadContext) -> flask.Flask:
    """The app pytest-flask pushes a test request context for."""
    return make_app(ext)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> cabc.Iterator[None]:
    """Fail a test that leaves a context pushed or worker threads running."""
    yield
    leaked_app = flask_globals._cv_app.get(None)
    cv_request = getattr(flask_globals, "_cv_request", None)  # gone in Flask 3.2
    leaked_request = None if cv_request is None else cv_request.get(None)
    workers = [thread.name for thread in threading.enumerate() if isinstance(thread, _Worker)]
    problems = []
    if leaked_app is not None or leaked_request is not None:
        problems.append(f"left a context pushed: {leaked_app or leaked_request!r}")
    if workers:
        problems.append(f"left worker threads running: {workers}")
    if problems:
        raise AssertionError(f"{item.nodeid} " + " and ".join(problems))
