"""Re-running a task: what a ``rerunnable`` submit keeps in the task store, and :func:`rerun`,
which submits the task again from it, linked to the original (``rerun_of``).

What is kept is what a Celery worker would be sent, made by the same code and under the same
rules: the request snapshot of :func:`~flask_threadctx.contexts.wire.message_context` (no
``Cookie``, no credential headers, the body within ``THREADCTX_CELERY_MAX_BODY``), and the
message JSON of :func:`~flask_threadctx.contexts.json_message.encode` (plain data only, string
keys), so a rerunnable thread task moves to Celery unchanged. Not
kept: ``g`` data and the session, which may hold credentials; nor when the original was to
start (``countdown``, ``eta``) or its deadline date (an ``expires`` datetime): a re-run is asked
for now. The store's :attr:`~flask_threadctx.stores.base.Record.rerun` holds it, written with
the task's first record (see :class:`~flask_threadctx.stores.base.KeptForRerun`).

:func:`rerun` reads it back, finds the function among the tasks declared with
``@threadctx.task``, rebuilds the request as a Celery worker does
(:func:`~flask_threadctx.contexts.wire.rebuilt_capture`), and submits in those contexts, on the
original's engine, with its options.
"""

from __future__ import annotations

import datetime
import re
import typing as t

from .app_state import app_state
from .config import shown
from .contexts.capture import active_app_context
from .contexts.json_message import encode
from .contexts.json_message import json_loads
from .contexts.json_message import KombuTagged
from .contexts.wire import class_path
from .contexts.wire import find
from .contexts.wire import import_path
from .contexts.wire import message_context
from .contexts.wire import rebuilt_capture
from .model import current_task
from .options import check_options
from .stores import flush
from .stores.base import kept_for_rerun
from .stores.base import KeptForRerun

if t.TYPE_CHECKING:
    import collections.abc as cabc

    from .extension import ThreadContext
    from .future import TaskFuture
    from .task import Task

R = t.TypeVar("R")

_NOT_KEPT = ("countdown", "eta")
"""Options of when the original was to start, which a re-run, asked for now, does not take."""

_SURROGATE = re.compile("[\ud800-\udfff]")


def submit_kept(
    task: Task[t.Any, R],
    args: tuple[t.Any, ...],
    kwargs: dict[str, t.Any],
    options: cabc.Mapping[str, t.Any],
    backend: str | None,
    rerun_of: str | None,
) -> TaskFuture[R]:
    """Submit ``task`` as :meth:`Task.submit <flask_threadctx.Task.submit>` does, keeping
    what a re-run needs with its first record in the task store.

    :raise RuntimeError: the app has no task store.
    :raise TypeError: the function cannot be found by another process, or an argument, an
        option or the request cannot be kept; nothing is submitted.
    """
    extension = task._extension
    app_ctx = active_app_context()
    app = extension._current_app("submit") if app_ctx is None else app_ctx.app
    state = app_state(app, "submit")
    name = getattr(task.fn, "__qualname__", repr(task.fn))
    if state.recorder is None:
        raise RuntimeError(
            f"{name!r} is rerunnable, but {app.name!r} has no task store to keep what a re-run"
            " needs in: set 'THREADCTX_TASK_STORE' (a 'sqlite:///' file, a Redis URL or"
            " \"celery\"), or submit it with 'rerunnable=False'."
        )
    why = (
        f"{name!r} was not submitted: it is rerunnable, and what a re-run needs is kept in the"
        " task store under the rules of what crosses to a Celery worker."
    )
    try:
        path = import_path(task.fn)
        request = message_context(app, state.settings, app_ctx).get("request")
    except TypeError as error:
        raise TypeError(f"{why} {error}") from None
    meta = {"context": {} if request is None else {"request": request}}
    meta["options"] = _kept_options(options, why)
    try:
        encoded = encode([app.name, path, list(args), kwargs, meta], task.fn)
    except TypeError as error:
        raise TypeError(f"{why} {error}") from None
    parent = current_task()
    kept = KeptForRerun(_ascii(encoded), rerun_of, None if parent is None else parent.id)
    token = kept_for_rerun.set(kept)
    try:
        return task._submit_now(args, kwargs, options, backend)
    finally:
        kept_for_rerun.reset(token)


def rerun(extension: ThreadContext, task_id: str) -> TaskFuture[object]:
    """What :meth:`ThreadContext.rerun <flask_threadctx.ThreadContext.rerun>` does."""
    if not isinstance(task_id, str):
        raise TypeError(f"'rerun' takes a task id string, not {shown(task_id)}.")
    app = extension._current_app("rerun")
    state = app_state(app, "rerun")
    recorder = state.recorder
    if recorder is None:
        raise RuntimeError(
            f"'rerun' reads what a re-run needs from the task store, and {app.name!r} has"
            " none: set 'THREADCTX_TASK_STORE', and submit tasks with 'rerunnable=True'."
        )
    flush(app)  # this process's own submits included
    record = recorder.store.get(task_id)
    if record is None:
        raise LookupError(
            f"No task {shown(task_id)} of {app.name!r} is in its task store: it was never"
            " submitted, or it was removed since ('THREADCTX_KEEP_FINISHED')."
        )
    if record.rerun is None:
        raise ValueError(
            f"Task {task_id} ({record.name}) cannot be re-run: it was not submitted"
            " rerunnable, so the task store keeps nothing to run it again with. Declare its"
            " function with '@threadctx.task(rerunnable=True)' (or set"
            " 'THREADCTX_RERUNNABLE'), submit it through the task ('fn.submit(...)'), and"
            " re-run the tasks submitted from then on."
        )
    path, args, kwargs, context, kept = _read(record.rerun, task_id)
    task = _declared(extension, path, task_id)
    from .task import _engine

    options = check_options(_options_from(kept, task_id), _engine(task.backend))
    captured = rebuilt_capture(app, state.settings, context)

    def submit(_: None) -> tuple[TaskFuture[object] | None, BaseException | None]:
        try:
            return task._submit(tuple(args), kwargs, options, record.backend, task_id), None
        except BaseException as error:  # raised below, once the contexts are torn down
            return None, error

    future, error = captured.run(submit, None, f"the re-run of task {task_id}")
    if error is not None:
        raise error
    return t.cast("TaskFuture[object]", future)


