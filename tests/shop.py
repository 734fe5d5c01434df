"""Two apps named "shop" stand for two processes of one deployment, sharing a SQLite task store in
one instance folder: for the store's tests and the CLI's (the fixture ``two`` is in conftest)."""

from __future__ import annotations

import typing as t
from pathlib import Path

import flask
from flask_threadctx import ThreadContext


def make(folder: Path, **config: t.Any) -> flask.Flask:
    """An app named "shop" with its instance folder in ``folder``: two of them stand for two
    processes of one deployment, each with its own pool."""
    app = flask.Flask("shop", instance_path=str(folder))
    app.config.update(TESTING=True, THREADCTX_TASK_STORE="sqlite:///tasks.db")
    app.config.update(config)
    ThreadContext(app)
    return app
