"""How the submitting process hears how its tasks go: the :class:`Listener` thread, and
:class:`Hearing`, the part of :class:`~.backend.CeleryBackend` that applies what the listener
hears (a start, progress, an end; the answers to its stop requests go to :mod:`.stopping`)
and finds the tasks whose worker was lost.

:class:`Hearing` is a part of the backend's class in a module of its own: its methods take the
backend as ``self`` and use its state, which :mod:`.backend` declares.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
import typing as t
import weakref

import celery
import celery.exceptions
import celery.signals
from celery import states
from celery.utils.serialization import UnpickleableExceptionWrapper

from ...contexts.wire import RemoteTraceback
from ...errors import RemoteTaskError
from ...errors import TaskExpired
from ...model import TaskInfo
from ...progress import Progress
from .messages import PROGRESS_BYTES
from .messages import RETRYING_BYTES
from .messages import STARTED_BYTES
from .messages import STOP_ANSWER_BYTES
from .state import CeleryState
from .state import CeleryTaskInfo
from .state import keep_later_progress
from .state import TASK_STATE

if t.TYPE_CHECKING:
    import collections.abc as cabc

    from celery.backends.redis import RedisBackend

    from .backend import CeleryBackend

# One logger for the whole backend, under the name it always had: users filter on it.
_logger = logging.getLogger("flask_threadctx.celery_backend")


class Hearing(CeleryState):
    """What the listener hears, applied to the backend's futures."""

    def on_state(self, task_id: str, meta: dict[str, t.Any], *, heard: bool = True) -> None:
        """Apply the state ``meta`` that the result backend holds for ``task_id``.

        :param heard: from a message, or read back: not applied if it is the REVOKED of a
            cancel of this process's own (see ``CeleryBackend.may_cancel``)."""
        future = self.live.get(task_id)
        if future is None:
            return
        status = meta.get("status")
        info = future.task
        if status == states.STARTED:
            retried = info.state == "retrying"
            if future._claim():
                info.state = "running"
                # Each attempt's start, as on threads (and in the records).
                info.started_at = time.time() if retried else info.started_at or time.time()
                info.due_at = None
                if isinstance(info, CeleryTaskInfo):
                    info.redelivery_at = None
            return
        if status not in states.READY_STATES:
            return
        with self.lock:
            # The claim of a cancel of this process's own is left to it, which books it (see
            # 'may_cancel').
            mine = (
                heard
                and (task_id in self.cancelling or task_id in self.cancels_won)
                and status == states.REVOKED
                and meta.get(TASK_STATE) != "expired"
            )
            if mine or self.live.pop(task_id, None) is None:
                return
            self.watched.discard(task_id)
        self.child_messages.pop(task_id, None)
        info.finished_at = time.time()
        info.due_at = None
        if isinstance(info, CeleryTaskInfo):  # its end can be read back before its start
            info.redelivery_at = None
        self.finished.append(future)
        if status == states.REVOKED and meta.get(TASK_STATE) == "expired":  # see '.expiry'
            info.state = "expired"
            future._finish(None, self._expired_error(info, meta))
            return
        if status == states.REVOKED:  # revoked with Celery's own tools
            info.state = "cancelled"
            future._cancelled_elsewhere()
            return
        if status == states.SUCCESS:
            info.state = "succeeded"
            future._finish(meta.get("result"), None)
        else:
            error = self.exception_of(meta)
            # Stopped while it ran, or past its time limit: Celery's status says 'FAILURE'.
            stopped = meta.get(TASK_STATE)
            info.state = stopped if stopped in ("cancelled", "timed_out") else "failed"
            future._finish(None, error)

    def _expired_error(self, info: TaskInfo, meta: dict[str, t.Any]) -> TaskExpired:
        error = self.exception_of(meta)
        if isinstance(error, TaskExpired):
            return error
        return TaskExpired(f"{info} had not started by its 'expires'; it never ran ({error}).")

    def on_retrying(self, task_id: str, retries: int, due_at: float | None) -> None:
        """Apply the news that one of this process's tasks waits for retry number
        ``retries``, due at ``due_at``: pending again, as on threads, until that retry starts
        (older news, heard again or read back, changes nothing)."""
        future = self.live.get(task_id)
        if future is None:
            return
        info = future.task
        with self.lock:
            if retries <= info.retries or future.done():
                return
            info.retries = retries
            info.due_at = due_at
            info.state = "retrying"
            if future.running():
                future._unclaim()

    def catch_up(self, task_ids: cabc.Collection[str]) -> int:
        """Apply what Redis holds of live tasks whose messages this process may have missed,
        published while its listener was away; return how many moved on."""
        futures = {i: f for i in task_ids if (f := self.live.get(i)) is not None}
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
            elif state == "retrying" and (record := records.get(task_id)) is not None:
                self.on_retrying(task_id, record.retries, record.due_at)
            moved += future._state != before
        return moved

    def on_progress(self, task_id: str, progress: Progress, seq: int | None = None) -> None:
        """Keep the progress a worker reported for one of this process's tasks, if it is
        later than the one kept: see :meth:`keep_progress`."""
        future = self.live.get(task_id)
        if future is not None:
            self.keep_progress(future.task, progress, -1 if seq is None else seq)

    def keep_progress(self, info: TaskInfo, progress: Progress | None, seq: int) -> None:
        """Keep ``progress``, the report numbered ``seq`` by the worker, unless a later one is
        kept already: reports that come by two ways (the reply channel, the records) or again
        (a batch written twice) never take a task's progress back. ``seq`` -1: unnumbered, by
        a worker of an older version, kept as it comes."""
        if progress is None:
            return
        with self.lock:
            keep_later_progress(info, progress, seq)

    def exception_of(self, meta: dict[str, t.Any]) -> BaseException:
        result_backend = self._connect()[0]  # connected: the listener heard from it
        stored = meta.get("result")
        try:
            error: t.Any = result_backend.exception_to_python(stored)
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

    def find_lost(self) -> None:
        """Fail the running tasks this process waits for whose worker process no longer shows
        a sign of life: killed, or its machine gone. Not with late acknowledgement and
        ``task_reject_on_worker_lost``, where Celery delivers them again instead.

        A task is lost only once its sign of life has been missing for a whole heartbeat more,
        with Redis answering all along: a worker that is there renews it three times in that
        time, also after Redis was away long enough for it to run out (restarted, say), and
        the end it stores then is the one that counts. The verdict and the end are booked in
        one step each, the first of them only (see ``CeleryRecords.finish``).
        """
        conf = self.celery.conf
        if conf.task_acks_late and conf.task_reject_on_worker_lost:
            return
        heartbeat = self.settings.celery_heartbeat
        now = time.time()
        running = [
            future.task
            for future in list(self.live.values())
            if future.running()
            and future.task.started_at is not None
            and now - future.task.started_at >= heartbeat
        ]
        suspects, self.suspects = self.suspects, {}
        if not running:
            return
        _, records = self._connect()
        alive = records.signs_of_life([info.id for info in running])
        seen = time.monotonic()
        for info, beating in zip(running, alive, strict=True):
            if beating:
                continue
            since = self.suspects[info.id] = suspects.get(info.id, seen)
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
            self.store_outcome(info.id, None, error, lost_since=lost_since)

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
            for future in list(self.live.values())
            if not future.running()
            and not future.done()
            and isinstance(info := future.task, CeleryTaskInfo)
            and info.redelivery_at is None
            and now - info.submitted_at >= heartbeat
        ]
        suspects, self.stranded = self.stranded, {}
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
            since = self.stranded[info.id] = suspects.get(info.id, seen)
            if seen - since >= heartbeat and records.redelivery(info.id, held_at + after):
                info.redelivery_at = held_at + after


