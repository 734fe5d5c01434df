"""What the thread pool does for the tasks submitted with options (see :mod:`..options`): it
holds a delayed task until it is due, expires one not started in time, asks one past its time
limit to stop and writes it off after ``THREADCTX_TIME_LIMIT_GRACE``, and retries one whose
error its ``retry_for`` names, after its delay.

A :class:`Controller` is made with a pool's first such task; a pool that never gets one pays
one check of an empty dict per task. Its timer (:mod:`.timer`) holds every delayed task and
every grace in one heap, with one thread.
"""

from __future__ import annotations

import datetime
import logging
import queue
import threading
import time
import typing as t

from .. import control
from .. import signals
from ..errors import TaskExpired
from ..errors import TaskTimeout
from ..future import PENDING
from ..options import Policy
from ..signals import task_cancelled
from ..signals import task_failed
from ..signals import task_finished
from ..signals import task_retried
from ..signals import task_submitted
from .runner import Counter
from .runner import Runner
from .timer import Kind
from .timer import Timer
from .workers import Helper
from .workers import Worker

if t.TYPE_CHECKING:
    import collections.abc as cabc

    import flask

    from ..config import Settings
    from ..future import TaskFuture
    from ..model import TaskInfo

QUEUE_FULL_RETRY = 0.05
"""Seconds after which a task that came due while the pool's queue was full tries again: it
stays pending, never refused, as it was accepted at its submit."""

Attempt = tuple["TaskFuture[t.Any]", int]
"""A task's future, and which of its attempts (its retries so far) a timer entry is for."""


