"""The seam between the extension and the engines that run tasks.

:class:`~flask_threadctx.ThreadContext` talks to an engine only through :class:`Backend`, and a
:class:`~flask_threadctx.TaskFuture` only through the three methods of
:class:`~flask_threadctx.future.FutureOwner`. The thread pool
(:class:`~flask_threadctx.backends.pool.Pool`) and Celery
(:class:`~flask_threadctx.backends.celery.backend.CeleryBackend`) implement it, and say so on
their class line; another engine would too, without touching either.

The types say what crosses the seam, without ``Any``: a submit's ``fn`` and its arguments (checked
against each other where the user called ``submit``, through a :class:`~typing.ParamSpec`), the
engine's own ``options``, and the future of a task looked up by its id, a
``TaskFuture[object]``: its result is whatever its function returned, unknown to whoever looks it
up.
"""

from __future__ import annotations

import typing as t

from ..future import FutureOwner

if t.TYPE_CHECKING:
    import collections.abc as cabc

    import flask
    from flask.ctx import AppContext

    from ..config import Settings
    from ..future import TaskFuture

R = t.TypeVar("R")


class Backend(FutureOwner, t.Protocol):
    """An engine that runs the tasks of one app; the owner of their futures
    (:class:`~flask_threadctx.future.FutureOwner`) too."""

    name: t.ClassVar[str]
    """What ``THREADCTX_BACKEND`` and ``task(backend=...)`` call it."""

    settings: Settings

    def submit(
        self,
        app: flask.Flask,
        app_ctx: AppContext | None,
        fn: t.Callable[..., R],
        args: tuple[object, ...],
        kwargs: dict[str, object],
        options: cabc.Mapping[str, object] | None = None,
    ) -> TaskFuture[R]:
        """Start ``fn(*args, **kwargs)`` in the contexts of ``app_ctx`` (the active app
        context, if it is ``app``'s), with the engine's own ``options``; raise, and send
        ``task_rejected``, if it cannot.

        ``args`` and ``kwargs`` were checked against ``fn`` where the user called
        :meth:`~flask_threadctx.ThreadContext.submit` (its signature is a
        :class:`~typing.ParamSpec`'s); ``options`` are what ``task(backend=...)`` was given,
        as the engine checked them then (Celery's:
        ``backends.celery.messages.CeleryOptions``)."""

    def get(self, task_id: str) -> TaskFuture[object] | None:
        """The future of the task ``task_id``, if the engine knows it."""

    def stop(self, task_id: str) -> bool | None:
        """Stop the task ``task_id``: one not started never runs, a running one is asked to
        stop (see :func:`~flask_threadctx.check_cancelled`). ``True`` if it will not finish
        normally, ``False`` if it had finished; ``None`` if the engine does not know it."""

    def live_future(self, task_id: str) -> TaskFuture[object] | None:
        """The future of the task ``task_id`` if it is pending or running in this process,
        asking nothing of anyone else."""

    def known_futures(self) -> list[TaskFuture[object]]:
        """The futures of the tasks the engine knows in this process: the pending and running
        ones, then the last ``THREADCTX_KEEP_FINISHED`` finished ones."""

    def stats(self) -> dict[str, int]:
        """Counts of tasks by state; see :meth:`~flask_threadctx.ThreadContext.stats`."""

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Refuse new tasks from outside; see :meth:`~flask_threadctx.ThreadContext.shutdown`."""

    def wait_for_live(self, deadline: float | None) -> list[TaskFuture[object]]:
        """Wait until no task submitted here is pending or running, or until ``deadline`` (a
        :func:`time.monotonic` time); return those still pending or running."""
