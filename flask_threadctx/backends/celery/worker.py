"""The worker side of the Celery backend: the one Celery task that runs every submitted function
(:func:`run_message`), :class:`WorkerSide` (the part of :class:`~.backend.CeleryBackend` that
runs a task that came as a message, on a worker, eagerly, or inline in a waiting parent, and
stores how it ended), the Celery signal hooks, connected by :func:`register` when a backend
registers its task on a Celery app (not when this module is imported), and ``flask threadctx
worker``.

:class:`WorkerSide` is a part of the backend's class in a module of its own: its methods take
the backend as ``self`` and use its state, which :mod:`.backend` declares.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import threading
import time
import typing as t

import celery
import celery.exceptions
import celery.signals
import flask
import redis.exceptions
from celery import states

from ... import control
from ... import signals
from ...app_state import app_state
from ...contexts.wire import rebuilt_capture
from ...contexts.wire import resolve
from ...errors import TaskTimeout
from ...future import TaskFuture
from ...model import TaskInfo
from ...options import Policy
from ...progress import Progress
from ...signals import task_submitted
from ...stores.base import storable_text
from .claims import CeleryRecords
from .expiry import book_expired
from .messages import json_dumps
from .messages import json_loads
from .messages import raise_error
from .messages import returning_json
from .messages import STARTED
from .messages import TASK_NAME
from .retries import policy_of
from .retries import RetryHere
from .state import CeleryState
from .state import CeleryTaskInfo
from .state import check_celery

if t.TYPE_CHECKING:
    import collections.abc as cabc

    from celery.backends.redis import RedisBackend

    from ..runner import RetryHook
    from .backend import CeleryBackend

# One logger for the whole backend, under the name it always had: users filter on it.
_logger = logging.getLogger("flask_threadctx.celery_backend")

# The attribute of a Celery app that holds the backend whose tasks it runs: a worker finds the
# Flask app of a message there. In a forked worker process, the app made again replaces it.
BACKEND_ATTRIBUTE = "_flask_threadctx_backend"


def register(made: celery.Celery, backend: CeleryBackend) -> None:
    """Make ``made`` run ``backend``'s tasks: register the generic task on it, and connect the
    Celery signal hooks (once per process; they find the backend on the app that sent)."""
    setattr(made, BACKEND_ATTRIBUTE, backend)
    # Neither Celery's ``track_started`` nor its result store: the claim announces the start
    # and 'store_outcome' stores the result with the records, a round trip each.
    made.task(
        name=TASK_NAME, bind=True, track_started=False, ignore_result=True, serializer="json"
    )(run_message)
    _connect_signals()


def _connect_signals() -> None:
    # Celery keys a receiver by its id and its sender: connecting again changes nothing.
    celery.signals.task_failure.connect(_on_celery_failure, weak=False)
    celery.signals.task_revoked.connect(_on_celery_revoked, weak=False)
    celery.signals.worker_ready.connect(_on_worker_ready, weak=False)
    celery.signals.worker_shutdown.connect(_on_worker_shutdown, weak=False)


class WorkerSide(CeleryState):
    """Runs tasks that came as messages, and stores how they ended."""

    def run_eagerly(
        self, info: TaskInfo, encoded: str, options: cabc.Mapping[str, object] | None
    ) -> TaskFuture[t.Any]:
        """Run the task now, from the message a worker would get, decoded, in fresh contexts;
        with ``options``, as the pool runs its own eager submits (each retry at once, here)."""
        if task_submitted.receivers:
            signals.send(task_submitted, self.app, task=info)
        _, path, args, kwargs, meta = json_loads(encoded)
        policy = Policy(options) if options else None
        return self.run_message_here(info, path, args, kwargs, meta, policy=policy)

    def run_message_here(
        self,
        info: TaskInfo,
        path: str,
        args: list[t.Any],
        kwargs: dict[str, t.Any],
        meta: t.Any,
        *,
        retry: RetryHook | None = None,
        policy: Policy | None = None,
    ) -> TaskFuture[t.Any]:
        """Run a task that came as a message, in contexts rebuilt from it, in this thread. A
        function this process cannot import (the code deployed here differs) fails the task at
        once, with the :exc:`LookupError` that says so, booked and signalled as any failure."""
        try:
            fn = returning_json(self.app, resolve(path))
        except LookupError as error:
            fn = functools.partial(raise_error, error)
        if control.asked and control.asked.get(info.id) is not None:
            # Asked to stop as it was claimed, or before this attempt: it never runs.
            fn = functools.partial(raise_error, control.stopped(info.id, "cancel"))
        captured = rebuilt_capture(self.app, self.settings, meta["context"])
        limit = meta.get("time_limit")
        if limit is not None:
            control.set_time_limit(info.id, limit)
        run = self.runner.run_here
        return run(info, captured, fn, tuple(args), kwargs, retry=retry, policy=policy)

    def run_delivered(
        self,
        task: t.Any,
        path: str,
        args: list[t.Any],
        kwargs: dict[str, t.Any],
        meta: dict[str, t.Any],
    ) -> t.Any:
        """Run a task a worker received, unless it was cancelled or its waiting parent ran it;
        raise what it raised, for Celery to store, or retry it per its ``retry_for``."""
        info = CeleryTaskInfo(
            t.cast(str, task.request.id), meta["name"], meta["parent_id"], meta["request"]
        )
        info.submitted_at = meta["submitted_at"]
        info.retries = task.request.retries or 0
        _, records = self._connect()
        started = f"{STARTED}{info.id}"
        reply = meta.get("reply")
        hearer = self.stop_hearer()
        hearer.claiming_to_run(info)
        claim, request = records.claim_to_run(
            info.id,
            "run",
            started,
            to_submitter=False,
            channels=[reply] if reply else [],
            worker=worker_name(task.request.hostname),
            stop=True,
        )
        hearer.claimed(info.id, claim == "run", request)
        if claim != "run":
            if claim == "cancelled":
                task.update_state(state=states.REVOKED)
            raise celery.exceptions.Ignore
        info._on_progress = PassProgressOn(records, reply, info.retries)
        policy = policy_of(meta.get("retry"))
        retry = None if policy is None else RetryHere(self.app, policy, records, hearer, reply)
        # Alive until its end is stored, however long that takes: see 'until_stored'.
        with records.beating(info.id):
            try:
                future = self.run_message_here(info, path, args, kwargs, meta, retry=retry)
                if info.progress is not None:
                    records.flush()  # the last report goes before the result
                error = future._exception
                stopped = info.state if info.state in ("cancelled", "timed_out") else None
                if error is not None and not isinstance(error, Exception):
                    # 'SystemExit' (the pool ending this process: a hard time limit, a cold
                    # shutdown), 'KeyboardInterrupt': not the task's outcome. As Celery does,
                    # let the process go; the worker's main process reports the task, once
                    # ('_on_celery_failure').
                    raise error
                if retry is not None and (retried := retry.by_celery(task, error, info)):
                    raise retried  # booked by it as the attempt failed, and sent to Celery
            finally:
                hearer.ended(info.id)  # a stop request is answered before the end is stored
            booked = until_stored(
                info.id,
                functools.partial(
                    self.store_outcome,
                    info.id,
                    future._result,
                    error,
                    task.request,
                    reply=reply,
                    ended_at=info.finished_at,  # not when a restarted Redis came back
                    state_of_task=stopped,
                ),
            )
            if not booked:
                self._ignored_end(records, info, info.state)
        if error is not None:
            raise error  # for Celery's log, events and signals; the result is stored
        return future._result

    @staticmethod
    def _ignored_end(records: CeleryRecords, info: TaskInfo, state: str) -> None:
        """Say, in the worker's log, that a task's end came after another one was booked:
        its worker was frozen (stopped, paused) long enough to be declared lost, say."""
        record = records.get(info.id)
        booked = "?" if record is None else record.state
        why = "" if record is None or record.error is None else f" ({record.error})"
        _logger.warning(
            "Task %s (%s) %s on this worker, but its end had been booked already as %s%s: this"
            " end is ignored. A worker frozen for two heartbeats is declared lost by the"
            " submitter.",
            info.id,
            info.name,
            state,
            booked,
            why,
        )

    def run_inline(self, future: TaskFuture[t.Any], message: list[t.Any]) -> None:
        """Run ``future``'s task, claimed for this process, from its ``message``; store and
        book its outcome, and resolve ``future``."""
        _, records = self._connect()
        _, path, args, kwargs, meta = json_loads(json_dumps(message))
        # To the records only: this process is the submitter, and its future has the task's
        # own TaskInfo, which the reports update at once.
        future.task._on_progress = PassProgressOn(records, None, 0)
        with records.beating(future.task.id):
            try:
                ran = self.run_message_here(future.task, path, args, kwargs, meta)
            finally:
                self.stop_hearer().ended(future.task.id)
        if future.task.progress is not None:
            records.flush()  # the last report goes before the result
        with self.lock:  # first, so that the listener leaves this future alone
            self.live.pop(future.task.id, None)
        state = future.task.state
        self.store_outcome(
            future.task.id,
            ran._result,
            ran._exception,
            state_of_task=state if state in ("cancelled", "timed_out") else None,
        )
        self.finished.append(future)
        future._claim()
        future._finish(ran._result, ran._exception)


class PassProgressOn:
    """What a task on a worker does with its progress: keep it in its record, and tell the
    submitter on ``reply``, both the same, escaped if need be; each report numbered, later
    ones higher, also those of a retry (``attempt``), so that whoever hears them keeps the
    last."""

    __slots__ = ("records", "reply", "seq")

    def __init__(self, records: CeleryRecords, reply: str | None, attempt: int) -> None:
        self.records = records
        self.reply = reply
        self.seq = attempt << 32

    def __call__(self, info: TaskInfo, progress: Progress) -> None:
        note = progress.note
        if note is not None and not note.isascii():
            progress = progress._replace(note=storable_text(note))
            info._progress = progress  # what its own process answers, too
        self.seq += 1  # in the task's own thread: report_progress is called from it alone
        self.records.progress_soon(info, progress, self.reply, self.seq)


def worker_name(hostname: str | None) -> str:
    """``"celery@host:pid"``: the worker, and its process that runs the task."""
    return f"{hostname or socket.gethostname()}:{os.getpid()}"


STORE_PATIENCE = 300.0
"""How long a worker tries to store how a task ended while Redis cannot be reached, in
seconds, keeping the task's sign of life meanwhile."""


