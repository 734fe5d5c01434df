"""Feeding the task store from the signals: a :class:`Recorder` per app, with a background
writer thread in each process.

``task_submitted`` (and ``task_rejected``, for a task refused at once) tells the recorder of
each task, with a reference to its :class:`~flask_threadctx.TaskInfo`; ``task_failed`` brings a
failure's error. Every 50 ms the writer reads each task it was told of that has not finished,
and writes those that changed (started, finished, reported progress) in one batch, as
:class:`~flask_threadctx.stores.base.Record` objects. So a task costs one signal and a share of a
batch, whatever it does, and a submit never waits for the store. A task whose result is kept
(``keep_result``, ``THREADCTX_KEEP_RESULTS``) is followed with its future, and its end is
written with its result, as JSON, by the writer.

In the same round, once its batch is written and while it follows unfinished tasks, the writer
serves the requests of other processes to stop them (:mod:`.stops`): it stops each task with
the pool's own ``stop``, and answers.

A store that is down or slow costs the tasks nothing: a batch it refuses is not retried for
the tasks that finished (counted in :attr:`Recorder.dropped`, with a warning at most every 10
seconds); the others are written when they next change, or at the next batch. A task whose
record cannot be made (a bug) is dropped alone, counted and warned of the same way.
"""

from __future__ import annotations

import atexit
import collections
import logging
import os
import threading
import time
import typing as t
import weakref

from .. import signals as task_signals
from .._process import reset_in_child
from ..app_state import app_state
from .base import FINISHED_STATES
from .base import Here
from .base import keep_result
from .base import kept_for_rerun
from .base import kept_result
from .base import Record
from .base import summary
from .stops import stops_of
from .stops import take_stops

if t.TYPE_CHECKING:
    import flask

    from ..future import TaskFuture
    from ..model import TaskInfo
    from ..model import TaskState
    from ..progress import Progress
    from .base import TaskStore
    from .stops import StopRequests

_logger = logging.getLogger("flask_threadctx.recorder")  # the name it always logged under

WARN_INTERVAL = 10.0
"""Seconds between two warnings about tasks dropped."""

MAX_TRACKED = 100_000
"""Unfinished tasks one process's writer follows, and updates it keeps waiting, for a store that
is slow or away; beyond them, new ones are dropped."""

WRITE_INTERVAL = 0.05
"""Seconds between two batches of one process's writer."""

EXIT_TIMEOUT = 5.0
"""Seconds a process that exits waits for its writer's last batch."""

Failure = tuple["TaskInfo", str, "TaskState"]
"""What ``task_failed`` queues: the task, its error summary, and ``"failed"`` (or
``"timed_out"``)."""


Written = tuple["TaskState", "Progress | None", "str | None"]
"""What is written of a task that can change: its state, progress and error."""


class _Keep(t.NamedTuple):
    """What ``task_submitted`` queues for a task whose result the store keeps."""

    task: TaskInfo
    future: TaskFuture[object]


class _Rerunnable(t.NamedTuple):
    """What ``task_submitted`` queues for a task submitted ``rerunnable``: what a re-run of
    it needs, written with its first record."""

    task: TaskInfo
    payload: str


class _Tracked:
    """A task the writer follows until its end is written."""

    __slots__ = ("error", "future", "rerun", "state", "task", "written")

    def __init__(self, task: TaskInfo) -> None:
        self.task = task
        self.future: TaskFuture[object] | None = None
        """The task's future, if its result is kept."""
        self.rerun: str | None = None
        """What a re-run needs, until it is written: :attr:`Record.rerun`."""
        self.error: str | None = None
        self.state: TaskState | None = None
        """The state to write whatever the task says: ``"failed"``, from ``task_failed``."""
        self.written: Written | None = None
        """What was written last: state, progress and error."""


