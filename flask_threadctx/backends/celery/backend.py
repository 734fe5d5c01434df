"""The Celery backend: ``submit()`` sends the task to Celery workers, which rebuild its contexts.

One generic Celery task, :data:`TASK_NAME`, runs every submitted function, found on the worker by
its import path. The submitting process keeps one :class:`Listener` thread on one Redis
connection, subscribed to a reply channel of the process before any task is published: workers
say there when a task starts, how far it got and how it ended, and the listener resolves the
task's :class:`~flask_threadctx.TaskFuture`. Task records shared by
every process (:class:`~.claims.CeleryRecords`) answer ``get_task`` and
``stats`` for tasks of other processes, and decide races: a cancel against a worker starting the
task, a waiting parent running its child itself against a worker taking it.

Its class is put together from parts: this one (submitting, cancelling, looking up, shutting
down), :class:`~.listener.Hearing` (what the listener hears), :class:`~.sending.Sending`
(publishing), :class:`~.stopping.Stopping` (stopping a running task) and
:class:`~.worker.WorkerSide` (running a task that came as a message), on the state that
:class:`~.state.CeleryState` declares.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import threading
import time
import typing as t
import uuid

import flask
from celery import states

from ... import signals
from ...contexts.json_message import encode
from ...contexts.wire import import_path
from ...contexts.wire import message_context
from ...errors import BrokerUnavailable
from ...future import PENDING
from ...future import TaskFuture
from ...model import current_task
from ...model import find_task
from ...model import task_name
from ...model import TaskInfo
from ...model import wait_until_done
from ...options import Policy
from ...signals import task_cancelled
from ...signals import task_rejected
from ...signals import task_submitted
from ..base import Backend
from .claims import CANCELLED_BEFORE
from .listener import Hearing
from .retries import retry_options
from .sending import Sending
from .state import CeleryState
from .state import CeleryTaskInfo
from .state import ForeignTaskInfo
from .stopping import Stopping
from .worker import revoked_message
from .worker import worker_name
from .worker import WorkerSide

if t.TYPE_CHECKING:
    import collections.abc as cabc

    from flask.ctx import AppContext

    from .messages import CeleryOptions


R = t.TypeVar("R")


def _utc(when: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(when, datetime.timezone.utc)


class CeleryBackend(Hearing, Sending, Stopping, WorkerSide, CeleryState, Backend):
    """Runs the tasks of one app on Celery workers; see :doc:`/scaling`.

    :param runner: the app's thread pool, which runs the tasks that reach this process: on a
        worker, in eager mode, and children run by their waiting parent.
    """

    name: t.ClassVar[str] = "celery"

    _shut_down = False  # until 'shutdown'

    # -- submitting -------------------------------------------------------------------------

    def submit(
        self,
        app: flask.Flask,
        app_ctx: AppContext | None,
        fn: t.Callable[..., R],
        args: tuple[object, ...],
        kwargs: dict[str, object],
        options: cabc.Mapping[str, object] | None = None,
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
        celery_options = t.cast("CeleryOptions", options or {})
        if options:  # checked when the function was decorated, or by 'submit_with_options'
            celery_options = self._with_options(info, meta, options, celery_options)
        message = [app.name, path, list(args), kwargs, meta]
        encoded = encode(message, fn)
        if self._shut_down:
            self._reject(info, RuntimeError(f"The Celery backend of {app.name!r} was shut down."))
        if self.settings.eager:
            return self.run_eagerly(info, encoded, options)
        # Made here, so that what Celery refuses in it raises as itself, not as a broker down.
        prepared = self.task_message(info, message, encoded, celery_options)
        future: TaskFuture[R] = TaskFuture(info, self, None, None, (), {})
        result_backend, records = self._connect()
        with self.lock:
            self.live[info.id] = future
        try:
            self.publish_bounded(result_backend, prepared)
        except BrokerUnavailable as error:
            with self.lock:
                self.live.pop(info.id, None)
            # Booked once Redis answers again: if the broker took the message after all (it
            # hung, then went on), the rejection and the worker's claim decide who won.
            records.reject_soon(info, self.reply_channel)
            self._reject(info, error)
        # After the publish, so that the writer thread does not hold it up; a worker that
        # claims the task first is no matter (see 'CeleryRecords.add_soon').
        records.add_soon(info, self.reply_channel)
        if parent is not None and self.runner.live_future(parent.id) is not None:
            # A task waiting for this child may run it itself; see ``before_wait``.
            self.child_messages[info.id] = message
        if task_submitted.receivers:
            signals.send(task_submitted, app, task=info)
        return future

    @staticmethod
    def _with_options(
        info: TaskInfo,
        meta: dict[str, t.Any],
        options: cabc.Mapping[str, object],
        celery_options: CeleryOptions,
    ) -> CeleryOptions:
        """Put what the worker needs of ``options`` in ``meta`` (its time limit, its retry
        options); return what Celery is sent: a start and an expiry from the submit's own
        time, as the thread engine computes them, so that ``info.due_at`` is Celery's ``eta``
        exactly.

        :raise TypeError: a class of ``retry_for`` cannot be imported by its path."""
        if options.get("time_limit") is not None:
            meta["time_limit"] = t.cast(float, options["time_limit"])  # asked to stop then
        retry = retry_options(options, info.name)
        if retry is not None:
            meta["retry"] = retry
        countdown, expires = options.get("countdown"), options.get("expires")
        if countdown is None and not isinstance(expires, float):
            due = t.cast("datetime.datetime | None", options.get("eta"))
            if due is not None and due.timestamp() > time.time():
                info.due_at = due.timestamp()
            return celery_options
        policy = Policy(options)
        sent = t.cast("CeleryOptions", dict(celery_options))
        start, end = policy.start_at(info.submitted_at), policy.expires_at(info.submitted_at)
        if start is not None:
            sent["countdown"] = None
            sent["eta"] = celery_options.get("eta") or _utc(start)
            if start > time.time():
                info.due_at = start
        if end is not None:
            sent["expires"] = _utc(end) if isinstance(expires, float) else celery_options["expires"]
        return sent

    def _reject(self, info: TaskInfo, error: Exception) -> t.NoReturn:
        info.state = "rejected"
        info.finished_at = time.time()
        if task_rejected.receivers:
            signals.send(task_rejected, self.app, task=info, reason=error)
        raise error

    # -- waiting and cancelling --------------------------------------------------------------

    def before_wait(self, future: TaskFuture[R], timeout: float | None) -> None:
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
        message = self.child_messages.pop(future.task.id, None)
        if message is None:
            return
        _, records = self._connect()
        hearer = self.stop_hearer()
        hearer.claiming_to_run(future.task)
        claim, request = records.claim_to_run(
            future.task.id, "inline", worker=worker_name(None), stop=True
        )
        hearer.claimed(future.task.id, claim == "inline", request)
        if claim != "inline":
            return  # a worker has it
        if timeout is None and asyncio._get_running_loop() is None:
            self.run_inline(future, message)
            return
        name = f"{self.settings.thread_name_prefix}-helper-{future.task.id}"
        # A daemon, as the pool's own threads: a worker process that ends meanwhile loses the
        # child as it would lose any task it runs (see Delivery).
        threading.Thread(
            target=self.run_inline, args=(future, message), name=name, daemon=True
        ).start()

    def may_cancel(self, future: TaskFuture[R]) -> bool:
        if self.settings.eager:
            return True
        task_id = future.task.id
        result_backend, records = self._connect()
        with self.lock:
            elsewhere = task_id in self.watched  # else this process is the submitter
            # The listener leaves the REVOKED of a claim alone while it counts here: the
            # cancel that wins books the task and sends 'task_cancelled' here, once.
            self.cancelling[task_id] += 1
        claim = ""
        try:
            claim = records.claim(
                task_id,
                "cancelled",
                revoked_message(result_backend, task_id),
                to_submitter=elsewhere,
                channels=[result_backend.get_key_for_task(task_id)],
            )
        finally:
            with self.claims_decided:
                self.cancelling[task_id] -= 1
                if self.cancelling[task_id] <= 0:
                    del self.cancelling[task_id]
                if claim == "cancelled":
                    self.cancels_won.add(task_id)  # until 'record_cancelled'
                self.claims_decided.notify_all()
        if claim == CANCELLED_BEFORE:
            with self.claims_decided:  # another thread's claim here may be the one that won
                self.claims_decided.wait_for(
                    lambda: task_id not in self.cancelling, self.settings.cancel_timeout
                )
                won_here = task_id in self.cancels_won
            if won_here:
                return True  # by another thread here, whose cancel books it, as does this one
            # Cancelled by another process first, which booked it: learnt now, as from that
            # cancel's message (the listener may not have heard it yet, or left it alone).
            self.on_state(task_id, {"status": states.REVOKED}, heard=False)
            return False
        if claim != "cancelled":
            with contextlib.suppress(Exception):  # else at the listener's next check
                self.catch_up([task_id])  # what the listener left alone meanwhile
            return False
        with contextlib.suppress(Exception):  # the claim holds already; this only saves work
            self.celery.control.revoke(future.task.id)
        return True

    def record_cancelled(self, future: TaskFuture[R]) -> None:
        info = future.task
        info.state = "cancelled"
        info.finished_at = time.time()
        info.due_at = None
        with self.lock:
            self.live.pop(info.id, None)
            self.watched.discard(info.id)
            self.cancels_won.discard(info.id)
        self.child_messages.pop(info.id, None)
        self.finished.append(future)
        if task_cancelled.receivers:
            signals.send(task_cancelled, self.app, task=info)

    # -- looking ----------------------------------------------------------------------------

    def known_futures(self) -> list[TaskFuture[object]]:
        """The futures of the pending and running tasks, then of the last finished ones."""
        # Copies made in C, under the GIL: a worker changing them cannot break a loop over them.
        return [*list(self.live.values()), *list(self.finished)]

    def get(self, task_id: str) -> TaskFuture[object] | None:
        """The future of any task of the app, from whichever process submitted it: one of
        this process's own, or one made from the shared records, resolved by the listener."""
        if self.settings.eager:
            return self.runner.get(task_id)
        future = find_task(self.live, self.finished, task_id)
        if future is not None:
            info = future.task
            if isinstance(info, ForeignTaskInfo):
                self.keep_progress(info, *self._connect()[1].progress_of(task_id))
            return future
        result_backend, records = self._connect()
        records.flush()  # this process's own submits included
        record = records.get(task_id)
        if record is None or record.backend != "celery":  # a thread task, in the task store
            return None
        info = ForeignTaskInfo.of(record)
        future = TaskFuture(info, self, None, None, (), {})
        if info.state == "rejected" or (info.state == "cancelled" and info.started_at is None):
            future._cancelled_elsewhere()
            return future
        if info.started_at is not None and info.state != "retrying":
            # Running, or ended: a task stopped while it ran raises its 'TaskCancelled',
            # stored with its end, which the catch-up below reads.
            future._claim()
        with self.lock:
            self.live[task_id] = future
            self.watched.add(task_id)
        self.listener_for(result_backend).watch(task_id)
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
            for future in list(self.live.values()):
                future.cancel()
        if wait:
            # The tasks run on, elsewhere, whatever this process does: wait a bounded time.
            self.wait_for_live(time.monotonic() + self.settings.shutdown_timeout)
        self.stop_threads()

    def wait_for_live(self, deadline: float | None) -> list[TaskFuture[object]]:
        return wait_until_done(self.live, deadline)
