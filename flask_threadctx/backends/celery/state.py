"""What the parts of the Celery backend share: :class:`CeleryState` (the backend's state, its
Celery app and its connection to the records in Redis), the :class:`~flask_threadctx.TaskInfo` of
a Celery task, and making or loading the Celery app.

:class:`~.backend.CeleryBackend` is put together from parts, one module each, that all derive
from :class:`CeleryState`: :mod:`.backend` (submitting, cancelling, looking up, shutting down),
:mod:`.sending` (publishing within a time bound), :mod:`.listener` (what the submitting process
hears of its tasks), :mod:`.stopping` (stopping a running task) and :mod:`.worker` (running a
task that came as a message, and storing how it ended). The state is declared here, once, so
that each part is typed against it.

Internal API
------------
What the parts, the :class:`~.listener.Listener` thread and the Celery signal hooks of
:mod:`.worker` use of :class:`CeleryState`, and nothing else does: the attributes
:attr:`~CeleryState.live`, :attr:`~CeleryState.finished`, :attr:`~CeleryState.watched`,
:attr:`~CeleryState.cancelling`, :attr:`~CeleryState.cancels_won`,
:attr:`~CeleryState.child_messages`, :attr:`~CeleryState.suspects`,
:attr:`~CeleryState.stranded`, :attr:`~CeleryState.senders`,
:attr:`~CeleryState.stop_answers`, :attr:`~CeleryState.stop_hearers` and the
:attr:`~CeleryState.lock` that guards them; the methods
:meth:`~CeleryState.listener_for`, :meth:`~CeleryState.stop_hearer`,
:meth:`~CeleryState.records_if_connected`,
:meth:`~CeleryState.stop_threads`, :meth:`~CeleryState.store_outcome`, and ``_connect()``, the
one way to Redis (the result backend and :class:`~.claims.CeleryRecords`), which keeps its
underscore because the tests reach it by that name, as they do ``_listener``; and
:func:`keep_later_progress`, the one reader of a Celery task's ``_progress_seq``. Public names
of a class that is not: none of them is part of the package's API.
"""

from __future__ import annotations

import collections
import concurrent.futures
import os
import threading
import traceback
import typing as t
import uuid

import celery
import celery.exceptions
import celery.signals
import flask
import redis
from celery import states
from celery.utils.serialization import get_pickleable_exception

from ..._process import PerProcess
from ...contexts.wire import resolve
from ...future import TaskFuture
from ...model import TaskInfo
from ...stores.base import TaskStore
from .claims import CeleryRecords

if t.TYPE_CHECKING:
    import collections.abc as cabc

    from celery.backends.redis import RedisBackend

    from ...backends.pool import Pool
    from ...config import Settings
    from ...extension import ThreadContext
    from ...progress import Progress
    from ...stores.base import Record
    from ...stores.stops import StopRequests
    from .backend import CeleryBackend
    from .listener import Listener
    from .sending import Sender
    from .stopping import StopHearer


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


def check_celery(made: celery.Celery) -> None:
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


class _LazyRecords(TaskStore):
    """The Celery backend's records, connected when first used, not when the app is made."""

    def __init__(self, backend: CeleryState) -> None:
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

    def stop_requests(self) -> StopRequests:
        return self._backend._connect()[1].stop_requests()


def keep_later_progress(info: TaskInfo, progress: Progress, seq: int) -> None:
    """Keep ``progress``, the report numbered ``seq`` by the worker, as ``info``'s, unless a
    later one is kept already; ``seq`` -1: unnumbered, kept as it comes. Called holding the
    backend's :attr:`~CeleryState.lock`."""
    if seq < 0 or seq >= getattr(info, "_progress_seq", -1):
        if isinstance(info, CeleryTaskInfo):
            info._progress_seq = seq
        info._progress = progress


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
        info = record.into(cls)
        info.redelivery_at = record.redelivery_at
        return info


class ForeignTaskInfo(CeleryTaskInfo):
    """Of a task that another process submitted: its progress is read from the records at
    each ``get_task``, as its worker tells only the submitter."""

    __slots__ = ()


