"""The per-app pool of worker threads: queue, bookkeeping and shutdown.

A worker takes a :class:`~flask_threadctx.future.TaskFuture` from the queue, claims it (moves it
from pending to running, which only one thread can do), and runs its task through
:meth:`~flask_threadctx.context.Capture.run`, which re-creates the submitter's contexts around the
task. Nothing on this path takes a lock shared by all tasks: the queue is a
:class:`queue.SimpleQueue`, the counters are :func:`itertools.count` objects, and the lock a claim
takes is the future's own.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import concurrent.futures
import contextlib
import contextvars
import inspect
import itertools
import logging
import os
import queue
import secrets
import sys
import threading
import time
import traceback
import types
import typing as t
import weakref

import flask

from . import signals
from .context import capture
from .context import TeardownFailed
from .future import PENDING
from .future import TaskFuture
from .signals import task_cancelled
from .signals import task_failed
from .signals import task_finished
from .signals import task_rejected
from .signals import task_started
from .signals import task_submitted

if t.TYPE_CHECKING:
    import collections.abc as cabc

    from flask.ctx import AppContext

    from .config import Settings
    from .context import Capture
    from .context import Outcome
    from .extension import ThreadContext
    from .progress import OnProgress
    from .progress import Progress

R = t.TypeVar("R")

TaskState = t.Literal["pending", "running", "succeeded", "failed", "cancelled", "rejected"]

_current_task: contextvars.ContextVar[TaskInfo] = contextvars.ContextVar("flask_threadctx.task")


def current_task() -> TaskInfo | None:
    """The :class:`TaskInfo` of the task running in this thread, or ``None`` outside a task.

    .. code-block:: python

        app.logger.info("step 2 of %s", current_task().id)
    """
    return _current_task.get(None)


class QueueFull(RuntimeError):
    """Raised by ``submit`` when ``THREADCTX_MAX_QUEUE`` tasks are already waiting to start.
    Never for a child submitted by a running task: that is part of work already accepted.

    The task was not queued. Answer ``503 Service Unavailable`` with a ``Retry-After`` header, or
    try again later.
    """


class TaskInfo:
    """What is known about one task, for status pages and signal receivers.

    Times are Unix timestamps (:func:`time.time`), ``None`` until they happen.
    """

    __slots__ = (
        "_on_progress",
        "_progress",
        "_progress_passed_at",
        "finished_at",
        "id",
        "name",
        "parent_id",
        "request",
        "started_at",
        "state",
        "submitted_at",
    )

    def __init__(self, id: str, name: str, parent_id: str | None, request: str | None) -> None:
        self.id = id
        """Unique among the app's tasks, in every process: each process draws a random prefix
        for the ids of its own."""
        self.name = name
        """The task function's ``__qualname__``."""
        self.parent_id = parent_id
        """The id of the task that submitted this one, or ``None``."""
        self.state: TaskState = "pending"
        """``"pending"``, ``"running"``, ``"succeeded"``, ``"failed"``, ``"cancelled"`` or
        ``"rejected"``."""
        self.submitted_at: float = time.time()
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.request = request
        """``"METHOD /path"`` of the request the task (or its first ancestor) was submitted from,
        or ``None``."""

    backend: t.ClassVar[str] = "threads"
    """The backend that runs the task, ``"threads"`` or ``"celery"``."""

    # Left unset until a task reports its progress: a task that never does pays nothing.
    _progress: Progress
    _progress_passed_at: float
    _on_progress: OnProgress

    @property
    def progress(self) -> Progress | None:
        """The last :func:`~flask_threadctx.report_progress` of the task, or ``None``."""
        return getattr(self, "_progress", None)

    @property
    def redelivery_at(self) -> float | None:
        """While a Celery task is pending: by when the broker has delivered it again (a Unix
        time, a latest bound: its ``visibility_timeout`` and a period of the workers' sweep),
        the worker that had received it (prefetched, not started) being lost; otherwise, and
        for threads, ``None``. See :doc:`/scaling`, "Delivery"."""
        return None

    def __repr__(self) -> str:
        return f"<TaskInfo {self.id} {self.name!r} {self.state}>"

    def __str__(self) -> str:
        return f"task {self.id} ({self.name})"


class _Worker(threading.Thread):
    """One of a pool's worker threads."""

    def __init__(self, pool: Pool, name: str) -> None:
        super().__init__(name=name, daemon=True)
        self.pool = pool

    def run(self) -> None:
        self.pool.work()