def until_stored(task_id: str, store: t.Callable[[], bool]) -> bool:
    """Store a task's end with ``store``, trying again while Redis is away (restarted, say),
    for up to :data:`STORE_PATIENCE`: a task that ran must not be reported lost for want of
    its result. Return what ``store`` returns: whether the end was booked."""
    deadline = time.monotonic() + STORE_PATIENCE
    delay = 0.1
    while True:
        try:
            return store()
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as error:
            if time.monotonic() + delay > deadline:
                raise
            if delay == 0.1:
                _logger.warning(
                    "Could not store how task %s ended (%s); trying again for %g s.",
                    task_id,
                    error,
                    STORE_PATIENCE,
                )
            time.sleep(delay)  # a backoff between attempts, not a synchronisation
            delay = min(delay * 2, 5.0)


def run_message(
    task: t.Any,
    app_name: str,
    path: str,
    args: list[t.Any],
    kwargs: dict[str, t.Any],
    meta: dict[str, t.Any],
) -> t.Any:
    """The Celery task that runs every submitted function, in its app's fresh contexts."""
    backend: CeleryBackend | None = getattr(task.app, BACKEND_ATTRIBUTE, None)
    if backend is None or backend.app.name != app_name:
        raise RuntimeError(
            f"This worker has no Flask app {app_name!r} with Flask-ThreadCtx. Start it with"
            " 'flask --app YOUR_APP threadctx worker'; one Flask app per Celery app."
        )
    return backend.run_delivered(task, path, args, kwargs, meta)


