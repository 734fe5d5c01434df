"""The Celery backend: ``submit()`` sends the task to Celery workers, which rebuild its contexts.

One generic Celery task, :data:`TASK_NAME`, runs every submitted function, found on the worker by
its import path. The submitting process keeps one :class:`_Listener` thread on one Redis
connection, subscribed to a reply channel of the process before any task is published: workers
say there when a task starts, how far it got and how it ended, and the listener resolves the
task's :class:`~flask_threadctx.TaskFuture`. Task records shared by
every process (:class:`~flask_threadctx.records.RedisTaskRecords`) answer ``get_task`` and
``stats`` for tasks of other processes, and decide races: a cancel against a worker starting the
task, a waiting parent running its child itself against a worker taking it.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import datetime
import functools
import json
import logging
import math
import numbers
import os
import queue
import socket
import threading
import time
import traceback
import typing as t
import uuid
import weakref

import celery
import celery.exceptions
import celery.signals
import flask
import redis
import redis.exceptions
from celery import states
from celery.utils.saferepr import saferepr
from celery.utils.serialization import get_pickleable_exception
from celery.utils.serialization import UnpickleableExceptionWrapper
from kombu.entity import Exchange
from kombu.entity import Queue
from kombu.utils import json as kombu_json

from . import signals
from .config import shown
from .executor import current_task
from .executor import find_task
from .executor import task_name
from .executor import TaskInfo
from .executor import wait_until_done
from .future import PENDING
from .future import TaskFuture
from .progress import Progress
from .records import PROGRESS_MESSAGE
from .records import RedisTaskRecords
from .remote import BrokerUnavailable
from .remote import find
from .remote import import_path
from .remote import message_context
from .remote import rebuilt_capture
from .remote import RemoteTaskError
from .remote import RemoteTraceback
from .remote import resolve
from .signals import task_cancelled
from .signals import task_rejected
from .signals import task_submitted
from .store import storable_text

if t.TYPE_CHECKING:
    import collections.abc as cabc

    from celery.backends.redis import RedisBackend
    from flask.ctx import AppContext

    from .config import Settings
    from .executor import Pool
    from .extension import ThreadContext
    from .store import Record
    from .store import TaskStore

R = t.TypeVar("R")

TASK_NAME = "flask_threadctx.run"
"""The name of the one Celery task that runs every submitted function."""

PUBLISH_OPTIONS = frozenset(
    ("queue", "routing_key", "exchange", "priority", "countdown", "eta", "expires")
)
"""The options of ``task(backend="celery", ...)`` that go to Celery with each message."""

RETRY_OPTIONS = frozenset(("max_retries", "retry_for", "retry_delay"))
"""The options of ``task(backend="celery", ...)`` that the worker reads when the task raises."""

TIME_LIMITS = ("soft_time_limit", "time_limit")
"""The options of ``task(backend="celery", ...)`` that Celery's worker enforces, in seconds: a
soft limit raises ``SoftTimeLimitExceeded`` in the task, a hard one kills
its pool process."""

TASK_OPTIONS = PUBLISH_OPTIONS | RETRY_OPTIONS | frozenset(TIME_LIMITS)

_logger = logging.getLogger(__name__)
_json_dumps: t.Callable[[t.Any], str] = kombu_json.dumps
_json_loads: t.Callable[[str], t.Any] = kombu_json.loads

# The attribute of a Celery app that holds the backend whose tasks it runs: a worker finds the
# Flask app of a message there. In a forked worker process, the app made again replaces it.
_BACKEND_ATTRIBUTE = "_flask_threadctx_backend"


MAX_SECONDS = 365 * 24 * 3600
"""The most seconds that ``time_limit``, ``soft_time_limit``, ``countdown``, ``expires`` and
``retry_delay`` take, and how far ahead ``eta`` and ``expires`` may lie: one year. Beyond the
range of a float, or of a date, Celery fails to send the task or its worker fails to run it;
long before that, a message held for later sits unacknowledged in the broker."""

# Each option in seconds, and whether 0 is one of its values.
_SECONDS = {
    "soft_time_limit": False,
    "time_limit": False,
    "countdown": True,
    "expires": False,
    "retry_delay": True,
}


def check_options(options: cabc.Mapping[str, t.Any]) -> dict[str, t.Any]:
    """``options`` as Celery is sent them: every number of seconds a :class:`float`.

    :raise TypeError: ``options`` has a name that ``task(backend="celery")`` does not take,
        or a value of the wrong type.
    :raise ValueError: a value out of its range (see :data:`MAX_SECONDS`), or the soft time
        limit not below the hard one."""
    unknown = sorted(set(options) - TASK_OPTIONS)
    if unknown:
        raise TypeError(
            f"'task(backend=\"celery\")' does not take {', '.join(map(repr, unknown))}. It takes"
            f" {', '.join(sorted(TASK_OPTIONS))}."
        )
    checked = dict(options)
    retry_for = options.get("retry_for", ())
    if not isinstance(retry_for, tuple) or not all(
        isinstance(cls, type) and issubclass(cls, BaseException) for cls in retry_for
    ):
        raise TypeError(f"'retry_for' must be a tuple of exception classes, not {retry_for!r}.")
    for name, zero in _SECONDS.items():
        value = options.get(name)
        if value is None or (name == "expires" and isinstance(value, datetime.datetime)):
            continue
        checked[name] = _seconds(name, value, zero)
    if options.get("eta") is not None:
        _check_date("eta", options["eta"])
    if isinstance(options.get("expires"), datetime.datetime):
        _check_date("expires", options["expires"])
    if options.get("countdown") is not None and options.get("eta") is not None:
        raise TypeError(
            "Give 'countdown' or 'eta', not both: Celery would run the task at the countdown."
        )
    for name, least, most in (("max_retries", 0, None), ("priority", 0, 255)):
        value = options.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name!r} must be an integer, not {shown(value)}.")
        if value < least or (most is not None and value > most):
            bounds = f"from {least} to {most}" if most is not None else f"{least} or more"
            raise ValueError(f"{name!r} must be an integer {bounds}, not {shown(value)}.")
    for name, kinds in (
        ("queue", (str, Queue)),
        ("exchange", (str, Exchange)),
        ("routing_key", (str,)),
    ):
        value = options.get(name)
        if value is not None and not isinstance(value, kinds):
            raise TypeError(
                f"{name!r} must be a {' or a '.join(kind.__name__ for kind in kinds)}, not"
                f" {shown(value)}."
            )
    soft, hard = (checked.get(name) for name in TIME_LIMITS)
    if soft is not None and hard is not None and soft >= hard:
        raise ValueError(
            f"'soft_time_limit' ({soft:g}) must be less than 'time_limit' ({hard:g}): the soft"
            " limit lets the task clean up before the hard one kills it."
        )
    start = checked.get("eta") if checked.get("countdown") is None else checked["countdown"]
    expires = checked.get("expires")
    if (
        start is not None
        and expires is not None
        and isinstance(start, float) == isinstance(expires, float)
        and start >= expires
    ):
        when = {
            name: value.isoformat() if isinstance(value, datetime.datetime) else f"{value:g} s"
            for name, value in (("expires", expires), ("start", start))
        }
        raise ValueError(
            f"'expires' ({when['expires']}) must come after the start ('countdown' or 'eta',"
            f" {when['start']}): every task would expire before it runs."
        )
    return checked


def _seconds(name: str, value: t.Any, zero: bool) -> float:
    """``value``, a number of seconds, as a float within ``0``..:data:`MAX_SECONDS`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        kind = "a number of seconds or an aware datetime" if name == "expires" else None
        raise TypeError(f"{name!r} must be {kind or 'a number of seconds'}, not {value!r}.")
    try:
        seconds = float(value)
    except OverflowError:
        seconds = math.inf if t.cast(float, value) > 0 else -math.inf
    if seconds < 0 or (seconds == 0 and not zero) or math.isnan(seconds):
        least = "0 or more" if zero else "above 0"
        raise ValueError(f"{name!r} must be a number of seconds {least}, not {shown(value)}.")
    if seconds > MAX_SECONDS:
        leave_out = " Leave it out for no limit." if name in TIME_LIMITS else ""
        raise ValueError(
            f"{name!r} must be at most {MAX_SECONDS} seconds (365 days), not {shown(value)}."
            f"{leave_out}"
        )
    return seconds


