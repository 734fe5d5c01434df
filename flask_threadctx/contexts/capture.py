"""Capturing Flask's contexts in one thread and re-creating them for a task in another.

This is the only module that uses Flask's (and Werkzeug's) private names, so that a change in
Flask's context machinery is met in one place. Flask 3.1 keeps the request in its own context
variable (``flask.globals._cv_request``); Flask 3.2 merges it into the app context. Both are
detected here. What a task's ``request`` holds is
:class:`~flask_threadctx.contexts.request_snapshot.RequestSnapshot`'s, in a module of its own; how
it is set up in a task's context, and what of the view's request and session it is made from,
are this module's.

The data flow: :func:`capture` runs in the submitting thread and returns a :class:`Capture`, which
holds the app, a ``RequestSnapshot`` shared by every task of one request, and what is copied
per task (``g`` data, session data, the other context variables). :meth:`Capture.run` then runs in
the worker, inside the task's own :class:`contextvars.Context`, pushing a fresh app context (and so
a fresh ``g``) for the task and popping it at the end, so ``teardown_appcontext`` runs there.
"""

from __future__ import annotations

import contextvars
import copy
import functools
import typing as t

from flask import Flask
from flask import globals as flask_globals
from flask.ctx import AppContext
from flask.signals import appcontext_popped
from flask.signals import appcontext_pushed
from flask.signals import appcontext_tearing_down

from .plain_data import plain_data_items
from .request_snapshot import RequestSnapshot

if t.TYPE_CHECKING:
    import flask
    from flask.sessions import SessionMixin

    from ..config import Settings

_cv_app: contextvars.ContextVar[AppContext] = flask_globals._cv_app
_cv_request: contextvars.ContextVar[t.Any] | None = getattr(flask_globals, "_cv_request", None)

_FLASK_TEARDOWN_APPCONTEXT = Flask.do_teardown_appcontext

MERGED_CONTEXTS = _cv_request is None
"""True on Flask 3.2 and later, where the request lives in the app context."""

# Name of the attribute under which a request's snapshot is cached on its context object: on the
# request's own context at the first submit, and on every task context made from it.
_SNAPSHOT = "_flask_threadctx_snapshot"

A = t.TypeVar("A")

Outcome = tuple[t.Any, BaseException | None]
"""What a task's body returns: ``(result, None)`` or ``(None, exception)``."""


class TeardownFailed(Exception):
    """Raised by :meth:`Capture.run` when tearing down the contexts raised ``error`` after the
    body returned ``outcome``. An exception rather than a third value in the outcome, so that
    the path every task takes stays as short as it was."""

    def __init__(self, outcome: Outcome, error: BaseException) -> None:
        super().__init__(outcome, error)
        self.outcome = outcome
        self.error = error


_EMPTY_CONTEXT = contextvars.Context()

# Stands for the token of an app context that was set, not pushed; see ``_push``.
_SET_WITHOUT_PUSH: t.Any = None


active_app_context: t.Callable[[], AppContext | None] = functools.partial(_cv_app.get, None)
"""The app context active in this thread, or ``None``. (A partial, not a ``def``: it is called
on every submit, and this way the call stays in C.)"""


