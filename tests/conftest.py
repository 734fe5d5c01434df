from __future__ import annotations

import collections.abc as cabc
import json
import sys
import threading
import typing as t
from pathlib import Path

import flask
import hypothesis
import pytest
from flask import globals as flask_globals
from flask_threadctx import ThreadContext
from flask_threadctx.app_state import app_state
from flask_threadctx.backends.workers import Worker as _Worker

pytest_plugins = ["pytester"]

# No timing thresholds in tests: hypothesis' deadline fails an example that a loaded CI
# machine happened to run slowly.
hypothesis.settings.register_profile("threadctx", deadline=None)
hypothesis.settings.load_profile("threadctx")

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
        app_state(app).default.shutdown(wait=True)


@pytest.fixture
def frequent_switches() -> cabc.Iterator[None]:
    """Switch threads every microsecond instead of every 5 ms, so that threads interleave within
    the few lines where they race."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(interval)


@pytest.fixture
def ext() -> ThreadContext:
    return ThreadContext()


@pytest.fixture
def app(make_app: AppFactory, ext: ThreadContext) -> flask.Flask:
    """The app pytest-flask pushes a test request context for."""
    return make_app(ext)


INTEGRATION = Path(__file__).parent / "integration"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the tests that start real servers and processes, so that ``pytest -m "not
    integration"`` runs the fast ones alone."""
    for item in items:
        if INTEGRATION in item.path.parents:
            item.add_marker(pytest.mark.integration)


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


# -- figures the integration suite measures ---------------------------------------------------

FIGURES: dict[str, dict[str, t.Any]] = {}


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> dict[str, t.Any]:
    """What a test measured: printed at the end of the run, and written to
    ``integration-figures.json`` in pytest's base temporary directory."""
    return FIGURES.setdefault(request.node.name, {})


@pytest.fixture(scope="session", autouse=True)
def _write_figures(tmp_path_factory: pytest.TempPathFactory) -> cabc.Iterator[None]:
    yield
    if FIGURES:
        path = Path(tmp_path_factory.getbasetemp()) / "integration-figures.json"
        path.write_text(json.dumps(FIGURES, indent=2))


def pytest_terminal_summary(terminalreporter: t.Any) -> None:
    if FIGURES:
        terminalreporter.section("integration figures")
        for test, values in FIGURES.items():
            shown = ", ".join(f"{key}={value}" for key, value in values.items())
            terminalreporter.write_line(f"{test}: {shown}")


@pytest.fixture
def two(tmp_path: Path) -> cabc.Iterator[tuple[flask.Flask, flask.Flask]]:
    """Two processes of the app "shop", sharing a SQLite store: see tests/shop.py."""
    from shop import make  # here, not above: tests of the plugin copy this file elsewhere

    apps = make(tmp_path), make(tmp_path)
    yield apps
    for app in apps:
        app_state(app).default.shutdown()
