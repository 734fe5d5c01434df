"""The future of one task: a :class:`concurrent.futures.Future` that costs little until someone
waits on it.

The stdlib's ``Future.__init__`` builds a :class:`threading.Condition` (an ``RLock``, a deque
and five bound methods) for every future, and takes it on every change of state. For a trivial
task that is more work than the rest of the task's life together, and the many small objects
keep the garbage collector busy while tasks queue up. A :class:`TaskFuture` has a plain lock
instead, taken for each change of state. A thread that waits for the task sleeps on a lock of its
own, which finishing the task releases; ``result()`` and ``exception()`` of a finished task read
it without any lock, as its state never changes again.

The states, and the ``_condition`` and ``_waiters`` that :func:`concurrent.futures.wait` and
:func:`~concurrent.futures.as_completed` use, are the stdlib's own, so those work unchanged; the
condition is made when one of them first asks for it.

The owner's side
----------------
A future has two sides. Its users see the stdlib's API. The engine that owns it (a
:class:`FutureOwner`, in practice a :class:`~flask_threadctx.backends.base.Backend`, or a task
store for a future read from one) uses these, its internal API, and nothing else of it:

- ``_claim()``: move the pending task to running; only the thread that gets ``True`` runs it;
- ``_unclaim()``: make the claimed task pending again, to wait for a retry;
- ``_finish(result, exception)``: set the outcome of a claimed task, and wake its waiters;
- ``_cancelled_elsewhere()``: make cancelled a task that its engine reports cancelled;
- ``_capture``, ``_fn``, ``_args``, ``_kwargs``: the work, read by the engine that runs it, and
  let go of once it has run; ``_state``, ``_result`` and ``_exception``, read (never set) by the
  engine for its bookkeeping, without the lock the public getters would take;
- ``_slot``: the place in a bounded queue the task holds until it starts; ``_take_slot()``
  holds one for a task queued after a delay.

The package's readers of futures they do not own (the recorder of
:mod:`~flask_threadctx.stores.feed`, :mod:`~flask_threadctx.stores.local` and the pytest plugin)
read ``_result`` and ``_exception`` of a finished future, and the plugin ``_retrieved`` (unset
until ``result()`` or ``exception()`` hands the exception out): the public getters would count
as the outcome being seen. Nothing else of a future is read outside this module.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import typing as t

# The states that ``wait`` and ``as_completed`` compare a future's state with are defined only in
# the private module.
from concurrent.futures import _base

if t.TYPE_CHECKING:
    from concurrent.futures._base import _Waiter

    from .contexts.capture import Capture
    from .model import TaskInfo

R = t.TypeVar("R")

PENDING = _base.PENDING
RUNNING = _base.RUNNING
CANCELLED = _base.CANCELLED
CANCELLED_AND_NOTIFIED = _base.CANCELLED_AND_NOTIFIED
FINISHED = _base.FINISHED
_NO_KWARGS: dict[str, object] = {}  # only ever unpacked, never changed

_CANCELLED_STATES = (CANCELLED, CANCELLED_AND_NOTIFIED)
_WAITING_STATES = (PENDING, RUNNING)
_DONE_STATES = (CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED)


class FutureOwner(t.Protocol):
    """What a :class:`TaskFuture` asks of the engine that owns it: the narrow side of
    :class:`~flask_threadctx.backends.base.Backend` that a future sees. A future read from a
    task store has an owner that can neither run nor cancel it. Each method takes a future of
    any result type, as its own: a ``TaskFuture[int]`` is not a ``TaskFuture[object]``, futures
    being invariant in their result."""

    def before_wait(self, future: TaskFuture[R], timeout: float | None) -> None:
        """Called by a thread about to wait up to ``timeout`` seconds for ``future``, which is
        pending or running: the place to keep a task that waits for its child from
        deadlocking."""

    def may_cancel(self, future: TaskFuture[R]) -> bool:
        """Called by ``cancel()`` on a pending ``future``: make sure it can never start, or
        return ``False`` if it has started already somewhere."""

    def record_cancelled(self, future: TaskFuture[R]) -> None:
        """Book ``future``, just cancelled, and send ``task_cancelled``."""


class TaskFuture(concurrent.futures.Future[R]):
    """A :class:`concurrent.futures.Future` for a task, with its :class:`TaskInfo` as
    :attr:`task`.

    A task of the same pool that waits for one that has not started yet, with
    :meth:`~concurrent.futures.Future.result`, :meth:`~concurrent.futures.Future.exception` or
    ``await asyncio.wrap_future(...)``, runs it in the waiting thread or on a helper
    thread (with a timeout, in an event loop, past 16 nested waits), so a task that waits for
    its own children cannot deadlock the pool. :func:`concurrent.futures.wait` and
    :func:`~concurrent.futures.as_completed` only wait; they count a cancelled task as done at
    once. Done callbacks run in the thread that finishes the task (its worker, after the task's
    contexts are torn down) or cancels it.

    Only the pool sets a task's state and outcome: ``set_result``, ``set_exception`` and
    ``set_running_or_notify_cancel``, which the stdlib keeps for executors, raise
    :exc:`RuntimeError`. Use :meth:`~concurrent.futures.Future.cancel` to keep a task from running.
    """

    __slots__ = (
        "_args",
        "_callbacks",
        "_capture",
        "_cond",
        "_exception",
        "_fn",
        "_kwargs",
        "_lock",
        "_pool",
        "_result",
        "_retrieved",
        "_sleepers",
        "_slot",
        "_state",
        "_waiter_list",
        "task",
    )

    def __init__(
        self,
        task: TaskInfo,
        pool: FutureOwner,
        capture: Capture | None,
        fn: t.Callable[..., R] | None,
        args: tuple[object, ...],
        kwargs: dict[str, object],
    ) -> None:
        # Not ``super().__init__()``: every attribute it sets is a slot or a property here.
        self.task = task
        """The task's :class:`TaskInfo`."""
        self._lock = threading.Lock()
        self._cond: threading.Condition | None = None
        self._state = PENDING
        self._result: R = None  # type: ignore[assignment]  # until finished
        self._exception: BaseException | None = None
        self._sleepers: list[threading.Lock] | None = None
        self._waiter_list: list[_Waiter] | None = None
        self._callbacks: list[t.Callable[[concurrent.futures.Future[R]], object]] | None = None
        self._pool = pool
        self._slot: threading.BoundedSemaphore | None = None
        """The place in the bounded queue this task holds until it starts or is cancelled."""
        # The work itself, let go of once it has run.
        self._capture: Capture | None = capture
        self._fn: t.Callable[..., R] | None = fn
        self._args = args
        self._kwargs = kwargs

    # -- the stdlib's internals, made when first used -------------------------------------------
    # With setters, so that type checkers accept a TaskFuture where they expect a Future.

    @property
    def _condition(self) -> threading.Condition:
        cond = self._cond
        if cond is None:
            with self._lock:
                cond = self._cond
                if cond is None:
                    cond = self._cond = threading.Condition(self._lock)
        return cond

    @_condition.setter
    def _condition(self, value: threading.Condition) -> None:
        self._cond = value

    @property
    def _waiters(self) -> list[_Waiter]:
        # ``wait`` and ``as_completed`` use this holding ``_condition``, that is ``_lock``.
        waiters = self._waiter_list
        if waiters is None:
            waiters = self._waiter_list = []
        return waiters

    @_waiters.setter
    def _waiters(self, value: list[_Waiter]) -> None:
        self._waiter_list = value

    @property
    def _done_callbacks(self) -> list[t.Callable[[concurrent.futures.Future[R]], object]]:
        # Used by ``Future``'s own methods, holding the lock, like ``_waiters``.
        callbacks = self._callbacks
        if callbacks is None:
            callbacks = self._callbacks = []
        return callbacks

    @_done_callbacks.setter
    def _done_callbacks(
        self, value: list[t.Callable[[concurrent.futures.Future[R]], object]]
    ) -> None:
        self._callbacks = value

    # -- asking -------------------------------------------------------------------------------

    def cancelled(self) -> bool:
        return self._state in _CANCELLED_STATES

    def running(self) -> bool:
        return self._state == RUNNING

    def done(self) -> bool:
        return self._state in _DONE_STATES

    def result(self, timeout: float | None = None) -> R:
        if self._state != FINISHED:
            self._wait(timeout)
        error = self._exception
        if error is not None:
            self._retrieved = True
            try:
                raise error
            finally:
                # The traceback holds this frame: without this, the frame would hold the
                # exception and the future, and they the traceback.
                del self, error
        return self._result

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if self._state != FINISHED:
            self._wait(timeout)
        self._retrieved = True
        return self._exception

    def _wait(self, timeout: float | None) -> None:
        """Wait until the task is done; raise if it was cancelled or ``timeout`` ran out.

        The waiting thread sleeps on a lock of its own, which finishing the task releases. A
        :class:`threading.Condition` would do the same but takes three times as long to make,
        and until this thread sleeps, the worker woken for the task waits for the GIL.
        """
        if self._state in _WAITING_STATES:
            self._pool.before_wait(self, timeout)
        if self._state not in _DONE_STATES:
            sleeper = threading.Lock()
            sleeper.acquire()
            with self._lock:
                waiting = self._state not in _DONE_STATES
                if waiting:
                    if self._sleepers is None:
                        self._sleepers = []
                    self._sleepers.append(sleeper)
            if waiting and not _sleep(sleeper, timeout):
                with self._lock:
                    if self._sleepers is not None and sleeper in self._sleepers:
                        self._sleepers.remove(sleeper)
        state = self._state
        if state in _CANCELLED_STATES:
            raise concurrent.futures.CancelledError
        if state != FINISHED:
            raise concurrent.futures.TimeoutError

    def add_done_callback(self, fn: t.Callable[[concurrent.futures.Future[R]], object]) -> None:
        if self._state == PENDING and asyncio._get_running_loop() is not None:
            # ``await asyncio.wrap_future(future)`` in a coroutine: waiting, as ``result()``
            # does, but without calling it. In an ``async def`` task the worker waits for the
            # loop, so, as for ``result()``, the pool gives the awaited task a thread.
            self._pool.before_wait(self, None)
        with self._lock:
            if self._state not in _DONE_STATES:
                self._done_callbacks.append(fn)
                return
        try:
            fn(self)
        except Exception:
            _base.LOGGER.exception("exception calling callback for %r", self)

    def __repr__(self) -> str:
        state = self._state
        outcome = ""
        if state == FINISHED:
            if self._exception is not None:
                outcome = f" raised {type(self._exception).__name__}"
            else:
                outcome = f" returned {type(self._result).__name__}"
        description = _base._STATE_TO_DESCRIPTION_MAP[state]
        return f"<{type(self).__name__} {self.task.id} state={description}{outcome}>"

    # -- changing state -----------------------------------------------------------------------
    # Only through the pool and ``cancel``: a task's outcome comes from running it.

    def cancel(self) -> bool:
        state = self._state
        if state != PENDING:
            return state in _CANCELLED_STATES
        if not self._pool.may_cancel(self):  # it started in another process
            return False
        with self._lock:
            state = self._state
            if state != PENDING:
                return state in _CANCELLED_STATES
            self._state = CANCELLED
        if self._slot is not None:
            self._free_slot()
        # Counted and signalled before anyone wakes to the cancellation.
        self._pool.record_cancelled(self)
        self._let_go()
        with self._lock:
            self._state = CANCELLED_AND_NOTIFIED
            self._notify("add_cancelled")
        self._invoke_callbacks()
        return True

    def _cancelled_elsewhere(self) -> None:
        """Make a future cancelled that its backend reports cancelled (by another process, or
        with the engine's own tools): no bookkeeping here, only the waiters woken."""
        with self._lock:
            self._state = CANCELLED_AND_NOTIFIED
            self._notify("add_cancelled")
        self._let_go()
        self._invoke_callbacks()

    def set_running_or_notify_cancel(self) -> t.NoReturn:
        raise self._not_yours("set_running_or_notify_cancel")

    def set_result(self, result: R) -> t.NoReturn:
        raise self._not_yours("set_result")

    def set_exception(self, exception: BaseException | None) -> t.NoReturn:
        raise self._not_yours("set_exception")

    def _not_yours(self, method: str) -> RuntimeError:
        return RuntimeError(
            f"'{method}' is for the pool that runs {self.task}, which sets its state and"
            " outcome. To keep a task that has not started from running, call 'cancel()'."
        )

    def _claim(self) -> bool:
        """Move a pending task to running; ``False`` if another thread took it first, or it was
        cancelled. Only the thread that gets ``True`` may run the task."""
        with self._lock:
            if self._state != PENDING:
                return False
            self._state = RUNNING
        if self._slot is not None:
            self._free_slot()
        return True

    def _unclaim(self) -> None:
        """Make the running task of this thread's claim pending again: it waits for a retry,
        and may be cancelled, or claimed again, like any pending task."""
        with self._lock:
            assert self._state == RUNNING
            self._state = PENDING

    def _take_slot(self, slot: threading.BoundedSemaphore) -> bool:
        """Hold ``slot``, a place in a bounded queue acquired for this task as it is queued
        after a delay, if the task is still pending: whether it is (else ``slot`` is given
        back)."""
        with self._lock:
            if self._state == PENDING:
                self._slot = slot
                return True
        slot.release()
        return False

    def _free_slot(self) -> None:
        """Give back the task's place in the bounded queue: it has left the queue, even if the
        queue still holds it until a worker comes by and skips it."""
        slot = self._slot
        self._slot = None
        assert slot is not None
        slot.release()

    def _finish(self, result: R, exception: BaseException | None) -> None:
        """Set the outcome of a task this thread claimed: ``result``, or ``exception`` if it
        is not ``None``."""
        with self._lock:
            self._result = result
            self._exception = exception
            self._state = FINISHED
            if self._sleepers is not None or self._cond is not None:
                self._notify("add_result" if exception is None else "add_exception")
        self._let_go()
        if self._callbacks is not None:
            self._invoke_callbacks()

    def _notify(self, event: str) -> None:
        """Wake the threads waiting on this future; called holding ``_lock``."""
        sleepers = self._sleepers
        if sleepers is not None:
            self._sleepers = None
            for sleeper in sleepers:
                sleeper.release()
        cond = self._cond
        if cond is not None:
            # ``wait`` and ``as_completed`` wait through the waiters they add; anyone else who
            # uses the stdlib's condition is woken through it.
            for waiter in self._waiter_list or ():
                getattr(waiter, event)(self)
            cond.notify_all()

    def _invoke_callbacks(self) -> None:
        for callback in self._callbacks or ():
            try:
                callback(self)
            except Exception:
                _base.LOGGER.exception("exception calling callback for %r", self)

    def _let_go(self) -> None:
        """Drop the task's function, arguments and contexts: they may be large, and the future
        may be kept a long time."""
        self._capture = self._fn = None
        self._args = ()
        self._kwargs = _NO_KWARGS


def _sleep(sleeper: threading.Lock, timeout: float | None) -> bool:
    """Wait for ``sleeper`` to be released, at most ``timeout`` seconds (none if it is not
    positive, as :meth:`threading.Condition.wait`); whether it was."""
    if timeout is None:
        return sleeper.acquire()
    if timeout > 0:
        return sleeper.acquire(timeout=timeout)
    return sleeper.acquire(blocking=False)
