"""The per-app pool of worker threads: queue, bookkeeping and shutdown.

A worker takes a :class:`~flask_threadctx.future.TaskFuture` from the queue, claims it (moves it
from pending to running, which only one thread can do), and runs its task through
:meth:`~flask_threadctx.contexts.capture.Capture.run`, which re-creates the submitter's contexts
around the task. Nothing on this path takes a lock shared by all tasks: the queue is a
:class:`queue.SimpleQueue`, the counters are :func:`itertools.count` objects, and the lock a claim
takes is the future's own.

The running itself, the hot path shared with the Celery backend's worker side, is
:class:`~flask_threadctx.backends.runner.Runner`'s. A pool owns the queue, its bookkeeping
(the live tasks, the window of finished ones, the counts), starting its worker threads, and
shutdown, the drain at interpreter exit included. The thread classes, and what a task that waits
for a child which has not started does (run it, here or on a helper thread), are
:mod:`~flask_threadctx.backends.workers`'; the pool decides only that a wait is such a wait.
What the options of a task ask for (delays, expiry, time limits, retries) and stopping a task
are :mod:`~flask_threadctx.backends.controlled`'s: the pool's :class:`.controlled.Controls`
part, and its ``Controller``, which reads and writes these of its pool, their internal API:
``_policies`` (the options of the live tasks that have some, by task id; the controller
deletes a task's entry when it books or hands back its end), ``_started``, ``_stopped`` and
``_timed_out`` (counters), ``_retire(future)`` and ``_shut_down``.
"""

from __future__ import annotations

import atexit
import collections
import itertools
import logging
import queue
import secrets
import threading
import time
import typing as t

import flask

from .. import signals
from .._process import reset_in_child
from ..contexts.capture import capture
from ..errors import QueueFull
from ..future import PENDING
from ..future import TaskFuture
from ..model import current_task_var
from ..model import find_task
from ..model import task_counts
from ..model import TaskInfo
from ..model import wait_until_done
from ..options import Policy
from ..signals import task_cancelled
from ..signals import task_rejected
from ..signals import task_submitted
from .base import Backend
from .controlled import Controls
from .runner import Counter
from .runner import end_forked_child
from .runner import Runner
from .workers import join_helpers
from .workers import Waits
from .workers import Worker

if t.TYPE_CHECKING:
    import collections.abc as cabc

    from flask.ctx import AppContext

    from ..config import Settings
    from ..extension import ThreadContext
    from .controlled import Controller
    from .runner import RetryHook

R = t.TypeVar("R")


