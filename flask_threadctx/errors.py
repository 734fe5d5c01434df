"""The errors the package raises for callers to catch, each re-exported by
:mod:`flask_threadctx`. They sit apart from the engines and stores that raise them, so that
catching one never imports an engine (and with it Celery or Redis).
"""

from __future__ import annotations

import concurrent.futures


class QueueFull(RuntimeError):
    """Raised by ``submit`` when ``THREADCTX_MAX_QUEUE`` tasks are already waiting to start.
    Never for a child submitted by a running task: that is part of work already accepted.

    The task was not queued. Answer ``503 Service Unavailable`` with a ``Retry-After`` header, or
    try again later.
    """


class BrokerUnavailable(RuntimeError):
    """Raised by ``submit`` when the task could not be sent to another process: the broker or
    the result backend cannot be reached. Nothing was sent; answer ``503 Service
    Unavailable``, or try again later."""


class RemoteTaskError(Exception):
    """A task in another process raised an exception whose class cannot be imported here. Its
    ``type_name`` and ``message`` are those of the original."""

    def __init__(self, type_name: str, message: str) -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.message = message


class ResultElsewhere(RuntimeError):
    """Raised by ``result()`` and ``exception()`` of a task that runs, or ran, in another
    process, when this process cannot have its result: it has not finished, or its result
    was not kept (not asked for, too large, or not JSON); see :doc:`/monitoring`."""


class TaskCancelled(concurrent.futures.CancelledError):
    """Raised inside a task by :func:`~flask_threadctx.check_cancelled` (and
    :func:`~flask_threadctx.report_progress`) once a stop was asked for, with
    :meth:`ThreadContext.cancel_task <flask_threadctx.ThreadContext.cancel_task>` or by the
    task's ``time_limit``; and by the ``result()`` of a task that stopped so. A subclass of
    :exc:`concurrent.futures.CancelledError`, so code that handles a cancelled future handles
    it too. Let it propagate: a task that catches it and returns finishes normally."""


class TaskTimeout(TimeoutError):
    """Raised by the ``result()`` of a task that ran past its ``time_limit``: it stopped when
    asked, or it did not stop within ``THREADCTX_TIME_LIMIT_GRACE`` and was written off. A
    subclass of the builtin :exc:`TimeoutError`; see :doc:`/control`."""


class TaskExpired(concurrent.futures.CancelledError):
    """Raised by the ``result()`` of a task that had not started by its ``expires``: it never
    ran, and its state is ``expired``."""
