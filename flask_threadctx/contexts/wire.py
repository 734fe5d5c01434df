"""What crosses a process boundary with a task, and how it is rebuilt on the other side.

A task for another process travels as its function's import path, its arguments, and a
:class:`Message` context: the request as a snapshot of plain values, ``g`` data and session data.
Nothing here knows how the engine carries it (Celery, for now): the engine serializes what
:func:`message_context` returns and hands it back to :func:`rebuilt_capture` on the worker. What
crosses is bounded by three settings named for Celery, the one engine so far that crosses
processes: ``THREADCTX_CELERY_MAX_BODY``, ``THREADCTX_CELERY_PUBLIC_HEADERS`` and
``THREADCTX_CELERY_PRIVATE_HEADERS``. Flask's private names are read through
:mod:`~flask_threadctx.contexts.capture`, which owns them.
"""

from __future__ import annotations

import base64
import contextvars
import importlib
import re
import types
import typing as t

from werkzeug.datastructures import Headers
from werkzeug.test import EnvironBuilder

from .capture import Capture
from .capture import forget_parsed_json
from .capture import live_request_context
from .capture import opened_session
from .plain_data import plain_data_items
from .request_snapshot import RequestSnapshot

if t.TYPE_CHECKING:
    import flask
    from flask.ctx import AppContext

    from ..config import Settings

# Computed again from the body on the other side, or taken from the URL. The body crosses
# whole: a 'Transfer-Encoding: chunked' beside the new length would have it read as empty.
_REBUILT_HEADERS = frozenset(("content-length", "host", "transfer-encoding"))

SECRET_WORDS = (
    "auth",
    "token",
    "key",
    "secret",
    "session",
    "csrf",
    "pass",
    "cred",
    "jwt",
    "bearer",
    "signature",
    "cookie",
    "hmac",
    "dpop",
    "cert",
)
"""A request header whose name holds one of these (in any case) stays in the web process unless
``THREADCTX_CELERY_PUBLIC_HEADERS`` names it: broker messages sit in Redis in plain text.
``"pass"`` covers ``Password``, ``Passwd`` and ``Pass``; it also keeps back a harmless name such
as ``X-Passthrough``, which ``THREADCTX_CELERY_PUBLIC_HEADERS`` can let through. ``"hmac"`` and
``"signature"`` keep back a webhook's signature (``X-Shopify-Hmac-Sha256``,
``X-Hub-Signature-256``), which the body crossing beside it would make replayable; ``"dpop"``
and ``"cert"`` a proof of possession and a client certificate forwarded by a proxy."""
_SECRET_NAME = re.compile("|".join(SECRET_WORDS))

# The parts of the URL in the WSGI environ, where they are the bytes the client sent (the path
# percent-decoded, or not, as the server chose).
_URL_ENVIRON = ("SCRIPT_NAME", "PATH_INFO", "QUERY_STRING", "REQUEST_URI", "RAW_URI")

# The request context attribute under which its snapshot for other processes is cached, so that
# the tasks of one request share it.
_MESSAGE_REQUEST = "_flask_threadctx_message_request"