class Controller:
    """The options of one pool's tasks, carried out."""

    def __init__(self, pool: Controls) -> None:
        self.pool = pool
        self.grace = pool.settings.time_limit_grace
        self.timer: Timer[Attempt] = Timer(f"{pool.settings.thread_name_prefix}-timer", self._due)
        # The attempts running with a time limit, and their threads: whoever takes an attempt
        # out first, its end or its write-off, books it (a dict's pop is atomic). An end that
        # took its attempt out is in ``_ended`` until the attempt is booked.
        self._limited: dict[Attempt, threading.Thread] = {}
        self._ended: set[Attempt] = set()
        # Entries of the timer no longer needed (the graces of attempts that ended in time, the
        # starts of tasks cancelled): pruned once they are half of it, so that the timer
        # neither keeps finished tasks nor runs on for them.
        self._ended_entries = 0
        self.expired = Counter()
        self.retrying: set[str] = set()
        """The ids of the tasks waiting for a retry: one set rather than two counters, so that
        ``stats()`` reads how many at once (each call on it is atomic under the GIL)."""
        self.written_off = Counter()
        """Threads written off, each stuck in a task past its time limit and grace."""

    # -- submitting ---------------------------------------------------------------------------

    def hold(self, future: TaskFuture[t.Any], policy: Policy) -> bool:
        """Keep ``future``'s task until it is due, if it has a start ahead: whether it did."""
        info = future.task
        start = policy.start_at(info.submitted_at)
        if start is None or start <= time.time() or self.pool.settings.eager:
            return False
        info.due_at = start
        self.timer.call_at(start, (future, 0))
        return True

    # -- running ------------------------------------------------------------------------------

    def begin_attempt(self, future: TaskFuture[t.Any]) -> bool:
        """Before an attempt of the claimed task of ``future``: whether it runs now. Its
        first attempt does not once it expired, a retry not once a stop was asked for; either
        is booked here."""
        pool = self.pool
        info = future.task
        policy = pool._policies[info.id]
        if info.retries == 0:
            expires = policy.expires_at(info.submitted_at)
            if expires is not None and time.time() >= expires:
                self._expire(future, expires)
                return False
            pool._started.increment()
        else:
            self.retrying.discard(info.id)
            if control.asked.get(info.id) is not None:  # asked to stop while it waited
                self._stop_before(future)
                return False
        info.due_at = None
        limit = policy.time_limit
        if limit is not None:
            key = (future, info.retries)
            control.set_time_limit(info.id, limit)
            self._limited[key] = threading.current_thread()
            self.timer.call_at(time.time() + limit + self.grace, key, "grace")
        return True

    def end_attempt(self, future: TaskFuture[t.Any]) -> bool:
        """After an attempt of the claimed task of ``future``: whether the runner books it
        now. Not if it was written off meanwhile, nor if it is to be retried: then it is
        pending again, due after its delay (at once, in eager mode: see :meth:`Pool.submit
        <flask_threadctx.backends.pool.Pool.submit>`)."""
        pool = self.pool
        info = future.task
        retrying = info.state == "retrying"
        policy = pool._policies[info.id]
        limit = policy.time_limit
        if limit is not None:
            if not self._took_end((future, info.retries - retrying)):
                del pool._policies[info.id]
                self._ended_late(info, limit)
                return False
            self.entry_ended()
        if not retrying:
            del pool._policies[info.id]
            return True
        control.deadlines.pop(info.id, None)  # the next attempt gets a limit of its own
        future._unclaim()  # pending again: 'cancel()' keeps it from running
        if not pool.settings.eager:
            self.timer.call_at(t.cast(float, info.due_at), (future, info.retries))
        if pool._shut_down:  # since 'retry_later' looked: cancelled, as the delayed tasks are
            future.cancel()
        return False

    def entry_ended(self) -> None:
        """Note that an entry of the timer is no longer needed (its attempt ended in time, or
        its task was cancelled while it waited); prune them once they are half of it."""
        self._ended_entries += 1  # a count for pruning: a lost increment costs nothing
        if self._ended_entries * 2 >= len(self.timer):
            self._ended_entries = 0
            self.timer.prune(self._still_needed)

    def _still_needed(self, key: Attempt, kind: Kind) -> bool:
        future, attempt = key
        if kind == "grace":
            return key in self._limited
        return future._state == PENDING and future.task.retries == attempt

    def owns_end(self, future: TaskFuture[t.Any]) -> bool:
        """Whether the attempt of ``future``'s task that just returned or raised books its own
        end, its state and signals: called by the runner before it books anything, so that an
        attempt written off meanwhile changes nothing."""
        info = future.task
        if self.pool._policies[info.id].time_limit is None:
            return True
        key = (future, info.retries)
        if self._limited.pop(key, None) is None:
            return False
        self._ended.add(key)
        return True

    def _took_end(self, key: Attempt) -> bool:
        """Whether the attempt ``key``, which has run, is this thread's to book: its end took
        it out (:meth:`owns_end`), or does now (its contexts failed before it ran)."""
        if key in self._ended:
            self._ended.discard(key)
            return True
        return self._limited.pop(key, None) is not None

    def retry_later(self, future: TaskFuture[t.Any], error: BaseException) -> bool:
        """Whether the attempt of ``future``'s task that raised ``error`` is retried; if so,
        it is ``"retrying"``, due after its delay, and ``task_retried`` is sent (in the task's
        contexts). A pool that is shutting down retries nothing: the task fails."""
        pool = self.pool
        info = future.task
        policy = pool._policies[info.id]
        if pool._shut_down or not policy.retries(error, info.retries):
            return False
        delay = policy.retry_delay(info.retries)
        info.retries += 1
        info.state = "retrying"
        info.due_at = time.time() + delay
        self.retrying.add(info.id)
        capture = future._capture
        assert capture is not None
        if task_retried.receivers:
            signals.send(task_retried, capture.app, task=info, exception=error, delay=delay)
        return True

    def _due(self, key: Attempt, kind: Kind) -> None:
        """Called by the timer: a task is due to start, or a grace ended."""
        future, attempt = key
        if kind == "grace":
            self._write_off(future, attempt)
            return
        if future._state != PENDING or future.task.retries != attempt:
            return  # cancelled while it waited, or this attempt ran already (see 'before_wait')
        try:
            queued = self.pool.enqueue_due(future, retry=attempt > 0)
        except Exception:  # the timer's thread must go on for the other tasks
            logging.getLogger(self.pool.app_name).exception(
                "Could not queue %s, which came due.", future.task
            )
            return
        if not queued:
            self.timer.call_at(time.time() + QUEUE_FULL_RETRY, key)

    # -- ending -------------------------------------------------------------------------------

    def _expire(self, future: TaskFuture[t.Any], expires: float) -> None:
        pool = self.pool
        info = future.task
        info.state = "expired"
        info.finished_at = time.time()
        info.due_at = None
        self.expired.increment()
        del pool._policies[info.id]
        when = datetime.datetime.fromtimestamp(expires, datetime.timezone.utc).isoformat()
        error = TaskExpired(f"{info} had not started by its 'expires' ({when}); it never ran.")
        capture = future._capture
        assert capture is not None
        app = capture.app
        pool._retire(future)
        # The signal before the wake, as for every end: whoever 'result()' wakes sees it sent.
        if task_cancelled.receivers:
            signals.send(task_cancelled, app, task=info)
        future._finish(None, error)

    def _stop_before(self, future: TaskFuture[t.Any]) -> None:
        """Book the task of ``future``, asked to stop as it went to wait for a retry, as
        stopped without running it again."""
        pool = self.pool
        info = future.task
        info.state = "cancelled"
        info.finished_at = time.time()
        info.due_at = None
        del pool._policies[info.id]
        capture = future._capture
        assert capture is not None
        app = capture.app
        app.logger.info("%s stopped before its retry, as asked.", info)
        error = control.stopped(info.id, "cancel")
        pool._stopped.increment()
        pool._retire(future)
        if task_cancelled.receivers:
            signals.send(task_cancelled, app, task=info)
        future._finish(None, error)
        control.forget(info.id)

    def _write_off(self, future: TaskFuture[t.Any], attempt: int) -> None:
        """End the attempt ``attempt`` of ``future``'s task, if it still runs a grace past its
        time limit: its future fails with :exc:`TaskTimeout`, and the worker thread stuck in
        it is replaced, so that the pool keeps its size (Python cannot stop a thread)."""
        thread = self._limited.pop((future, attempt), None)
        if thread is None:  # it ended in time
            return
        pool = self.pool
        info = future.task
        # Its policy stays until the thread returns from the task (see 'end_attempt').
        limit = t.cast(float, pool._policies[info.id].time_limit)
        info.state = "timed_out"
        info.finished_at = time.time()
        # A worker is replaced; the thread that submitted an eager task, or a helper, is not
        # the pool's to replace.
        replaced = pool.replace_thread(thread)
        error = TaskTimeout(
            f"{info} ran past its time limit ({limit:g} s) and did not stop within"
            f" 'THREADCTX_TIME_LIMIT_GRACE' ({self.grace:g} s). Its thread was written off"
            f"{' and replaced' if replaced else ''}; it runs on until the task returns, and"
            " what it returns is dropped. Call 'check_cancelled()' in long loops so that the"
            " task stops when asked."
        )
        capture = future._capture
        assert capture is not None
        app = capture.app
        app.logger.error("%s", error)
        pool._timed_out.increment()
        self.written_off.increment()
        pool._retire(future)
        if task_finished.receivers:
            signals.send(task_finished, app, task=info, result=None, exception=error)
        if task_failed.receivers:
            signals.send(task_failed, app, task=info, exception=error)
        future._finish(None, error)

    def _ended_late(self, info: TaskInfo, limit: float) -> None:
        logging.getLogger(self.pool.app_name).warning(
            "%s returned after it was written off (its time limit of %g s and the grace of"
            " %g s had passed): what it returned is dropped.",
            info,
            limit,
            self.grace,
        )
        control.forget(info.id)

    def cancel_waiting(self) -> None:
        """Cancel the tasks waiting for their start or a retry: at shutdown. Each is counted
        and signalled as cancelled; none is dropped silently."""
        for future, _ in self.timer.take("start"):
            future.cancel()