def _check_date(name: str, value: t.Any) -> None:
    """:raise TypeError: ``value`` is not a datetime.
    :raise ValueError: it is naive, or further off than :data:`MAX_SECONDS`."""
    example = "such as 'datetime.now(timezone.utc) + timedelta(hours=1)'"
    if not isinstance(value, datetime.datetime):
        instead = " For a delay, give 'countdown' in seconds." if name == "eta" else ""
        raise TypeError(
            f"{name!r} must be an aware datetime, {example}, not {shown(value)}.{instead}"
        )
    if value.utcoffset() is None:
        raise ValueError(
            f"{name!r} must be an aware datetime, {example}, not the naive {value!r}: its time"
            " zone would be a guess."
        )
    now = datetime.datetime.now(datetime.timezone.utc)
    if value - now > datetime.timedelta(seconds=MAX_SECONDS):
        raise ValueError(f"{name!r} must lie at most 365 days ahead, not at {value.isoformat()}.")
    if name == "expires" and value <= now:
        raise ValueError(
            f"'expires' must lie ahead, not at {value.isoformat()}: every task would expire"
            " before it runs."
        )


def make_celery(app: flask.Flask, settings: Settings) -> celery.Celery:
    """The Celery app of ``THREADCTX_CELERY``: JSON only."""
    made = celery.Celery(app.import_name, set_as_current=False)
    made.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    made.conf.update(settings.celery or {})
    return made


def load_celery(path: str) -> celery.Celery:
    """The Celery app at ``path`` (``module:name``), for ``THREADCTX_CELERY_APP``."""
    try:
        found = resolve(path)
    except LookupError as error:
        raise RuntimeError(f"'THREADCTX_CELERY_APP' = {path!r}: {error}") from None
    if not isinstance(found, celery.Celery):
        raise TypeError(f"'THREADCTX_CELERY_APP' = {path!r} is {found!r}, not a Celery app.")
    return found


def _check_celery(made: celery.Celery) -> None:
    conf = made.conf
    url = str(conf.result_backend or "")
    if not url.startswith(("redis://", "rediss://", "redis+socket://")):
        raise ValueError(
            "The Celery backend of Flask-ThreadCtx needs a Redis result backend, which it"
            f" listens to for results and keeps task records in; 'result_backend' is {url!r}."
            " Set it to 'redis://host:port/db'."
        )
    if conf.result_serializer != "json" or "json" not in (conf.accept_content or ()):
        raise ValueError(
            "The Celery backend of Flask-ThreadCtx sends and accepts JSON only, so that no"
            " process ever unpickles what comes from the broker: set 'result_serializer' to"
            " 'json' and keep 'json' in 'accept_content'."
        )


class _LazyRecords:
    """The Celery backend's records, connected when first used, not when the app is made."""

    def __init__(self, backend: CeleryBackend) -> None:
        self._backend = backend

    def write(self, records: cabc.Sequence[Record]) -> None:
        self._backend._connect()[1].write(records)

    def get(self, task_id: str) -> Record | None:
        return self._backend._connect()[1].get(task_id)

    def counts(self) -> dict[str, int]:
        return self._backend._connect()[1].counts()

    def recent(
        self, *, state: str | None = None, name: str | None = None, limit: int = 50
    ) -> list[Record]:
        return self._backend._connect()[1].recent(state=state, name=name, limit=limit)

    def children(self, task_id: str) -> list[Record]:
        return self._backend._connect()[1].children(task_id)

    def history(self, seconds: int = 300) -> list[dict[str, int]]:
        return self._backend._connect()[1].history(seconds)


class CeleryTaskInfo(TaskInfo):
    """The :class:`TaskInfo` of a task that runs on a Celery worker."""

    __slots__ = ("_progress_seq", "redelivery_at")
    backend = "celery"

    _progress_seq: int
    """The number of the report in ``progress``, as the worker numbered it; unset: none."""

    def __init__(self, id: str, name: str, parent_id: str | None, request: str | None) -> None:
        super().__init__(id, name, parent_id, request)
        self.redelivery_at: float | None = None
        """While the task is pending: when the broker delivers it again (a Unix time), the
        worker that had received it (prefetched, not started) being lost. ``None``
        otherwise. See :doc:`/scaling`, "Delivery"."""

    @classmethod
    def of(cls, record: Record) -> CeleryTaskInfo:
        """The task as ``record`` has it."""
        info = cls(record.id, record.name, record.parent_id, record.request)
        info.state = record.state
        info.submitted_at = record.submitted_at
        info.started_at = record.started_at
        info.finished_at = record.finished_at
        info.redelivery_at = record.redelivery_at
        if record.progress is not None:
            info._progress = record.progress
        return info


class _ForeignTaskInfo(CeleryTaskInfo):
    """Of a task that another process submitted: its progress is read from the records at
    each ``get_task``, as its worker tells only the submitter."""

    __slots__ = ()


