"""The heartbeat of a process that runs or holds Celery tasks: the thread that renews the
signs of life in the records (see :mod:`.claims`), and :func:`started`."""

from __future__ import annotations

import logging
import os
import threading
import time
import typing as t

if t.TYPE_CHECKING:
    import collections.abc as cabc

    from .claims import CeleryRecords

# Under the name it always logged under: users filter on it.
_logger = logging.getLogger("flask_threadctx.records")


class Heartbeat(threading.Thread):
    """Renews the sign of life of the tasks running in one process, and of those its
    ``sources`` name. A sign of life that ran out while Redis was away (restarted from its
    saved data, say) is made again: the process is there, and says so."""

    def __init__(self, records: CeleryRecords) -> None:
        super().__init__(name="threadctx-heartbeat", daemon=True)
        self.records = records
        self.pid = os.getpid()
        self.running: set[str] = set()
        self.sources: list[cabc.Callable[[], cabc.Iterable[str]]] = []
        self.holders: list[cabc.Callable[[], cabc.Iterable[str]]] = []
        self._seen_held: set[str] = set()

    def run(self) -> None:
        records = self.records
        milliseconds = int(records.heartbeat * 1000)
        while True:
            time.sleep(records.heartbeat / 3)  # a period, not a synchronisation
            running: set[str] = set(self.running)
            held: set[str] = set()
            for sources, ids in ((self.sources, running), (self.holders, held)):
                for source in list(sources):
                    try:
                        ids.update(source())
                    except Exception:  # a source's bug must not stop the beat of the others
                        _logger.exception("Could not list the tasks to renew the signs of.")
            if not running and not held:
                continue
            now = repr(time.time())
            try:
                with records.client.pipeline(transaction=False) as pipe:
                    for task_id in running:
                        pipe.set(records._alive_key(task_id), "1", px=milliseconds)
                    for task_id in held:
                        pipe.set(records._held_key(task_id), "1", px=milliseconds)
                        if task_id not in self._seen_held:
                            pipe.hsetnx(records.task_key(task_id), "held_at", now)
                    pipe.execute()
                self._seen_held = held
            except Exception as error:  # Redis away: the next beat tries again
                _logger.warning("Could not renew the sign of life of running tasks: %s", error)


_T = t.TypeVar("_T", bound=threading.Thread)


def started(thread: _T) -> _T:
    thread.start()
    return thread
