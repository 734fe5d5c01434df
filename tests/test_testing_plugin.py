"""The pytest plugin, run on test files of a user's app with pytest's own ``pytester``."""

from __future__ import annotations

import textwrap

import pytest

# Each test runs pytest in a process of its own (about 2 s): outside the fast loop.
pytestmark = pytest.mark.integration

CONFTEST = """
import flask
import pytest
from flask_threadctx import ThreadContext

threadctx = ThreadContext()

@pytest.fixture
def app():
    app = flask.Flask("users_app")
    app.config.update(THREADCTX_MAX_WORKERS=2, THREADCTX_KEEP_FINISHED={keep_finished})
    threadctx.init_app(app)
    yield app
    with app.app_context():
        threadctx.shutdown(wait=True)
"""


def run(pytester: pytest.Pytester, tests: str, keep_finished: int = 1000) -> pytest.RunResult:
    pytester.makeconftest(CONFTEST.replace("{keep_finished}", str(keep_finished)))
    pytester.makepyfile(test_users_app=textwrap.dedent(tests))
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", "-W", "error")


def test_fixtures_and_the_eager_marker(pytester: pytest.Pytester) -> None:
    result = run(
        pytester,
        """
        import threading
        import pytest
        from flask import request
        from conftest import threadctx as registered

        def test_threadctx_is_the_apps_extension(threadctx):
            assert threadctx is registered
            assert threadctx.submit(lambda: request.path).result(timeout=10) == "/"

        def test_wait_for_tasks_waits_for_children(threadctx, wait_for_tasks):
            done = []
            def parent():
                threadctx.submit(done.append, "child")
                done.append("parent")
            threadctx.submit(parent)
            wait_for_tasks(10)
            assert sorted(done) == ["child", "parent"]
            assert threadctx.stats()["succeeded"] == 2

        @pytest.mark.threadctx_eager
        def test_eager(threadctx):
            future = threadctx.submit(threading.current_thread)
            assert future.done() and future.result() is threading.current_thread()
            failed = threadctx.submit(int, "x")  # the error lands in the future
            assert isinstance(failed.exception(), ValueError)

        def test_not_eager_without_the_marker(threadctx):
            worker = threadctx.submit(threading.current_thread).result(timeout=10)
            assert worker is not threading.current_thread()
        """,
    )
    result.assert_outcomes(passed=4)


def test_wait_for_tasks_names_what_is_still_running(pytester: pytest.Pytester) -> None:
    result = run(
        pytester,
        """
        import threading

        def test_slow(threadctx, wait_for_tasks):
            gate = threading.Event()
            def stuck():
                gate.wait(10)
            try:
                threadctx.submit(stuck)
                wait_for_tasks(0.1)
            finally:
                gate.set()
        """,
    )
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*1 task(s) of 'users_app' were still pending or running after 0.1s:"
            " task *(*stuck) running.*"
        ]
    )


UNSEEN_FAILURE = """
import pytest

def fail():
    raise ValueError("bad order")

def test_unseen(threadctx, wait_for_tasks):
    threadctx.submit(fail)
    wait_for_tasks(10)
"""


def test_a_task_that_raised_unseen_fails_the_test(pytester: pytest.Pytester) -> None:
    result = run(
        pytester,
        UNSEEN_FAILURE
        + textwrap.dedent(
            """
        def test_seen_with_exception(threadctx):
            assert str(threadctx.submit(fail).exception(timeout=10)) == "bad order"

        def test_seen_with_raises(threadctx):
            with pytest.raises(ValueError):
                threadctx.submit(fail).result(timeout=10)

        def test_seen_through_get_task(threadctx):
            task_id = threadctx.submit(fail).task.id
            assert isinstance(threadctx.get_task(task_id).exception(timeout=10), ValueError)
        """
        ),
    )
    result.assert_outcomes(passed=3, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*1 task(s) raised, and the test never looked at the exception:",
            "*task *(fail): ValueError('bad order')",
        ]
    )


def test_an_unseen_failure_is_caught_even_when_get_task_cannot_find_it(
    pytester: pytest.Pytester,
) -> None:
    result = run(pytester, UNSEEN_FAILURE, keep_finished=0)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*task *(fail): ValueError('bad order')"])