class CeleryBackend:
    """Runs the tasks of one app on Celery workers; see :doc:`/scaling`.

    :param runner: the app's thread pool, which runs the tasks that reach this process: on a
        worker, in eager mode, and children run by their waiting parent.
    """

    name: t.ClassVar[str] = "celery"

    def __init__(
        self, app: flask.Flask, settings: Settings, extension: ThreadContext, runner: Pool
    ) -> None:
        self.app = app
        self.settings = settings
        self.extension = extension
        self.runner = runner
        self._celery: celery.Celery | None = None
        if settings.celery is not None or (settings.celery_app is None and settings.eager):
            self._celery = make_celery(app, settings)
            self._register(self._celery)
        self._result_backend: RedisBackend | None = None
        self._records: RedisTaskRecords | None = None
        self._lock = threading.Lock()
        self._listener: _Listener | None = None
        self._listener_lock = threading.Lock()  # held while connecting: not 'self._lock'
        self._sending: _Sender | None = None
        self._live: dict[str, TaskFuture[t.Any]] = {}
        self._finished: collections.deque[TaskFuture[t.Any]] = collections.deque(
            maxlen=settings.keep_finished
        )
        self._messages: dict[str, list[t.Any]] = {}  # of children a waiting parent may run
        self._watched: set[str] = set()  # live tasks of other processes, from 'get'
        self._replies = f"threadctx-replies-{uuid.uuid4()}"
        self._shut_down = False
        # Running tasks found without a sign of life, and when (monotonic): the listener's.
        self._suspects: dict[str, float] = {}
        self._stranded: dict[str, float] = {}  # likewise, pending tasks no worker holds now

    # -- Celery -------------------------------------------------------------------------------

    @property
    def celery(self) -> celery.Celery:
        """The Celery app tasks are sent with."""
        made = self._celery
        if made is None:
            assert self.settings.celery_app is not None
            made = load_celery(self.settings.celery_app)
            self._register(made)
            self._celery = made
        return made

    def _register(self, made: t.Any) -> None:
        setattr(made, _BACKEND_ATTRIBUTE, self)
        # Neither Celery's ``track_started`` nor its result store: the claim announces the start
        # and '_store_outcome' stores the result with the records, a round trip each.
        made.task(
            name=TASK_NAME, bind=True, track_started=False, ignore_result=True, serializer="json"
        )(_run_message)

    @property
    def records(self) -> TaskStore:
        """The records of the app's tasks, as a task store: connected on first use."""
        return _LazyRecords(self)

    def _connect(self) -> tuple[RedisBackend, RedisTaskRecords]:
        """The result backend and records shared by every thread of this process."""
        records = self._records
        if records is None:
            with self._lock:
                if self._records is None:
                    made = self.celery
                    _check_celery(made)
                    result_backend = t.cast("RedisBackend", made._get_backend())
                    self._result_backend = result_backend
                    expires = int(made.conf.result_expires.total_seconds())
                    self._records = RedisTaskRecords(
                        _bounded(result_backend.client, self.settings.celery_submit_timeout),
                        self.app.name,
                        expires or 86400,
                        self.settings.celery_heartbeat,
                        self.settings.keep_finished,
                    )
                records = self._records
        assert self._result_backend is not None
        return self._result_backend, records

    # -- submitting -------------------------------------------------------------------------

    def submit(
        self,
        app: flask.Flask,
        app_ctx: AppContext | None,
        fn: t.Callable[..., R],
        args: tuple[t.Any, ...],
        kwargs: dict[str, t.Any],
        options: cabc.Mapping[str, t.Any] | None = None,
    ) -> TaskFuture[R]:
        """Send ``fn(*args, **kwargs)`` to a Celery worker, with the contexts active now.

        :raise TypeError: ``fn``, its arguments or the request cannot cross to a worker.
        :raise BrokerUnavailable: the broker or the result backend cannot be reached, or did
            not answer within ``THREADCTX_CELERY_SUBMIT_TIMEOUT``; the task is booked rejected.
        :raise RuntimeError: the backend was shut down.
        """
        path = import_path(fn)
        parent = current_task()
        context = message_context(app, self.settings, app_ctx)
        request_data = context.get("request")
        label = f"{request_data['method']} {request_data['path']}" if request_data else None
        info = CeleryTaskInfo(
            str(uuid.uuid4()),
            task_name(fn),
            None if parent is None else parent.id,
            parent.request if parent is not None and parent.request else label,
        )
        meta = {
            "name": info.name,
            "parent_id": info.parent_id,
            "request": info.request,
            "submitted_at": info.submitted_at,
            "context": context,
            "reply": self.reply_channel,
        }
        message = [app.name, path, list(args), kwargs, meta]
        encoded = _encode(message, fn)
        if self._shut_down:
            self._reject(info, RuntimeError(f"The Celery backend of {app.name!r} was shut down."))
        if self.settings.eager:
            return self._run_eagerly(info, encoded)
        # Made here, so that what Celery refuses in it raises as itself, not as a broker down.
        prepared = self._task_message(info, message, encoded, options or {})
        future: TaskFuture[R] = TaskFuture(info, self, None, None, (), {})
        result_backend, records = self._connect()
        with self._lock:
            self._live[info.id] = future
        given_up = threading.Event()
        try:
            self._within_bound(
                functools.partial(self._send, result_backend, prepared, given_up),
                given_up,
            )
        except BrokerUnavailable as error:
            with self._lock:
                self._live.pop(info.id, None)
            # Booked once Redis answers again: if the broker took the message after all (it
            # hung, then went on), the rejection and the worker's claim decide who won.
            records.reject_soon(info, self.reply_channel)
            self._reject(info, error)
        # After the publish, so that the writer thread does not hold it up; a worker that
        # claims the task first is no matter (see 'RedisTaskRecords.add_soon').
        records.add_soon(info, self.reply_channel)
        if parent is not None and parent.id in self.runner._live:
            # A task waiting for this child may run it itself; see ``before_wait``.
            self._messages[info.id] = message
        if task_submitted.receivers:
            signals.send(task_submitted, app, task=info)
        return future

    def _send(
        self,
        result_backend: RedisBackend,
        prepared: tuple[t.Any, dict[str, t.Any]],
        given_up: threading.Event,
    ) -> None:
        """What a submit waits for Redis for: listen for the task's end, then publish it,
        unless the submit has given up on it meanwhile."""
        try:
            listener = self._listener_for(result_backend)
        except Exception as error:
            raise _unavailable("the result backend", error) from None
        lost = listener.lost
        if lost is not None and not listener.reconnect_now(self.settings.celery_submit_timeout):
            # The task could run, but nobody would hear how it ended.
            raise _unavailable("the result backend", listener.lost or lost)
        if given_up.is_set():
            return
        try:
            self._publish(*prepared)
        except Exception as error:
            raise _unavailable("the broker", error) from None

    def _within_bound(self, send: t.Callable[[], None], given_up: threading.Event) -> None:
        """Run ``send`` on one of the backend's sender threads, waiting for it at most
        ``THREADCTX_CELERY_SUBMIT_TIMEOUT``: a Redis that hangs (stopped, not closed) would
        otherwise hold the calling thread until its socket timeout, if any. A send that has
        not started by then never starts, nor publishes if it has not yet; a publish under
        way may reach the broker once Redis goes on (the task is then rejected by claim)."""
        timeout = self.settings.celery_submit_timeout
        sending = self._sender().send(send)
        try:
            sending.result(timeout)
        except concurrent.futures.TimeoutError:
            given_up.set()
            sending.cancel()
            raise BrokerUnavailable(
                f"The task was not sent: Redis did not answer within {timeout:g} s"
                " ('THREADCTX_CELERY_SUBMIT_TIMEOUT'). It is booked as rejected; try again"
                " later, or answer '503 Service Unavailable'."
            ) from None

    def _sender(self) -> _Sender:
        sender = self._sending
        if sender is None or sender.pid != os.getpid():  # none yet, or the parent's, forked
            with self._lock:
                sender = self._sending
                if sender is None or sender.pid != os.getpid():
                    sender = self._sending = _Sender(f"threadctx-celery-send-{self.app.name}")
                    weakref.finalize(self, sender.stop)  # its threads end with the backend
        return sender

    def _task_message(
        self,
        info: TaskInfo,
        message: list[t.Any],
        encoded: str,
        options: cabc.Mapping[str, t.Any],
    ) -> tuple[t.Any, dict[str, t.Any]]:
        """The message Celery's worker takes, and where it goes: no round trip to Redis."""
        _, path, args, kwargs, _ = message
        # Not Celery's ``send_task``: it would also subscribe for the result, on a connection
        # of the calling thread's own; the result comes on the process's reply channel.
        made = self.celery
        amqp = made.amqp
        soft_time_limit, time_limit = (options.get(k) for k in TIME_LIMITS)
        options = {k: v for k, v in options.items() if k in PUBLISH_OPTIONS}
        countdown, eta, expires = (options.pop(k, None) for k in ("countdown", "eta", "expires"))
        routed = amqp.router.route(options, TASK_NAME, message, {}, made.tasks[TASK_NAME])
        task_message = amqp.create_task_message(
            info.id,
            TASK_NAME,
            message,
            {},
            countdown,
            eta,
            expires=expires,
            time_limit=time_limit,
            soft_time_limit=soft_time_limit,
            parent_id=info.parent_id,
            create_sent_event=made.conf.task_send_sent_event,
            ignore_result=True,
            # What Celery's logs and monitors show: the function and its arguments, not the
            # envelope (whose repr would also cost more than the rest of the submit).
            shadow=path,
            argsrepr=saferepr(args),
            kwargsrepr=saferepr(kwargs),
        )
        # The body as Celery's protocol 2 has it, from the arguments encoded once, at submit.
        _, _, (_, no_kwargs, embed), _ = task_message
        body = f"[{encoded}, {_json_dumps(no_kwargs)}, {_json_dumps(embed)}]"
        return task_message._replace(body=body), routed

    def _publish(self, task_message: t.Any, routed: dict[str, t.Any]) -> None:
        made = self.celery
        with made.producer_or_acquire() as producer:
            made.amqp.send_task_message(
                producer,
                TASK_NAME,
                task_message,
                content_type="application/json",
                content_encoding="utf-8",
                **routed,
            )

    def _reject(self, info: TaskInfo, error: Exception) -> t.NoReturn:
        info.state = "rejected"
        info.finished_at = time.time()
        if task_rejected.receivers:
            signals.send(task_rejected, self.app, task=info, reason=error)
        raise error

    def _run_eagerly(self, info: TaskInfo, encoded: str) -> TaskFuture[t.Any]:
        """Run the task now, from the message a worker would get, decoded, in fresh contexts."""
        if task_submitted.receivers:
            signals.send(task_submitted, self.app, task=info)
        _, path, args, kwargs, meta = _json_loads(encoded)
        return self._run_here(info, path, args, kwargs, meta)

    def _run_here(
        self, info: TaskInfo, path: str, args: list[t.Any], kwargs: dict[str, t.Any], meta: t.Any
    ) -> TaskFuture[t.Any]:
        """Run a task that came as a message, in contexts rebuilt from it, in this thread. A
        function this process cannot import (the code deployed here differs) fails the task at
        once, with the :exc:`LookupError` that says so, booked and signalled as any failure."""
        try:
            fn = _returning_json(self.app, resolve(path))
        except LookupError as error:
            fn = functools.partial(_raise, error)
        captured = rebuilt_capture(self.app, self.settings, meta["context"])
        return self.runner.run_here(info, captured, fn, tuple(args), kwargs)

    @property
    def reply_channel(self) -> str:
        """Where workers tell this process that its tasks started and ended: one channel
        for all of them, rather than one per task, and a new one in a forked process. Made
        from the pid, not drawn at random: the first submits of a process, from several
        threads at once, must all name the channel its listener subscribes to."""
        return f"{self._replies}-{os.getpid()}"

    def _listener_for(self, result_backend: RedisBackend) -> _Listener:
        listener = self._listener
        if listener is None or listener.pid != os.getpid():
            with self._listener_lock:
                listener = self._listener
                if listener is None or listener.pid != os.getpid():
                    listener = self._listener = _Listener(self, result_backend)
                    listener.start()
        return listener

    # -- what the listener hears -----------------------------------------------------------

    def on_state(self, task_id: str, meta: dict[str, t.Any]) -> None:
        """Apply the state ``meta`` that the result backend holds for ``task_id``."""
        future = self._live.get(task_id)
        if future is None:
            return
        status = meta.get("status")
        info = future.task
        if status == states.STARTED:
            if future._claim():
                info.state = "running"
                info.started_at = info.started_at or time.time()
                if isinstance(info, CeleryTaskInfo):
                    info.redelivery_at = None
            return
        if status not in states.READY_STATES:
            return
        with self._lock:
            if self._live.pop(task_id, None) is None:
                return
            self._watched.discard(task_id)
        self._messages.pop(task_id, None)
        info.finished_at = time.time()
        self._finished.append(future)
        if status == states.REVOKED:  # revoked with Celery's own tools
            info.state = "cancelled"
            future._cancelled_elsewhere()
            return
        if status == states.SUCCESS:
            info.state = "succeeded"
            future._finish(meta.get("result"), None)
        else:
            info.state = "failed"
            future._finish(None, self._exception(meta))

    def catch_up(self, task_ids: cabc.Collection[str]) -> int:
        """Apply what Redis holds of live tasks whose messages this process may have missed,
        published while its listener was away; return how many moved on."""
        futures = {i: f for i in task_ids if (f := self._live.get(i)) is not None}
        if not futures:
            return 0
        result_backend, records = self._connect()
        ids = list(futures)
        keys = [result_backend.get_key_for_task(task_id) for task_id in ids]
        moved = 0
        found = records.results_and_states(ids, keys)
        for task_id, (result, state) in zip(ids, found, strict=True):
            future = futures[task_id]
            before = future._state
            if result is not None:
                self.on_state(task_id, result_backend.decode_result(result))
            elif state == "running":
                self.on_state(task_id, {"status": states.STARTED})
            moved += future._state != before
        return moved

    def on_progress(self, task_id: str, progress: Progress, seq: int | None = None) -> None:
        """Keep the progress a worker reported for one of this process's tasks, if it is
        later than the one kept: see :meth:`keep_progress`."""
        future = self._live.get(task_id)
        if future is not None:
            self.keep_progress(future.task, progress, -1 if seq is None else seq)

    def keep_progress(self, info: TaskInfo, progress: Progress | None, seq: int) -> None:
        """Keep ``progress``, the report numbered ``seq`` by the worker, unless a later one is
        kept already: reports that come by two ways (the reply channel, the records) or again
        (a batch written twice) never take a task's progress back. ``seq`` -1: unnumbered, by
        a worker of an older version, kept as it comes."""
        if progress is None:
            return
        with self._lock:
            if seq < 0 or seq >= getattr(info, "_progress_seq", -1):
                if isinstance(info, CeleryTaskInfo):
                    info._progress_seq = seq
                info._progress = progress

    def _exception(self, meta: dict[str, t.Any]) -> BaseException:
        assert self._result_backend is not None
        stored = meta.get("result")
        try:
            error: t.Any = self._result_backend.exception_to_python(stored)
        except Exception as problem:  # a stored value that is not an exception at all
            error = RemoteTaskError("Exception", f"{stored!r} ({problem})")
        if not isinstance(error, BaseException):
            error = RemoteTaskError("Exception", repr(stored))
        if isinstance(error, UnpickleableExceptionWrapper):
            # How Celery stores an exception whose class it could not import where it was raised.
            message = " ".join(map(str, error.exc_args)) if error.exc_args else error.text
            error = RemoteTaskError(f"{error.exc_module}.{error.exc_cls_name}", message)
        cls = type(error)
        if cls.__module__ == celery.exceptions.__name__ and not hasattr(
            celery.exceptions, cls.__name__
        ):
            # Celery made the class up: the original cannot be imported here.
            original = stored.get("exc_module", "?") if isinstance(stored, dict) else "?"
            error = RemoteTaskError(f"{original}.{cls.__name__}", str(error))
        traceback_text = meta.get("traceback")
        if traceback_text:
            error.__cause__ = RemoteTraceback(traceback_text)
        return t.cast(BaseException, error)

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
        _, records = self._connect()
        started = f"{_STARTED}{info.id}"
        reply = meta.get("reply")
        claim = records.claim(
            info.id,
            "run",
            started,
            to_submitter=False,
            channels=[reply] if reply else [],
            worker=_worker_name(task.request.hostname),
        )
        if claim != "run":
            if claim == "cancelled":
                task.update_state(state=states.REVOKED)
            raise celery.exceptions.Ignore
        info._on_progress = _PassProgressOn(records, reply, task.request.retries or 0)
        # Alive until its end is stored, however long that takes: see '_until_stored'.
        with records.beating(info.id):
            future = self._run_here(info, path, args, kwargs, meta)
            if info.progress is not None:
                records.flush()  # the last report goes before the result
            error = future._exception
            if error is not None and not isinstance(error, Exception):
                # 'SystemExit' (the pool ending this process: a hard time limit, a cold
                # shutdown), 'KeyboardInterrupt': not the task's outcome. As Celery does, let
                # the process go; the worker's main process reports the task, once
                # ('_on_celery_failure').
                raise error
            if error is not None:
                retry_for, max_retries, delay = _retry_policy(path)
                if isinstance(error, retry_for) and task.request.retries < max_retries:
                    records.retrying(info.id)
                    raise task.retry(exc=error, countdown=delay, max_retries=max_retries)
            booked = _until_stored(
                info.id,
                functools.partial(
                    self._store_outcome,
                    info.id,
                    future._result,
                    error,
                    task.request,
                    reply=reply,
                    ended_at=info.finished_at,  # not when a restarted Redis came back
                ),
            )
            if not booked:
                self._ignored_end(records, info, "succeeded" if error is None else "failed")
        if error is not None:
            raise error  # for Celery's log, events and signals; the result is stored
        return future._result

    @staticmethod
    def _ignored_end(records: RedisTaskRecords, info: TaskInfo, state: str) -> None:
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

    # -- waiting and cancelling --------------------------------------------------------------

    def before_wait(self, future: TaskFuture[t.Any], timeout: float | None) -> None:
        """A task waiting for a child no worker has taken yet runs the child itself: on a
        worker with one process, or all of whose processes wait so, nobody else ever could.
        Here and now for a wait without a timeout; on a thread of its own for one with a
        timeout (which must be able to end the wait while the child runs on) or in an event
        loop (which the child would block), as the thread backend does."""
        waiter = current_task()
        if waiter is None or future._state != PENDING:
            return
        if waiter.id == future.task.id:
            raise RuntimeError(
                f"{waiter} waited for its own result, which comes only once it returns: it"
                " would wait forever. Return the value instead."
            )
        message = self._messages.pop(future.task.id, None)
        if message is None:
            return
        _, records = self._connect()
        if records.claim(future.task.id, "inline", worker=_worker_name(None)) != "inline":
            return  # a worker has it
        if timeout is None and asyncio._get_running_loop() is None:
            self._run_inline(future, message)
            return
        name = f"{self.settings.thread_name_prefix}-helper-{future.task.id}"
        # A daemon, as the pool's own threads: a worker process that ends meanwhile loses the
        # child as it would lose any task it runs (see Delivery).
        threading.Thread(
            target=self._run_inline, args=(future, message), name=name, daemon=True
        ).start()

    def _run_inline(self, future: TaskFuture[t.Any], message: list[t.Any]) -> None:
        """Run ``future``'s task, claimed for this process, from its ``message``; store and
        book its outcome, and resolve ``future``."""
        _, records = self._connect()
        _, path, args, kwargs, meta = _json_loads(_json_dumps(message))
        # To the records only: this process is the submitter, and its future has the task's
        # own TaskInfo, which the reports update at once.
        future.task._on_progress = _PassProgressOn(records, None, 0)
        with records.beating(future.task.id):
            ran = self._run_here(future.task, path, args, kwargs, meta)
        if future.task.progress is not None:
            records.flush()  # the last report goes before the result
        with self._lock:  # first, so that the listener leaves this future alone
            self._live.pop(future.task.id, None)
        self._store_outcome(future.task.id, ran._result, ran._exception)
        self._finished.append(future)
        future._claim()
        future._finish(ran._result, ran._exception)

    def _store_outcome(
        self,
        task_id: str,
        result: t.Any,
        error: BaseException | None,
        request: t.Any = None,
        traceback_text: str | None = None,
        reply: str | None = None,
        *,
        lost_since: float | None = None,
        ended_at: float | None = None,
    ) -> bool:
        """Store how a task ended where Celery would, in its format, and book it in the
        records: one round trip, so the records are final before the result is heard.
        Return whether it was stored (with ``lost_since``: only if the task was lost; see
        :meth:`RedisTaskRecords.finish`, as for ``ended_at``)."""
        result_backend, records = self._connect()
        if error is None:
            state, value = states.SUCCESS, result
        else:
            # As Celery's tracer does: a class that cannot be imported is stored by name.
            state, value = states.FAILURE, get_pickleable_exception(error)
            if traceback_text is None:
                traceback_text = "".join(traceback.format_exception(error))
        # Celery's own '_store_result' makes its message so; that one also reads the stored
        # result first, which the records' script does in the same round trip.
        meta = result_backend._get_result_meta(
            result=result_backend.encode_result(value, state),
            state=state,
            traceback=traceback_text,
            request=request,
        )
        meta["task_id"] = task_id
        return records.finish(
            task_id,
            error,
            (
                result_backend.get_key_for_task(task_id),
                result_backend.encode(meta),
                result_backend.expires,
            ),
            reply,
            lost_since=lost_since,
            ended_at=ended_at,
        )

    def find_lost(self) -> None:
        """Fail the running tasks this process waits for whose worker process no longer shows
        a sign of life: killed, or its machine gone. Not with late acknowledgement and
        ``task_reject_on_worker_lost``, where Celery delivers them again instead.

        A task is lost only once its sign of life has been missing for a whole heartbeat more,
        with Redis answering all along: a worker that is there renews it three times in that
        time, also after Redis was away long enough for it to run out (restarted, say), and
        the end it stores then is the one that counts. The verdict and the end are booked in
        one step each, the first of them only (see ``RedisTaskRecords.finish``).
        """
        conf = self.celery.conf
        if conf.task_acks_late and conf.task_reject_on_worker_lost:
            return
        heartbeat = self.settings.celery_heartbeat
        now = time.time()
        running = [
            future.task
            for future in list(self._live.values())
            if future.running()
            and future.task.started_at is not None
            and now - future.task.started_at >= heartbeat
        ]
        suspects, self._suspects = self._suspects, {}
        if not running:
            return
        _, records = self._connect()
        alive = records.signs_of_life([info.id for info in running])
        seen = time.monotonic()
        for info, beating in zip(running, alive, strict=True):
            if beating:
                continue
            since = self._suspects[info.id] = suspects.get(info.id, seen)
            if seen - since < heartbeat:
                continue
            worker = records.worker_of(info.id)
            who = "The worker" if worker is None else f"Worker {worker}"
            error = celery.exceptions.WorkerLostError(
                f"{who} gave no sign of life for {2 * heartbeat:g} s while running {info}: it"
                " is gone (killed, its machine lost) or frozen (stopped, paused). The task is"
                " booked failed; if its worker was only frozen, the task may still finish"
                " there, and that end is ignored (the worker logs it). Submit it again if it"
                " should run; Celery's 'task_acks_late' and 'task_reject_on_worker_lost' would"
                " deliver it again."
            )
            # Its last sign of life was given a heartbeat before it was first seen missing,
            # at the latest: the end the records book, so that its run time is its work.
            lost_since = time.time() - (seen - since)
            self._store_outcome(info.id, None, error, lost_since=lost_since)

    def find_stranded(self) -> None:
        """Say when the broker delivers again the pending tasks this process waits for that a
        worker had received (prefetched, not started) and then was lost: Celery acknowledges
        a task only as it starts, so the Redis transport delivers it again once its
        ``visibility_timeout`` is over (an hour by default), counted from when the worker
        received it, at the next sweep of a worker for such messages after that. Their
        ``redelivery_at`` says by when, in the future's task and the records: see
        :func:`_redelivery_after`. A worker that holds a task shows it, as with a sign of life;
        the same wait for a heartbeat more applies as in :meth:`find_lost`."""
        heartbeat = self.settings.celery_heartbeat
        now = time.time()
        waiting = [
            info
            for future in list(self._live.values())
            if not future.running()
            and not future.done()
            and isinstance(info := future.task, CeleryTaskInfo)
            and info.redelivery_at is None
            and now - info.submitted_at >= heartbeat
        ]
        suspects, self._stranded = self._stranded, {}
        if not waiting:
            return
        _, records = self._connect()
        after = _redelivery_after(self.celery.conf.broker_transport_options or {})
        seen = time.monotonic()
        for info, (held_at, held) in zip(
            waiting, records.holders([info.id for info in waiting]), strict=True
        ):
            if held_at is None or held:
                continue
            since = self._stranded[info.id] = suspects.get(info.id, seen)
            if seen - since >= heartbeat and records.redelivery(info.id, held_at + after):
                info.redelivery_at = held_at + after

    def may_cancel(self, future: TaskFuture[t.Any]) -> bool:
        if self.settings.eager:
            return True
        task_id = future.task.id
        result_backend, records = self._connect()
        claim = records.claim(
            task_id,
            "cancelled",
            _revoked(result_backend, task_id),
            to_submitter=task_id in self._watched,  # else this process is the submitter
            channels=[result_backend.get_key_for_task(task_id)],
        )
        if claim != "cancelled":
            return False
        with contextlib.suppress(Exception):  # the claim holds already; this only saves work
            self.celery.control.revoke(future.task.id)
        return True

    def record_cancelled(self, future: TaskFuture[t.Any]) -> None:
        info = future.task
        info.state = "cancelled"
        info.finished_at = time.time()
        with self._lock:
            self._live.pop(info.id, None)
            self._watched.discard(info.id)
        self._messages.pop(info.id, None)
        self._finished.append(future)
        if task_cancelled.receivers:
            signals.send(task_cancelled, self.app, task=info)

    # -- looking ----------------------------------------------------------------------------

    def get(self, task_id: str) -> TaskFuture[t.Any] | None:
        """The future of any task of the app, from whichever process submitted it: one of
        this process's own, or one made from the shared records, resolved by the listener."""
        if self.settings.eager:
            return self.runner.get(task_id)
        future = find_task(self._live, self._finished, task_id)
        if future is not None:
            info = future.task
            if isinstance(info, _ForeignTaskInfo):
                self.keep_progress(info, *self._connect()[1].progress_of(task_id))
            return future
        result_backend, records = self._connect()
        records.flush()  # this process's own submits included
        record = records.get(task_id)
        if record is None or record.backend != "celery":  # a thread task, in the task store
            return None
        info = _ForeignTaskInfo.of(record)
        future = TaskFuture(info, self, None, None, (), {})
        if info.state in ("cancelled", "rejected"):
            future._cancelled_elsewhere()
            return future
        if info.state == "running":
            future._claim()
        with self._lock:
            self._live[task_id] = future
            self._watched.add(task_id)
        self._listener_for(result_backend).watch(task_id)
        # The task may have finished before the listener subscribed: ask for what is stored.
        self.catch_up([task_id])
        return future

    def stats(self) -> dict[str, int]:
        """Counts of the app's tasks in every process; no ``max_workers``, which is the
        workers' to say."""
        if self.settings.eager:
            counts = self.runner.stats()
            del counts["max_workers"]
            return counts
        self.flush_records()  # this process's own submits included
        return self._connect()[1].counts()

    def flush_records(self) -> None:
        """Wait until the records of this process's submits are written."""
        if not self.settings.eager:
            self._connect()[1].flush()

    # -- stopping -------------------------------------------------------------------------

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._shut_down = True
        if cancel_futures:
            for future in list(self._live.values()):
                future.cancel()
        if wait:
            # The tasks run on, elsewhere, whatever this process does: wait a bounded time.
            self.wait_for_live(time.monotonic() + self.settings.shutdown_timeout)
        if self._records is not None:
            self._records.flush()
        listener = self._listener
        if listener is not None and not self._live:
            listener.stop()
        if self._sending is not None:
            self._sending.stop()

    def wait_for_live(self, deadline: float | None) -> list[TaskFuture[t.Any]]:
        return wait_until_done(self._live, deadline)