class Pool(Controls, Runner, Backend):
    """The worker threads, queue and task registry of one app.

    Threads start with the first submits, one with each, so a pool created before ``os.fork()``
    (``gunicorn --preload``) has none to lose; a pool that did start is reset in the child.
    """

    name: t.ClassVar[str] = "threads"

    def __init__(self, app: flask.Flask, settings: Settings, extension: ThreadContext) -> None:
        self.app_name = app.name
        self.settings = settings
        self.extension = extension
        """The extension that registered this pool on its app."""
        self.plain_ensure_sync = type(
            app
        ).ensure_sync is flask.Flask.ensure_sync and "ensure_sync" not in vars(app)
        """Whether the app runs plain functions as they are, so tasks may skip the call."""
        self._default_options: dict[str, object] | None = (
            None if settings.time_limit is None else {"time_limit": settings.time_limit}
        )
        """The options of every task, from the config: ``THREADCTX_TIME_LIMIT``."""
        self._reset()
        reset_in_child(self)

    def _reset(self) -> None:
        settings = self.settings
        self._queue: queue.SimpleQueue[TaskFuture[t.Any] | None] = queue.SimpleQueue()
        self._slots = threading.BoundedSemaphore(settings.max_queue) if settings.max_queue else None
        self._threads: list[Worker] = []
        self.waits = Waits(self)
        """Where a task that waits for a child of this pool has it run (see
        :meth:`before_wait`): the internal API of :mod:`.workers`, which also tells by it that
        a task forked."""
        self._threads_started = 0  # names each new worker, replacements included
        self._short_of_threads = True
        self._start_lock = threading.Lock()
        self._shut_down = False
        self._stopping = False
        self._id_prefix = secrets.token_hex(4) + "-"
        self._ids = itertools.count(1)
        self._live: dict[str, TaskFuture[t.Any]] = {}
        self._policies: dict[str, Policy] = {}
        self._retry_hooks: dict[str, RetryHook] = {}
        self._control: Controller | None = None
        """What carries out task options: made with the first task that has some."""
        # ``append`` evicts the oldest atomically, so finishing a task costs one call; looking a
        # finished task up scans the window, which is what a status page can afford.
        self._finished: collections.deque[TaskFuture[t.Any]] = collections.deque(
            maxlen=settings.keep_finished
        )
        self._submitted = Counter()
        self._rejected = Counter()
        self._started = Counter()
        self._succeeded = Counter()
        self._failed = Counter()
        self._cancelled = Counter()
        self._stopped = Counter()
        self._timed_out = Counter()

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
        """Queue ``fn(*args, **kwargs)`` to run in copies of the contexts active now.

        :raise QueueFull: ``THREADCTX_MAX_QUEUE`` tasks are waiting already.
        :raise RuntimeError: the pool was shut down.
        """
        captured = capture(app, self.settings, app_ctx)
        parent = current_task_var.get(None)
        snapshot = captured.snapshot
        info = TaskInfo(
            f"{self._id_prefix}{next(self._ids)}",
            getattr(fn, "__qualname__", None) or type(fn).__qualname__,
            None if parent is None else parent.id,
            parent.request if parent else snapshot.label if snapshot else None,
        )
        self._submitted.increment()
        future = TaskFuture(info, self, captured, fn, args, kwargs)
        # After shutdown, the pool's own tasks may still submit children: they are part of the
        # work being finished. ``parent.id in _live`` says the parent is a running task here.
        from_outside = parent is None or parent.id not in self._live
        if self._shut_down and from_outside:
            self._reject(future, app, _shut_down_error(self.app_name))
        if (options or self._default_options) and self._held(app, future, options):
            return future
        if self.settings.eager:
            self._live[info.id] = future
            if task_submitted.receivers:
                signals.send(task_submitted, app, task=info)
            future._claim()  # a new future: it is pending, and nobody else knows it yet
            self.run_claimed(future)
            # Eagerly, a retry runs at once, in the same thread (as Celery's eager mode does).
            while info.state == "retrying" and future._claim():
                self.run_claimed(future)
            return future
        slots = self._slots
        # The bound is for new work only: a running task's children are part of work already
        # accepted, and refusing them would lose it half done.
        if slots is not None and from_outside:
            if not slots.acquire(blocking=False):
                self._reject(
                    future,
                    app,
                    QueueFull(
                        f"The task queue of {self.app_name!r} is full"
                        f" ('THREADCTX_MAX_QUEUE' = {self.settings.max_queue}). Try again"
                        " later, or answer '503 Service Unavailable'."
                    ),
                )
            future._slot = slots
        self._live[info.id] = future
        self._queue.put(future)
        if self._shut_down and from_outside and future._claim():
            # ``shutdown`` ran between the check above and the put: the workers may be stopping
            # already, so the task is refused rather than stranded.
            self._take_back(future, app, _shut_down_error(self.app_name))
        if task_submitted.receivers:
            signals.send(task_submitted, app, task=info)
        if self._short_of_threads:
            # After the signal: the new thread takes the task at once.
            try:
                self._add_thread()
            except RuntimeError as error:  # no worker at all could start to run the task
                if future._claim():
                    self._take_back(future, app, error)
                raise
        return future

    def _take_back(
        self, future: TaskFuture[t.Any], app: flask.Flask, error: Exception
    ) -> t.NoReturn:
        """Refuse a task that was queued, and that this thread claimed so that no worker runs
        it. It was live for a moment, so ``shutdown`` may be waiting on it: it is finished with
        ``error`` for them, before ``submit`` raises ``error``."""
        self._forget(future.task.id)
        future._finish(None, error)
        self._reject(future, app, error)

    def _reject(self, future: TaskFuture[R], app: flask.Flask, error: Exception) -> t.NoReturn:
        info = future.task
        if self._policies:
            self._policies.pop(info.id, None)
        info.state = "rejected"
        info.finished_at = time.time()
        self._rejected.increment()
        if task_rejected.receivers:
            signals.send(task_rejected, app, task=info, reason=error)
        raise error

    def _add_thread(self) -> None:
        """Start one more worker, until there are ``THREADCTX_MAX_WORKERS`` or the workers are
        being stopped.

        One with each submit rather than all at the first: starting a thread hands it the GIL,
        so each new worker takes its task at once, where workers started up front wake one by
        one whenever the submitting thread lets go of the GIL. With 32 workers on 2 cores that
        took the last of them 14 ms instead of 6.
        """
        with self._start_lock:
            threads = self._threads
            if self._stopping or len(threads) >= self.settings.max_workers:
                self._short_of_threads = False
                return
            number = self._threads_started
            thread = Worker(self, f"{self.settings.thread_name_prefix}-{number}")
            try:
                thread.start()
            except RuntimeError:
                # Python 3.12 starts no thread at interpreter exit, where tasks still submit
                # children during the exit drain: the workers already there run them.
                if not threads:
                    raise
                self._short_of_threads = False
                return
            self._threads_started = number + 1
            # A new list (never changed in place): ``shutdown`` reads it without the lock.
            self._threads = [*threads, thread]
            if not threads and not self._shut_down:
                atexit.register(self.drain_at_exit)

    # -- running ----------------------------------------------------------------------------

    def work(self, worker: Worker) -> None:
        """The loop of each worker thread."""
        tasks = self._queue
        get = tasks.get
        run = self.run_claimed
        while (future := get()) is not None:
            if future._claim():  # else cancelled, or run by a task that waited for it
                run(future)
                if self._queue is not tasks:  # the task forked, and this is the child process
                    end_forked_child(future)
                if worker.written_off:
                    return
            del future  # let a finished task go before waiting for the next

    def before_wait(self, future: TaskFuture[R], timeout: float | None) -> None:
        """Called by a thread about to wait for ``future``, a task of this pool that is pending
        or running.

        If the thread is running one of the pool's own tasks and ``future`` has not started,
        every worker may be waiting like it, and ``future`` would never start. Then it runs here
        and now (a delayed task, or one waiting for a retry, once it is due), or on the waiting
        task's helper thread: when the wait has a timeout (which must
        be able to end the wait), in an event loop (which it would block, and where a coroutine
        task cannot run), and past :data:`~.workers.MAX_INLINE_DEPTH`: see :class:`.Waits`.

        :raise RuntimeError: ``future`` is the waiting task's own, which would wait forever.
        """
        waiter = self._own_task()
        if waiter is None:
            return
        if waiter is future.task:
            raise RuntimeError(
                f"{waiter} waited for its own result, which comes only once it returns: it"
                " would wait forever. Return the value instead."
            )
        ends = None if timeout is None else time.monotonic() + timeout
        # Again for each retry of a child run here, pending once more until its retry is due;
        # a helper thread runs the retries of those it runs itself.
        while future._state == PENDING:
            due = future.task.due_at
            if due is not None:  # delayed, or waiting for a retry: it runs once it is due
                wait = due - time.time()
                if ends is not None and time.monotonic() + wait >= ends:
                    return  # the wait ends first
                if wait > 0:
                    threading.Event().wait(wait)
                if future._state != PENDING:  # cancelled, or the timer queued it and it ran
                    return
            left = None if ends is None else max(ends - time.monotonic(), 0.0)
            if not self.waits.run_child(waiter.id, future, left):
                return

    def _own_task(self) -> TaskInfo | None:
        """The task of this pool that the calling thread runs, if any: on a worker, in eager
        mode, or on a thread the task's code runs on (an ``async def`` task's event loop, a
        :class:`~flask_threadctx.ContextThread` it started)."""
        task = current_task_var.get(None)
        return task if task is not None and task.id in self._live else None

    def _in_own_worker(self) -> bool:
        thread = threading.current_thread()
        return isinstance(thread, Worker) and thread.pool is self

    def may_cancel(self, future: TaskFuture[R]) -> bool:
        return True  # the future's own lock decides

    def record_cancelled(self, future: TaskFuture[R]) -> None:
        capture = future._capture
        assert capture is not None  # let go of only once the task is done
        app = capture.app
        info = future.task
        if self._policies and self._policies.pop(info.id, None) is not None:
            if info.due_at is not None:  # its entry in the timer is not needed any more
                assert self._control is not None
                self._control.entry_ended()
            info.due_at = None
            if info.state == "retrying":  # it started before: stopped, and waits no more
                assert self._control is not None
                self._control.retrying.discard(info.id)
                self._stopped.increment()
            else:
                self._cancelled.increment()
        else:
            self._cancelled.increment()
        info.state = "cancelled"
        info.finished_at = time.time()
        self._retire(future)
        if task_cancelled.receivers:
            signals.send(task_cancelled, app, task=info)

    def _retire(self, future: TaskFuture[R]) -> None:
        self._finished.append(future)
        self._forget(future.task.id)

    def _forget(self, task_id: str) -> None:
        live = self._live
        live.pop(task_id, None)
        if self._shut_down and not live:
            self._stop_workers()  # the last task of a pool that is shutting down

    # -- looking ----------------------------------------------------------------------------

    def live_future(self, task_id: str) -> TaskFuture[object] | None:
        """The future of ``task_id`` if it is pending or running here."""
        return self._live.get(task_id)

    def known_futures(self) -> list[TaskFuture[object]]:
        """The futures of the pending and running tasks, then of the last finished ones."""
        # Copies made in C, under the GIL: a worker changing them cannot break a loop over them.
        return [*list(self._live.values()), *list(self._finished)]

    def get(self, task_id: str) -> TaskFuture[object] | None:
        return find_task(self._live, self._finished, task_id)

    def stats(self) -> dict[str, int]:
        # Read each count after the ones that come later in a task's life, so that no derived
        # count is ever negative: its end, its wait for a retry, its start.
        succeeded = self._succeeded.value
        failed = self._failed.value
        stopped = self._stopped.value
        timed_out = self._timed_out.value
        control = self._control
        retrying = 0 if control is None else len(control.retrying)
        started = self._started.value
        expired = 0 if control is None else control.expired.value
        cancelled = self._cancelled.value
        rejected = self._rejected.value
        submitted = self._submitted.value
        counts = task_counts(
            submitted,
            started,
            succeeded,
            failed,
            cancelled,
            rejected,
            expired=expired,
            stopped=stopped,
            timed_out=timed_out,
            retrying=retrying,
        )
        counts["max_workers"] = self.settings.max_workers
        return counts

    # -- stopping -------------------------------------------------------------------------

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Refuse new tasks from outside the pool, optionally cancel the waiting ones, and stop
        the workers once every task, and every child they submit, has finished.

        :raise RuntimeError: ``wait`` is true and this is one of the pool's own tasks, which
            would wait for itself.
        """
        if wait and (self._in_own_worker() or self._own_task() is not None):
            raise RuntimeError(
                f"'shutdown(wait=True)' was called in a task of {self.app_name!r}, which would"
                " wait for itself to finish. Call 'shutdown(wait=False)' in a task."
            )
        self._shut_down = True
        if self._control is not None:
            self._control.cancel_waiting()
        if cancel_futures:
            for future in list(self._live.values()):
                future.cancel()
        if not self._live:
            self._stop_workers()
        if wait:
            self.wait_for_live(None)
            # The last task may have ended while a submit was still starting a worker for it:
            # stopping the workers takes the lock that starting one holds, and once they are
            # stopping, no worker starts, so the list joined here is the whole of them.
            self._stop_workers()
            for thread in self._threads:
                if thread is not threading.current_thread():
                    thread.join()
            join_helpers(self)

    def _stop_workers(self) -> None:
        """Stop the workers of a pool that was shut down, once no task is left. The exit hook
        stays registered until then, so that tasks still queued when the interpreter exits are
        run, or cancelled and logged, rather than dropped with the daemon threads."""
        with self._start_lock:
            if self._stopping:
                return
            self._stopping = True
            threads = self._threads
            if threads:
                atexit.unregister(self.drain_at_exit)
        for _ in threads:
            self._queue.put(None)

    def drain_at_exit(self) -> None:
        """Let waiting and running tasks (and the children they submit) finish at interpreter
        exit, within ``THREADCTX_SHUTDOWN_TIMEOUT``; cancel those that never started, and log
        those still running after a further grace period."""
        self._shut_down = True
        if self._control is not None:
            self._control.cancel_waiting()
        logger = logging.getLogger(self.app_name)  # the same logger as ``app.logger``
        timeout = self.settings.shutdown_timeout
        not_done = self.wait_for_live(time.monotonic() + timeout)
        cancelled = [future for future in not_done if future.cancel()]
        if cancelled:
            logger.warning(
                "Cancelled %d task(s) of %r that had not started when"
                " 'THREADCTX_SHUTDOWN_TIMEOUT' (%ss) ran out at exit.",
                len(cancelled),
                self.app_name,
                timeout,
            )
        if any(not future.cancelled() for future in not_done):
            grace = max(timeout, 1.0)
            for future in self.wait_for_live(time.monotonic() + grace):
                logger.error(
                    "Abandoned %s of %r: still running %ss after the exit timeout.",
                    future.task,
                    self.app_name,
                    grace,
                )
        self.shutdown(wait=False)

    def wait_for_live(self, deadline: float | None) -> list[TaskFuture[object]]:
        """Wait until no task is pending or running, or ``deadline`` (a
        :func:`time.monotonic` time) passes; return the tasks still pending or running."""
        return wait_until_done(self._live, deadline)

    def reset_after_fork(self) -> None:
        if self._threads:
            atexit.unregister(self.drain_at_exit)
        self._reset()


def _shut_down_error(app_name: str) -> RuntimeError:
    return RuntimeError(
        f"The task pool of {app_name!r} was shut down; 'submit' cannot queue more tasks."
    )