_failures_stored: dict[str, None] = {}
"""The tasks whose failure :func:`_on_celery_failure` stored lately, oldest first."""
_failures_lock = threading.Lock()


def _on_celery_failure(
    sender: t.Any = None,
    task_id: str = "",
    exception: t.Any = None,
    einfo: t.Any = None,
    args: t.Any = None,
    **_: t.Any,
) -> None:
    """Store and book a task that failed outside its own code: its worker process was lost,
    or a hard time limit killed it. Celery reports it from the worker's main process and, the
    task ignoring results, stores nothing itself."""
    if getattr(sender, "name", None) != TASK_NAME:
        return
    if not isinstance(
        exception, (celery.exceptions.WorkerLostError, celery.exceptions.TimeLimitExceeded)
    ):
        return
    backend: CeleryBackend | None = getattr(sender.app, BACKEND_ATTRIBUTE, None)
    if backend is None:
        return
    with _failures_lock:
        # A hard time limit is reported up to three times (the limit, the pool's result, the
        # lost process): the first says what happened, and is the one stored and booked.
        if task_id in _failures_stored:
            return
        _failures_stored[task_id] = None
        if len(_failures_stored) > 1000:
            del _failures_stored[next(iter(_failures_stored))]
    state = None
    meta = args[4] if isinstance(args, (list, tuple)) and len(args) == 5 else {}
    own_limit = meta.get("time_limit") if isinstance(meta, dict) else None
    if isinstance(exception, celery.exceptions.TimeLimitExceeded) and own_limit is not None:
        # Its 'time_limit', and the grace after it, which Celery's hard limit adds up to.
        state = "timed_out"
        hard = exception.args[0] if exception.args else "?"
        hard = f"{hard:g}" if isinstance(hard, (int, float)) else hard
        exception = TaskTimeout(
            f"Task {task_id} ({meta.get('name', '?')}) ran past its time limit ('time_limit',"
            f" {own_limit:g} s) and did not stop within its grace ('THREADCTX_TIME_LIMIT_GRACE'):"
            f" at {hard} s its worker on {socket.gethostname()} killed the process running it."
            " Call 'check_cancelled()' or 'report_progress()' between steps, so that it stops"
            " when asked."
        )
    elif isinstance(exception, celery.exceptions.TimeLimitExceeded):
        # Celery's says only the number of seconds.
        name = meta.get("name", "?") if isinstance(meta, dict) else "?"
        limit = exception.args[0] if exception.args else "?"
        limit = f"{limit:g}" if isinstance(limit, (int, float)) else limit
        exception = celery.exceptions.TimeLimitExceeded(
            f"task {task_id} ({name}) ran past its hard time limit ('time_limit', {limit} s)"
            f" on {socket.gethostname()}, whose worker killed the process running it. It will"
            " not finish: make it faster, split it, or raise the limit (a 'soft_time_limit'"
            " below it lets the task clean up first)."
        )
    backend.store_outcome(
        task_id,
        None,
        exception,
        traceback_text=getattr(einfo, "traceback", None),
        state_of_task=state,
    )