class Capture:
    """The contexts of one submit, to be re-created once in a worker by :meth:`run`."""

    __slots__ = ("app", "context", "g_data", "g_left_out", "session_state", "settings", "snapshot")

    def __init__(
        self,
        app: flask.Flask,
        settings: Settings,
        snapshot: RequestSnapshot | None,
        g_data: dict[str, t.Any] | None,
        g_left_out: list[str] | None,
        session_state: t.Any,
        context: contextvars.Context,
    ) -> None:
        self.app = app
        self.settings = settings
        self.snapshot = snapshot
        self.g_data = g_data
        self.g_left_out = g_left_out
        """Names in the submitter's ``g`` that ``THREADCTX_COPY_G`` left behind."""
        self.session_state = session_state
        self.context = context

    def copy(self) -> Capture:
        """A capture for one more run: its own ``g`` data and its own context variables, since a
        :class:`contextvars.Context` can be entered by one thread at a time."""
        g_data = self.g_data
        if g_data is not None:
            g_data = plain_data_items(g_data)[0] if self.settings.copy_g == "data" else dict(g_data)
        return Capture(
            self.app,
            self.settings,
            self.snapshot,
            g_data,
            self.g_left_out,
            self.session_state,
            self.context.copy(),
        )

    def run(self, body: t.Callable[[A], Outcome], arg: A, description: object) -> Outcome:
        """Run ``body(arg)`` in this capture's contexts and return its outcome.

        ``body`` reports the task's exception in its outcome, which is passed on to the teardown
        functions. Whatever setting up the contexts raises is raised here, and ``body`` does not
        run; whatever tearing them down raises is raised as :exc:`TeardownFailed`, with the
        outcome. ``description`` names the task in log messages.
        """
        return self.context.run(self._run, body, arg, description)

    def _run(self, body: t.Callable[[A], Outcome], arg: A, description: object) -> Outcome:
        app_ctx = _push(self)
        outcome = body(arg)
        try:
            if _cv_app.get(None) is not app_ctx:
                self.app.logger.warning(
                    "%s left an app or request context pushed; it was discarded.", description
                )
                _cv_app.set(app_ctx)
            _pop(app_ctx, self, outcome[1])
        except BaseException as error:  # a task's teardown must never take its thread down
            raise TeardownFailed(outcome, error) from None
        return outcome

    def let_go(self) -> None:
        """Drop the captured data. A failed task's traceback keeps the frames that ran it, and
        with them this capture: it must not keep the request's body, ``g`` and the context
        variables alive for as long as the exception is kept."""
        self.snapshot = self.g_data = self.session_state = None
        self.context = _EMPTY_CONTEXT


def capture(app: flask.Flask, settings: Settings, app_ctx: AppContext | None) -> Capture:
    """Capture the contexts of the calling thread for one task of ``app``.

    :param app_ctx: the active app context, if it belongs to ``app``.
    """
    snapshot = None
    session_state = None
    g_data = None
    g_left_out = None
    context = contextvars.copy_context()
    if app_ctx is not None:
        request_ctx = _request_context(app_ctx)
        if request_ctx is None:
            if not MERGED_CONTEXTS:
                context = _without_foreign_request(context)
        else:
            snapshot = getattr(request_ctx, _SNAPSHOT, None)
            if snapshot is None or snapshot.app is not app:
                snapshot = _snapshot(app, request_ctx, settings)
            # The private attribute, as ``opened_session`` reads it (inline: every submit
            # from a request comes here).
            session = request_ctx._session
            if isinstance(session, dict):
                session_state = dict(session) if session else None
            elif session is not None:
                session_state = copy.copy(session)
        namespace = vars(app_ctx.g)
        if namespace:
            copy_g = settings.copy_g
            if copy_g == "data":
                g_data, g_left_out = plain_data_items(namespace)
            elif copy_g is True:
                g_data = dict(namespace)
            elif copy_g is False:
                g_left_out = list(namespace)
            else:
                g_data = {name: namespace[name] for name in copy_g if name in namespace}
                g_left_out = [name for name in namespace if name not in g_data]
    return Capture(app, settings, snapshot, g_data, g_left_out or None, session_state, context)


def _without_foreign_request(context: contextvars.Context) -> contextvars.Context:
    """``context`` without a request context of another app, which would otherwise be copied
    into the task as it is: live, and shared with the request it belongs to."""
    if _cv_request is None or context.get(_cv_request) is None:
        return context
    clean = contextvars.Context()
    for var, value in context.items():
        if var is not _cv_request:
            clean.run(var.set, value)
    return clean


def _explain_g(app_ctx: AppContext, capture: Capture) -> None:
    """Give the task's app context a ``g`` whose missing attributes say why they are missing,
    for a task whose submitter's ``g`` had attributes that ``THREADCTX_COPY_G`` left behind."""
    assert capture.g_left_out is not None
    app_ctx.g = _explaining_globals_class(capture.app.app_ctx_globals_class)()
    left_out = (capture.g_left_out, capture.settings.copy_g)
    object.__setattr__(app_ctx.g, "_flask_threadctx_left_out", left_out)


@functools.cache
def _explaining_globals_class(base: type[t.Any]) -> type[t.Any]:
    class _TaskGlobals(base):  # type: ignore[misc]
        # A slot, not an attribute: ``g``'s attributes live in its ``__dict__``, and this must
        # not show up there.
        __slots__ = ("_flask_threadctx_left_out",)

        def __getattr__(self, name: str) -> t.Any:
            try:
                return super().__getattr__(name)
            except AttributeError:
                left_out, copy_g = self._flask_threadctx_left_out
                if name not in left_out:
                    raise
                raise AttributeError(_not_carried(name, copy_g)) from None

    _TaskGlobals.__qualname__ = _TaskGlobals.__name__ = base.__name__
    return _TaskGlobals


