"""The three contenders of the Celery benchmark, importable by its worker processes.

Each has its own Redis database on the same server (``BENCH_REDIS``) and its own worker.
"""

from __future__ import annotations

import os
import threading
import typing as t

import celery
import redis
from flask import current_app
from flask import Flask
from flask import request
from flask_threadctx import report_progress
from flask_threadctx import ThreadContext

REDIS = os.environ.get("BENCH_REDIS", "redis://127.0.0.1:6379")


def celery_config(db: int) -> dict[str, t.Any]:
    url = f"{REDIS}/{db}"
    return {"broker_url": url, "result_backend": url, "broker_connection_retry_on_startup": True}


# Bare Celery: a trivial task, no Flask at all.
bare = celery.Celery("bare", set_as_current=False)
bare.conf.update(celery_config(1))


@bare.task(name="bench.nothing")  # type: ignore[untyped-decorator]
def nothing() -> None:
    return None


# Flask's documented pattern ("Background Tasks with Celery"): a Task class that pushes an app
# context around every run, and the view calls ``.delay()``. The docs register tasks with
# ``@shared_task``; ``@pattern.task`` is the same here and keeps the three apps apart.
def celery_init_app(app: Flask) -> celery.Celery:
    class FlaskTask(celery.Task):  # type: ignore[misc]
        def __call__(self, *args: object, **kwargs: object) -> object:
            with app.app_context():
                return self.run(*args, **kwargs)

    celery_app = celery.Celery(app.name, task_cls=FlaskTask, set_as_current=False)
    celery_app.config_from_object(app.config["CELERY"])
    app.extensions["celery"] = celery_app
    return celery_app


pattern_app = Flask("pattern")
pattern_app.config["CELERY"] = celery_config(2)
pattern = celery_init_app(pattern_app)


@pattern.task(name="bench.app_name")  # type: ignore[untyped-decorator]
def app_name() -> str:
    return current_app.name


# Flask-ThreadCtx on its Celery backend: the view calls ``threadctx.submit`` and the task reads
# the request, rebuilt on the worker.
threadctx = ThreadContext()


def create_app() -> Flask:
    app = Flask("threadctx")
    app.config["THREADCTX_BACKEND"] = "celery"
    app.config["THREADCTX_CELERY"] = celery_config(3)
    threadctx.init_app(app)
    return app


def read_path() -> str:
    return request.path


def reports_until_stopped() -> None:
    """For the stop benchmark (``control_bench.py``): say it started (on ``bench-started``),
    then report progress every 10 ms until asked to stop."""
    redis.Redis.from_url(f"{REDIS}/3").rpush("bench-started", 1)
    step = threading.Event()
    n = 0
    while True:
        n += 1
        report_progress(n)
        step.wait(0.01)
