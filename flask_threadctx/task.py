"""What ``@threadctx.task`` makes of a function: :class:`Task`, submitted as ``fn.submit()``.

It submits through the extension: :meth:`ThreadContext.submit` for the default backend, and the
extension's ``_submit_to`` and ``_map``, documented there as this module's internal API, for a
backend of its own and for ``map``.
"""

from __future__ import annotations

import functools
import types
import typing as t

from .app_state import KEY
from .contexts.capture import active_app_context
from .options import check_options
from .stores.base import keep_result

if t.TYPE_CHECKING:
    import collections.abc as cabc

    from .app_state import AppState
    from .extension import ThreadContext
    from .future import TaskFuture

P = t.ParamSpec("P")
R = t.TypeVar("R")


class Task(t.Generic[P, R]):
    """A function decorated with :meth:`ThreadContext.task`."""

    def __init__(
        self,
        extension: ThreadContext,
        fn: t.Callable[P, R],
        backend: str | None = None,
        options: dict[str, t.Any] | None = None,
        *,
        keep_result: bool | None = None,
    ) -> None:
        self._extension = extension
        self.fn = fn
        """The decorated function."""
        self.backend = backend
        """The backend its tasks run on; ``None`` for ``THREADCTX_BACKEND``'s."""
        if options:  # made here or by 'task', which checked them at once
            options = check_options(options, _engine(backend))
        self.options: cabc.Mapping[str, t.Any] = types.MappingProxyType(dict(options or {}))
        """The options it was decorated with, as checked then (read-only)."""
        self.keep_result = keep_result
        """Whether the task store keeps its tasks' results; ``None`` for
        ``THREADCTX_KEEP_RESULTS``."""
        functools.update_wrapper(self, fn)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.fn(*args, **kwargs)

    def submit(self, *args: P.args, **kwargs: P.kwargs) -> TaskFuture[R]:
        """Submit the function with these arguments; see :meth:`ThreadContext.submit`."""
        return self._submit(args, kwargs, self.options)

    def submit_with_options(
        self,
        args: tuple[t.Any, ...] = (),
        kwargs: dict[str, t.Any] | None = None,
        **options: t.Any,
    ) -> TaskFuture[R]:
        """Submit the function with these arguments and these options, which replace those
        it was decorated with, one by one:

        .. code-block:: python

            send_reminder.submit_with_options(args=(order.id,), countdown=3600)

        :raise TypeError: or :exc:`ValueError`, for an option as :meth:`ThreadContext.task`
            says, raised here and nothing submitted. With ``rerunnable``, also
            :exc:`TypeError` for what cannot be kept for a re-run, and :exc:`RuntimeError`
            without a task store: see :doc:`/control`, "Re-run".
        """
        if not isinstance(args, tuple):
            raise TypeError(f"'args' must be a tuple of arguments, not {type(args).__name__}.")
        if kwargs is not None and not isinstance(kwargs, dict):
            raise TypeError(f"'kwargs' must be a dict of arguments, not {type(kwargs).__name__}.")
        merged = check_options({**self.options, **options}, _engine(self.backend))
        return self._submit(args, kwargs or {}, merged)

    def _submit(
        self,
        args: tuple[t.Any, ...],
        kwargs: dict[str, t.Any],
        options: cabc.Mapping[str, t.Any],
        backend: str | None = None,
        rerun_of: str | None = None,
    ) -> TaskFuture[R]:
        """Submit with ``options``; on ``backend`` (``None``: the task's own), as the re-run
        of the task ``rerun_of`` if one. A rerunnable task goes through
        :mod:`~flask_threadctx.rerun`, which keeps what a re-run needs, and comes back to
        :meth:`_submit_now`."""
        rerunnable = options.get("rerunnable")
        if "rerunnable" in options:  # the engines never see it
            options = {name: value for name, value in options.items() if name != "rerunnable"}
        if rerunnable is None:
            rerunnable = _rerunnable_by_default(self._extension)
        if rerunnable:
            from .rerun import submit_kept

            return submit_kept(self, args, kwargs, options, backend, rerun_of)
        return self._submit_now(args, kwargs, options, backend)

    def _submit_now(
        self,
        args: tuple[t.Any, ...],
        kwargs: dict[str, t.Any],
        options: cabc.Mapping[str, t.Any],
        backend: str | None = None,
    ) -> TaskFuture[R]:
        if self.keep_result is not None:
            token = keep_result.set(self.keep_result)  # read by the recorder, in the submit
            try:
                return self._send(args, kwargs, options, backend)
            finally:
                keep_result.reset(token)
        return self._send(args, kwargs, options, backend)

    def _send(
        self,
        args: tuple[t.Any, ...],
        kwargs: dict[str, t.Any],
        options: cabc.Mapping[str, t.Any],
        backend: str | None,
    ) -> TaskFuture[R]:
        backend = self.backend if backend is None else backend
        if backend is None and not options:
            return self._extension.submit(self.fn, *args, **kwargs)
        return self._extension._submit_to(backend, options, self.fn, args, kwargs)

    def map(
        self, *iterables: cabc.Iterable[t.Any], timeout: float | None = None
    ) -> cabc.Iterator[R]:
        """Submit the function for each set of items; see :meth:`ThreadContext.map`."""
        return self._extension._map(self._submit_fn, self.fn, iterables, timeout)

    def _submit_fn(self, fn: t.Callable[P, R], *args: t.Any) -> TaskFuture[R]:
        return self.submit(*args)  # type: ignore[call-arg]


def _rerunnable_by_default(extension: ThreadContext) -> bool:
    """``THREADCTX_RERUNNABLE`` of the app submitted to; ``False`` where there is none (the
    submit then raises the error that says what to do)."""
    app_ctx = active_app_context()
    app = extension._app if app_ctx is None else app_ctx.app
    state: AppState | None = None if app is None else app.extensions.get(KEY)
    return state is not None and state.settings.rerunnable


def _engine(backend: str | None) -> str:
    """The engine whose options a task of ``backend`` takes: Celery's own only with
    ``backend="celery"``, since ``None`` may mean threads in some app."""
    return "celery" if backend == "celery" else "threads"
