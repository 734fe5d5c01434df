"""The stop requests of a SQLite task store (see :mod:`.stops`): a table of their own,
``threadctx_stops``, one row per request, which a file of an earlier version gets when it is
opened."""

from __future__ import annotations

import time
import typing as t

from .stops import STALE
from .stops import StopRequests

if t.TYPE_CHECKING:
    import collections.abc as cabc
    import sqlite3

    from .base import Record
    from .sqlite import SQLiteTaskStore
    from .stops import StopState

_R = t.TypeVar("_R")

SCHEMA = """
CREATE TABLE IF NOT EXISTS threadctx_stops (
    app TEXT NOT NULL,
    request TEXT NOT NULL,
    id TEXT NOT NULL,
    process TEXT NOT NULL,
    state TEXT NOT NULL,
    asked_at REAL NOT NULL,
    PRIMARY KEY (app, request)
);
CREATE INDEX IF NOT EXISTS threadctx_stops_process ON threadctx_stops (app, process, state);
"""


class SQLiteStops(StopRequests):
    """The stop requests of ``store``'s app. The asker's side opens a connection for each
    call, as the store's reads do; the writer's side uses the writer's connection."""

    def __init__(self, store: SQLiteTaskStore) -> None:
        self.store = store
        self.app_name = store.app_name

    def ask(self, request: str, task_id: str, process: str) -> None:
        now = time.time()
        with self.store._reading() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                # Of every process: one that is gone is asked no more.
                db.execute(
                    "DELETE FROM threadctx_stops WHERE app = ? AND asked_at < ?",
                    (self.app_name, now - STALE),
                )
                db.execute(
                    "INSERT INTO threadctx_stops VALUES (?, ?, ?, ?, 'asked', ?)",
                    (self.app_name, request, task_id, process, now),
                )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    def look(
        self, request: str, task_id: str, process: str
    ) -> tuple[StopState | None, Record | None]:
        with self.store._reading() as db:
            row = db.execute(
                "SELECT state FROM threadctx_stops WHERE app = ? AND request = ?",
                (self.app_name, request),
            ).fetchone()
        return None if row is None else row[0], self.store.get(task_id)

    def withdraw(self, request: str, process: str, *, only_asked: bool) -> StopState | None:
        with self.store._reading() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                row = db.execute(
                    "SELECT state FROM threadctx_stops WHERE app = ? AND request = ?",
                    (self.app_name, request),
                ).fetchone()
                if row is not None and (row[0] == "asked" or not only_asked):
                    db.execute(
                        "DELETE FROM threadctx_stops WHERE app = ? AND request = ?",
                        (self.app_name, request),
                    )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return None if row is None else t.cast("StopState", row[0])

    def asked(self, process: str) -> list[tuple[str, str]]:
        rows = self.store._writer_connection().execute(
            "SELECT request, id FROM threadctx_stops WHERE app = ? AND process = ?"
            " AND state = 'asked'",
            (self.app_name, process),
        )
        return [(request, task_id) for request, task_id in rows]

    def take(self, process: str, requests: cabc.Sequence[str]) -> list[str]:
        def take_each(db: sqlite3.Connection) -> list[str]:
            return [
                request
                for request in requests
                if db.execute(
                    "UPDATE threadctx_stops SET state = 'taken' WHERE app = ? AND request = ?"
                    " AND state = 'asked'",
                    (self.app_name, request),
                ).rowcount
            ]

        return self._writing(take_each)

    def answer(self, process: str, answers: cabc.Mapping[str, bool]) -> None:
        def answer_each(db: sqlite3.Connection) -> None:
            db.executemany(
                "UPDATE threadctx_stops SET state = ? WHERE app = ? AND request = ?"
                " AND state = 'taken'",
                [
                    ("stopped" if stopped else "finished", self.app_name, request)
                    for request, stopped in answers.items()
                ],
            )

        self._writing(answer_each)

    def _writing(self, change: t.Callable[[sqlite3.Connection], _R]) -> _R:
        """``change`` in one transaction of the writer's connection."""
        db = self.store._writer_connection()
        db.execute("BEGIN IMMEDIATE")
        try:
            done = change(db)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return done
