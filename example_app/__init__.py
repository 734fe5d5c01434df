"""A small shop that records orders in a task, the way a real app hands work to threads.

Run it with ``flask --app example_app init-db`` and ``flask --app example_app run``.
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
    )
    if test_config is None:
        app.config.from_prefixed_env()
    else:
        app.config.from_mapping(test_config)
    os.makedirs(app.instance_path, exist_ok=True)

    db.init_app(app)
    threadctx.init_app(app)
    app.register_blueprint(views.bp)
    return app