def _not_carried(name: str, copy_g: t.Any) -> str:
    prefix = f"'g.{name}' was set where the task was submitted, but not carried into the task:"
    if copy_g == "data":
        return (
            f'{prefix} THREADCTX_COPY_G = "data" carries plain data only (strings, numbers,'
            " dates, and lists, tuples, dicts and sets of those), and it held something else."
            " Pass what the task needs as an argument (an id rather than an object) and load it"
            f" in the task, or add {name!r} to a list in THREADCTX_COPY_G to share the object"
            " itself with the task, if it is safe to use from another thread."
        )
    if copy_g is False:
        return (
            f"{prefix} THREADCTX_COPY_G = False carries nothing from 'g'. Pass it as an"
            f' argument, or set THREADCTX_COPY_G to "data" or to a list that names {name!r}.'
        )
    return (
        f"{prefix} THREADCTX_COPY_G = {list(copy_g)!r} does not name it. Add {name!r} to that"
        " list, or pass it as an argument."
    )


def _snapshot(app: flask.Flask, request_ctx: t.Any, settings: Settings) -> RequestSnapshot:
    snapshot = RequestSnapshot(
        app, request_ctx.request, request_ctx.url_adapter, request_ctx._session, settings
    )
    forget_parsed_json(snapshot.request)
    setattr(request_ctx, _SNAPSHOT, snapshot)
    return snapshot


def forget_parsed_json(request: flask.Request) -> None:
    """Make ``request``, a copy of the view's, parse its JSON body for itself: a parsed body the
    view already holds stays the view's."""
    request._cached_json = (Ellipsis, Ellipsis)


# mypy checks against the installed Flask 3.1, so it reads only this branch.
if t.TYPE_CHECKING or _cv_request is not None:
    from flask.ctx import RequestContext

    class _TaskRequestContext(RequestContext):
        """The request context a task sees on Flask 3.1. It is set, never pushed: pushing would
        match the URL and open the session again, and popping would run ``teardown_request``
        once per task.
        """

        def __init__(
            self, app: flask.Flask, snapshot: RequestSnapshot, session_state: t.Any
        ) -> None:
            self.app = app
            self.url_adapter = snapshot.url_adapter
            self.flashes = None
            self._flask_threadctx_snapshot = snapshot
            self._session_state = session_state
            self._task_request: flask.Request | None = None
            self._task_session: SessionMixin | None = None
            self._task_tokens: list[contextvars.Token[t.Any]] | None = None

        @property
        def request(self) -> flask.Request:  # type: ignore[override]
            if self._task_request is None:
                self._task_request = self._flask_threadctx_snapshot.request_for_task()
            return self._task_request

        @property
        def _session(self) -> SessionMixin | None:  # type: ignore[override]
            if self._task_session is None:
                snapshot = self._flask_threadctx_snapshot
                self._task_session = snapshot.session_for_task(self._session_state)
            return self._task_session

        @property
        def _after_request_functions(self) -> list[t.Any]:  # type: ignore[override]
            raise RuntimeError(_AFTER_REQUEST_IN_TASK)

        def copy(self) -> RequestContext:
            return RequestContext(
                self.app, self.request.environ, request=self.request, session=self._session
            )

        # Flask code that pushes the current request context again (``stream_with_context``,
        # for one) nests inside the task: it binds this context, and unbinds it at the end,
        # without matching the URL, opening the session or running teardown, which belong to
        # the request and to the end of the task.

        def push(self) -> None:
            token = _cv_request.set(self)  # type: ignore[union-attr]
            if self._task_tokens is None:  # made here, as few tasks ever push again
                self._task_tokens = []
            self._task_tokens.append(token)

        def pop(self, exc: BaseException | None = None) -> None:
            assert self._task_tokens, "popped more often than pushed"
            _cv_request.reset(self._task_tokens.pop())  # type: ignore[union-attr]

    def _push(capture: Capture) -> AppContext:
        app_ctx = capture.app.app_context()
        if capture.g_left_out is not None:
            _explain_g(app_ctx, capture)
        if capture.g_data:
            vars(app_ctx.g).update(capture.g_data)
        if appcontext_pushed.receivers or appcontext_popped.receivers:
            app_ctx.push()
        else:
            # What push() does, without the signals that nobody listens to. The placeholder
            # makes the context count as pushed once, so that Flask code pushing it again inside
            # the task (``stream_with_context``) does not run its teardown when it pops it. It
            # is not the token: the task's Context is thrown away, so there is nothing to
            # reset, and the token, which refers to that Context, would make a reference cycle
            # that only the cyclic garbage collector could free.
            _cv_app.set(app_ctx)
            app_ctx._cv_tokens.append(_SET_WITHOUT_PUSH)
        if capture.snapshot is not None:
            _cv_request.set(  # type: ignore[union-attr]
                _TaskRequestContext(capture.app, capture.snapshot, capture.session_state)
            )
        return app_ctx

    def _request_context(app_ctx: AppContext) -> t.Any:
        request_ctx = _cv_request.get(None)  # type: ignore[union-attr]
        if request_ctx is None or request_ctx.app is not app_ctx.app:
            return None
        return request_ctx

    def _pop(app_ctx: AppContext, capture: Capture, exc: BaseException | None) -> None:
        app = capture.app
        try:
            if capture.snapshot is not None and capture.settings.teardown_request:
                app.do_teardown_request(exc)
        finally:
            if app_ctx._cv_tokens[0] is not _SET_WITHOUT_PUSH:
                app_ctx.pop(exc)
            # Without receivers, popping adds only the teardown; with no teardown function
            # either the call would do nothing, and it is skipped because it costs a tenth of a
            # trivial task.
            elif (
                app.teardown_appcontext_funcs
                or appcontext_tearing_down.receivers
                or type(app).do_teardown_appcontext is not _FLASK_TEARDOWN_APPCONTEXT
            ):
                app.do_teardown_appcontext(exc)

