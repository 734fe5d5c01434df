from __future__ import annotations

import collections.abc as cabc
import typing as t

import flask
import pytest

from example_app import create_app
from example_app import threadctx
from example_app.db import init_db

if t.TYPE_CHECKING:
    from pathlib import Path


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "app_config(**config): more config for the test's app")


@pytest.fixture
def app(tmp_path: Path, request: pytest.FixtureRequest) -> cabc.Iterator[flask.Flask]:
    marker = request.node.get_closest_marker("app_config")
    extra = {} if marker is None else marker.kwargs
    app = create_app({"TESTING": True, "DATABASE": str(tmp_path / "shop.sqlite"), **extra})
    with app.app_context():
        init_db()
    yield app
    with app.app_context():
        threadctx.shutdown(wait=True)
