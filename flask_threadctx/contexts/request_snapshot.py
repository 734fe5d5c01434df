"""The request as every task of one request sees it: :class:`RequestSnapshot`, made once per
request, in the submitting thread (by :mod:`.capture`) or from a message in a worker process
(by :mod:`.wire`), and a copy of it for each task.

It owns what a task's ``request`` holds (the body, read first; the uploaded files, if copied)
and the session object a task gets. It uses no private name of Flask's or Werkzeug's: setting
the snapshot up in a context, and reading the session the view opened, are :mod:`.capture`'s.
"""

from __future__ import annotations

import copy
import io
import typing as t

from werkzeug.datastructures import FileStorage
from werkzeug.datastructures import ImmutableMultiDict

if t.TYPE_CHECKING:
    import flask
    from flask.sessions import SessionMixin
    from werkzeug.routing import MapAdapter

    from ..config import Settings


class RequestSnapshot:
    """What every task of one request sees as ``request``: made once, at the request's first
    submit, and shared by all its tasks (and their children).

    The body is read and cached first (``THREADCTX_PRELOAD_BODY``), so JSON, form data and raw data
    stay readable after the response. Each task then gets its own shallow copy of the request on
    first use, so what one task does to ``request`` (its parsed JSON, ``view_args``) no other sees.
    The JSON the view parsed already stays the view's: :mod:`.capture`, which owns Werkzeug's
    private names too, drops it from the copy (``forget_parsed_json``).
    """

    __slots__ = ("app", "files", "label", "request", "session_template", "url_adapter")

    def __init__(
        self,
        app: flask.Flask,
        parent: flask.Request,
        url_adapter: MapAdapter | None,
        session: SessionMixin | None,
        settings: Settings,
    ) -> None:
        if settings.preload_body:
            # Raw data first, so that parsing a urlencoded form keeps it; a multipart body is
            # parsed without buffering it whole, as Flask itself does.
            if parent.mimetype != "multipart/form-data":
                parent.get_data(cache=True)
            parent.form  # noqa: B018 -- parses form and files while the body is still there
        request = copy.copy(parent)
        if settings.preload_body:
            # The body has been read into the cache, or parsed (multipart): either way the
            # server's stream is spent, and may be closed once the response is sent.
            request.stream = io.BytesIO()
        request.environ = {k: v for k, v in parent.environ.items() if k != "werkzeug.request"}
        self.app = app
        self.request = request
        self.url_adapter = url_adapter
        self.label = f"{parent.method} {parent.path}"
        self.session_template: SessionMixin | None = None
        if isinstance(session, dict):
            template = copy.copy(session)
            dict.clear(template)  # dict's own clear: a NullSession's refuses, and must stay empty
            self.session_template = template
        self.files: list[tuple[str, FileStorage, bytes]] | None = None
        if settings.copy_files and "files" in parent.__dict__:
            self.files = [(key, f, _read_all(f)) for key, f in parent.files.items(multi=True)]

    def request_for_task(self) -> flask.Request:
        """A shallow copy of the request for one task, with its own uploaded files if copied."""
        snapshot = self.request
        # What copy.copy does for a Request, without its generic machinery.
        request = object.__new__(type(snapshot))
        request.__dict__.update(snapshot.__dict__)
        if request.view_args is not None:
            request.view_args = dict(request.view_args)
        if self.files is not None:
            request.files = ImmutableMultiDict(
                (
                    key,
                    FileStorage(
                        io.BytesIO(data),
                        filename=f.filename,
                        name=f.name,
                        content_type=f.content_type,
                        content_length=len(data),
                        headers=f.headers,
                    ),
                )
                for key, f, data in self.files
            )
        return request

    def session_for_task(self, state: t.Any) -> SessionMixin | None:
        """A session object of the request's session class holding ``state``, the data captured
        at submit time."""
        if self.session_template is None:
            return t.cast("SessionMixin | None", copy.copy(state))
        session = copy.copy(self.session_template)
        if state:
            dict.update(session, state)
        return session


def _read_all(storage: FileStorage) -> bytes:
    stream = storage.stream
    position = stream.tell()
    stream.seek(0)
    try:
        return stream.read()
    finally:
        stream.seek(position)