class RemoteTraceback(Exception):
    """The formatted traceback of a task that failed in another process, set as the
    ``__cause__`` of its exception, as :class:`concurrent.futures.ProcessPoolExecutor` does."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return f'\n"""\n{self.text}"""'


def import_path(fn: t.Callable[..., t.Any]) -> str:
    """The ``module:qualname`` under which a worker process imports ``fn``.

    :raise TypeError: ``fn`` cannot be imported by name: a lambda, a function defined inside
        another function, in ``__main__``, a bound method or any other callable object, or one
        that its module holds under another name.
    """
    what = "cannot be sent to a worker process, which finds a task's function by its import path:"
    if not isinstance(fn, types.FunctionType):
        raise TypeError(
            f"{fn!r} {what} only functions defined at the top level of a module (or"
            " static methods of a class there) can be. Wrap the call in such a function."
        )
    module, qualname = fn.__module__, fn.__qualname__
    if qualname == "<lambda>" or "<locals>" in qualname:
        kind = "a lambda" if qualname.endswith("<lambda>") else "defined inside another function"
        raise TypeError(
            f"{qualname!r} {what} it is {kind}. Define it at the top level of a module and"
            " pass what it needs as arguments."
        )
    if module == "__main__":
        raise TypeError(
            f"{qualname!r} {what} it is defined in '__main__', which is another module in the"
            " worker. Move it into a module of your app."
        )
    path = f"{module}:{qualname}"
    if resolve(path, fn) is not fn:
        raise TypeError(
            f"{path!r} {what} under that name its module holds another object. Decorate it"
            " with 'functools.wraps', or submit the function its module holds."
        )
    return path


def resolve(path: str, expected: object = None) -> t.Callable[..., t.Any]:
    """Import the function at ``path`` (``module:qualname``). A :class:`~flask_threadctx.Task`
    found there stands for the function it decorates.

    :raise LookupError: nothing can be imported at ``path``.
    """
    found = find(path)
    inner = getattr(found, "fn", None)
    if inner is not None and (expected is None or inner is expected):
        from ..task import Task

        if isinstance(found, Task):
            found = inner
    return t.cast("t.Callable[..., t.Any]", found)


def find(path: str) -> object:
    """The object at ``path`` (``module:qualname``).

    :raise LookupError: nothing can be imported at ``path``.
    """
    module_name, _, qualname = path.partition(":")
    try:
        found: t.Any = importlib.import_module(module_name)
        for name in qualname.split("."):
            found = getattr(found, name)
    except (ImportError, AttributeError) as error:
        raise LookupError(
            f"The task function {path!r} cannot be imported in this process: {error}. Deploy"
            " the same code to the web and worker processes."
        ) from error
    return found


def class_path(cls: type) -> tuple[str, bool]:
    """The import path of the class ``cls`` (``module:qualname``), and whether another process
    can find it by that path: not a class defined inside a function, or in ``__main__``, or
    replaced at its path since."""
    path = f"{cls.__module__}:{cls.__qualname__}"
    try:
        return path, find(path) is cls
    except LookupError:
        return path, False


def message_context(
    app: flask.Flask, settings: Settings, app_ctx: AppContext | None
) -> dict[str, t.Any]:
    """The contexts of the calling thread as plain data: ``request``, ``g`` and ``session``.

    :raise TypeError: the request holds more than ``THREADCTX_CELERY_MAX_BODY`` bytes of body.
    """
    context: dict[str, t.Any] = {}
    if app_ctx is None:
        return context
    namespace = vars(app_ctx.g)
    if namespace:
        copy_g = settings.copy_g
        if copy_g == "data" or copy_g is True:
            chosen = namespace
        elif copy_g is False:
            chosen = {}
        else:
            chosen = {name: namespace[name] for name in copy_g if name in namespace}
        # Plain data only, whatever the setting: objects do not survive the trip.
        g_data, left_out = plain_data_items(chosen)
        left_out = [*(left_out or ()), *(name for name in namespace if name not in chosen)]
        if g_data:
            context["g"] = g_data
        if left_out:
            context["g_left_out"] = left_out
    request_ctx = live_request_context(app_ctx)
    if request_ctx is not None:
        request_data = getattr(request_ctx, _MESSAGE_REQUEST, None)
        if request_data is None:
            request_data = _request_data(request_ctx.request, settings)
            setattr(request_ctx, _MESSAGE_REQUEST, request_data)
        context["request"] = request_data
        session = opened_session(request_ctx)
        if session:
            context["session"] = dict(session)
    return context


def _request_data(request: flask.Request, settings: Settings) -> dict[str, t.Any]:
    headers = [
        [key, value] for key, value in request.headers.items() if _crosses(key.lower(), settings)
    ]
    data: dict[str, t.Any] = {
        "method": request.method,
        "scheme": request.scheme,
        "host": request.host,
        "path": request.path,
        # As the WSGI server handed them over (bytes decoded as latin-1, whatever they were),
        # to be handed over so again: a decoded path or query encoded anew can read otherwise.
        "environ": {name: request.environ.get(name, "") for name in _URL_ENVIRON},
        "headers": headers,
        "remote_addr": request.remote_addr,
        "endpoint": request.endpoint,
        "view_args": request.view_args,
    }
    limit = settings.celery_max_body
    if request.mimetype == "multipart/form-data":
        # Flask parses a multipart body as it reads it: the fields cross, the files cannot.
        data["form"] = [[key, value] for key, value in request.form.items(multi=True)]
        if request.files:
            data["files"] = sorted(set(request.files))
        size = sum(len(key) + len(value) for key, value in data["form"])
    else:
        length = request.content_length
        size = length if length is not None else 0
        if size <= limit:
            body = request.get_data(cache=True)
            if not body and "form" in request.__dict__:
                # The view read the form before the raw body, which parsing does not keep.
                data["form"] = [[key, value] for key, value in request.form.items(multi=True)]
                size = sum(len(key) + len(value) for key, value in data["form"])
            else:
                size = len(body)
                if body and size <= limit:
                    data["body"] = base64.b64encode(body).decode("ascii")
    if size > limit:
        raise TypeError(
            f"The request body of {request.method} {request.path} is {size} bytes, more than"
            f" 'THREADCTX_CELERY_MAX_BODY' ({limit}) lets cross to a worker process. Store it"
            " (a file, a database row) and pass the task a reference, or raise the limit."
        )
    return data


def _crosses(name: str, settings: Settings) -> bool:
    """Whether the header ``name`` (lower case) goes with a task to another process."""
    if name in _REBUILT_HEADERS:
        return False
    if name in settings.celery_public_headers:  # the app opted in by name
        return True
    return name not in settings.celery_private_headers and _SECRET_NAME.search(name) is None


def rebuilt_capture(app: flask.Flask, settings: Settings, context: dict[str, t.Any]) -> Capture:
    """The :class:`~flask_threadctx.contexts.capture.Capture` that :func:`message_context`
    described, rebuilt in this process for one run in a fresh :class:`contextvars.Context`."""
    snapshot = None
    session_state = None
    request_data = context.get("request")
    if request_data is not None:
        request = _rebuilt_request(app, request_data)
        url_adapter = app.create_url_adapter(request)
        session = app.session_interface.open_session(app, request)
        snapshot = RequestSnapshot(app, request, url_adapter, session, settings)
        forget_parsed_json(snapshot.request)  # as for a snapshot of a live request
        files = request_data.get("files")
        if files:  # after the snapshot, which parses the form, and with it 'files'
            snapshot.request.__dict__["files"] = _FilesNotCarried(files)
        session_state = context.get("session")
    return Capture(
        app,
        settings,
        snapshot,
        context.get("g"),
        context.get("g_left_out"),
        session_state,
        contextvars.Context(),
    )


def _rebuilt_request(app: flask.Flask, data: dict[str, t.Any]) -> flask.Request:
    headers = Headers([tuple(pair) for pair in data["headers"]])
    form = data.get("form")
    body: bytes | dict[str, t.Any] | None = None
    if form is not None:
        body = {}
        for key, value in form:
            body.setdefault(key, []).append(value)
    elif "body" in data:
        body = base64.b64decode(data["body"])
    content_type = headers.pop("Content-Type", None)
    if form is not None and (content_type or "").startswith("multipart/form-data"):
        content_type = "multipart/form-data"  # the builder writes a new body, its own boundary
    builder = EnvironBuilder(
        path=data["path"],
        base_url=f"{data['scheme']}://{data['host']}",
        method=data["method"],
        headers=headers,
        data=body,
        content_type=content_type,
        environ_base={"REMOTE_ADDR": data["remote_addr"]},
    )
    try:
        environ = builder.get_environ()
    finally:
        builder.close()
    environ.update((name, value) for name, value in data["environ"].items() if value)
    request = app.request_class(environ)
    try:
        rule, _ = app.url_map.bind_to_environ(request.environ).match(return_rule=True)
        request.url_rule = rule
    except Exception:  # the routes differ between the processes: keep what the view matched
        pass
    request.view_args = data["view_args"]
    return request


class _FilesNotCarried:
    """``request.files`` of a request rebuilt in another process, where uploaded files never
    arrive: any use says why, and what to do instead."""

    def __init__(self, names: list[str]) -> None:
        self._names = names

    def _refuse(self, *args: object) -> t.NoReturn:
        raise RuntimeError(
            f"The request uploaded files ({', '.join(self._names)}), which do not cross to a"
            " worker process. Store them in the view (a file, object storage, a database row)"
            " and pass the task a reference."
        )

    __getitem__ = __iter__ = __len__ = __contains__ = __bool__ = _refuse
    get = getlist = items = keys = values = _refuse
