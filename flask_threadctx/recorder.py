"""Feeding the task store from the signals: a :class:`Recorder` per app, with a background
writer thread in each process.

Each receiver queues a reference to the task and nothing else, so that a signal costs the task
little. Every 50 ms, the writer makes one :class:`~flask_threadctx.store.Record` per task from
what was queued (read from the task then, which is as far as, or further than, what the signals
said) and writes them in one batch, so a submit never waits for the store. A store that is down
or slow costs the tasks nothing: what it cannot take is dropped, counted and warned about.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
import typing as t
import weakref

from . import signals as task_signals
from .executor import TaskInfo
from .store import Here
from .store import Record
from .store import summary

if t.TYPE_CHECKING:
    import flask

    from .executor import TaskState
    from .store import TaskStore

_logger = logging.getLogger(__name__)

WARN_INTERVAL = 10.0
"""Seconds between two warnings about records dropped."""

MAX_WAITING = 100_000
"""Records one process keeps waiting for a slow store; beyond them, new ones are dropped."""

WRITE_INTERVAL = 0.05
"""Seconds between two batches of one process's writer."""

Update = tuple[TaskInfo, "str | None", "TaskState | None"]
"""What a signal queues: the task, its error, and its state if the task does not say it yet."""


class Recorder:
    """Feeds the task signals of ``app`` into ``store``, through a background writer in each
    process. A store that is down or slow costs the tasks nothing: the records it cannot take
    are dropped, counted in :attr:`dropped`, with a warning at most every 10 seconds.

    :param skip: the backend whose tasks ``store`` keeps already (Celery's records).
    """

    def __init__(self, app: flask.Flask, store: TaskStore, skip: str | None = None) -> None:
        self.app_name = app.name
        self.store = store
        self.skip = skip
        self.dropped = 0
        """Updates (one per signal) lost since the process started, because the store failed
        or fell behind."""
        self._waiting: collections.deque[Update | threading.Event] = collections.deque()
        self._writer: _Writer | None = None
        self._writer_lock = threading.Lock()
        self._warned_at = -WARN_INTERVAL
        self._warned_dropped = 0
        _recorders.add(self)
        for signal, receiver in (
            (task_signals.task_submitted, self._on_change),
            (task_signals.task_started, self._on_change),
            (task_signals.task_finished, self._on_finished),
            (task_signals.task_failed, self._on_failed),
            (task_signals.task_cancelled, self._on_change),
            (task_signals.task_rejected, self._on_change),
            (task_signals.task_progress, self._on_change),
        ):
            signal.connect(receiver, app, weak=False)

    # Each receiver only queues a reference to the task, so that a signal costs the task
    # little: the writer reads the task when it writes it, so it writes what the task is then,
    # which is as far as, or further than, what the signal said.

    def _on_change(self, sender: flask.Flask, task: TaskInfo, **kwargs: t.Any) -> None:
        if task.backend != self.skip:
            self._put((task, None, None))

    def _on_finished(
        self, sender: flask.Flask, task: TaskInfo, exception: BaseException | None, **kw: t.Any
    ) -> None:
        if task.backend != self.skip:
            self._put((task, None if exception is None else summary(exception), None))

    def _on_failed(self, sender: flask.Flask, task: TaskInfo, exception: BaseException) -> None:
        if task.backend != self.skip:
            self._put((task, summary(exception), "failed"))

    def _put(self, update: Update | threading.Event) -> None:
        waiting = self._waiting
        if len(waiting) >= MAX_WAITING:
            self.dropped += 1
            return
        waiting.append(update)
        if self._writer is None:  # none yet, or the parent's, forked (see 'reset_after_fork')
            self._start_writer()

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until what this process recorded so far was written (or dropped)."""
        writer = self._writer
        if writer is None:
            return
        written = threading.Event()
        self._waiting.append(written)  # set by the writer once it wrote what came before
        writer.wake.set()
        written.wait(timeout)

    def _start_writer(self) -> None:
        with self._writer_lock:
            if self._writer is None:
                self._writer = _Writer(self)
                self._writer.start()

    def reset_after_fork(self) -> None:
        """In a forked child: the parent's writer thread is not here, nor what it had to
        write."""
        self._writer = None
        self._writer_lock = threading.Lock()
        self._waiting.clear()

    def write_waiting(self) -> None:
        """Write what is waiting, merged per task, as one batch."""
        waiting = self._waiting
        # One record per task, read from the task now: the signals of a task that are still
        # waiting say no more than the task itself, except the error of a failure.
        latest: dict[str, Update] = {}
        flushes: list[threading.Event] = []
        taken = 0
        while waiting:
            update = waiting.popleft()
            if isinstance(update, threading.Event):
                flushes.append(update)
                continue
            task, error, state = update
            taken += 1
            seen = latest.get(task.id)
            if seen is not None:
                error, state = error or seen[1], state or seen[2]
            latest[task.id] = task, error, state
        process = Here.name
        merged = [
            Record(
                task.id,
                task.name,
                task.parent_id,
                task.request,
                state or task.state,
                task.submitted_at,
                task.started_at,
                task.finished_at,
                task.progress,
                error,
                process,
                task.backend,
            )
            for task, error, state in latest.values()
        ]
        if merged:
            try:
                self.store.write(merged)
            except Exception as error:  # the store is down: the tasks go on without it
                self.dropped += taken
                self._warn(error)
        for flush in flushes:
            flush.set()

    def _warn(self, error: Exception) -> None:
        now = time.monotonic()
        if now - self._warned_at < WARN_INTERVAL:
            return
        _logger.warning(
            "The task store of %r is not taking writes (%s): %d task updates dropped so far"
            " (%d since the last warning). The tasks are not affected.",
            self.app_name,
            error,
            self.dropped,
            self.dropped - self._warned_dropped,
        )
        self._warned_at = now
        self._warned_dropped = self.dropped


_recorders: weakref.WeakSet[Recorder] = weakref.WeakSet()


def _reset_recorders_after_fork() -> None:
    for recorder in list(_recorders):
        recorder.reset_after_fork()


os.register_at_fork(after_in_child=_reset_recorders_after_fork)


class _Writer(threading.Thread):
    def __init__(self, recorder: Recorder) -> None:
        super().__init__(name="threadctx-store-writer", daemon=True)
        self.recorder = recorder
        self.pid = os.getpid()
        self.wake = threading.Event()

    def run(self) -> None:
        recorder = self.recorder
        while True:
            # A period, so that the writes of many tasks go in one batch; ``flush`` cuts it short.
            self.wake.wait(WRITE_INTERVAL)
            self.wake.clear()
            recorder.write_waiting()
