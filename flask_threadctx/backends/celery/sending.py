"""How a submit publishes its task: :class:`Sending`, the part of
:class:`~.backend.CeleryBackend` that sends a message within ``THREADCTX_CELERY_SUBMIT_TIMEOUT``,
through the process's :class:`Sender` threads.

:class:`Sending` is a part of the backend's class in a module of its own: its methods take the
backend as ``self`` and use its state, which :mod:`.backend` declares.
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
import queue
import threading
import typing as t
import weakref

from celery.utils.saferepr import saferepr

from ...errors import BrokerUnavailable
from ...model import TaskInfo
from .messages import json_dumps
from .messages import PUBLISH_OPTIONS
from .messages import TASK_NAME
from .state import CeleryState

if t.TYPE_CHECKING:
    from celery.backends.redis import RedisBackend

    from .messages import CeleryOptions


class Sending(CeleryState):
    """Publishes a submit's message, bounded in time: :meth:`task_message` makes it,
    :meth:`publish_bounded` sends it."""

    def publish_bounded(
        self, result_backend: RedisBackend, prepared: tuple[t.Any, dict[str, t.Any]]
    ) -> None:
        """Publish ``prepared``, from :meth:`task_message`, once this process listens for the
        task's end, within ``THREADCTX_CELERY_SUBMIT_TIMEOUT``.

        :raise BrokerUnavailable: Redis cannot be reached, or did not answer in time."""
        given_up = threading.Event()
        self._within_bound(
            functools.partial(self._send, result_backend, prepared, given_up), given_up
        )

    def _send(
        self,
        result_backend: RedisBackend,
        prepared: tuple[t.Any, dict[str, t.Any]],
        given_up: threading.Event,
    ) -> None:
        """What a submit waits for Redis for: listen for the task's end, then publish it,
        unless the submit has given up on it meanwhile."""
        try:
            listener = self.listener_for(result_backend)
        except Exception as error:
            raise unavailable("the result backend", error) from None
        lost = listener.lost
        if lost is not None and not listener.reconnect_now(self.settings.celery_submit_timeout):
            # The task could run, but nobody would hear how it ended.
            raise unavailable("the result backend", listener.lost or lost)
        if given_up.is_set():
            return
        try:
            self._publish(*prepared)
        except Exception as error:
            raise unavailable("the broker", error) from None

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

    def _sender(self) -> Sender:
        return self.senders.get(self._new_sender)

    def _new_sender(self) -> Sender:
        sender = Sender(f"threadctx-celery-send-{self.app.name}")
        weakref.finalize(self, sender.stop)  # its threads end with the backend
        return sender

    def task_message(
        self,
        info: TaskInfo,
        message: list[t.Any],
        encoded: str,
        options: CeleryOptions,
    ) -> tuple[t.Any, dict[str, t.Any]]:
        """The message Celery's worker takes, and where it goes: no round trip to Redis."""
        _, path, args, kwargs, _ = message
        # Not Celery's ``send_task``: it would also subscribe for the result, on a connection
        # of the calling thread's own; the result comes on the process's reply channel.
        made = self.celery
        amqp = made.amqp
        soft_time_limit, time_limit = options.get("soft_time_limit"), options.get("time_limit")
        if time_limit is not None:
            # At 'time_limit' the worker asks the task to stop (see 'run_message_here');
            # Celery's hard limit ends the process only if it has not after the grace.
            time_limit += self.settings.time_limit_grace
        publish = {k: v for k, v in options.items() if k in PUBLISH_OPTIONS}
        countdown, eta, expires = (publish.pop(k, None) for k in ("countdown", "eta", "expires"))
        routed = amqp.router.route(publish, TASK_NAME, message, {}, made.tasks[TASK_NAME])
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
        body = f"[{encoded}, {json_dumps(no_kwargs)}, {json_dumps(embed)}]"
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


class Sender:
    """A few daemon threads that send a process's tasks, so that a submit can stop waiting
    for a Redis that hangs (see ``Sending._within_bound``). Daemons: a send that
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


def unavailable(what: str, error: Exception) -> BrokerUnavailable:
    return BrokerUnavailable(
        f"The task was not sent: {what} cannot be reached ({type(error).__name__}: {error})."
        " Nothing was queued; try again later, or answer '503 Service Unavailable'."
    )