class _Sender:
    """A few daemon threads that send a process's tasks, so that a submit can stop waiting
    for a Redis that hangs (see ``CeleryBackend._within_bound``). Daemons: a send that
    waits for a hung Redis must not hold up the end of the process."""

    THREADS = 4

    def __init__(self, name: str) -> None:
        self.pid = os.getpid()
        self._queue: queue.SimpleQueue[
            tuple[t.Callable[[], None], concurrent.futures.Future[None]] | None
        ] = queue.SimpleQueue()
        for n in range(self.THREADS):
            threading.Thread(target=self._run, name=f"{name}-{n}", daemon=True).start()

    def send(self, send: t.Callable[[], None]) -> concurrent.futures.Future[None]:
        sending: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._queue.put((send, sending))
        return sending

    def stop(self) -> None:
        for _ in range(self.THREADS):
            self._queue.put(None)

    def _run(self) -> None:
        while (job := self._queue.get()) is not None:
            self._do(*job)
            del job  # nor keep its backend alive while waiting for the next

    @staticmethod
    def _do(send: t.Callable[[], None], sending: concurrent.futures.Future[None]) -> None:
        if not sending.set_running_or_notify_cancel():
            return  # its submit stopped waiting before it started: never sent
        try:
            send()
        except BaseException as error:
            sending.set_exception(error)
        else:
            sending.set_result(None)


