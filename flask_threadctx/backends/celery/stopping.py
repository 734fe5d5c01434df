"""Stopping a running Celery task from any process: :class:`Stopping`, the part of
:class:`~.backend.CeleryBackend` that asks (``stop``, behind ``cancel_task``), and the
:class:`StopHearer` thread of each process that runs the app's tasks, which answers.

A request is written once, in one step that reads the task's record first: a key per task
(kept while the task may still run: a retry or a redelivery finds it at its claim and never
runs) and a message on the app's stop channel, which every process that runs the app's tasks
hears (a Celery worker's pool processes, and a waiting parent that runs its child itself). The
process that runs the task asks it to stop (:func:`flask_threadctx.control.ask_to_stop`: its
next check raises) and answers on the asker's reply channel whether the stop takes, before
that process stores the task's end: the asker's listener hears the answer before the end.

Each process knows the tasks it runs from their claim on: a request for a task whose claim is
under way waits for the claim, and is answered if it won. A task's end is booked once, so a
stop that races it is decided once, as on threads (see ``Pool.stop``).

:class:`Stopping` is a part of the backend's class in a module of its own: its methods take the
backend as ``self`` and use its state, which :mod:`.state` declares.
"""

from __future__ import annotations

import collections.abc as cabc
import concurrent.futures
import contextlib
import json
import logging
import os
import threading
import typing as t
import uuid
import weakref

from ... import control
from .claims import ENDED
from .messages import STOP_ANSWER
from .state import CeleryState

if t.TYPE_CHECKING:
    import redis
    from celery.backends.redis import RedisBackend

    from ...future import TaskFuture
    from ...model import TaskInfo
    from .backend import CeleryBackend

_logger = logging.getLogger("flask_threadctx.celery_backend")

# KEYS: the task's hash, its stop request, the app's stop channel. ARGV: the request, how long
# it is kept. A task whose end is booked is left alone: its state says how it ended.
_ASK = (
    ENDED
    + """
local state = redis.call('HGET', KEYS[1], 'state')
if state and ended[state] then return state end
redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[2])
redis.call('PUBLISH', KEYS[3], ARGV[1])
return state or ''
"""
)

_STILL_GOING = ("pending", "running", "retrying")


class Stopping(CeleryState):
    """Stops a task of the app, started or not, from any process."""

    @property
    def stop_channel(self) -> str:
        """Where every process that runs the app's tasks hears the requests to stop one."""
        return f"threadctx:{self.app.name}:stop"

    def stop(self, task_id: str) -> bool | None:
        """See :meth:`.base.Backend.stop`: a task not started never runs; a running one is
        asked to stop by the process that runs it, which answers within
        ``THREADCTX_CANCEL_TIMEOUT``.

        :raise TimeoutError: no answer came in time (its worker is frozen, busy or gone)."""
        if self.settings.eager:
            return None  # its tasks run on the app's thread pool, which answers
        future = t.cast("CeleryBackend", self).get(task_id)
        if future is None:
            return None
        if future.done():
            return False
        if future.cancel():
            return True
        if future.done():  # it ended meanwhile
            return False
        return self._ask_to_stop(future)

    def _ask_to_stop(self, future: TaskFuture[object]) -> bool:
        task_id = future.task.id
        result_backend, records = self._connect()
        self.listener_for(result_backend)  # subscribed to the reply channel before asking
        request_id = str(uuid.uuid4())
        answer: concurrent.futures.Future[bool] = concurrent.futures.Future()
        self.stop_answers[request_id] = answer
        try:
            request = json.dumps([task_id, self.reply_channel, request_id])
            keys = [records.task_key(task_id), records.stop_key(task_id), self.stop_channel]
            ask = records.client.register_script(_ASK)
            state = _text(ask(keys=keys, args=[request, records.expires]))
            if state not in ("", "pending", "running", "retrying"):
                # Its end was booked before the request, which was not made: it had finished,
                # however it ended (this process's future may not have heard of it yet).
                return False
            if state == "retrying":
                return True  # its next attempt finds the request at its claim
            timeout = self.settings.cancel_timeout
            either: list[concurrent.futures.Future[t.Any]] = [answer, future]
            concurrent.futures.wait(either, timeout, return_when=concurrent.futures.FIRST_COMPLETED)
            if answer.done():
                return answer.result()
            if future.done():
                # Its end came with no answer: its process had let go of it before it heard
                # the request, which it never applied.
                return future.task.state == "cancelled"
        finally:
            self.stop_answers.pop(request_id, None)
        worker = records.worker_of(task_id) or "an unknown worker"
        raise TimeoutError(
            f"Task {task_id} runs on {worker}, which did not answer the request to stop it"
            f" within {timeout:g} s ('THREADCTX_CANCEL_TIMEOUT'): it is frozen (stopped,"
            " paused), busy in code that holds the GIL, or gone. The request stays in Redis"
            f" for {records.expires} s: if the worker goes on, the task stops at its next"
            " 'check_cancelled' or 'report_progress' (or never runs again, if it is retried);"
            " if the worker is gone, the task is booked failed once its sign of life runs out."
        )

    def on_stop_answer(self, request_id: str, stopped: bool) -> None:
        """Hand the answer to a stop request of this process to the thread that waits."""
        answer = self.stop_answers.get(request_id)
        if answer is not None and not answer.done():
            answer.set_result(stopped)