def _on_celery_revoked(
    sender: t.Any = None, request: t.Any = None, expired: bool = False, **_: t.Any
) -> None:
    """Book a task revoked with Celery's own tools before it ran (one past its ``expires``:
    see :mod:`.expiry`), and tell its submitter. (A task cancelled through its future was
    claimed so already: this changes nothing.)"""
    if getattr(sender, "name", None) != TASK_NAME or request is None:
        return
    backend: CeleryBackend | None = getattr(sender.app, BACKEND_ATTRIBUTE, None)
    if backend is not None and expired:
        book_expired(backend, request.id, request.expires)
    elif backend is not None:
        result_backend, records = backend._connect()
        task_id = request.id
        records.claim(
            task_id,
            "cancelled",
            revoked_message(result_backend, task_id),
            channels=[result_backend.get_key_for_task(task_id)],
        )


def _on_worker_ready(sender: t.Any = None, **_: t.Any) -> None:
    """In a worker's main process: renew the sign of life of the tasks its pool processes
    run, from a thread that no task can starve. A task that holds the GIL for long (a C call,
    a long regular expression) starves every other thread of its own process, its heartbeat
    included; the main process sees a pool process die, and says so itself."""
    backend: CeleryBackend | None = getattr(getattr(sender, "app", None), BACKEND_ATTRIBUTE, None)
    if backend is not None and not backend.settings.eager:
        backend._connect()[1].beat_for(_running_in_pool, _held_in_pool)