class _Listener(threading.Thread):
    """The one thread of a process (per app) that hears how its tasks go: one Redis
    connection, subscribed to the process's reply channel, and to the result channels of
    other processes' tasks that :meth:`CeleryBackend.get` returned futures for.

    Redis publishes a message only to those subscribed at that moment: what came while the
    connection was down is read back from what Redis stores, after a reconnect, and every third
    of a heartbeat for the tasks live that long, so that no future waits for ever for a message
    that was lost. The listener holds its backend weakly and ends with it.
    """

    def __init__(self, backend: CeleryBackend, result_backend: RedisBackend) -> None:
        super().__init__(name=f"threadctx-celery-listener-{backend.app.name}", daemon=True)
        self._backend = weakref.ref(backend)
        # Not the result backend itself, which holds the Celery app, which holds the backend.
        self._client = result_backend.client
        self._prefix = t.cast(bytes, result_backend.get_key_for_task("-"))[:-1]
        self.pid = os.getpid()
        self.check_every = backend.settings.celery_heartbeat / 3
        self._stopping = False
        self._write_lock = threading.Lock()
        self._try_now = threading.Event()
        self._attempted = threading.Condition()
        self._attempts = 0
        self.reply_channel = backend.reply_channel
        self.lost: Exception | None = None
        """Why the connection is down, while it is."""
        self._pubsub = self._connect()

    def _connect(self) -> t.Any:
        pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(self.reply_channel)
        return pubsub

    def _close(self) -> None:
        with contextlib.suppress(Exception):
            self._pubsub.close()

    def _channel(self, task_id: str) -> bytes:
        return self._prefix + task_id.encode()

    def watch(self, task_id: str) -> None:
        """Subscribe to the result of ``task_id``, a task of another process."""
        with self._write_lock:
            self._pubsub.subscribe(self._channel(task_id))

    def stop(self) -> None:
        self._stopping = True

    def run(self) -> None:
        replies = self.reply_channel.encode()
        next_check = time.monotonic() + self.check_every
        while not self._stopping:
            backend = self._backend()
            if backend is None:
                break
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + self.check_every
                self._check(backend)
            del backend  # not kept alive by the wait below
            try:
                message = self._pubsub.get_message(timeout=1.0)
            except Exception as error:
                _logger.warning("Lost the result backend (%s); reconnecting.", error)
                self.lost = error
                self._reconnect()
                continue
            if message is None or message["type"] != "message":
                continue
            try:
                self._hear(message["channel"], message["data"], replies)
            except Exception:  # another sender's, or another version's: never stop listening
                _logger.exception("Ignored a message on %r that could not be read.", message)
        self._close()

    def _check(self, backend: CeleryBackend) -> None:
        """Read what Redis stores of the tasks live longer than a check, for messages that
        never reached this process; then look for tasks whose worker was lost."""
        since = time.time() - self.check_every
        overdue = [i for i, f in list(backend._live.items()) if f.task.submitted_at < since]
        try:
            moved = backend.catch_up(overdue)
        except Exception:  # read again at the next check
            _logger.exception("Could not read what Redis stores of this process's tasks.")
        else:
            if moved:
                # Also when a message was on its way as Redis was read: not worth a warning.
                _logger.info("Read how %d task(s) went from Redis, not from a message.", moved)
        try:
            backend.find_lost()
            backend.find_stranded()
        except Exception:
            _logger.exception("Could not look for tasks whose worker was lost.")

    def _hear(self, channel: bytes, data: bytes, replies: bytes) -> None:
        """Apply one message: a task's start or progress on the reply channel, or how a task
        ended, there or on the result channel of another process's task."""
        backend = self._backend()
        if backend is None:
            return
        if data.startswith(_STARTED_BYTES):  # only ever on the reply channel
            task_id = data[len(_STARTED_BYTES) :].decode()
            meta: dict[str, t.Any] = {"status": states.STARTED}
        elif data.startswith(_PROGRESS_BYTES):  # likewise
            task_id, done, total, note, *seq = json.loads(data[len(_PROGRESS_BYTES) :])
            backend.on_progress(task_id, Progress(done, total, note), *seq)
            return
        else:
            meta = backend._connect()[0].decode_result(data)
            task_id = meta.get("task_id") or channel[len(self._prefix) :].decode()
        if channel != replies and meta.get("status") in states.READY_STATES:
            with self._write_lock, contextlib.suppress(Exception):
                self._pubsub.unsubscribe(channel)
        backend.on_state(task_id, meta)

    def _reconnect(self) -> None:
        """Subscribe again, then catch up on what every live task did meanwhile."""
        delay = 0.1
        while not self._stopping:
            backend = self._backend()
            if backend is None:
                return
            try:
                with self._write_lock:
                    self._close()
                    self._pubsub = self._connect()
                    live = list(backend._live)
                    for task_id in live:
                        if task_id in backend._watched:
                            self._pubsub.subscribe(self._channel(task_id))
                self.lost = None
                self._attempt_made()
                backend._suspects.clear()  # Redis was away: its silence says nothing
                backend._stranded.clear()
                backend.catch_up(live)
                return
            except Exception:
                del backend
                self._attempt_made()
                # A backoff between attempts, which a submit cuts short: see 'reconnect_now'.
                self._try_now.wait(delay)
                self._try_now.clear()
                delay = min(delay * 2, 5.0)

    def _attempt_made(self) -> None:
        with self._attempted:
            self._attempts += 1
            self._attempted.notify_all()

    def reconnect_now(self, timeout: float) -> bool:
        """For a submit while the connection is down: have the listener try again at once,
        rather than at the end of its backoff (up to 5 s), and wait for that attempt, at most
        ``timeout``. Return whether it is connected: a Redis that is back takes submits at
        once."""
        with self._attempted:
            attempts = self._attempts
            self._try_now.set()
            self._attempted.wait_for(
                lambda: self.lost is None or self._attempts > attempts, timeout
            )
        return self.lost is None


