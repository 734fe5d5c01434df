"""The threads of a thread pool, and how its tasks wait for their children without deadlock.

A :class:`Worker` takes tasks from its pool's queue (:meth:`Pool.work
<flask_threadctx.backends.pool.Pool.work>`). A task that waits for a task of the same pool
that has not started may be one of many doing so, every worker waiting and the child never
starting: :meth:`Pool.before_wait <flask_threadctx.backends.pool.Pool.before_wait>` sees such a
wait, and hands the child to the pool's :class:`Waits`, which runs it in the waiting thread, or
on a :class:`Helper`, a thread of the waiting task's own. This module owns those helpers and
the depth of nested inline runs; the pool owns its queue, its workers' lifetime and shutdown.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
import typing as t

from ..future import PENDING
from .runner import end_forked_child

if t.TYPE_CHECKING:
    from ..future import TaskFuture
    from .pool import Pool

R = t.TypeVar("R")


class Worker(threading.Thread):
    """One of a pool's worker threads; a :class:`Helper` is one too."""

    written_off = False
    """Set when the thread was replaced, stuck in a task past its time limit: it ends once
    the task returns."""

    def __init__(self, pool: Pool, name: str) -> None:
        super().__init__(name=name, daemon=True)
        self.pool = pool

    def run(self) -> None:
        self.pool.work(self)


class Helper(Worker):
    """A thread of a pool that runs the ``tasks`` a waiting task hands it: those of the task
    ``waiter``, which shares it, or, for ``None``, one task of a chain too deep to run inline."""

    def __init__(self, waits: Waits, name: str, waiter: str | None) -> None:
        super().__init__(waits.pool, name)
        self.waits = waits
        self.waiter = waiter
        # Futures of any result type (a future is invariant in it): the tasks' own values.
        self.tasks: collections.deque[TaskFuture[t.Any]] = collections.deque()

    def run(self) -> None:
        self.waits.help(self)


MAX_INLINE_DEPTH = 16
"""How many tasks one thread runs inside each other while they wait for their children. Each
level costs about ten stack frames, so a chain of waits deeper than this continues on a helper
thread instead of running into the recursion limit."""

_inline = threading.local()


class Waits:
    """Runs the children that the tasks of ``pool`` wait for before they start: one per pool
    and process (a forked child makes its own, and so tells that it forked)."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self._helpers: dict[str, Helper] = {}  # by the id of the task they help
        self._lock = threading.Lock()

    def run_child(self, waiter: str, future: TaskFuture[R], timeout: float | None) -> bool:
        """Run ``future``, pending, which the pool's task ``waiter`` is about to wait for up to
        ``timeout`` seconds: here and now, or on the waiting task's helper thread when the wait
        has a timeout (which must be able to end the wait), in an event loop (which it would
        block, and where a coroutine task cannot run), and past :data:`MAX_INLINE_DEPTH`.
        Whether it ran here."""
        depth = getattr(_inline, "depth", 0)
        if timeout is not None or asyncio._get_running_loop() is not None:
            self._hand_to_helper(waiter, future)
            return False
        if depth >= MAX_INLINE_DEPTH:
            # Where it would have run here: on a new stack, never behind another task.
            self._hand_to_helper(None, future)
            return False
        _inline.depth = depth + 1
        try:
            self.pool.execute(future)
        finally:
            _inline.depth = depth
        if self.pool.waits is not self:  # the task forked: its waiting parent is the parent's
            end_forked_child(future)
        return True

    def _hand_to_helper(self, waiter: str | None, future: TaskFuture[R]) -> None:
        """Have ``future`` run on a helper thread: the one of the task ``waiter``, started if
        it has none, or, for ``None``, one of its own. One helper per waiting task runs what
        that task waits for one after the other: a coroutine awaiting a thousand children gets
        one more thread, not a thousand, and the pool's workers take what the helper has not
        come to yet."""
        with self._lock:
            helper = None if waiter is None else self._helpers.get(waiter)
            if helper is not None:
                helper.tasks.append(future)
                return
            name = f"{self.pool.settings.thread_name_prefix}-helper-{waiter or future.task.id}"
            helper = Helper(self, name, waiter)
            helper.tasks.append(future)
            if waiter is not None:
                self._helpers[waiter] = helper
        try:
            helper.start()
        except RuntimeError:  # no thread starts at interpreter exit: run them here after all
            with self._lock:
                if waiter is not None:
                    del self._helpers[waiter]
            for task in helper.tasks:
                self.pool.execute(task)

    def help(self, helper: Helper) -> None:
        """The life of a helper thread: run the tasks its waiting task hands it, those that
        have not started by then, until none is left; a task to be retried, again once its
        retry is due."""
        while True:
            with self._lock:
                if not helper.tasks:
                    if helper.waiter is not None:
                        del self._helpers[helper.waiter]
                    return
                future = helper.tasks.popleft()
            if future._claim():
                self.pool.run_claimed(future)
                if self.pool.waits is not self:  # the task forked
                    end_forked_child(future)
                due = future.task.due_at
                if future._state == PENDING and due is not None:  # its retry, here once due
                    threading.Event().wait(max(due - time.time(), 0.0))
                    with self._lock:
                        helper.tasks.appendleft(future)
            del future


def join_helpers(pool: Pool) -> None:
    """Wait for the helper threads of ``pool`` to end: they end when the tasks they ran are
    done, and may still be on their way out."""
    for helper in threading.enumerate():
        if isinstance(helper, Helper) and helper.pool is pool:
            helper.join()