def _on_worker_shutdown(sender: t.Any = None, **_: t.Any) -> None:
    """A worker that stops gives the tasks it received and did not start back to the broker
    at once: they wait in the queue, not for a redelivery."""
    backend: CeleryBackend | None = getattr(getattr(sender, "app", None), BACKEND_ATTRIBUTE, None)
    records = None if backend is None else backend.records_if_connected()
    if records is not None:
        try:
            records.let_go()
        except Exception:  # Redis away: their submitters will say when they come again
            _logger.exception("Could not say that this worker holds its tasks no more.")


def _held_in_pool() -> list[str]:
    """The ids of the tasks this worker has received and not yet started: prefetched, or
    waiting for their ``eta``. Unacknowledged, they come back from the broker only after its
    visibility timeout if the worker is lost."""
    from celery.worker import state

    return [
        request.id
        for request in list(state.requests.values())  # a copy made under the GIL
        if request.type == TASK_NAME and request.worker_pid is None
    ]


def _running_in_pool() -> list[str]:
    """The ids of the tasks this worker's pool has started and not yet ended."""
    from celery.worker import state

    return [
        request.id
        for request in list(state.requests.values())  # a copy made under the GIL
        if request.type == TASK_NAME and request.worker_pid is not None
    ]


def revoked_message(result_backend: RedisBackend, task_id: str) -> str:
    """The message that says a task was cancelled, as Celery's result backend writes it."""
    error = celery.exceptions.TaskRevokedError("cancelled")
    meta = {
        "status": states.REVOKED,
        "result": result_backend.encode_result(error, states.REVOKED),
        "task_id": task_id,
        "children": [],
    }
    return t.cast(str, result_backend.encode(meta))


def serve(app: flask.Flask, script_info: t.Any, argv: list[str]) -> None:
    """Run a Celery worker for ``app``'s tasks (``flask threadctx worker``): each process of a
    prefork pool makes its own app, through the same factory as ``script_info``."""
    backend = app_state(app, "worker").celery
    if backend is None:
        raise RuntimeError(
            f"{app.name!r} has no Celery backend: set 'THREADCTX_CELERY' (or"
            " 'THREADCTX_CELERY_APP') in its config."
        )
    made = backend.celery
    check_celery(made)

    def make_app_again(**_: t.Any) -> None:
        # A forked pool process: the app, its connections and its pool are the parent's
        # copies. The factory makes this process its own; its 'init_app' takes over the name.
        from flask.cli import ScriptInfo

        fresh = ScriptInfo(
            app_import_path=script_info.app_import_path, create_app=script_info.create_app
        ).load_app()
        setattr(made, BACKEND_ATTRIBUTE, app_state(fresh, "worker").backend("celery"))

    if script_info is not None:
        celery.signals.worker_process_init.connect(make_app_again, weak=False)
    made.worker_main(["worker", *argv])