_STARTED = "threadctx-started:"
"""What a worker says on the reply channel when a task starts: just that, and the task's id,
rather than a result message to decode."""
_STARTED_BYTES = _STARTED.encode()
_PROGRESS_BYTES = PROGRESS_MESSAGE.encode()


class _PassProgressOn:
    """What a task on a worker does with its progress: keep it in its record, and tell the
    submitter on ``reply``, both the same, escaped if need be; each report numbered, later
    ones higher, also those of a retry (``attempt``), so that whoever hears them keeps the
    last."""

    __slots__ = ("records", "reply", "seq")

    def __init__(self, records: RedisTaskRecords, reply: str | None, attempt: int) -> None:
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


def _worker_name(hostname: str | None) -> str:
    """``"celery@host:pid"``: the worker, and its process that runs the task."""
    return f"{hostname or socket.gethostname()}:{os.getpid()}"


def _returning_json(app: flask.Flask, fn: t.Callable[..., R]) -> t.Callable[..., R]:
    """``fn``, failing if what it returns cannot be sent back as JSON: inside the task, so that
    the task is booked and signalled as failed, as it would be on a worker."""
    run = app.ensure_sync(fn)

    def returning_json(*args: t.Any, **kwargs: t.Any) -> R:
        result = run(*args, **kwargs)
        try:
            _json_dumps(result)
        except (TypeError, ValueError) as error:
            raise TypeError(
                f"{task_name(fn)!r} returned {result!r}, which cannot be sent back as JSON."
                f" Return plain data (strings, numbers, lists, dicts): {error}"
            ) from None
        found = _non_str_key(result)
        if found is not None:
            where, key = found
            raise TypeError(
                f"{task_name(fn)!r} returned a dict key {key!r} at result{where}:"
                f" {_json_key_fate(key)}. Use string keys."
            )
        return t.cast(R, result)

    return returning_json


