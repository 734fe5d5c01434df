"""The background thread that writes a process's submits and progress reports to the Celery
backend's records in batches, so that a submit does not wait for Redis."""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import queue
import threading
import time
import typing as t

if t.TYPE_CHECKING:
    import redis

    from ...model import TaskInfo

# Under the name it always logged under: users filter on it.
_logger = logging.getLogger("flask_threadctx.records")

Write = t.Callable[[t.Any, "TaskInfo"], None]
"""Queues the commands that write one record on a pipeline."""


OWED_KEPT = 10_000
"""How many records of rejected tasks a process keeps while Redis cannot be reached, to
write once it answers again; beyond that, the oldest are let go (and logged)."""


class Writer(threading.Thread):
    """Writes the records queued by the threads of one process, all that are waiting in one
    pipeline; retries a while when Redis is away, then logs what it gave up, except what is
    *owed* (rejections: Redis being away is why there are any), which it tries again every
    second until Redis answers."""

    def __init__(self, client: redis.Redis) -> None:
        super().__init__(name="threadctx-records-writer", daemon=True)
        self.client = client
        self.pid = os.getpid()
        self._queue: queue.SimpleQueue[tuple[int, Write, TaskInfo, bool]]
        self._queue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._queued = 0
        self._written = 0
        self._rounds = 0
        self._owed: collections.deque[tuple[Write, TaskInfo]] = collections.deque()
        self._progress = threading.Condition()

    def put(self, write: Write, info: TaskInfo, *, owed: bool = False) -> None:
        with self._lock:  # numbered in the order queued, so 'written' only grows
            self._queued += 1
            self._queue.put((self._queued, write, info, owed))

    def flush(self, timeout: float) -> None:
        """Wait until what was queued is written or given up, and what is owed was tried
        once more."""
        last = self._queued
        with self._progress:
            rounds = self._rounds
            self._progress.wait_for(
                lambda: self._written >= last and (not self._owed or self._rounds >= rounds + 2),
                timeout,
            )

    def run(self) -> None:
        while True:
            batch = []
            with contextlib.suppress(queue.Empty):  # a second without records: try the owed
                batch.append(self._queue.get(timeout=1.0 if self._owed else None))
            while len(batch) < 1000:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            self._write(batch)
            with self._progress:
                if batch:
                    self._written = batch[-1][0]
                self._rounds += 1
                self._progress.notify_all()

    def _write(self, batch: list[tuple[int, Write, TaskInfo, bool]]) -> None:
        owed = list(self._owed)
        writes = owed + [(write, info) for _, write, info, _ in batch]
        delay = 0.05
        attempts = 6 if batch else 1
        for attempt in range(attempts):
            try:
                with self.client.pipeline(transaction=False) as pipe:
                    for write, info in writes:
                        write(pipe, info)
                    pipe.execute()
                self._owed.clear()
                return
            except Exception as error:  # Redis away: the tasks are not affected, only records
                if attempt < attempts - 1:
                    time.sleep(delay)  # a backoff between attempts, not a synchronisation
                    delay *= 2
                    continue
                given_up = sum(not keep for *_, keep in batch)
                if given_up:
                    _logger.error(
                        "Gave up writing %d task records to Redis (%s); the tasks are not"
                        " affected, but their records and counts are incomplete.",
                        given_up,
                        error,
                    )
                self._owe([(write, info) for _, write, info, keep in batch if keep], error)

    def _owe(self, writes: list[tuple[Write, TaskInfo]], error: Exception) -> None:
        if writes and not self._owed:
            _logger.warning(
                "Could not book %d rejected task(s) in Redis (%s); trying again every second.",
                len(writes),
                error,
            )
        self._owed.extend(writes)
        over = len(self._owed) - OWED_KEPT
        if over > 0:
            for _ in range(over):
                self._owed.popleft()
            _logger.error(
                "Let go of %d rejected task(s) never booked: Redis was away too long.", over
            )