class Recorder:
    """Feeds the tasks of ``app`` into ``store``, through a background writer in each process.

    :param skip: the backend whose tasks ``store`` keeps already (Celery's records).
    """

    def __init__(
        self,
        app: flask.Flask,
        store: TaskStore,
        skip: str | None = None,
        *,
        keep_results: bool = False,
        result_max_bytes: int = 64 * 1024,
    ) -> None:
        self.app_name = app.name
        self.store = store
        self.skip = skip
        self.keep_results = keep_results
        """Keep the results of tasks whose function does not say (``keep_result``)."""
        self.result_max_bytes = result_max_bytes
        self.dropped = 0
        """Tasks whose end could not be written, since the process started, because the store
        failed or fell behind."""
        self._waiting: collections.deque[TaskInfo | Failure | _Keep | _Rerunnable | threading.Event]
        self._waiting = collections.deque()
        self._tracked: dict[str, _Tracked] = {}  # the writer's alone
        self._writer: _Writer | None = None
        self._writer_lock = threading.Lock()
        self._warned_at = -WARN_INTERVAL
        self._warned_dropped = 0
        self._app = weakref.ref(app)
        self._stops: StopRequests | None = None
        self._stops_found = False
        self._stops_warned_at = -WARN_INTERVAL
        reset_in_child(self)
        # Before any pool of the app registers its drain at exit (at its first thread), so
        # that this runs after it: the ends of the tasks drained are written too.
        atexit.register(_write_at_exit, weakref.ref(self))
        # Weakly: the app keeps its recorder, and when the app goes, so do its receivers.
        task_signals.task_submitted.connect(self._on_task, app)
        task_signals.task_rejected.connect(self._on_task, app)
        task_signals.task_failed.connect(self._on_failed, app)

    # The receivers only queue a reference: the writer reads the task when it writes it.

    def _on_task(self, sender: flask.Flask, task: TaskInfo, **kwargs: object) -> None:
        kept = kept_for_rerun.get()
        if kept is not None and kept.claim(task):
            task.rerun_of = kept.rerun_of
            if task.backend != self.skip:
                self._put(_Rerunnable(task, kept.payload))
        if task.backend == self.skip:
            return
        keep = keep_result.get()
        if (self.keep_results if keep is None else keep) and task.state != "rejected":
            # Sent by 'submit' once the future is live, before it returns; but a worker may
            # have run the task to its end meanwhile: then it is among the last finished.
            backend = app_state(sender, "task_submitted").backends[task.backend]
            future = backend.live_future(task.id)
            if future is None and task.backend == "threads":
                future = backend.get(task.id)
            if future is not None:
                self._put(_Keep(task, future))
                return
        self._put(task)

    def _on_failed(self, sender: flask.Flask, task: TaskInfo, exception: BaseException) -> None:
        if task.backend != self.skip:
            # A task that returned but whose contexts failed to tear down is still
            # "succeeded" when this is sent; one written off past its time limit is not failed.
            state: TaskState = "timed_out" if task.state == "timed_out" else "failed"
            self._put((task, summary(exception), state))

    def _put(self, update: TaskInfo | Failure | _Keep | _Rerunnable) -> None:
        waiting = self._waiting
        if len(waiting) < MAX_TRACKED:
            waiting.append(update)
            if self._writer is None:  # none yet, or the parent's, forked: 'reset_after_fork'
                self._start_writer()
        else:
            self.dropped += 1

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until every task this process knows is written as it is now (or dropped)."""
        writer = self._writer
        if writer is None or writer is threading.current_thread():
            return  # a receiver of a stop that the writer applies: it writes next
        written = threading.Event()
        self._waiting.append(written)  # set by the writer once it wrote what came before
        writer.wake.set()
        written.wait(timeout)

    def write_at_exit(self) -> None:
        """Write what is waiting, within :data:`EXIT_TIMEOUT`, then end the writer: a process
        that exits right after its tasks (a script, ``flask shell``) would lose the last
        batch, and the store would close under a writer still writing."""
        writer = self._writer
        if writer is None or writer.pid != os.getpid():
            return
        self.flush(EXIT_TIMEOUT)
        writer.ended = True
        writer.wake.set()

    def _start_writer(self) -> None:
        with self._writer_lock:
            if self._writer is None:
                self._writer = _Writer(self)
                self._writer.start()

    def reset_after_fork(self) -> None:
        """In a forked child: the parent's writer thread is not here, nor its tasks."""
        self._writer = None
        self._writer_lock = threading.Lock()
        self._waiting.clear()
        self._tracked.clear()

    def write_changes(self) -> None:
        """Write every task followed that changed since it was last written, as one batch;
        then wake the threads that flushed."""
        tracked = self._tracked
        flushes: list[threading.Event] = []
        waiting = self._waiting
        while waiting:
            update = waiting.popleft()
            if isinstance(update, threading.Event):
                flushes.append(update)
            elif isinstance(update, _Rerunnable):
                if update.task.id not in tracked and len(tracked) < MAX_TRACKED:
                    tracked[update.task.id] = _Tracked(update.task)
                if update.task.id in tracked:
                    tracked[update.task.id].rerun = update.payload
            elif isinstance(update, _Keep):
                if update.task.id not in tracked and len(tracked) < MAX_TRACKED:
                    tracked[update.task.id] = _Tracked(update.task)
                if update.task.id in tracked:
                    tracked[update.task.id].future = update.future
                else:
                    self.dropped += 1
            elif isinstance(update, tuple):
                task, error, state = update
                entry = tracked.get(task.id)
                if entry is None:  # its end was written already: a teardown failed it
                    entry = tracked[task.id] = _Tracked(task)
                entry.error, entry.state = error, state
            elif update.id not in tracked:
                if len(tracked) < MAX_TRACKED:
                    tracked[update.id] = _Tracked(update)
                else:
                    self.dropped += 1
        try:
            # A store that refused the batch is not asked for requests: a round costs it one
            # wait for it at most.
            if self._write(tracked) and tracked:
                self._serve_stops(tracked)
        finally:
            for flush in flushes:
                flush.set()

    def _serve_stops(self, tracked: dict[str, _Tracked]) -> None:
        """Stop the thread tasks followed that other processes asked to stop, and answer
        them (see :mod:`.stops`)."""
        app = self._app()
        if app is None:
            return

        def follows(task_id: str) -> bool:
            entry = tracked.get(task_id)
            return entry is not None and entry.task.backend == "threads"

        try:
            if not self._stops_found:
                self._stops = stops_of(app)  # the Celery backend's records connect on first use
                self._stops_found = True
            if self._stops is None:
                return
            pool = app_state(app, "cancel_task").backend("threads")
            answers = take_stops(self._stops, Here.name, follows, pool.stop)
            if answers:
                self._stops.answer(Here.name, answers)
        except Exception as error:  # the store is away: the askers time out
            self._warn_stops(f"cannot serve the requests to stop tasks ({error})")

    def _warn_stops(self, why: str) -> None:
        now = time.monotonic()
        if now - self._stops_warned_at >= WARN_INTERVAL:
            self._stops_warned_at = now
            _logger.warning("The task store of %r %s.", self.app_name, why)

    def _write(self, tracked: dict[str, _Tracked]) -> bool:
        """Write the tasks that changed: whether the store took them (or none changed)."""
        process = Here.name
        records: list[Record] = []
        entries: list[tuple[_Tracked, Written]] = []
        failed: list[str] = []
        for entry in tracked.values():
            task = entry.task
            state = entry.state or task.state
            now: Written = (state, task.progress, entry.error)
            if now == entry.written:
                continue
            try:
                record = self._record(entry, state, process)
            except Exception as error:  # a bug of ours: this task's record goes, not the batch
                failed.append(task.id)
                self.dropped += 1
                self._warn(f"was not given task {task.id}, whose record failed ({error!r})")
                continue
            if record is None:
                continue  # its result comes a moment after its state: at the next batch
            entries.append((entry, now))
            records.append(record)
        for task_id in failed:
            del tracked[task_id]
        if not records:
            return True
        try:
            self.store.write(records)
        except Exception as error:  # the store is away: the tasks go on without it
            ended = [entry for entry, (state, _, _) in entries if state in FINISHED_STATES]
            for entry in ended:
                del tracked[entry.task.id]
            self.dropped += len(ended)
            self._warn(f"is not taking writes ({error})")
            return False
        for entry, now in entries:
            entry.rerun = None  # written: the store keeps it through later writes
            if now[0] in FINISHED_STATES:
                del tracked[entry.task.id]
            else:
                entry.written = now
        return True

    def _record(self, entry: _Tracked, state: TaskState, process: str) -> Record | None:
        """The record of a task as it is now; ``None`` while its kept result is not there."""
        task = entry.task
        result = None
        future = entry.future
        if future is not None and state == "succeeded":
            if not future.done():
                return None
            if future._exception is None:  # not failed in its teardown
                result = kept_result(future._result, self.result_max_bytes)
        return Record(
            task.id,
            task.name,
            task.parent_id,
            task.request,
            state,
            task.submitted_at,
            task.started_at,
            task.finished_at,
            task.progress,
            entry.error,
            process,
            task.backend,
            result,
            retries=task.retries,
            due_at=task.due_at,
            rerun_of=task.rerun_of,
            rerun=entry.rerun,
        )

    def _warn(self, why: str) -> None:
        now = time.monotonic()
        if now - self._warned_at < WARN_INTERVAL:
            return
        _logger.warning(
            "The task store of %r %s: %d tasks dropped from it so far"
            " (%d since the last warning). The tasks themselves are not affected.",
            self.app_name,
            why,
            self.dropped,
            self.dropped - self._warned_dropped,
        )
        self._warned_at = now
        self._warned_dropped = self.dropped


def _write_at_exit(recorder: weakref.ref[Recorder]) -> None:
    alive = recorder()
    if alive is not None:
        alive.write_at_exit()


class _Writer(threading.Thread):
    """The thread that writes a recorder's tasks in this process, until the recorder (with its
    app) is gone."""

    def __init__(self, recorder: Recorder) -> None:
        super().__init__(name="threadctx-store-writer", daemon=True)
        self.recorder = weakref.ref(recorder)
        self.pid = os.getpid()
        self.wake = threading.Event()
        self.ended = False
        """Set at interpreter exit, once the last batch is written."""

    def run(self) -> None:
        while True:
            # A period, so that the changes of many tasks go in one batch; 'flush' cuts it short.
            self.wake.wait(WRITE_INTERVAL)
            self.wake.clear()
            recorder = self.recorder()
            if recorder is None or self.ended:
                return
            try:
                recorder.write_changes()
            except Exception:  # a bug of ours: the next batch is tried all the same
                _logger.exception("Writing the task store of %r failed.", recorder.app_name)
            del recorder  # held only while writing