def _encode(message: list[t.Any], fn: t.Callable[..., t.Any]) -> str:
    """``message`` as JSON, or a :exc:`TypeError` naming the part that cannot be, or that JSON
    would change: a dict key that is not a string would arrive as one, or not at all."""
    # The session's own keys; those of the values in it are looked at with each value.
    for key in message[4]["context"].get("session", ()):
        if not isinstance(key, str):
            raise TypeError(
                f"The session of {task_name(fn)!r} has the key {key!r}: {_json_key_fate(key)}."
                " Use string keys."
            )
    try:
        encoded = _json_dumps(message)
    except (TypeError, ValueError) as error:
        for what, value in _parts(message):
            _check_keys(what, value, fn)
            try:
                _json_dumps(value)
            except (TypeError, ValueError):
                raise TypeError(
                    f"The {what} of {task_name(fn)!r}, {value!r}, cannot cross to a worker"
                    " process as JSON. Pass plain data (strings, numbers, lists, dicts; an id"
                    " rather than an object)."
                ) from None
        raise TypeError(f"The task {task_name(fn)!r} cannot be sent as JSON: {error}") from None
    for what, value in _parts(message):
        _check_keys(what, value, fn)
    return encoded


def _parts(message: list[t.Any]) -> list[tuple[str, t.Any]]:
    """The parts of ``message`` that the caller chose, each named as the user knows it."""
    _, _, args, kwargs, meta = message
    context = meta["context"]
    return [
        *((f"argument {i}", value) for i, value in enumerate(args)),
        *((f"argument {name!r}", value) for name, value in kwargs.items()),
        *((f"'g.{name}'", value) for name, value in context.get("g", {}).items()),
        *((f"session[{key!r}]", value) for key, value in context.get("session", {}).items()),
    ]


def _check_keys(what: str, value: t.Any, fn: t.Callable[..., t.Any]) -> None:
    """:raise TypeError: ``value`` holds a dict key that is not a string."""
    found = _non_str_key(value)
    if found is not None:
        where, key = found
        raise TypeError(
            f"The {what} of {task_name(fn)!r} has the dict key {key!r} at {what}{where}:"
            f" {_json_key_fate(key)}. Use string keys."
        )


def _json_key_fate(key: t.Any) -> str:
    if key is not None and not isinstance(key, (int, float)):
        return "JSON cannot carry it"
    return (
        f"JSON would turn it into the string {_json_dumps(key)!r}, and drop its value if that"
        " string is a key too"
    )


def _non_str_key(value: t.Any) -> tuple[str, t.Any] | None:
    """Where in ``value`` a dict has a key that is not a string, as a subscript path, and that
    key; ``None`` if nowhere. Looked for as deep as ``value`` goes, without recursion (JSON
    encodes deeper than Python's recursion limit lets a function recurse), and in each container
    once (one met again is shared, or loops back, which JSON refuses)."""
    if not isinstance(value, (dict, list, tuple)):
        return None
    seen = {id(value)}
    # The containers from ``value`` down to the one looked through now: the subscript that
    # leads to each, and its entries not yet looked at.
    stack: list[tuple[t.Any, cabc.Iterator[tuple[t.Any, t.Any, bool]]]] = [(None, _entries(value))]
    while stack:
        for key, item, is_key in stack[-1][1]:
            if is_key and not isinstance(key, str):
                return "".join(f"[{subscript!r}]" for subscript, _ in stack[1:]), key
            if isinstance(item, (dict, list, tuple)) and id(item) not in seen:
                seen.add(id(item))
                stack.append((key, _entries(item)))
                break
        else:
            stack.pop()
    return None


def _entries(
    value: dict[t.Any, t.Any] | list[t.Any] | tuple[t.Any, ...],
) -> cabc.Iterator[tuple[t.Any, t.Any, bool]]:
    """The subscripts and items of ``value``, each with whether the subscript is a dict key."""
    if isinstance(value, dict):
        return ((key, item, True) for key, item in value.items())
    return ((i, item, False) for i, item in enumerate(value))