def _read(
    payload: str, task_id: str
) -> tuple[str, list[t.Any], dict[str, t.Any], dict[str, t.Any], dict[str, t.Any]]:
    """The parts of a stored :attr:`~flask_threadctx.stores.base.Record.rerun`.

    :raise ValueError: it is not what :func:`submit_kept` wrote."""
    try:
        _, path, args, kwargs, meta = json_loads(payload)
        context, kept = meta["context"], meta["options"]
        if not all(
            isinstance(part, kind)
            for part, kind in ((path, str), (args, list), (kwargs, dict), (context, dict))
        ) or not isinstance(kept, dict):
            raise TypeError("a part of the wrong type")
    except KombuTagged as error:
        raise ValueError(
            f"Task {task_id} cannot be re-run here; nothing was submitted. {error}"
        ) from None
    except (ValueError, TypeError, KeyError) as error:
        raise ValueError(
            f"Task {task_id} cannot be re-run, and nothing was submitted: what the task store"
            f" keeps for it cannot be read ({type(error).__name__}: {error}). It was changed"
            " outside Flask-ThreadCtx, or written by a version that kept it otherwise."
        ) from None
    return path, args, kwargs, context, kept


def _declared(extension: ThreadContext, path: str, task_id: str) -> Task[t.Any, object]:
    """The task declared at ``path`` with ``extension``.

    :raise LookupError: there is none any more: removed, renamed, or no longer a task."""
    from .task import Task

    gone = f"Task {task_id} cannot be re-run, and nothing was submitted: its function {path!r}"
    try:
        found = find(path)
    except LookupError as error:
        raise LookupError(
            f"{gone} is no longer declared in this process ({error.__cause__ or error}): it"
            " was removed or renamed. Submit the function that took its place instead."
        ) from None
    if not isinstance(found, Task):
        raise LookupError(
            f"{gone} is no longer a task declared with '@threadctx.task' (it is"
            f" {shown(found)}). Declare it again to re-run its tasks."
        )
    if found._extension is not extension:
        raise LookupError(f"{gone} is a task of another 'ThreadContext' than this app's.")
    return t.cast("Task[t.Any, object]", found)


def _kept_options(options: cabc.Mapping[str, t.Any], why: str) -> dict[str, t.Any]:
    """``options``, checked, as JSON keeps them: ``retry_for`` by its classes' import paths;
    without when the original starts (see the module's docstring)."""
    kept: dict[str, t.Any] = {}
    for name, value in options.items():
        if value is None or name in _NOT_KEPT:
            continue
        if name == "expires" and isinstance(value, datetime.datetime):
            continue
        if name == "retry_for":
            kept[name] = [_class_path(cls, why) for cls in value]
            continue
        if name in ("queue", "exchange") and not isinstance(value, str):
            raise TypeError(
                f"{why} Give {name!r} as a name, not {shown(value)}: JSON keeps names only."
            )
        kept[name] = value
    kept["rerunnable"] = True  # a re-run can be re-run in turn
    return kept


def _class_path(cls: type[BaseException], why: str) -> str:
    path, findable = class_path(cls)
    if not findable:
        raise TypeError(
            f"{why} Its 'retry_for' holds {cls!r}, which a re-run cannot find by its import"
            f" path {path!r}: define the exception class at the top level of a module."
        )
    return path


def _options_from(kept: dict[str, t.Any], task_id: str) -> dict[str, t.Any]:
    """The options of a task as :func:`_kept_options` kept them."""
    options = dict(kept)
    if "retry_for" in options:
        classes = []
        for path in options["retry_for"]:
            try:
                classes.append(find(path))
            except LookupError as error:
                raise LookupError(
                    f"Task {task_id} cannot be re-run, and nothing was submitted: the class"
                    f" {path!r} of its 'retry_for' is no longer declared in this process"
                    f" ({error.__cause__ or error})."
                ) from None
        options["retry_for"] = tuple(classes)
    return options


def _ascii(encoded: str) -> str:
    """``encoded`` JSON with each lone surrogate (an undecodable byte of a file name, from
    :func:`os.fsdecode`) written as its escape: the same JSON, which every store can keep as
    text. JSON holds characters outside ASCII only in its strings, where an escape reads back
    as the character."""
    if encoded.isascii():
        return encoded
    return _SURROGATE.sub(lambda found: f"\\u{ord(found.group()):04x}", encoded)
