"""The Flask-facing extension object: registration, configuration, and the task API."""

from __future__ import annotations

import functools
import time
import typing as t

from .config import read_settings
from .context import active_app_context
from .context import capture
from .executor import Pool

if t.TYPE_CHECKING:
    import collections.abc as cabc

    import flask

    from .future import TaskFuture

P = t.ParamSpec("P")
R = t.TypeVar("R")

EXTENSION_KEY = "threadctx"


class ThreadContext:
    """Run functions in worker threads with the contexts of the code that submits them.

    Each app gets its own pool of worker threads, configured by the ``THREADCTX_*`` keys of its
    config. A task sees ``current_app``, a fresh ``g`` filled per ``THREADCTX_COPY_G``, and, when
    submitted during a request, ``request`` and a copy of ``session``. See :doc:`/contract`.

    :param app: Call :meth:`init_app` on this app now. Tasks submitted with no app context at
        all then go to this app's pool. Leave it out for the application factory pattern.

    .. code-block:: python

        threadctx = ThreadContext()

        def create_app():
            app = Flask(__name__)
            threadctx.init_app(app)
            return app
    """

    def __init__(self, app: flask.Flask | None = None) -> None:
        # Only the fallback for submits made outside any app context; everything else is
        # per app, in ``app.extensions``.
        self._app = app
        if app is not None:
            self.init_app(app)

    def init_app(self, app: flask.Flask) -> None:
        """Read and check the ``THREADCTX_*`` config of ``app`` (filling in defaults) and give it
        a task pool. No threads start until the first submit.

        :raise RuntimeError: the extension is already registered on ``app``.
        :raise TypeError: a config key has a value of the wrong type.
        :raise ValueError: a config key has a value out of range.
        """
        if EXTENSION_KEY in app.extensions:
            raise RuntimeError(
                f"A 'ThreadContext' is already registered on {app.name!r}. Call 'init_app'"
                " once per app."
            )
        app.extensions[EXTENSION_KEY] = Pool(app, read_settings(app.config), self)

    @t.overload
    def submit(
        self,
        fn: t.Callable[P, cabc.Coroutine[t.Any, t.Any, R]],
        /,
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> TaskFuture[R]: ...

    @t.overload
    def submit(
        self, fn: t.Callable[P, R], /, *args: P.args, **kwargs: P.kwargs
    ) -> TaskFuture[R]: ...

    def submit(
        self, fn: t.Callable[..., t.Any], /, *args: t.Any, **kwargs: t.Any
    ) -> TaskFuture[t.Any]:
        """Run ``fn(*args, **kwargs)`` in a worker thread of the current app's pool, in copies
        of the contexts that are active now. A coroutine function is run through
        :meth:`app.ensure_sync <flask.Flask.ensure_sync>`, so its future holds what it returns.

        :raise TypeError: ``fn`` is not callable.
        :raise QueueFull: ``THREADCTX_MAX_QUEUE`` tasks are already waiting (never for a
            running task's children).
        :raise RuntimeError: there is no app to submit to, or its pool was shut down.
        """
        if not callable(fn):
            raise TypeError(f"'submit' takes a callable to run, not {fn!r}.")
        app_ctx = active_app_context()
        app = self._current_app("submit") if app_ctx is None else app_ctx.app
        pool: Pool | None = app.extensions.get(EXTENSION_KEY)
        if pool is None:
            pool = _pool(app, "submit")  # raises the error that says what to do
        return pool.submit(capture(app, pool.settings, app_ctx), fn, args, kwargs)

    def map(
        self,
        fn: t.Callable[..., R],
        *iterables: cabc.Iterable[t.Any],
        timeout: float | None = None,
    ) -> cabc.Iterator[R]:
        """Like :meth:`concurrent.futures.Executor.map`: submit ``fn`` for each set of items,
        each in its own contexts, and yield the results in order.

        All items are submitted before this returns. The iterables must have the same length.
        If a submit is refused (:exc:`QueueFull`), the tasks already submitted that have not
        started are cancelled and the error is raised. Closing the iterator early cancels the
        tasks that have not started.

        :param timeout: seconds from this call within which every result must be ready, or
            :exc:`concurrent.futures.TimeoutError` is raised.
        :raise ValueError: the iterables have different lengths.
        """
        if not callable(fn):
            raise TypeError(f"'map' takes a callable to run, not {fn!r}.")
        if not iterables:
            raise TypeError("'map' needs at least one iterable of arguments.")
        try:
            calls = list(zip(*iterables, strict=True))
        except ValueError as exc:
            if not str(exc).startswith("zip() "):
                raise  # raised by one of the iterables themselves
            # zip says "zip() argument 2 is shorter than argument 1".
            detail = str(exc).replace("zip() ", "").replace("argument", "iterable")
            raise ValueError(f"'map' takes iterables of the same length: {detail}.") from None
        deadline = None if timeout is None else time.monotonic() + timeout
        futures: list[TaskFuture[R]] = []
        try:
            for call in calls:
                futures.append(self.submit(fn, *call))
        except BaseException:
            for future in futures:
                future.cancel()
            raise
        return _results(futures, deadline)

    def task(self, fn: t.Callable[P, R]) -> Task[P, R]:
        """Decorate a function so that it can be submitted as ``fn.submit(...)`` and
        ``fn.map(...)``; calling it directly still runs it in the caller.

        .. code-block:: python

            @threadctx.task
            def send_receipt(order_id: int) -> None: ...

            send_receipt.submit(42)
        """
        return Task(self, fn)

    def get_task(self, task_id: str) -> TaskFuture[t.Any] | None:
        """The future of a pending or running task of the current app, or of one of the
        ``THREADCTX_KEEP_FINISHED`` that finished most recently; ``None`` if there is none
        with this id.

        :raise TypeError: ``task_id`` is not a string.
        """
        if not isinstance(task_id, str):
            raise TypeError(f"'get_task' takes a task id string, not {task_id!r}.")
        return _pool(self._current_app("get_task"), "get_task").get(task_id)

    def stats(self) -> dict[str, int]:
        """Counts of the current app's tasks: ``submitted``, ``queued``, ``running``,
        ``succeeded``, ``failed``, ``cancelled``, ``rejected``, and ``max_workers``.

        ``submitted`` counts every task that was given a :class:`TaskInfo`, rejected ones
        included, so it is the sum of the six counts after it.
        """
        return _pool(self._current_app("stats"), "stats").stats()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop the current app's pool. Tasks already queued still run, unless
        ``cancel_futures``; submitting afterwards raises :exc:`RuntimeError`.

        :param wait: Return only when every task, and every child it submits, has finished,
            and the worker threads with them. Not from one of the pool's own tasks, which
            would wait for itself: that raises :exc:`RuntimeError`.
        :param cancel_futures: Cancel the tasks that have not started.
        """
        _pool(self._current_app("shutdown"), "shutdown").shutdown(
            wait, cancel_futures=cancel_futures
        )

    def _current_app(self, api: str) -> flask.Flask:
        app_ctx = active_app_context()
        if app_ctx is not None:
            return app_ctx.app
        if self._app is not None:
            return self._app
        raise RuntimeError(
            f"'{api}' needs an application context. Call it inside a request or"
            " 'with app.app_context():', or create the extension with 'ThreadContext(app)'."
        )


def _pool(app: flask.Flask, api: str) -> Pool:
    try:
        return t.cast(Pool, app.extensions[EXTENSION_KEY])
    except KeyError:
        raise RuntimeError(
            f"'{api}' was called for the app {app.name!r}, which has no 'ThreadContext'."
            " Call 'threadctx.init_app(app)' in its factory."
        ) from None


def _results(futures: list[TaskFuture[R]], deadline: float | None) -> cabc.Iterator[R]:
    futures.reverse()
    try:
        while futures:
            future = futures.pop()
            if deadline is None:
                yield future.result()
            else:
                yield future.result(deadline - time.monotonic())
    finally:
        for future in futures:
            future.cancel()


class Task(t.Generic[P, R]):
    """A function decorated with :meth:`ThreadContext.task`."""

    def __init__(self, extension: ThreadContext, fn: t.Callable[P, R]) -> None:
        self._extension = extension
        self.fn = fn
        """The decorated function."""
        functools.update_wrapper(self, fn)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.fn(*args, **kwargs)

    def submit(self, *args: P.args, **kwargs: P.kwargs) -> TaskFuture[R]:
        """Submit the function with these arguments; see :meth:`ThreadContext.submit`."""
        return self._extension.submit(self.fn, *args, **kwargs)

    def map(
        self, *iterables: cabc.Iterable[t.Any], timeout: float | None = None
    ) -> cabc.Iterator[R]:
        """Submit the function for each set of items; see :meth:`ThreadContext.map`."""
        return self._extension.map(self.fn, *iterables, timeout=timeout)