class CeleryState:
    """The state the parts of :class:`~.backend.CeleryBackend` share, and its connections:
    to Celery (made or loaded when first needed) and to the records in Redis, and the
    listener of this process."""

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
            _register(self._celery, self)
        self._result_backend: RedisBackend | None = None
        self._records: CeleryRecords | None = None
        self.lock = threading.Lock()
        """Held to move a task out of :attr:`live`, and to keep a progress report."""
        # Each with a lock of its own, held while connecting: not 'self.lock'.
        self._listeners: PerProcess[Listener] = PerProcess()
        self.senders: PerProcess[Sender] = PerProcess()
        """The threads that publish this process's submits (:mod:`.sending`)."""
        # Futures of any result type (a future is invariant in it): the tasks' own values.
        self.live: dict[str, TaskFuture[t.Any]] = {}
        """The futures of the pending and running tasks that this process waits for: its own
        submits, and the tasks of other processes that ``get`` returned futures for."""
        self.finished: collections.deque[TaskFuture[t.Any]] = collections.deque(
            maxlen=settings.keep_finished
        )
        """The futures of the last ``THREADCTX_KEEP_FINISHED`` tasks that left :attr:`live`."""
        self.child_messages: dict[str, list[t.Any]] = {}
        """The messages of children a waiting parent may run itself, by task id (see
        ``CeleryBackend.before_wait``): JSON data, as sent."""
        self.watched: set[str] = set()
        """The ids in :attr:`live` of tasks of other processes, from ``get``."""
        self.cancelling: collections.Counter[str] = collections.Counter()
        """The claims to cancel a task that this process is making, by task id, and
        :attr:`cancels_won`: the listener leaves a REVOKED alone while either holds the task,
        so that the cancel that won books it and sends ``task_cancelled``, once (see
        ``CeleryBackend.may_cancel``)."""
        self.cancels_won: set[str] = set()
        """The tasks whose claim to cancel this process won, until ``record_cancelled``."""
        self.claims_decided = threading.Condition(self.lock)
        """Notified as each claim to cancel of this process is decided."""
        self._replies = f"threadctx-replies-{uuid.uuid4()}"
        self.suspects: dict[str, float] = {}
        """Running tasks found without a sign of life, and when (:func:`time.monotonic`): the
        listener's (``Hearing.find_lost``)."""
        self.stranded: dict[str, float] = {}
        """Likewise, pending tasks that no worker holds now (``Hearing.find_stranded``)."""
        self.stop_answers: dict[str, concurrent.futures.Future[bool]] = {}
        """The stop requests this process waits for an answer to, by request id (see
        :mod:`.stopping`)."""
        self.stop_hearers: PerProcess[StopHearer] = PerProcess()
        """The thread that hears stop requests, in a process that runs the app's tasks."""

    # -- Celery -------------------------------------------------------------------------------

    @property
    def celery(self) -> celery.Celery:
        """The Celery app tasks are sent with."""
        made = self._celery
        if made is None:
            assert self.settings.celery_app is not None
            made = load_celery(self.settings.celery_app)
            _register(made, self)
            self._celery = made
        return made

    @property
    def records(self) -> TaskStore:
        """The records of the app's tasks, as a task store: connected on first use."""
        return _LazyRecords(self)

    def _connect(self) -> tuple[RedisBackend, CeleryRecords]:
        """The result backend and records shared by every thread of this process, connected
        on first use: the internal API through which every part of the backend, and its
        signal hooks, reach Redis."""
        records = self._records
        if records is None:
            with self.lock:
                if self._records is None:
                    made = self.celery
                    check_celery(made)
                    result_backend = t.cast("RedisBackend", made._get_backend())
                    self._result_backend = result_backend
                    expires = int(made.conf.result_expires.total_seconds())
                    self._records = CeleryRecords(
                        _bounded(result_backend.client, self.settings.celery_submit_timeout),
                        self.app.name,
                        expires or 86400,
                        self.settings.celery_heartbeat,
                        self.settings.keep_finished,
                    )
                records = self._records
        assert self._result_backend is not None
        return self._result_backend, records

    @property
    def reply_channel(self) -> str:
        """Where workers tell this process that its tasks started and ended: one channel
        for all of them, rather than one per task, and a new one in a forked process. Made
        from the pid, not drawn at random: the first submits of a process, from several
        threads at once, must all name the channel its listener subscribes to."""
        return f"{self._replies}-{os.getpid()}"

    def live_future(self, task_id: str) -> TaskFuture[object] | None:
        """The future of ``task_id`` if it is pending or running here."""
        return self.live.get(task_id)

    def records_if_connected(self) -> CeleryRecords | None:
        """The records, if this process has connected to them; ``None`` rather than connect."""
        return self._records

    @property
    def _listener(self) -> Listener | None:
        """The last listener started, maybe in the parent process (the tests read it)."""
        return self._listeners.current

    def listener_for(self, result_backend: RedisBackend) -> Listener:
        """This process's listener, started on first use (and again in a forked child)."""
        return self._listeners.get(lambda: _listener(self, result_backend))

    def stop_hearer(self) -> StopHearer:
        """This process's stop hearer, started (subscribed) on first use: in a process that
        runs the app's tasks (see :mod:`.stopping`)."""
        result_backend = self._connect()[0]
        return self.stop_hearers.get(lambda: _stop_hearer(self, result_backend))

    def stop_threads(self) -> None:
        """At shutdown: write the records held back, stop this process's senders, and its
        listener unless a task of this process is still live, whose end it waits to hear."""
        if self._records is not None:
            self._records.flush()
        listener = self._listener
        if listener is not None and not self.live:
            listener.stop()
        sender = self.senders.current
        if sender is not None:
            sender.stop()

    def store_outcome(
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
        state_of_task: str | None = None,
    ) -> bool:
        """Store how a task ended where Celery would, in its format, and book it in the
        records: one round trip, so the records are final before the result is heard.
        Return whether it was stored (with ``lost_since``: only if the task was lost; see
        :meth:`CeleryRecords.finish`, as for ``ended_at`` and ``state_of_task``, which the
        message carries too, for whoever hears it)."""
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
        if state_of_task is not None:
            meta[TASK_STATE] = state_of_task
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
            state=state_of_task,
        )


TASK_STATE = "threadctx_state"
"""The key, in a result message of Celery's format, of the state of a task that ended
``"cancelled"`` (stopped while it ran) or ``"timed_out"``: Celery's own status says only
``FAILURE``."""

# The parts that import this module, imported when first needed: the state is always a
# CeleryBackend's, which is made of them.


def _register(made: celery.Celery, state: CeleryState) -> None:
    from .worker import register

    register(made, t.cast("CeleryBackend", state))


def _listener(state: CeleryState, result_backend: RedisBackend) -> Listener:
    from .listener import Listener

    listener = Listener(t.cast("CeleryBackend", state), result_backend)
    listener.start()
    return listener


def _stop_hearer(state: CeleryState, result_backend: RedisBackend) -> StopHearer:
    from .stopping import StopHearer

    hearer = StopHearer(t.cast("CeleryBackend", state), result_backend)
    hearer.start()
    return hearer


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