class Listener(threading.Thread):
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
        overdue = [i for i, f in list(backend.live.items()) if f.task.submitted_at < since]
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
        if data.startswith(STARTED_BYTES):  # only ever on the reply channel
            task_id = data[len(STARTED_BYTES) :].decode()
            meta: dict[str, t.Any] = {"status": states.STARTED}
        elif data.startswith(PROGRESS_BYTES):  # likewise
            task_id, done, total, note, *seq = json.loads(data[len(PROGRESS_BYTES) :])
            backend.on_progress(task_id, Progress(done, total, note), *seq)
            return
        elif data.startswith(RETRYING_BYTES):  # likewise
            task_id, retries, due_at = json.loads(data[len(RETRYING_BYTES) :])
            backend.on_retrying(task_id, retries, due_at)
            return
        elif data.startswith(STOP_ANSWER_BYTES):  # likewise
            request_id, stopped = json.loads(data[len(STOP_ANSWER_BYTES) :])
            backend.on_stop_answer(request_id, bool(stopped))
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
                    live = list(backend.live)
                    for task_id in live:
                        if task_id in backend.watched:
                            self._pubsub.subscribe(self._channel(task_id))
                self.lost = None
                self._attempt_made()
                backend.suspects.clear()  # Redis was away: its silence says nothing
                backend.stranded.clear()
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
