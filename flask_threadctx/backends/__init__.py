"""The engines that run tasks, behind :class:`~flask_threadctx.backends.base.Backend`, and the
registry of their names.

- :mod:`.base`: the :class:`~.base.Backend` protocol, the whole of what the extension and the
  stores ask of an engine;
- :mod:`.runner`: running one claimed task in its contexts and booking its end, the hot path that
  both engines share (a Celery worker runs what it receives on the app's pool);
- :mod:`.pool`: the thread pool, ``"threads"``, which every app has;
- :mod:`.celery`: Celery workers, ``"celery"``.

:data:`NAMES` is the only list of engines: ``THREADCTX_BACKEND`` and ``task(backend=...)`` are
checked against it, and :func:`load` imports an engine only when an app uses it.
"""

from __future__ import annotations

import importlib
import typing as t

if t.TYPE_CHECKING:
    import flask

    from ..config import Settings
    from ..extension import ThreadContext
    from .base import Backend
    from .pool import Pool

NAMES: dict[str, tuple[str, str]] = {
    "threads": ("flask_threadctx.backends.pool:Pool", ""),
    "celery": ("flask_threadctx.backends.celery.backend:CeleryBackend", "celery"),
}
"""The registry of engines: each name, the class that runs it (``module:name``), and the extra
that installs what it needs."""


class Engine(t.Protocol):
    """How an engine other than the pool is made: for one app, with the app's pool, which runs
    the tasks that reach this process (on a worker, eagerly, a child run by its parent)."""

    def __call__(
        self, app: flask.Flask, settings: Settings, extension: ThreadContext, runner: Pool
    ) -> Backend: ...


def load(name: str) -> Engine:
    """The class of the engine ``name``, imported now.

    :raise RuntimeError: what it needs is not installed; the message names the extra.
    """
    path, extra = NAMES[name]
    module, _, attribute = path.partition(":")
    try:
        engine: Engine = getattr(importlib.import_module(module), attribute)
    except ImportError as error:
        raise RuntimeError(
            f"The {name.capitalize()} backend needs {name.capitalize()} ({error}). Install it"
            f" with 'pip install Flask-ThreadCtx[{extra}]'."
        ) from None
    return engine
