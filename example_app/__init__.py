"""A small shop that records orders in a task, the way a real app hands work to threads, or
to Celery workers with one config key changed.

Run it with ``flask --app example_app init-db`` and ``flask --app example_app run``; the task
monitor is at ``/monitor/`` after signing in at ``/staff/login?token=...`` (``MONITOR_TOKEN``;
``FLASK_MONITOR_TOKEN`` from the environment). On Celery:
set ``FLASK_THREADCTX_BACKEND=celery`` (and ``FLASK_REDIS_URL`` if Redis is not on
``redis://127.0.0.1:6379/0``) for both ``flask --app example_app run`` and
``flask --app example_app threadctx worker``.
"""

from __future__ import annotations

import os
import typing as t

from flask import Flask

from . import db
from . import views
from .extensions import threadctx

__all__ = ["create_app", "threadctx"]


def create_app(test_config: dict[str, t.Any] | None = None) -> Flask:
    app = Flask(__name__, instance_relative_config=True)
    app.config.from_mapping(
        SECRET_KEY="dev",
        DATABASE=os.path.join(app.instance_path, "example_app.sqlite"),
        THREADCTX_MAX_WORKERS=4,
        THREADCTX_MAX_QUEUE=100,
        REDIS_URL="redis://127.0.0.1:6379/0",
        MONITOR_TOKEN=None,
        REPORT_STEP_SECONDS=0.5,
        OUT_OF_STOCK=["lamp"],
    )
    if test_config is None:
        app.config.from_prefixed_env()
    else:
        app.config.from_mapping(test_config)
    if app.config.get("THREADCTX_BACKEND") == "celery":
        # Only then: the thread backend needs neither Celery nor Redis installed.
        url = app.config["REDIS_URL"]
        app.config.setdefault("THREADCTX_CELERY", {"broker_url": url, "result_backend": url})
        # Every task of the deployment, for status, the monitor and 'flask threadctx tasks':
        # on Celery, in its result backend; on threads, in a SQLite file that the processes
        # of this machine share.
        app.config.setdefault("THREADCTX_TASK_STORE", "celery")
    else:
        app.config.setdefault("THREADCTX_TASK_STORE", "sqlite:///tasks.db")
    os.makedirs(app.instance_path, exist_ok=True)

    db.init_app(app)
    threadctx.init_app(app)
    app.register_blueprint(views.bp)
    monitor = threadctx.monitor(check_access=views.is_staff, check_action=views.staff_may)
    app.register_blueprint(monitor, url_prefix="/monitor")
    return app