class _Helper(_Worker):
    """A thread of a pool that runs the ``tasks`` a waiting task hands it: those of the task
    ``waiter``, which shares it, or, for ``None``, one task of a chain too deep to run inline."""

    def __init__(self, pool: Pool, name: str, waiter: str | None) -> None:
        super().__init__(pool, name)
        self.waiter = waiter
        self.tasks: collections.deque[TaskFuture[t.Any]] = collections.deque()

    def run(self) -> None:
        self.pool.help(self)


class _Counter:
    """A counter that many threads may increment without a lock: ``next()`` on an
    :func:`itertools.count` runs in C, holding the GIL throughout."""

    __slots__ = ("_count", "increment")

    def __init__(self) -> None:
        self._count = itertools.count()
        self.increment = self._count.__next__

    @property
    def value(self) -> int:
        # ``count`` has no accessor; its repr is ``count(N)``.
        return int(repr(self._count)[6:-1])


_pools: weakref.WeakSet[Pool] = weakref.WeakSet()

MAX_INLINE_DEPTH = 16
"""How many tasks one thread runs inside each other while they wait for their children. Each
level costs about ten stack frames, so a chain of waits deeper than this continues on a helper
thread instead of running into the recursion limit."""

_inline = threading.local()


class Pool:
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
        self._reset()
        _pools.add(self)

    def _reset(self) -> None:
        settings = self.settings
        self._queue: queue.SimpleQueue[TaskFuture[t.Any] | None] = queue.SimpleQueue()
        self._slots = threading.BoundedSemaphore(settings.max_queue) if settings.max_queue else None
        self._threads: list[_Worker] = []
        self._helpers: dict[str, _Helper] = {}  # by the id of the task they help
        self._helpers_lock = threading.Lock()
        self._short_of_threads = True
        self._start_lock = threading.Lock()
        self._shut_down = False
        self._stopping = False
        self._id_prefix = secrets.token_hex(4) + "-"
        self._ids = itertools.count(1)
        self._live: dict[str, TaskFuture[t.Any]] = {}
        # ``append`` evicts the oldest atomically, so finishing a task costs one call; looking a
        # finished task up scans the window, which is what a status page can afford.
        self._finished: collections.deque[TaskFuture[t.Any]] = collections.deque(
            maxlen=settings.keep_finished
        )
        self._submitted = _Counter()
        self._rejected = _Counter()
        self._started = _Counter()
        self._succeeded = _Counter()
        self._failed = _Counter()
        self._cancelled = _Counter()

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
        """Queue ``fn(*args, **kwargs)`` to run in copies of the contexts active now.

        :raise QueueFull: ``THREADCTX_MAX_QUEUE`` tasks are waiting already.
        :raise RuntimeError: the pool was shut down.
        """
        captured = capture(app, self.settings, app_ctx)
        parent = _current_task.get(None)
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
        if self.settings.eager:
            self._live[info.id] = future
            if task_submitted.receivers:
                signals.send(task_submitted, app, task=info)
            future._claim()  # a new future: it is pending, and nobody else knows it yet
            self._run_claimed(future)
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

    def _reject(self, future: TaskFuture[t.Any], app: flask.Flask, error: Exception) -> t.NoReturn:
        info = future.task
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
            thread = _Worker(self, f"{self.settings.thread_name_prefix}-{len(threads)}")
            try:
                thread.start()
            except RuntimeError:
                # Python 3.12 starts no thread at interpreter exit, where tasks still submit
                # children during the exit drain: the workers already there run them.
                if not threads:
                    raise
                self._short_of_threads = False
                return
            # A new list, only ever longer: ``shutdown`` reads it without the lock.
            self._threads = [*threads, thread]
            if not threads and not self._shut_down:
                atexit.register(self.drain_at_exit)

    # -- running ----------------------------------------------------------------------------

    def work(self) -> None:
        """The loop of each worker thread."""
        tasks = self._queue
        get = tasks.get
        run = self._run_claimed
        while (future := get()) is not None:
            if future._claim():  # else cancelled, or run by a task that waited for it
                run(future)
                if self._queue is not tasks:  # the task forked, and this is the child process
                    _end_forked_child(future)
            del future  # let a finished task go before waiting for the next

    def help(self, helper: _Helper) -> None:
        """The life of a helper thread: run the tasks its waiting task hands it, those that
        have not started by then, until none is left."""
        tasks = self._queue
        while True:
            with self._helpers_lock:
                if not helper.tasks:
                    if helper.waiter is not None:
                        del self._helpers[helper.waiter]
                    return
                future = helper.tasks.popleft()
            if future._claim():
                self._run_claimed(future)
                if self._queue is not tasks:
                    _end_forked_child(future)
            del future

    def run_here(
        self,
        info: TaskInfo,
        captured: Capture,
        fn: t.Callable[..., R],
        args: tuple[t.Any, ...],
        kwargs: dict[str, t.Any],
    ) -> TaskFuture[R]:
        """Run the task ``info``, which came from another process, in this thread now, as an
        eager submit would: in ``captured``'s contexts, with its signals."""
        self._submitted.increment()
        future = TaskFuture(info, self, captured, fn, args, kwargs)
        self._live[info.id] = future
        future._claim()  # a new future: it is pending, and nobody else knows it yet
        self._run_claimed(future)
        return future

    def execute(self, future: TaskFuture[t.Any]) -> None:
        """Run ``future``'s task in this thread, unless another thread took it first or it was
        cancelled."""
        if future._claim():
            self._run_claimed(future)

    def _run_claimed(self, future: TaskFuture[t.Any]) -> None:
        info = future.task
        info.started_at = time.time()
        info.state = "running"
        self._started.increment()
        capture = future._capture
        assert capture is not None  # let go of only once the task has run
        try:
            result, exception = capture.run(self._run_task, future, info)
        except TeardownFailed as failed:
            result, exception = failed.outcome
            if exception is None:
                result, exception = None, failed.error
                self._fail_outside_task(info, capture, failed.error, "Tearing down the contexts of")
            else:  # the task failed already: its own error stays its outcome
                capture.app.logger.error(
                    "Tearing down the contexts of %s failed.", info, exc_info=failed.error
                )
            del failed
        except BaseException as error:  # setting up the contexts failed; the task never ran
            result, exception = None, error
            self._fail_outside_task(info, capture, error, "Setting up the contexts of")
        if exception is None:
            self._succeeded.increment()
        else:
            self._failed.increment()
            capture.let_go()
            _clear_frames(exception)
        # Bookkeeping first, so that whoever ``result()`` wakes sees it done.
        self._retire(future)
        future._finish(result, exception)

    def _fail_outside_task(
        self, info: TaskInfo, capture: Capture, error: BaseException, what: str
    ) -> None:
        """Book a task as failed by ``error``, raised while its contexts were set up or torn
        down. Its signals are sent outside the task's contexts, which are gone or never were:
        ``task_finished`` only if it was not sent already."""
        app = capture.app
        finished = info.state != "running"
        info.state = "failed"
        info.finished_at = time.time()
        app.logger.error("%s %s failed.", what, info, exc_info=error)
        if not finished and task_finished.receivers:
            signals.send(task_finished, app, task=info, result=None, exception=error)
        if task_failed.receivers:
            signals.send(task_failed, app, task=info, exception=error)

    def _run_task(self, future: TaskFuture[t.Any]) -> Outcome:
        """Call the task's function, with the signals around it, inside the task's contexts."""
        info = future.task
        capture = future._capture
        fn = future._fn
        assert capture is not None and fn is not None  # let go of only once the task has run
        app = capture.app
        _current_task.set(info)
        if task_started.receivers:
            signals.send(task_started, app, task=info)
        try:
            if not self.plain_ensure_sync or not _plain_function(fn):
                fn = app.ensure_sync(fn)  # raises for ``async def`` without ``flask[async]``
            result = fn(*future._args, **future._kwargs)
        except BaseException as exc:  # a task must never take its worker down with it
            del fn  # a failed task's frames outlive it, in the exception's traceback
            info.state = "failed"
            info.finished_at = time.time()
            if capture.settings.log_exceptions:
                app.logger.error("%s raised an exception.", info, exc_info=exc)
            if task_finished.receivers:
                signals.send(task_finished, app, task=info, result=None, exception=exc)
            if task_failed.receivers:
                signals.send(task_failed, app, task=info, exception=exc)
            return None, exc
        info.state = "succeeded"
        info.finished_at = time.time()
        if task_finished.receivers:
            signals.send(task_finished, app, task=info, result=result, exception=None)
        return result, None

    def before_wait(self, future: TaskFuture[t.Any], timeout: float | None) -> None:
        """Called by a thread about to wait for ``future``, a task of this pool that is pending
        or running.

        If the thread is running one of the pool's own tasks and ``future`` has not started,
        every worker may be waiting like it, and ``future`` would never start. Then it runs here
        and now, or on the waiting task's helper thread: when the wait has a timeout (which must
        be able to end the wait), in an event loop (which it would block, and where a coroutine
        task cannot run), and past :data:`MAX_INLINE_DEPTH`.

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
        if future._state != PENDING:
            return
        depth = getattr(_inline, "depth", 0)
        if timeout is not None or asyncio._get_running_loop() is not None:
            self._hand_to_helper(waiter.id, future)
        elif depth < MAX_INLINE_DEPTH:
            tasks = self._queue
            _inline.depth = depth + 1
            try:
                self.execute(future)
            finally:
                _inline.depth = depth
            if self._queue is not tasks:  # the task forked: its waiting parent is the parent's
                _end_forked_child(future)
        else:
            # Where it would have run here: on a new stack, never behind another task.
            self._hand_to_helper(None, future)

    def _hand_to_helper(self, waiter: str | None, future: TaskFuture[t.Any]) -> None:
        """Have ``future`` run on a helper thread: the one of the task ``waiter``, started if
        it has none, or, for ``None``, one of its own. One helper per waiting task runs what
        that task waits for one after the other: a coroutine awaiting a thousand children gets
        one more thread, not a thousand, and the pool's workers take what the helper has not
        come to yet."""
        with self._helpers_lock:
            helper = None if waiter is None else self._helpers.get(waiter)
            if helper is not None:
                helper.tasks.append(future)
                return
            name = f"{self.settings.thread_name_prefix}-helper-{waiter or future.task.id}"
            helper = _Helper(self, name, waiter)
            helper.tasks.append(future)
            if waiter is not None:
                self._helpers[waiter] = helper
        try:
            helper.start()
        except RuntimeError:  # no thread starts at interpreter exit: run them here after all
            with self._helpers_lock:
                if waiter is not None:
                    del self._helpers[waiter]
            for task in helper.tasks:
                self.execute(task)

    def _own_task(self) -> TaskInfo | None:
        """The task of this pool that the calling thread runs, if any: on a worker, in eager
        mode, or on a thread the task's code runs on (an ``async def`` task's event loop, a
        :class:`~flask_threadctx.ContextThread` it started)."""
        task = _current_task.get(None)
        return task if task is not None and task.id in self._live else None

    def _in_own_worker(self) -> bool:
        thread = threading.current_thread()
        return isinstance(thread, _Worker) and thread.pool is self

    def may_cancel(self, future: TaskFuture[t.Any]) -> bool:
        return True  # the future's own lock decides

    def record_cancelled(self, future: TaskFuture[t.Any]) -> None:
        capture = future._capture
        assert capture is not None  # let go of only once the task is done
        app = capture.app
        info = future.task
        info.state = "cancelled"
        info.finished_at = time.time()
        self._cancelled.increment()
        self._retire(future)
        if task_cancelled.receivers:
            signals.send(task_cancelled, app, task=info)

    def _retire(self, future: TaskFuture[t.Any]) -> None:
        self._finished.append(future)
        self._forget(future.task.id)

    def _forget(self, task_id: str) -> None:
        live = self._live
        live.pop(task_id, None)
        if self._shut_down and not live:
            self._stop_workers()  # the last task of a pool that is shutting down

    # -- looking ----------------------------------------------------------------------------

    def get(self, task_id: str) -> TaskFuture[t.Any] | None:
        return find_task(self._live, self._finished, task_id)

    def stats(self) -> dict[str, int]:
        # Read each count after the ones that come later in a task's life, so that no derived
        # count is ever negative.
        succeeded = self._succeeded.value
        failed = self._failed.value
        started = self._started.value
        cancelled = self._cancelled.value
        rejected = self._rejected.value
        submitted = self._submitted.value
        counts = task_counts(submitted, started, succeeded, failed, cancelled, rejected)
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
            # Helpers end when the tasks they ran are done, and may still be on their way out.
            for helper in threading.enumerate():
                if isinstance(helper, _Helper) and helper.pool is self:
                    helper.join()

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

    def wait_for_live(self, deadline: float | None) -> list[TaskFuture[t.Any]]:
        """Wait until no task is pending or running, or ``deadline`` (a
        :func:`time.monotonic` time) passes; return the tasks still pending or running."""
        return wait_until_done(self._live, deadline)

    def reset_after_fork(self) -> None:
        if self._threads:
            atexit.unregister(self.drain_at_exit)
        self._reset()


def _reset_pools_after_fork() -> None:
    for pool in list(_pools):
        pool.reset_after_fork()


os.register_at_fork(after_in_child=_reset_pools_after_fork)


def _clear_frames(error: BaseException) -> None:
    """Drop the local variables of the frames in a failed task's traceback, and in those of the
    exceptions it was raised from or during.

    The future keeps the exception, and so its traceback, for as long as ``get_task`` can find
    it; the frames would keep the task's arguments, what it read from the request, and the
    pool's own frames with the task's captured contexts. File, line and function of each frame
    stay, so the traceback still prints in full. Logging and the ``task_failed`` receivers have
    seen the frames whole by now.
    """
    seen: set[int] = set()
    pending: list[BaseException | None] = [error]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        tb = current.__traceback__
        traceback.clear_frames(tb)
        # The frames that called the first one are kept too (its ``f_back``): the pool's, up to
        # the one running now, which cannot be cleared.
        frame = None if tb is None else tb.tb_frame.f_back
        while frame is not None:
            try:
                frame.clear()
            except RuntimeError:  # still running
                break
            frame = frame.f_back
        pending += (current.__cause__, current.__context__)


def _end_forked_child(future: TaskFuture[t.Any]) -> t.NoReturn:
    """End the child process that ``future``'s task forked, once the task has returned or
    raised there: the thread that runs on in the child is a worker, which would otherwise go on
    to run the parent's queued tasks a second time. As :mod:`multiprocessing` ends the
    processes it forks: the standard streams are flushed, and the exit status is that of
    ``sys.exit`` if the task called it, 1 if it raised anything else, 0 if it returned."""
    error = future._exception
    status = 0
    if isinstance(error, SystemExit):
        if isinstance(error.code, int):
            status = error.code
        elif error.code is not None:
            print(error.code, file=sys.stderr)
            status = 1
    elif error is not None:
        status = 1
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed stream must not keep the child alive
            stream.flush()
    os._exit(status)


def _shut_down_error(app_name: str) -> RuntimeError:
    return RuntimeError(
        f"The task pool of {app_name!r} was shut down; 'submit' cannot queue more tasks."
    )


def find_task(
    live: dict[str, TaskFuture[t.Any]],
    finished: collections.deque[TaskFuture[t.Any]],
    task_id: str,
) -> TaskFuture[t.Any] | None:
    """The future of ``task_id`` among a backend's ``live`` tasks and its window of
    ``finished`` ones."""
    future = live.get(task_id)
    if future is None:
        # ``list()`` copies the deque in one C call; iterating it live could see it change.
        window = list(finished)
        future = next((f for f in reversed(window) if f.task.id == task_id), None)
    return future


def wait_until_done(
    live: dict[str, TaskFuture[t.Any]], deadline: float | None
) -> list[TaskFuture[t.Any]]:
    """Wait until ``live`` is empty, or ``deadline`` (a :func:`time.monotonic` time) passes;
    return the futures still in it."""
    while futures := list(live.values()):
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            return futures
        concurrent.futures.wait(futures, timeout=remaining)
    return []


def task_counts(
    submitted: int, started: int, succeeded: int, failed: int, cancelled: int, rejected: int
) -> dict[str, int]:
    """What ``stats()`` reports, from the counts of what happened to tasks."""
    return {
        "submitted": submitted,
        "queued": submitted - rejected - cancelled - started,
        "running": started - succeeded - failed,
        "succeeded": succeeded,
        "failed": failed,
        "cancelled": cancelled,
        "rejected": rejected,
    }


def task_name(fn: t.Callable[..., t.Any]) -> str:
    """The name a task of ``fn`` goes by in its :class:`TaskInfo`."""
    return getattr(fn, "__qualname__", None) or type(fn).__qualname__


def _plain_function(fn: t.Callable[..., t.Any]) -> bool:
    """Whether ``fn`` is a plain ``def`` function that ``ensure_sync`` would return as it is.

    The check costs a tenth of :func:`inspect.iscoroutinefunction`; anything it is unsure of
    (a method, a partial, a wrapped or marked function) goes through ``ensure_sync``.
    """
    return (
        type(fn) is types.FunctionType
        and not fn.__code__.co_flags & inspect.CO_COROUTINE
        and not fn.__dict__
    )