class Controls(Runner):
    """What a :class:`~flask_threadctx.backends.pool.Pool` does for its tasks with options,
    and to stop its tasks: a part of the pool, kept here with the :class:`Controller` it
    makes. What it uses of the rest of the pool is declared here."""

    app_name: str
    settings: Settings
    _shut_down: bool
    _control: Controller | None
    _default_options: dict[str, object] | None
    _queue: queue.SimpleQueue[TaskFuture[t.Any] | None]
    _slots: threading.BoundedSemaphore | None
    _start_lock: threading.Lock
    _threads: list[Worker]
    _short_of_threads: bool

    def _add_thread(self) -> None:
        raise NotImplementedError

    def get(self, task_id: str) -> TaskFuture[object] | None:
        raise NotImplementedError

    def _held(
        self,
        app: flask.Flask,
        future: TaskFuture[t.Any],
        options: cabc.Mapping[str, t.Any] | None,
    ) -> bool:
        """Keep the options of ``future``'s task; hold the task until it is due if it starts
        later (it is then live, and ``task_submitted`` sent): whether it was held."""
        policy = Policy({**(self._default_options or {}), **(options or {})})
        info = future.task
        controller = self._keep_policy(info.id, policy)
        if not controller.hold(future, policy):
            return False
        self._live[info.id] = future
        if task_submitted.receivers:
            signals.send(task_submitted, app, task=info)
        return True

    def _keep_policy(self, task_id: str, policy: Policy) -> Controller:
        """Carry out ``policy`` for the task ``task_id``, not started yet; the controller that
        does."""
        controller = self._control
        if controller is None:
            with self._start_lock:
                controller = self._control = self._control or Controller(self)
        self._policies[task_id] = policy
        return controller

    def enqueue_due(self, future: TaskFuture[t.Any], *, retry: bool) -> bool:
        """Queue ``future``, which was held until it was due: whether it is queued (or no
        longer pending). A retry takes no place in the bounded queue, as a running task's
        children do; a delayed start does, and waits (``False``) while the queue is full."""
        slots = self._slots
        if slots is not None and not retry:
            if not slots.acquire(blocking=False):
                return False
            if not future._take_slot(slots):
                return True
        self._queue.put(future)
        if self._short_of_threads:
            self._add_thread()
        return True

    def _begin_attempt(self, future: TaskFuture[t.Any]) -> bool:
        assert self._control is not None  # made with the task's options
        return self._control.begin_attempt(future)

    def _end_attempt(self, future: TaskFuture[t.Any]) -> bool:
        assert self._control is not None
        return self._control.end_attempt(future)

    def _retry_later(self, future: TaskFuture[t.Any], error: BaseException) -> bool:
        assert self._control is not None
        return self._control.retry_later(future, error)

    def _owns_end(self, future: TaskFuture[t.Any]) -> bool:
        assert self._control is not None
        return self._control.owns_end(future)

    def replace_thread(self, thread: threading.Thread) -> bool:
        """Start a worker in place of ``thread``, which is stuck in a task written off, if it
        is one of this pool's workers: it ends once the task returns. Whether it was one."""
        if not isinstance(thread, Worker) or isinstance(thread, Helper) or thread.pool is not self:
            return False
        with self._start_lock:
            if thread not in self._threads:
                return False
            thread.written_off = True
            self._threads = [worker for worker in self._threads if worker is not thread]
            self._short_of_threads = True
        self._add_thread()
        return True

    def stop(self, task_id: str) -> bool | None:
        """See :meth:`.base.Backend.stop`."""
        future = self.get(task_id)
        if future is None:
            return None
        if future.done():
            return False
        if future.cancel():  # pending, delayed or waiting for a retry: it never runs again
            return True
        control.ask_to_stop(task_id)
        state = future.task.state
        if state in ("pending", "running", "retrying"):
            return True  # its next check, its end or its next attempt sees the request
        if state == "succeeded":
            # It returned as the request came: whichever of this and the runner (see
            # 'Runner._run_task') takes the request out decides, the runner by booking it
            # cancelled.
            stopped = control.asked.pop(task_id, None) is None
        else:
            stopped = state == "cancelled"
        if future.done():  # a request left behind would never be cleared
            control.forget(task_id)
        return stopped
