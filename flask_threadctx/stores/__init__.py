"""The task stores, behind :class:`~flask_threadctx.stores.base.TaskStore`, and the registry
that opens one from its URL.

A store is a module of this package with a function ``open_url(url, app, settings)``;
:data:`SCHEMES` names the module for each URL scheme, and is the only place that lists them, so
that a new store needs no change outside its own module and its line here. A store's module is
imported only when a URL names it: the Redis one imports redis-py.

Besides the stores: :mod:`.feed` writes the app's tasks into one, from the task signals, and
:mod:`.local` reads this process's tasks as one when there is none.
"""

from __future__ import annotations

import importlib
import typing as t

from ..app_state import app_state
from .local import LocalTasks

if t.TYPE_CHECKING:
    import flask

    from ..config import Settings
    from .base import TaskReader
    from .base import TaskStore

SCHEMES: dict[str, str] = {
    "sqlite:///": "sqlite",
    "redis://": "redis",
    "rediss://": "redis",
    "unix://": "redis",
}
"""The registry of stores: a URL's scheme, and the module of this package that opens it."""


def flush(app: flask.Flask) -> None:
    """Wait until what this process knows of the app's tasks is in its store, so that what is
    read next includes it: the recorder's writes, and the Celery backend's records of its
    submits."""
    state = app_state(app, "flush")
    if state.recorder is not None:
        state.recorder.flush()
    celery = state.celery
    if celery is not None:
        celery.flush_records()


def reader_of(app: flask.Flask) -> TaskReader:
    """What the monitor shows of ``app``'s tasks: its store's, or this process's."""
    store = store_of(app)
    return LocalTasks(app) if store is None else store


def store_of(app: flask.Flask) -> TaskStore | None:
    """The store that ``app`` records its tasks in: ``THREADCTX_TASK_STORE``'s, else the Celery
    backend's records, if the app has Celery; ``None`` if neither."""
    state = app_state(app, "store_of")
    if state.recorder is not None:
        return state.recorder.store
    celery = state.celery
    return None if celery is None else celery.records


def open_store(url: str, app: flask.Flask, settings: Settings) -> TaskStore:
    """The store at ``url``, which ``read_settings`` checked: opened now, so that a store
    that cannot work is refused by ``init_app``, not found out by the writer later.

    :raise ValueError: the store cannot be opened, or the URL is not one it reads.
    """
    module = next(name for scheme, name in SCHEMES.items() if url.startswith(scheme))
    opener: t.Callable[[str, flask.Flask, Settings], TaskStore]
    opener = importlib.import_module(f"{__name__}.{module}").open_url
    return opener(url, app, settings)
