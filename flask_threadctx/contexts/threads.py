"""Contexts for threads that are not started through the pool: a function handed to
``threading.Thread`` or ``multiprocessing.dummy.Pool``, and ``Thread`` subclasses."""

from __future__ import annotations

import functools
import threading
import typing as t

from ..app_state import app_state
from ..app_state import KEY
from ..config import DEFAULT_SETTINGS
from .capture import active_app_context
from .capture import capture
from .capture import TeardownFailed

if t.TYPE_CHECKING:
    from .capture import Capture
    from .capture import Outcome

P = t.ParamSpec("P")
R = t.TypeVar("R")
_Run = t.TypeVar("_Run", bound=t.Callable[[t.Any], None])


def copy_current_context(fn: t.Callable[P, R]) -> t.Callable[P, R]:
    """Return a function that calls ``fn`` in fresh copies of the contexts active now.

    Each call gets its own app context (so its own ``g`` and its own ``teardown_appcontext``),
    its own copy of the request and session, and its own copy of the other context variables,
    so the returned function may be called from many threads at once, and again inside such a
    call. Unlike :func:`flask.copy_current_request_context`, it also works in an app context
    without a request.

    .. code-block:: python

        @app.post("/resize")
        def resize():
            worker = copy_current_context(make_thumbnail)
            with multiprocessing.dummy.Pool(3) as pool:
                pool.map(worker, request.json["images"])
            return "", 204

    :raise RuntimeError: no application context is active.
    """
    captured = _capture_now("copy_current_context")

    @functools.wraps(fn)
    def in_copied_contexts(*args: P.args, **kwargs: P.kwargs) -> R:
        return call_in(captured.copy(), fn, args, kwargs)

    return in_copied_contexts


class ContextThread(threading.Thread):
    """A :class:`threading.Thread` whose ``target``, or overridden
    :meth:`~threading.Thread.run`, runs in fresh copies of the contexts that were active when the
    thread was created.

    .. code-block:: python

        ContextThread(target=send_mail, args=(address,)).start()

    :raise RuntimeError: no application context is active when the thread is created.
    """

    def __init__(self, *args: t.Any, **kwargs: t.Any) -> None:
        super().__init__(*args, **kwargs)
        self._flask_threadctx_capture: Capture | None = _capture_now("ContextThread")

    def __init_subclass__(cls, **kwargs: t.Any) -> None:
        super().__init_subclass__(**kwargs)
        if "run" in cls.__dict__:
            cls.run = _run_in_captured_contexts(cls.__dict__["run"])  # type: ignore[method-assign]


def _run_in_captured_contexts(run: _Run) -> _Run:
    @functools.wraps(run)
    def wrapper(self: t.Any) -> None:
        captured = self._flask_threadctx_capture
        if captured is None:  # a subclass's ``run`` calling ``super().run()``: already inside
            run(self)
            return
        self._flask_threadctx_capture = None
        call_in(captured, run, (self,), {})

    return t.cast(_Run, wrapper)


ContextThread.run = _run_in_captured_contexts(threading.Thread.run)  # type: ignore[method-assign]


def _capture_now(api: str) -> Capture:
    app_ctx = active_app_context()
    if app_ctx is None:
        raise RuntimeError(
            f"'{api}' needs an application context to copy. Use it inside a request or"
            " 'with app.app_context():'."
        )
    app = app_ctx.app
    settings = app_state(app).default.settings if KEY in app.extensions else DEFAULT_SETTINGS
    return capture(app, settings, app_ctx)


def call_in(
    captured: Capture,
    fn: t.Callable[..., R],
    args: tuple[t.Any, ...],
    kwargs: dict[str, t.Any],
) -> R:
    """Call ``fn`` in ``captured``'s contexts and return its result or raise its exception,
    after the contexts are torn down."""
    app = captured.app

    def body(fn: t.Callable[..., R]) -> Outcome:
        try:
            return app.ensure_sync(fn)(*args, **kwargs), None
        except BaseException as exc:
            return None, exc

    name = getattr(fn, "__qualname__", fn)
    try:
        result, exception = captured.run(body, fn, name)
    except TeardownFailed as failed:
        result, exception = failed.outcome
        if exception is None:
            raise failed.error from None
        app.logger.error("Tearing down the contexts of %s failed.", name, exc_info=failed.error)
    if exception is not None:
        raise exception
    return t.cast(R, result)
