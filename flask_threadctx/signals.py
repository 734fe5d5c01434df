"""Blinker signals sent over the life of a task.

Every signal is sent with the real application object as the sender and the task's
:class:`~flask_threadctx.TaskInfo` as ``task``. Connect with ``signal.connect(receiver, app)`` to
hear one app only.
"""

from __future__ import annotations

import inspect
import typing as t
import weakref

import flask
from blinker import Namespace
from blinker import Signal
from blinker.base import ANY_ID

from .app_state import KEY

if t.TYPE_CHECKING:
    from blinker import NamedSignal

    from .app_state import AppState

_signals = Namespace()

task_submitted = _signals.signal("task-submitted")
"""Sent in the submitting thread once a task is queued (or, with ``THREADCTX_EAGER``, just before
it runs). Keyword arguments: ``task``.

A worker may take the task at once, so :data:`task_started`, even :data:`task_finished`, may reach
their receivers (in other threads or processes) before this one: a receiver that keeps state per
task must not assume this signal comes first. The task store does not.
"""

task_started = _signals.signal("task-started")
"""Sent in the worker thread, inside the task's contexts, right before the task's function is
called, so receivers can use ``current_app``, ``g`` and ``request``. Keyword arguments: ``task``.
"""

task_finished = _signals.signal("task-finished")
"""Sent in the worker thread, inside the task's contexts, after the task's function returned or
raised, before its app context is torn down. Keyword arguments: ``task``, ``result`` (``None`` if it
raised) and ``exception`` (``None`` if it returned). When the task's contexts could not be set up,
it is sent without them, with that error as ``exception``.
"""

task_failed = _signals.signal("task-failed")
"""Sent in the worker thread, inside the task's contexts, when the task's function raised, right
after :data:`task_finished`. Keyword arguments: ``task`` and ``exception``. Also sent, outside the
task's contexts, when setting them up or tearing them down failed the task; see
:doc:`/contract`.
"""

task_rejected = _signals.signal("task-rejected")
"""Sent in the submitting thread when a task is refused because the queue is full
(``THREADCTX_MAX_QUEUE``) or the pool was shut down. Keyword arguments: ``task`` and ``reason``
(the exception that ``submit`` then raises).
"""

task_cancelled = _signals.signal("task-cancelled")
"""Sent when a task will not run, or not to its end: cancelled before it started (a call to
:meth:`~concurrent.futures.Future.cancel` or ``cancel_task``, ``shutdown(cancel_futures=True)``,
a delayed task at shutdown, or the exit hook when ``THREADCTX_SHUTDOWN_TIMEOUT`` runs out),
in that thread, before any thread waiting on the task wakes; expired (``task.state`` is
``"expired"``), in the worker that found it so; or stopped when asked while it ran, in its
worker, inside its contexts after ``task_finished``. Keyword arguments: ``task``.
"""

task_retried = _signals.signal("task-retried")
"""Sent in the worker, inside the task's contexts, when an attempt of a task raised an error
its ``retry_for`` names and the task is retried: ``task.state`` is ``"retrying"``,
``task.retries`` counts this retry and ``task.due_at`` says when it starts. Keyword arguments:
``task``, ``exception`` (the attempt's) and ``delay`` (seconds).
"""

task_progress = _signals.signal("task-progress")
"""Sent in the task's own thread (on a Celery worker: there) when it reports its progress with
:func:`~flask_threadctx.report_progress`, at most every 0.1 seconds per task, and always for
its first and last report. Keyword arguments: ``task``, ``done``, ``total`` and ``note``.
"""


def send(signal: NamedSignal, app: flask.Flask, **kwargs: t.Any) -> None:
    """Send ``signal`` from ``app`` to each receiver in turn.

    Unlike :meth:`blinker.Signal.send`, a receiver that raises is logged through ``app.logger``
    and the remaining receivers still run: monitoring must never break a task, a submit or a
    cancel. That holds for a :exc:`BaseException` too (``KeyboardInterrupt``, an ``async``
    receiver's :exc:`asyncio.CancelledError`): raised through here, it would stop a worker
    between two steps of its bookkeeping. Callers check ``signal.receivers`` first, so a signal
    nobody listens to costs one attribute lookup.
    """
    for entry, plain in _receivers(signal, app):
        receiver = entry() if isinstance(entry, weakref.ref) else entry
        if receiver is None:  # collected; blinker has disconnected it already
            _changed()
            continue
        try:
            if plain:
                receiver(app, **kwargs)
            else:
                app.ensure_sync(receiver)(app, **kwargs)
        except BaseException:
            app.logger.exception(
                "Receiver %r of the %r signal raised; the task is not affected.",
                receiver,
                signal.name,
            )


Receivers = tuple[tuple[t.Any, bool], ...]
"""The receivers of one signal for one sender, as blinker keeps them (a callable, or a weak
reference to one), each with whether it can be called as it is, without ``ensure_sync``."""

_generation = [0]
"""Changed whenever a receiver of one of these signals is connected or disconnected."""


def _changed(*args: t.Any, **kwargs: t.Any) -> None:
    _generation[0] += 1


def _receivers(signal: NamedSignal, app: flask.Flask) -> Receivers:
    """The receivers of ``signal`` for ``app``, kept in its state until one is connected or
    disconnected: blinker's own ``receivers_for`` would cost three times as much for every
    task, and ``ensure_sync`` as much again for each receiver."""
    state: AppState | None = app.extensions.get(KEY)
    cache = {} if state is None else state.receivers  # an app without the extension: no cache
    cached = cache.get(signal.name)
    generation = _generation[0]
    if cached is not None and cached[0] == generation:
        return cached[1]
    found: Receivers
    by_sender = getattr(signal, "_by_sender", None)
    if by_sender is None:  # a blinker of another shape: its public API, and no cache
        return tuple((receiver, False) for receiver in signal.receivers_for(app))
    # Blinker identifies a sender that is not a bound method by its id().
    ids = by_sender.get(ANY_ID, set()) | by_sender.get(id(app), set())
    entries = [signal.receivers[i] for i in ids if i in signal.receivers]
    plain_app = type(app).ensure_sync is flask.Flask.ensure_sync and "ensure_sync" not in vars(app)
    found = tuple((entry, plain_app and not _is_coroutine(entry)) for entry in entries)
    cache[signal.name] = (generation, found)
    return found


def _is_coroutine(entry: t.Any) -> bool:
    """What ``Flask.ensure_sync`` asks of a receiver before it wraps it."""
    receiver = entry() if isinstance(entry, weakref.ref) else entry
    return inspect.iscoroutinefunction(receiver)


for _signal in _signals.values():
    # Instance-level, so that blinker tells these signals' connects and disconnects only.
    _signal.receiver_connected = Signal()
    _signal.receiver_connected.connect(_changed, weak=False)
    _signal.receiver_disconnected = Signal()
    _signal.receiver_disconnected.connect(_changed, weak=False)
