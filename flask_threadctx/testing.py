"""A pytest plugin for the tests of apps that use Flask-ThreadCtx.

Installed with the package and loaded by pytest on its own (the ``pytest11`` entry point). It
works with the ``app`` fixture of pytest-flask, or any fixture named ``app`` that returns the app
under test:

``threadctx``
    The :class:`~flask_threadctx.ThreadContext` of the app under test. A test that uses it fails
    if one of the app's tasks raised and the test never looked at the exception (with
    ``result()`` or ``exception()`` on its future, or on ``get_task(id)``).

``wait_for_tasks(timeout=10.0)``
    Return once the app's pool is idle: every task, and every task they submitted, done. Fails
    the test naming the tasks still pending or running after ``timeout`` seconds.

``@pytest.mark.threadctx_eager``
    Run the test's tasks eagerly, as :data:`~flask_threadctx.config.THREADCTX_EAGER` does.
"""

from __future__ import annotations

import collections.abc as cabc
import concurrent.futures
import dataclasses
import time
import typing as t

import pytest

from .app_state import app_state
from .signals import task_failed

if t.TYPE_CHECKING:
    import flask

    from .app_state import AppState
    from .backends.base import Backend
    from .extension import ThreadContext
    from .future import TaskFuture
    from .model import TaskInfo


class WaitForTasks(t.Protocol):
    """The type of the ``wait_for_tasks`` fixture, for annotating tests."""

    def __call__(self, timeout: float = 10.0) -> None: ...


_failures_key = pytest.StashKey["_Failures"]()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "threadctx_eager: run the tasks of the app under test eagerly, in the submitting"
        " thread (THREADCTX_EAGER).",
    )


def _state(app: flask.Flask) -> AppState:
    try:
        return app_state(app)
    except RuntimeError:
        raise pytest.UsageError(
            f"The app {app.name!r} of the 'app' fixture has no 'ThreadContext'. Call"
            " 'threadctx.init_app(app)' in the factory that the fixture uses."
        ) from None


@pytest.fixture
def threadctx(app: flask.Flask, request: pytest.FixtureRequest) -> cabc.Iterator[ThreadContext]:
    """The :class:`~flask_threadctx.ThreadContext` of the app under test. The test fails if
    one of the app's tasks raised and the test never retrieved the exception."""
    state = _state(app)
    failures = _Failures(state.default)
    with task_failed.connected_to(failures.record, app):
        request.node.stash[_failures_key] = failures
        yield state.extension


@pytest.fixture
def wait_for_tasks(app: flask.Flask) -> WaitForTasks:
    """A function that returns once the pool of the app under test is idle, or fails the test
    naming the tasks still pending or running when ``timeout`` seconds have passed."""
    pool = _state(app).default

    def wait(timeout: float = 10.0) -> None:
        busy = pool.wait_for_live(time.monotonic() + timeout)
        if busy:
            names = ", ".join(f"{future.task} {future.task.state}" for future in busy)
            pytest.fail(
                f"{len(busy)} task(s) of {app.name!r} were still pending or running after"
                f" {timeout}s: {names}.",
                pytrace=False,
            )

    return wait


@pytest.fixture(autouse=True)
def _threadctx_eager(request: pytest.FixtureRequest) -> cabc.Iterator[None]:
    if request.node.get_closest_marker("threadctx_eager") is None:
        yield
        return
    if "app" not in request.fixturenames:
        raise pytest.UsageError(
            "'@pytest.mark.threadctx_eager' needs the test to use an 'app' fixture (the one of"
            " pytest-flask, or your own) that returns the app under test."
        )
    pool = _state(request.getfixturevalue("app")).default
    settings = pool.settings
    pool.settings = dataclasses.replace(settings, eager=True)
    yield
    pool.settings = settings


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> cabc.Iterator[None]:
    """After a test that used ``threadctx`` passed: fail it if a task raised unseen."""
    yield
    failures = item.stash.get(_failures_key, None)
    if failures is not None:
        failures.check()


class _Failures:
    """The tasks of one app that failed during one test."""

    def __init__(self, pool: Backend) -> None:
        self.pool = pool
        self.futures: list[TaskFuture[t.Any]] = []

    def record(self, sender: flask.Flask, task: TaskInfo, **kwargs: t.Any) -> None:
        # Looked up now, while the task is live: later it may have left the get_task window.
        future = self.pool.get(task.id)
        if future is not None:
            self.futures.append(future)

    def check(self) -> None:
        futures = self.futures
        # task_failed is sent just before the future is done; wait() does not count as looking.
        concurrent.futures.wait(futures, timeout=10)
        unseen = [f for f in futures if not getattr(f, "_retrieved", False)]
        if unseen:
            lines = "\n".join(f"  {f.task}: {f._exception!r}" for f in unseen)
            pytest.fail(
                f"{len(unseen)} task(s) raised, and the test never looked at the exception:\n"
                f"{lines}\nAssert on it with 'future.exception()' or"
                " 'pytest.raises(...): future.result()' (from 'threadctx.get_task(id)' for a"
                " task a view submitted), or fix the task.",
                pytrace=False,
            )
