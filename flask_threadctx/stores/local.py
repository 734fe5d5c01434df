"""The tasks this process knows, read as a store: what the monitor and the CLI show of an app
without ``THREADCTX_TASK_STORE``. It reads each backend through the :class:`Backend` seam
(``live_futures``), never a backend's own attributes."""

from __future__ import annotations

import itertools
import typing as t

from ..app_state import app_state
from .base import Here
from .base import history_row
from .base import history_steps
from .base import Record
from .base import summary
from .base import tally
from .base import TaskReader

if t.TYPE_CHECKING:
    import flask

    from ..backends.base import Backend
    from ..future import TaskFuture


class LocalTasks(TaskReader):
    """The tasks that this process knows, for an app without a store: the pending and running
    ones, and the ``THREADCTX_KEEP_FINISHED`` that finished last, of each backend."""

    def __init__(self, app: flask.Flask) -> None:
        self.backends: list[Backend] = list(app_state(app, "monitor").backends.values())

    def _records(self) -> list[Record]:
        futures: list[TaskFuture[t.Any]] = []
        for backend in self.backends:
            futures += backend.known_futures()
        return sorted(
            (_record_of(future) for future in futures), key=lambda r: r.submitted_at, reverse=True
        )

    def get(self, task_id: str) -> Record | None:
        return next((r for r in self._records() if r.id == task_id), None)

    def counts(self) -> dict[str, int]:
        counts = self.backends[0].stats()
        counts.pop("max_workers", None)
        return counts

    def recent(
        self, *, state: str | None = None, name: str | None = None, limit: int = 50
    ) -> list[Record]:
        found = (
            r
            for r in self._records()
            if (state is None or r.state == state) and (name is None or r.name == name)
        )
        return list(itertools.islice(found, limit))

    def children(self, task_id: str) -> list[Record]:
        return [r for r in reversed(self._records()) if r.parent_id == task_id]

    def history(self, seconds: int = 300) -> list[dict[str, int]]:
        found: dict[int, dict[str, int]] = {at: {} for at in history_steps(seconds)}
        for (at, name), change in tally((None, r) for r in self._records())[1].items():
            if at in found:
                found[at][name] = change
        return [history_row(at, counts) for at, counts in found.items()]


def _record_of(future: TaskFuture[t.Any]) -> Record:
    info = future.task
    # ``_exception`` rather than ``exception()``, which would count as the failure being seen.
    error = future._exception if info.state == "failed" else None
    return Record(
        info.id,
        info.name,
        info.parent_id,
        info.request,
        info.state,
        info.submitted_at,
        info.started_at,
        info.finished_at,
        info.progress,
        None if error is None else summary(error),
        Here.name,
        info.backend,
    )
