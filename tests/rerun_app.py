"""Tasks for the re-run tests, at the top level of a module so that another process finds them
by their import path, and an app factory that such a process calls too."""

from __future__ import annotations

import typing as t

import flask
from flask import request
from flask_threadctx import current_task
from flask_threadctx import ThreadContext

threadctx = ThreadContext()

APP_NAME = "rerun_app"


def create_app(store: str | None, **config: t.Any) -> flask.Flask:
    app = flask.Flask(APP_NAME)
    app.config.update(
        TESTING=True, SECRET_KEY="test", THREADCTX_MAX_WORKERS=4, THREADCTX_TASK_STORE=store
    )
    app.config.update(config)
    threadctx.init_app(app)
    return app


def what_it_saw(*args: t.Any, **kwargs: t.Any) -> dict[str, t.Any]:
    """The arguments and the request a task saw, as plain data."""
    seen: dict[str, t.Any] = {"args": list(args), "kwargs": kwargs, "request": None}
    if flask.has_request_context():
        seen["request"] = {
            "method": request.method,
            "path": request.path,
            "args": request.args.to_dict(flat=False),
            "headers": sorted(request.headers.items()),
            "data": request.get_data(as_text=True),
            "url": request.url,
        }
    assert current_task() is not None
    return seen


@threadctx.task(rerunnable=True)
def echo(*args: t.Any, **kwargs: t.Any) -> dict[str, t.Any]:
    return what_it_saw(*args, **kwargs)


@threadctx.task
def plain(*args: t.Any, **kwargs: t.Any) -> dict[str, t.Any]:
    return what_it_saw(*args, **kwargs)


class Flaky(Exception):
    """Raised by :func:`flaky` on its first attempt of each run."""


attempts: dict[str, int] = {}


@threadctx.task(rerunnable=True, retry_for=(Flaky,), max_retries=2, retry_delay=0)
def flaky(key: str) -> int:
    attempts[key] = attempts.get(key, 0) + 1
    if attempts[key] % 2:
        raise Flaky(key)
    return attempts[key]


@threadctx.task(rerunnable=True)
def parent(n: int) -> list[str]:
    """Submits ``n`` children at once, plain and rerunnable in turn, while its own submit may
    not have told the store of it yet."""
    return [(echo if i % 2 else plain).submit(i).task.id for i in range(n)]