else:  # Flask 3.2: one context holds app and request.

    class _TaskAppContext(AppContext):
        """The context a task sees on Flask 3.2, with the request snapshot's data. Its request
        data is attached after it is pushed, so that pushing neither matches the URL nor opens
        the session again."""

        _flask_threadctx_snapshot: RequestSnapshot
        _session_state: t.Any = None

        def _get_session(self) -> SessionMixin:
            if self._session is None:
                snapshot = self._flask_threadctx_snapshot
                self._session = snapshot.session_for_task(self._session_state)
            return self._session

        @property
        def _after_request_functions(self) -> list[t.Any]:
            raise RuntimeError(_AFTER_REQUEST_IN_TASK)

        @_after_request_functions.setter
        def _after_request_functions(self, value: list[t.Any]) -> None:
            pass

        def push(self) -> None:
            super().push()
            if self._request is None:  # the first push; later ones nest inside the task
                snapshot = self._flask_threadctx_snapshot
                self._request = snapshot.request_for_task()
                self.url_adapter = snapshot.url_adapter

    def _push(capture: Capture) -> AppContext:
        if capture.snapshot is None:
            app_ctx = capture.app.app_context()
        else:
            app_ctx = _TaskAppContext(capture.app)
            app_ctx._flask_threadctx_snapshot = capture.snapshot
            app_ctx._session_state = capture.session_state
        if capture.g_left_out is not None:
            _explain_g(app_ctx, capture)
        if capture.g_data:
            vars(app_ctx.g).update(capture.g_data)
        app_ctx.push()
        return app_ctx

    def _request_context(app_ctx: AppContext) -> t.Any:
        return app_ctx if app_ctx._request is not None else None

    def _pop(app_ctx: AppContext, capture: Capture, exc: BaseException | None) -> None:
        if not capture.settings.teardown_request:
            # Without request data, popping runs ``teardown_appcontext`` only.
            app_ctx._request = None
        app_ctx.pop(exc)


def live_request_context(app_ctx: AppContext) -> t.Any:
    """The request context (Flask 3.1) or app context (3.2) that holds the request of
    ``app_ctx``'s app in this thread, or ``None``."""
    return _request_context(app_ctx)


def opened_session(request_ctx: t.Any) -> SessionMixin | None:
    """The session of the request that ``request_ctx`` (see :func:`live_request_context`)
    holds, as opened, or ``None`` if nothing opened it."""
    # The private attribute, not ``.session``: reading that marks the session accessed and
    # adds ``Vary: Cookie`` to the response. Both Flask versions keep it there.
    session: SessionMixin | None = request_ctx._session
    return session


_AFTER_REQUEST_IN_TASK = (
    "'after_this_request' cannot be used in a task: the response it would change has already"
    " been built, or is built without waiting for the task. Call it in the view, or return what"
    " the response needs from the task's future."
)
