"""What ``@threadctx.task`` makes of a function: :class:`Task`, submitted as ``fn.submit()``.

It submits through the extension: :meth:`ThreadContext.submit` for the default backend, and the
extension's ``_submit_to`` and ``_map``, documented there as this module's internal API, for a
backend of its own and for ``map``.
"""

from __future__ import annotations

import functools
import types
import typing as t

from .stores.base import keep_result

if t.TYPE_CHECKING:
    import collections.abc as cabc

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
            from .options import check_options

            options = check_options(options, "celery")
        self.options: cabc.Mapping[str, t.Any] = types.MappingProxyType(dict(options or {}))
        """The Celery options it was decorated with, as checked then (read-only)."""
        self.keep_result = keep_result
        """Whether the task store keeps its tasks' results; ``None`` for
        ``THREADCTX_KEEP_RESULTS``."""
        functools.update_wrapper(self, fn)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.fn(*args, **kwargs)

    def submit(self, *args: P.args, **kwargs: P.kwargs) -> TaskFuture[R]:
        """Submit the function with these arguments; see :meth:`ThreadContext.submit`."""
        if self.keep_result is not None:
            token = keep_result.set(self.keep_result)  # read by the recorder, in the submit
            try:
                return self._submit(args, kwargs)
            finally:
                keep_result.reset(token)
        return self._submit(args, kwargs)

    def _submit(self, args: tuple[t.Any, ...], kwargs: dict[str, t.Any]) -> TaskFuture[R]:
        if self.backend is None:
            return self._extension.submit(self.fn, *args, **kwargs)
        return self._extension._submit_to(self.backend, self.options, self.fn, args, kwargs)

    def map(
        self, *iterables: cabc.Iterable[t.Any], timeout: float | None = None
    ) -> cabc.Iterator[R]:
        """Submit the function for each set of items; see :meth:`ThreadContext.map`."""
        return self._extension._map(self._submit_fn, self.fn, iterables, timeout)

    def _submit_fn(self, fn: t.Callable[P, R], *args: t.Any) -> TaskFuture[R]:
        return self.submit(*args)  # type: ignore[call-arg]
