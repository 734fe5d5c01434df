"""Running one claimed task in its contexts, with its signals, and booking its end: what every
engine does with a task that reaches this process. The thread pool is a :class:`Runner`; the
Celery backend hands the tasks a worker receives to the app's pool, so they run here too.

This is the hot path: the odd-looking spots (``_plain_function``, the checks of ``.receivers``
before each signal) are measured; see :doc:`/performance`.

What an engine calls: :meth:`Runner.run_here` (a task that came from another process),
:meth:`Runner.execute` (a task not claimed yet) and :meth:`Runner.run_claimed` (one this thread
claimed). What a subclass provides, declared on :class:`Runner`: the ``_live`` tasks, the
counters and ``_retire``.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import os
import sys
import time
import traceback
import types
import typing as t

from .. import control
from .. import signals
from ..contexts.capture import TeardownFailed
from ..errors import TaskCancelled
from ..errors import TaskTimeout
from ..future import FutureOwner
from ..future import TaskFuture
from ..model import current_task_var
from ..signals import task_cancelled
from ..signals import task_failed
from ..signals import task_finished
from ..signals import task_started

if t.TYPE_CHECKING:
    import flask

    from ..contexts.capture import Capture
    from ..contexts.capture import Outcome
    from ..control import StopReason
    from ..model import TaskInfo
    from ..options import Policy

R = t.TypeVar("R")

RetryHook = t.Callable[["TaskInfo", BaseException], bool]
"""Whether the failed attempt of a task is retried by its engine: see ``Runner.run_here``."""


class Counter:
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


class Runner(FutureOwner):
    """Runs claimed tasks and books them: the part of an engine that runs tasks in this
    process. A subclass sets the counters and ``_live`` and retires finished tasks."""

    plain_ensure_sync: bool
    _live: dict[str, TaskFuture[t.Any]]
    _policies: dict[str, Policy]
    """The options of the live tasks submitted with some, by task id."""
    _retry_hooks: dict[str, RetryHook]
    """What decides the retries of the tasks run here that their engine retries elsewhere (a
    Celery worker's), by task id: see :meth:`run_here`."""
    _submitted: Counter
    _started: Counter
    _succeeded: Counter
    _failed: Counter
    _stopped: Counter
    """Tasks stopped when asked, while they ran."""
    _timed_out: Counter

    def _retry_later(self, future: TaskFuture[t.Any], error: BaseException) -> bool:
        """Whether the task of ``future``, whose attempt raised ``error``, is retried: then
        it is ``"retrying"``, and its ``task_retried`` was sent."""
        return False

    def _owns_end(self, future: TaskFuture[t.Any]) -> bool:
        """Whether the attempt of ``future``'s task that just returned or raised still books
        its own end: not once it was written off, past its time limit and grace."""
        return True

    def _retire(self, future: TaskFuture[R]) -> None:
        raise NotImplementedError

    def run_here(
        self,
        info: TaskInfo,
        captured: Capture,
        fn: t.Callable[..., R],
        args: tuple[object, ...],
        kwargs: dict[str, object],
        *,
        retry: RetryHook | None = None,
        policy: Policy | None = None,
    ) -> TaskFuture[R]:
        """Run the task ``info``, which came from another process, in this thread now, as an
        eager submit would: in ``captured``'s contexts, with its signals.

        :param retry: called in the attempt's thread and contexts if it raises (not if it was
            stopped): whether its engine retries it elsewhere; if so, it has made the task
            ``"retrying"`` and sent ``task_retried``, and the attempt sends neither
            ``task_finished`` nor ``task_failed``.
        :param policy: the task's options, carried out by this runner as for its own eager
            submits (an engine in eager mode): each retry at once, here."""
        self._submitted.increment()
        future = TaskFuture(info, self, captured, fn, args, kwargs)
        self._live[info.id] = future
        future._claim()  # a new future: it is pending, and nobody else knows it yet
        if policy is not None:
            self._keep_policy(info.id, policy)
            self.run_claimed(future)
            while info.state == "retrying" and future._claim():
                self.run_claimed(future)
            return future
        if retry is None:
            self.run_claimed(future)
            return future
        self._retry_hooks[info.id] = retry
        try:
            self.run_claimed(future)
        finally:
            del self._retry_hooks[info.id]
        return future

    def _retried_elsewhere(self, info: TaskInfo, error: BaseException) -> bool:
        """Whether the engine of the task ``info``, whose attempt raised ``error``, retries it
        elsewhere, as its retry hook says (see :meth:`run_here`)."""
        hook = self._retry_hooks.get(info.id)
        return hook is not None and isinstance(error, Exception) and hook(info, error)

    def _keep_policy(self, task_id: str, policy: Policy) -> object:
        """Carry out ``policy`` for the task ``task_id``, not started yet."""
        raise NotImplementedError  # only an engine that takes task options has such tasks

    def execute(self, future: TaskFuture[R]) -> None:
        """Run ``future``'s task in this thread, unless another thread took it first or it was
        cancelled."""
        if future._claim():
            self.run_claimed(future)

    def run_claimed(self, future: TaskFuture[R]) -> None:
        """Run ``future``'s task, which this thread claimed, in this thread, and book its end.

        A task submitted with options runs one attempt here: its engine's
        ``_begin_attempt`` and ``_end_attempt`` decide whether it runs (it may have expired)
        and whether this books it (it may be retried, or written off)."""
        info = future.task
        policies = self._policies
        controlled = info.id in policies if policies else False
        if not controlled:
            self._started.increment()
        elif not self._begin_attempt(future):
            return
        info.started_at = time.time()
        info.state = "running"
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
            if type(error) is SystemExit and _process_ending():
                raise  # from the task, or while its contexts were set up: see '_process_ending'
            result, exception = None, error
            self._fail_outside_task(info, capture, error, "Setting up the contexts of")
        if controlled and not self._end_attempt(future):
            return
        if exception is None:
            self._succeeded.increment()
        else:
            self._count_end(info)
            capture.let_go()
            _clear_frames(exception)
        # Bookkeeping first, so that whoever ``result()`` wakes sees it done.
        self._retire(future)
        future._finish(result, exception)
        if control.asked or control.deadlines:  # after the end: see 'control.forget'
            control.forget(info.id)

    def _count_end(self, info: TaskInfo) -> None:
        """Count the end of the task ``info``, which did not succeed, by its state."""
        state = info.state
        if state == "failed":
            self._failed.increment()
        elif state == "cancelled":
            self._stopped.increment()
        elif state == "retrying":  # an attempt its engine retries elsewhere: it ended here
            self._failed.increment()
        else:
            self._timed_out.increment()

    def _begin_attempt(self, future: TaskFuture[R]) -> bool:
        """Before an attempt of ``future``'s task, which has options: whether it runs now.
        If not, the task was booked (expired, or stopped while it waited for a retry)."""
        raise NotImplementedError  # only an engine that takes task options has such tasks

    def _end_attempt(self, future: TaskFuture[R]) -> bool:
        """After an attempt of ``future``'s task, which has options: whether it is booked
        now, as any task is. If not, it waits for a retry, or was written off."""
        raise NotImplementedError

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

    def _run_task(self, future: TaskFuture[R]) -> Outcome:
        """Call the task's function, with the signals around it, inside the task's contexts."""
        info = future.task
        capture = future._capture
        fn = future._fn
        assert capture is not None and fn is not None  # let go of only once the task has run
        app = capture.app
        current_task_var.set(info)
        if task_started.receivers:
            signals.send(task_started, app, task=info)
        try:
            if not self.plain_ensure_sync or not _plain_function(fn):
                fn = app.ensure_sync(fn)  # raises for ``async def`` without ``flask[async]``
            result = fn(*future._args, **future._kwargs)
        except BaseException as exc:  # a task must never take its worker down with it
            if type(exc) is SystemExit and _process_ending():
                raise  # not the task's end: see '_process_ending'
            del fn  # a failed task's frames outlive it, in the exception's traceback
            controlled = info.id in self._policies if self._policies else False
            if controlled and not self._owns_end(future):
                return None, exc
            if isinstance(exc, TaskCancelled) and (control.asked or control.deadlines):
                exc = _stopped(info, exc)
            else:
                info.state = "failed"
                if (controlled and self._retry_later(future, exc)) or (
                    self._retry_hooks and self._retried_elsewhere(info, exc)
                ):
                    return None, exc
            info.finished_at = time.time()
            if info.state == "cancelled":
                app.logger.info("%s stopped, as asked.", info)
            elif capture.settings.log_exceptions:
                app.logger.error("%s raised an exception.", info, exc_info=exc)
            if task_finished.receivers:
                signals.send(task_finished, app, task=info, result=None, exception=exc)
            if info.state == "cancelled":
                if task_cancelled.receivers:
                    signals.send(task_cancelled, app, task=info)
            elif task_failed.receivers:
                signals.send(task_failed, app, task=info, exception=exc)
            return None, exc
        if self._policies and info.id in self._policies and not self._owns_end(future):
            return result, None
        # The state first, then the stop requests: a 'cancel_task' that comes as the task
        # returns either finds it running, or takes its request out before this does (see
        # 'Pool.stop'); if this takes it, the task was stopped and its result is dropped,
        # unless the task was told (its check raised) and returned all the same.
        info.state = "succeeded"
        if control.asked or control.deadlines:
            reason = control.reason_at_end(info.id)
            if reason is not None:
                return self._stopped_at_end(info, app, reason)
        info.finished_at = time.time()
        if task_finished.receivers:
            signals.send(task_finished, app, task=info, result=result, exception=None)
        return result, None

    def _stopped_at_end(self, info: TaskInfo, app: flask.Flask, reason: StopReason) -> Outcome:
        """Book the task ``info``, which returned after it was asked to stop (``reason``)
        without being told, as stopped: its result is dropped."""
        stop = control.stopped(info.id, reason)
        error: TaskCancelled | TaskTimeout = stop
        if reason == "time_limit":
            info.state = "timed_out"
            error = _timed_out(info, stop)
            app.logger.error("%s returned past its time limit: its result is dropped.", info)
        else:
            info.state = "cancelled"
            app.logger.info("%s returned after it was asked to stop: its result is dropped.", info)
        info.finished_at = time.time()
        if task_finished.receivers:
            signals.send(task_finished, app, task=info, result=None, exception=error)
        if reason == "cancel":
            if task_cancelled.receivers:
                signals.send(task_cancelled, app, task=info)
        elif task_failed.receivers:
            signals.send(task_failed, app, task=info, exception=error)
        return None, error


def _process_ending() -> bool:
    """Whether this process is being ended by its pool: a Celery worker's pool process whose
    task ran past its hard time limit (or in a cold shutdown) gets a SIGTERM, which
    billiard's handler turns into :exc:`SystemExit` in the task, and a SIGKILL 0.1 s later.
    Such a task did not fail: it is killed, and the worker's main process books it
    (``timed_out``, or lost). Booking or signalling it here would race the SIGKILL, so the
    :exc:`SystemExit` goes on untouched. Asked only of a :exc:`SystemExit`: the hot path
    never asks; where billiard is not loaded, no handler of its fired."""
    common = sys.modules.get("billiard.common")
    if common is None:
        return False
    fired = getattr(common, "terminate_handler_fired", None)
    if callable(fired):
        return bool(fired())
    flag = getattr(common, "_should_have_exited", None)  # an older billiard's, the same flag
    return isinstance(flag, list) and bool(flag and flag[0])


def _stopped(info: TaskInfo, error: TaskCancelled) -> BaseException:
    """The outcome of the task ``info``, which raised ``error`` from a check of its stop: it
    is ``"cancelled"`` if it was asked to stop, ``"timed_out"`` (with :exc:`TaskTimeout`) if
    its time limit passed; as it raised it if neither."""
    reason = control.stop_reason(info.id)
    if reason is None:  # raised by hand, or by another task's check: the task's own failure
        info.state = "failed"
        return error
    if reason == "cancel":
        info.state = "cancelled"
        return error
    info.state = "timed_out"
    return _timed_out(info, error)


def _timed_out(info: TaskInfo, error: TaskCancelled) -> TaskTimeout:
    timeout = TaskTimeout(f"{info} ran past its time limit ('time_limit') and stopped.")
    timeout.__cause__ = error
    return timeout


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


def end_forked_child(future: TaskFuture[R]) -> t.NoReturn:
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


def _plain_function(fn: t.Callable[..., object]) -> bool:
    """Whether ``fn`` is a plain ``def`` function that ``ensure_sync`` would return as it is.

    The check costs a tenth of :func:`inspect.iscoroutinefunction`; anything it is unsure of
    (a method, a partial, a wrapped or marked function) goes through ``ensure_sync``.
    """
    return (
        type(fn) is types.FunctionType
        and not fn.__code__.co_flags & inspect.CO_COROUTINE
        and not fn.__dict__
    )
