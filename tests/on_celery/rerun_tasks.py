"""The app and tasks of the re-run tests on Celery and with the Redis store: importable by name
in the test process and in the worker processes that ``flask --app rerun_tasks threadctx
worker`` starts."""

from __future__ import annotations

import json
import os
import typing as t

import flask
from flask import request
from flask_threadctx import current_task
from flask_threadctx import ThreadContext

threadctx = ThreadContext()


def create_app(config: dict[str, t.Any] | None = None) -> flask.Flask:
    """Celery with its records as the task store, configured from ``THREADCTX_TEST_REDIS``."""
    app = flask.Flask("rerun_tasks")
    url = os.environ.get("THREADCTX_TEST_REDIS", "redis://127.0.0.1:1/0")
    app.config.update(
        SECRET_KEY="test",
        THREADCTX_BACKEND="celery",
        THREADCTX_CELERY={"broker_url": url, "result_backend": url},
        THREADCTX_TASK_STORE="celery",
    )
    app.config.update(json.loads(os.environ.get("THREADCTX_TEST_CONFIG", "{}")))
    app.config.update(config or {})
    threadctx.init_app(app)
    return app


@threadctx.task(rerunnable=True, max_retries=1, retry_for=(LookupError,))
def echo(*args: t.Any, **kwargs: t.Any) -> dict[str, t.Any]:
    """The arguments and the request it saw, as plain data."""
    seen: dict[str, t.Any] = {"args": list(args), "kwargs": kwargs, "request": None}
    if flask.has_request_context():
        seen["request"] = {
            "method": request.method,
            "path": request.path,
            "url": request.url,
            "args": request.args.to_dict(flat=False),
            "headers": sorted(request.headers.items()),
            "json": request.get_json(silent=True),
        }
    info = current_task()
    assert info is not None
    seen["backend"] = info.backend
    seen["pid"] = os.getpid()
    return seen