class StopHearer(threading.Thread):
    """The one thread of a process (per app) that hears the requests to stop the app's tasks,
    and stops those this process runs. Subscribed before it is returned: a task claimed to run
    here afterwards hears every request made after its claim; one made before it finds at its
    claim."""

    def __init__(self, backend: CeleryBackend, result_backend: RedisBackend) -> None:
        super().__init__(name=f"threadctx-celery-stop-{backend.app.name}", daemon=True)
        self._backend = weakref.ref(backend)
        self._client: redis.Redis = result_backend.client
        self._stop_key = backend._connect()[1].stop_key
        self.channel = backend.stop_channel
        self.pid = os.getpid()
        self.lock = threading.Lock()
        """Held to decide a request, and to let go of a task: a request is answered before
        its task's end is stored, or not at all."""
        self.running: dict[str, TaskInfo] = {}
        """The tasks this process runs, by id, from before their claim until their end is
        about to be stored."""
        self.claiming: dict[str, list[tuple[str, str]]] = {}
        """The tasks whose claim is under way here, with the requests (reply channel,
        request id) that wait for it."""
        self._pubsub = self._subscribe()

    def _subscribe(self) -> t.Any:
        pubsub = self._client.pubsub()
        pubsub.subscribe(self.channel)
        # Confirmed before any task of this process is claimed: see the class.
        while (message := pubsub.get_message(timeout=5.0)) is not None:
            if message["type"] == "subscribe":
                return pubsub
        pubsub.close()
        raise ConnectionError(f"Could not subscribe to {self.channel!r} in time.")

    # -- the tasks of this process ------------------------------------------------------------

    def claiming_to_run(self, info: TaskInfo) -> None:
        """Say that this process claims ``info``'s task to run it: requests that come now
        wait for :meth:`claimed`."""
        with self.lock:
            self.running[info.id] = info
            self.claiming[info.id] = []

    def claimed(self, task_id: str, won: bool, request: str | None = None) -> None:
        """The claim of ``task_id`` was decided: if it ``won``, apply the requests that came
        meanwhile, and ``request``, the one the claim found; else forget them."""
        with self.lock:
            waiting = self.claiming.pop(task_id, [])
            if not won:
                self.running.pop(task_id, None)
                control.forget(task_id)
                return
            if request is not None:
                with contextlib.suppress(ValueError, TypeError):
                    _, reply, request_id = json.loads(request)
                    waiting.append((reply, request_id))
            if waiting:
                control.ask_to_stop(task_id)
            for reply, request_id in waiting:
                self._answer(reply, request_id, True)

    def ended(self, task_id: str) -> None:
        """The task ``task_id`` ended here, or waits for its retry: let go of it."""
        with self.lock:
            self.running.pop(task_id, None)
            control.forget(task_id)

    def end_attempt(self, task_id: str, retry: cabc.Callable[[], bool]) -> bool:
        """Let go of the task ``task_id``, whose attempt failed; whether it is retried:
        ``retry()`` says, unless a stop was asked for (then answered ``False``: it failed).
        Decided against the requests, under the lock: one heard after that finds it gone,
        and :meth:`retrying` answers it."""
        with self.lock:
            retried = control.asked.get(task_id) is None and retry()
            self.running.pop(task_id, None)
            control.forget(task_id)
        return retried

    def retrying(self, task_id: str) -> None:
        """The task ``task_id`` is booked waiting for its retry: answer the request to stop it
        that came as its attempt ended, if one did. Its next attempt finds it at its claim."""
        request = self._client.get(self._stop_key(task_id))
        if request is not None:
            _, reply, request_id = json.loads(request)
            self._answer(reply, request_id, True)

    # -- hearing --------------------------------------------------------------------------------

    def run(self) -> None:
        while self._backend() is not None:
            try:
                message = self._pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            except Exception as error:
                _logger.warning("Lost the stop channel (%s); reconnecting.", error)
                self._reconnect()
                continue
            if message is None or message["type"] != "message":
                continue
            try:
                task_id, reply, request_id = json.loads(message["data"])
                self.apply(task_id, reply, request_id)
            except Exception:  # another version's, or Redis away as it answers
                _logger.exception("Could not apply the stop request %r.", message["data"])

    def _reconnect(self) -> None:
        """Subscribe again, then apply the requests made meanwhile to the tasks running here."""
        delay = 0.1
        while self._backend() is not None:
            try:
                with contextlib.suppress(Exception):
                    self._pubsub.close()
                self._pubsub = self._subscribe()
                ids = list(self.running)
                found = self._client.mget([self._stop_key(i) for i in ids]) if ids else []
                for task_id, request in zip(ids, found, strict=True):
                    if request is not None:
                        _, reply, request_id = json.loads(request)
                        self.apply(task_id, reply, request_id)
                return
            except Exception:
                threading.Event().wait(delay)  # a backoff between attempts
                delay = min(delay * 2, 5.0)

    def apply(self, task_id: str, reply: str, request_id: str) -> None:
        """Ask the task ``task_id`` to stop if it runs here, and answer the asker whether it
        will not finish normally: decided once, against its end, as ``Pool.stop`` does."""
        with self.lock:
            info = self.running.get(task_id)
            if info is None:
                return  # another process's
            control.ask_to_stop(task_id)
            waiting = self.claiming.get(task_id)
            if waiting is not None:
                waiting.append((reply, request_id))
                return
            state = info.state
            if state in _STILL_GOING:
                stopped = True  # its next check, or its end, sees the request
            elif state == "succeeded":
                # It returned as the request came: whichever of this and the runner takes
                # the request out decides (see 'Runner._run_task').
                stopped = control.asked.pop(task_id, None) is None
            else:  # its owner forgets the request as it lets go ('ended', 'end_attempt')
                stopped = state == "cancelled"
            self._answer(reply, request_id, stopped)

    def _answer(self, reply: str, request_id: str, stopped: bool) -> None:
        self._client.publish(reply, STOP_ANSWER + json.dumps([request_id, stopped]))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
