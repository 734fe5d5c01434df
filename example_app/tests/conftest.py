from __future__ import annotations

import collections.abc as cabc
import typing as t

import flask
import pytest

from example_app import create_app
from example_app.db import init_db

if t.TYPE_CHECKING:
    from pathlib import Path


@pytest.fixture
def app(tmp_path: Path) -> cabc.Iterator[flask.Flask]:
    app = create_app({"TESTING": True, "DATABASE": str(tmp_path / "shop.sqlite")})
    with app.app_context():
        init_db()
    yield app
    app.extensions["threadctx"].shutdown(wait=True)
