"""What the extension keeps for each app: one :class:`AppState`, made by
:meth:`~flask_threadctx.ThreadContext.init_app` and kept in ``app.extensions["threadctx"]``, and
:func:`app_state`, the one way the package and its tests reach it.

Nothing is kept on the extension object itself, so one extension serves any number of apps (the
application factory pattern). This module imports nothing of the package at run time, so every
module can use it, the stores and the contexts included, without an import cycle.
"""

from __future__ import annotations

import typing as t

if t.TYPE_CHECKING:
    import flask

    from .backends.base import Backend
    from .backends.celery.backend import CeleryBackend
    from .backends.pool import Pool
    from .config import Settings
    from .extension import ThreadContext
    from .metrics import MetricsRecorder
    from .signals import Receivers
    from .stores.feed import Recorder

KEY = "threadctx"
"""The key of ``app.extensions`` that holds the app's :class:`AppState`."""


class AppState:
    """The extension's state for one app: its settings, its engines and what feeds on its tasks.

    ``ThreadContext.submit`` reads :attr:`default` for every task, so this is a slotted object
    and that is a plain attribute: one load more than a backend kept directly in
    ``app.extensions``.
    """

    __slots__ = ("backends", "default", "extension", "metrics", "receivers", "recorder", "settings")

    def __init__(
        self,
        extension: ThreadContext,
        settings: Settings,
        backends: dict[str, Backend],
    ) -> None:
        self.extension = extension
        """The :class:`~flask_threadctx.ThreadContext` registered on the app."""
        self.settings = settings
        """The ``THREADCTX_*`` config, as ``init_app`` read it. (The pytest plugin's
        ``threadctx_eager`` marker switches only the default backend's own copy.)"""
        self.backends = backends
        """Each engine of the app, by name: always ``"threads"``, and ``"celery"`` if it has
        Celery. :meth:`backend` gives one with its own type."""
        self.default: Backend = backends[settings.backend]
        """The engine of ``THREADCTX_BACKEND``, which ``submit`` uses."""
        self.recorder: Recorder | None = None
        """What writes the app's tasks to ``THREADCTX_TASK_STORE``, or ``None`` without one."""
        self.metrics: MetricsRecorder | None = None
        """The metrics of ``THREADCTX_METRICS``, or ``None`` when they are off."""
        self.receivers: dict[str, tuple[int, Receivers]] = {}
        """The receivers of each task signal for the app, cached by :mod:`.signals`."""

    @t.overload
    def backend(self, name: t.Literal["threads"]) -> Pool: ...

    @t.overload
    def backend(self, name: t.Literal["celery"]) -> CeleryBackend: ...

    @t.overload
    def backend(self, name: str) -> Backend: ...

    def backend(self, name: str) -> Backend:
        """The engine ``name`` of the app, typed as what it is: ``backend("threads")`` is the
        :class:`~flask_threadctx.backends.pool.Pool`, ``backend("celery")`` the
        :class:`~flask_threadctx.backends.celery.backend.CeleryBackend`.

        :raise RuntimeError: the app has no such engine.
        """
        backend = self.backends.get(name)
        if backend is None:
            raise RuntimeError(
                f"The app has no {name!r} backend: set 'THREADCTX_CELERY' (or"
                " 'THREADCTX_CELERY_APP') in its config."
            )
        return backend

    @property
    def celery(self) -> CeleryBackend | None:
        """The Celery engine, or ``None`` if the app has no Celery."""
        return self.backend("celery") if "celery" in self.backends else None


def app_state(app: flask.Flask, api: str = "app_state") -> AppState:
    """The extension's state for ``app``.

    :param api: what needs it, named in the error.
    :raise RuntimeError: the extension is not registered on ``app``.
    """
    try:
        state: AppState = app.extensions[KEY]
    except KeyError:
        raise RuntimeError(
            f"'{api}' was called for the app {app.name!r}, which has no 'ThreadContext'."
            " Call 'threadctx.init_app(app)' in its factory."
        ) from None
    return state