def _raise(error: BaseException, *args: t.Any, **kwargs: t.Any) -> t.NoReturn:
    raise error


STORE_PATIENCE = 300.0
"""How long a worker tries to store how a task ended while Redis cannot be reached, in
seconds, keeping the task's sign of life meanwhile."""


def _until_stored(task_id: str, store: t.Callable[[], bool]) -> bool:
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


def _redelivery_after(options: cabc.Mapping[str, t.Any]) -> float:
    """Seconds from when a worker received a message until the Redis transport has delivered it
    again at the latest, the worker being lost and another one consuming the queue: its
    ``visibility_timeout`` (an hour by default), and then one period of the sweep that gives
    such messages back, which a worker runs every ``unacked_restore_interval`` times
    ``unacked_restore_throttle`` seconds (10 x 10 by default in kombu 5.7; a worker that starts
    sweeps at once). Not before the ``visibility_timeout``, usually by then; ``0`` or less, as
    kombu reads them, is its default."""
    visibility = float(options.get("visibility_timeout", 3600))
    interval = float(options.get("unacked_restore_interval") or 10)
    throttle = int(options.get("unacked_restore_throttle", 10)) or 1
    return visibility + (interval if interval > 0 else 10) * throttle


def _bounded(client: redis.Redis, seconds: float) -> redis.Redis:
    """A client of the same Redis as ``client`` whose calls give up after ``seconds`` (its
    socket timeouts), raising :exc:`redis.exceptions.TimeoutError`: the records' reads
    (``get_task``, ``stats``, the monitor, the CLI) must not wait for a Redis that hangs
    (stopped, not closed) until it goes on. Not the result backend's own client: its
    connections serve the listener, which waits for messages."""
    pool = client.connection_pool
    if type(pool) is not redis.ConnectionPool:  # a Sentinel's, say: as Celery set it up
        return client
    options = {**pool.connection_kwargs, "socket_timeout": seconds}
    options["socket_connect_timeout"] = seconds
    return redis.Redis(
        connection_pool=redis.ConnectionPool(
            connection_class=pool.connection_class, max_connections=pool.max_connections, **options
        )
    )


def _unavailable(what: str, error: Exception) -> BrokerUnavailable:
    return BrokerUnavailable(
        f"The task was not sent: {what} cannot be reached ({type(error).__name__}: {error})."
        " Nothing was queued; try again later, or answer '503 Service Unavailable'."
    )


# -- on the worker ------------------------------------------------------------------------------


def _run_message(
    task: t.Any,
    app_name: str,
    path: str,
    args: list[t.Any],
    kwargs: dict[str, t.Any],
    meta: dict[str, t.Any],
) -> t.Any:
    """The Celery task that runs every submitted function, in its app's fresh contexts."""
    backend: CeleryBackend | None = getattr(task.app, _BACKEND_ATTRIBUTE, None)
    if backend is None or backend.app.name != app_name:
        raise RuntimeError(
            f"This worker has no Flask app {app_name!r} with Flask-ThreadCtx. Start it with"
            " 'flask --app YOUR_APP threadctx worker'; one Flask app per Celery app."
        )
    return backend.run_delivered(task, path, args, kwargs, meta)


def _retry_policy(path: str) -> tuple[tuple[type[BaseException], ...], int, float]:
    """What ``task(backend="celery", retry_for=..., ...)`` says of retrying the task at
    ``path``: nothing, if it cannot be imported here."""
    from .extension import Task

    try:
        found = find(path)
    except LookupError:
        found = None
    options = found.options if isinstance(found, Task) else {}
    return (
        options.get("retry_for", ()),
        options.get("max_retries", 3),
        options.get("retry_delay", 0),
    )


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
    backend: CeleryBackend | None = getattr(sender.app, _BACKEND_ATTRIBUTE, None)
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
    if isinstance(exception, celery.exceptions.TimeLimitExceeded):
        # Celery's says only the number of seconds.
        meta = args[4] if isinstance(args, (list, tuple)) and len(args) == 5 else {}
        name = meta.get("name", "?") if isinstance(meta, dict) else "?"
        limit = exception.args[0] if exception.args else "?"
        limit = f"{limit:g}" if isinstance(limit, (int, float)) else limit
        exception = celery.exceptions.TimeLimitExceeded(
            f"task {task_id} ({name}) ran past its hard time limit ('time_limit', {limit} s)"
            f" on {socket.gethostname()}, whose worker killed the process running it. It will"
            " not finish: make it faster, split it, or raise the limit (a 'soft_time_limit'"
            " below it lets the task clean up first)."
        )
    backend._store_outcome(
        task_id, None, exception, traceback_text=getattr(einfo, "traceback", None)
    )


celery.signals.task_failure.connect(_on_celery_failure, weak=False)


def _on_celery_revoked(sender: t.Any = None, request: t.Any = None, **_: t.Any) -> None:
    """Book a task revoked with Celery's own tools before it ran, and tell its submitter.
    (A task cancelled through its future was claimed so already: this changes nothing.)"""
    if getattr(sender, "name", None) != TASK_NAME or request is None:
        return
    backend: CeleryBackend | None = getattr(sender.app, _BACKEND_ATTRIBUTE, None)
    if backend is not None:
        result_backend, records = backend._connect()
        task_id = request.id
        records.claim(
            task_id,
            "cancelled",
            _revoked(result_backend, task_id),
            channels=[result_backend.get_key_for_task(task_id)],
        )


celery.signals.task_revoked.connect(_on_celery_revoked, weak=False)


def _on_worker_ready(sender: t.Any = None, **_: t.Any) -> None:
    """In a worker's main process: renew the sign of life of the tasks its pool processes
    run, from a thread that no task can starve. A task that holds the GIL for long (a C call,
    a long regular expression) starves every other thread of its own process, its heartbeat
    included; the main process sees a pool process die, and says so itself."""
    backend: CeleryBackend | None = getattr(getattr(sender, "app", None), _BACKEND_ATTRIBUTE, None)
    if backend is not None and not backend.settings.eager:
        backend._connect()[1].beat_for(_running_in_pool, _held_in_pool)


celery.signals.worker_ready.connect(_on_worker_ready, weak=False)


def _on_worker_shutdown(sender: t.Any = None, **_: t.Any) -> None:
    """A worker that stops gives the tasks it received and did not start back to the broker
    at once: they wait in the queue, not for a redelivery."""
    backend: CeleryBackend | None = getattr(getattr(sender, "app", None), _BACKEND_ATTRIBUTE, None)
    if backend is not None and backend._records is not None:
        try:
            backend._records.let_go()
        except Exception:  # Redis away: their submitters will say when they come again
            _logger.exception("Could not say that this worker holds its tasks no more.")


celery.signals.worker_shutdown.connect(_on_worker_shutdown, weak=False)


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


def _revoked(result_backend: RedisBackend, task_id: str) -> str:
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
    from .extension import BACKENDS_KEY

    backend: CeleryBackend | None = app.extensions.get(BACKENDS_KEY, {}).get("celery")
    if backend is None:
        raise RuntimeError(
            f"{app.name!r} has no Celery backend: set 'THREADCTX_CELERY' (or"
            " 'THREADCTX_CELERY_APP') in its config."
        )
    made = backend.celery
    _check_celery(made)

    def make_app_again(**_: t.Any) -> None:
        # A forked pool process: the app, its connections and its pool are the parent's
        # copies. The factory makes this process its own; its 'init_app' takes over the name.
        from flask.cli import ScriptInfo

        fresh = ScriptInfo(
            app_import_path=script_info.app_import_path, create_app=script_info.create_app
        ).load_app()
        setattr(made, _BACKEND_ATTRIBUTE, fresh.extensions[BACKENDS_KEY]["celery"])

    if script_info is not None:
        celery.signals.worker_process_init.connect(make_app_again, weak=False)
    made.worker_main(["worker", *argv])
