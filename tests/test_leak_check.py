"""The suite's own guard: a test that leaves a context pushed or workers running fails."""

from __future__ import annotations

from pathlib import Path

import pytest

# Each test runs pytest in a process of its own (about 2 s): outside the fast loop.
pytestmark = pytest.mark.integration

CONFTEST = (Path(__file__).parent / "conftest.py").read_text()


@pytest.mark.parametrize(
    ("body", "complaint"),
    [
        ("app = flask.Flask('x')\n    app.app_context().push()", "left a context pushed"),
        ("app = flask.Flask('x')\n    app.test_request_context().push()", "left a context pushed"),
        (
            "app = flask.Flask('x')\n    ext = ThreadContext(app)\n    ext.submit(int).result()",
            "left worker threads running: ['threadctx-0'",
        ),
    ],
)
def test_leaks_fail_the_test(pytester: pytest.Pytester, body: str, complaint: str) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(
        f"""
import flask
from flask_threadctx import ThreadContext

def test_leaky():
    {body}
"""
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines([f"*{complaint}*"])


def test_clean_test_passes(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(
        """
import flask
from flask_threadctx import ThreadContext

def test_clean():
    app = flask.Flask('x')
    ext = ThreadContext(app)
    with app.app_context():
        ext.submit(int).result()
    ext.shutdown()
"""
    )
    pytester.runpytest_subprocess("-p", "no:cacheprovider").assert_outcomes(passed=1)
