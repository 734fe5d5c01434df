"""A task store in a SQLite file, for the processes of one machine."""

from __future__ import annotations

import collections.abc as cabc
import contextlib
import os
import sqlite3
import time
import typing as t
import weakref

from ..progress import Progress
from . import sqlite_stops as stops
from .base import COUNTS
from .base import findable
from .base import HISTORY_KEPT
from .base import history_row
from .base import history_steps
from .base import merge
from .base import Record
from .base import storable_record
from .base import tally
from .base import TaskStore

if t.TYPE_CHECKING:
    import flask

    from ..config import Settings

_SCHEMA = """
CREATE TABLE IF NOT EXISTS threadctx_tasks (
    app TEXT NOT NULL,
    id TEXT NOT NULL,
    name TEXT NOT NULL,
    parent_id TEXT,
    request TEXT,
    state TEXT NOT NULL,
    submitted_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    progress_done,  -- no type: no affinity, so an int comes back an int and a float a float
    progress_total,
    progress_note TEXT,
    error TEXT,
    process TEXT NOT NULL,
    backend TEXT NOT NULL,
    result TEXT,
    retries INTEGER NOT NULL DEFAULT 0,
    due_at REAL,
    rerun_of TEXT,
    rerun TEXT,
    PRIMARY KEY (app, id)
);
CREATE INDEX IF NOT EXISTS threadctx_tasks_parent ON threadctx_tasks (app, parent_id)
    WHERE parent_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS threadctx_history (
    app TEXT NOT NULL,
    at INTEGER NOT NULL,
    name TEXT NOT NULL,
    n INTEGER NOT NULL,
    PRIMARY KEY (app, at, name)
);
CREATE TABLE IF NOT EXISTS threadctx_counts (
    app TEXT NOT NULL,
    name TEXT NOT NULL,
    n INTEGER NOT NULL,
    PRIMARY KEY (app, name)
);
"""

_COLUMNS = (
    "id, name, parent_id, request, state, submitted_at, started_at, finished_at,"
    " progress_done, progress_total, progress_note, error, process, backend, result, retries,"
    " due_at, rerun_of, rerun"
)
_PLACES = ", ".join("?" * (1 + _COLUMNS.count(",") + 1))
# Every column but the key: a record is merged with what was stored before it is written.
_UPDATE = ", ".join(f"{c} = excluded.{c}" for c in _COLUMNS.replace(" ", "").split(",")[1:])

_ADDED_COLUMNS = (
    ("result", "TEXT"),
    ("retries", "INTEGER NOT NULL DEFAULT 0"),
    ("due_at", "REAL"),
    ("rerun_of", "TEXT"),
    ("rerun", "TEXT"),
)
"""The columns added since the first version, which an earlier file gets when it is opened."""

BUSY_TIMEOUT = 5.0
"""Seconds a write waits for another process's, before the batch is dropped."""
TRIM_INTERVAL = 1.0
"""Seconds between two removals of the finished tasks beyond those kept."""


class SQLiteTaskStore(TaskStore):
    """The tasks of the app ``app_name`` in the SQLite file at ``path``, in WAL mode, so that
    the processes of a machine read while one of them writes.

    :param keep_finished: how many finished tasks to keep; older ones are removed.
    """

    def __init__(self, path: str, app_name: str, keep_finished: int) -> None:
        self.path = path
        self.app_name = app_name
        self.keep_finished = keep_finished
        self._trimmed_at = 0.0
        self._writing: tuple[int, sqlite3.Connection] | None = None
        with self._reading() as db:
            db.executescript(_SCHEMA)
            db.executescript(stops.SCHEMA)
            columns = {row[1] for row in db.execute("PRAGMA table_info(threadctx_tasks)")}
            for column, kind in _ADDED_COLUMNS:
                if column in columns:
                    continue
                try:  # a file of an earlier version
                    db.execute(f"ALTER TABLE threadctx_tasks ADD COLUMN {column} {kind}")
                except sqlite3.OperationalError as error:
                    if "duplicate column" not in str(error):  # not another process first
                        raise

    def stop_requests(self) -> stops.SQLiteStops:
        """The requests to stop a thread task of another process, in their own table."""
        return stops.SQLiteStops(self)

    def _connect(self) -> sqlite3.Connection:
        # Autocommit: transactions are begun explicitly, where writing. Not checked for the
        # same thread: the store makes sure of it, and the writer's may be closed from another.
        db = sqlite3.connect(
            self.path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False
        )
        try:
            db.execute("PRAGMA journal_mode=WAL")
            # A crash may lose the last moment's records, never the file.
            db.execute("PRAGMA synchronous=NORMAL")
        except BaseException:  # not a database, say: the caller says so, nothing stays open
            db.close()
            raise
        return db

    @contextlib.contextmanager
    def _reading(self) -> cabc.Iterator[sqlite3.Connection]:
        """A connection of its own for one read: reads are rare (a status page, the CLI), and
        a connection kept per thread would stay open after its thread ended."""
        db = self._connect()
        try:
            yield db
        finally:
            db.close()

    def _writer_connection(self) -> sqlite3.Connection:
        """The connection of the process's writer thread, kept open, and closed with the
        store. A forked child makes its own: the parent's is not the child's to use or to
        close."""
        writing = self._writing
        if writing is not None and writing[0] == os.getpid():
            return writing[1]
        if writing is not None:
            _inherited.append(writing[1])  # kept, never closed, in the forked child
        db = self._connect()
        self._writing = os.getpid(), db
        weakref.finalize(self, _close_if_mine, db, os.getpid())
        return db

    def _select(self, sql: str, args: cabc.Sequence[t.Any]) -> list[t.Any]:
        with self._reading() as db:
            return db.execute(sql, args).fetchall()

    def write(self, records: cabc.Sequence[Record]) -> None:
        db = self._writer_connection()
        app = self.app_name
        db.execute("BEGIN IMMEDIATE")
        try:
            known: dict[str, Record] = {}
            ids = [record.id for record in records]
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                marks = ",".join("?" * len(chunk))
                rows = db.execute(
                    f"SELECT {_COLUMNS} FROM threadctx_tasks WHERE app = ? AND id IN ({marks})",
                    [app, *chunk],
                )
                known.update((row[0], _record(row)) for row in rows)
            moves = [
                (None, record) if old is None else (old.state, merge(old, record))
                for record in records
                for old in (known.get(record.id),)
            ]
            changes, history = tally(moves)
            rows_out = [_row(app, new) for _, new in moves]
            db.executemany(
                f"INSERT INTO threadctx_tasks (app, {_COLUMNS}) VALUES ({_PLACES})"
                f" ON CONFLICT (app, id) DO UPDATE SET {_UPDATE}",
                rows_out,
            )
            db.executemany(
                "INSERT INTO threadctx_counts (app, name, n) VALUES (?, ?, ?)"
                " ON CONFLICT (app, name) DO UPDATE SET n = n + excluded.n",
                [(app, name, change) for name, change in changes.items()],
            )
            db.executemany(
                "INSERT INTO threadctx_history (app, at, name, n) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (app, at, name) DO UPDATE SET n = n + excluded.n",
                [(app, at, name, change) for (at, name), change in history.items()],
            )
            now = time.monotonic()
            if now - self._trimmed_at >= TRIM_INTERVAL:
                self._trimmed_at = now
                self._trim(db)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _trim(self, db: sqlite3.Connection) -> None:
        # In the order the store first heard of the tasks (their rowid, which an update keeps):
        # the finished tasks kept are the last submitted, which are, but for a long one here
        # and there, the last to finish.
        finished = "DELETE FROM threadctx_tasks WHERE app = ? AND finished_at IS NOT NULL"
        if self.keep_finished == 0:
            db.execute(finished, (self.app_name,))
        else:
            db.execute(
                f"{finished} AND rowid < (SELECT rowid FROM threadctx_tasks WHERE app = ?"
                " AND finished_at IS NOT NULL ORDER BY rowid DESC LIMIT 1 OFFSET ?)",
                (self.app_name, self.app_name, self.keep_finished - 1),
            )
        db.execute(
            "DELETE FROM threadctx_history WHERE app = ? AND at < ?",
            (self.app_name, time.time() - HISTORY_KEPT),
        )

    def get(self, task_id: str) -> Record | None:
        if not findable(task_id):
            return None
        with self._reading() as db:
            row = db.execute(
                f"SELECT {_COLUMNS} FROM threadctx_tasks WHERE app = ? AND id = ?",
                (self.app_name, task_id),
            ).fetchone()
        return None if row is None else _record(row)

    def counts(self) -> dict[str, int]:
        from ..model import task_counts

        rows = self._select("SELECT name, n FROM threadctx_counts WHERE app = ?", (self.app_name,))
        raw = dict(rows)
        return task_counts(*(raw.get(name, 0) for name in COUNTS))

    def recent(
        self, *, state: str | None = None, name: str | None = None, limit: int = 50
    ) -> list[Record]:
        where, args = "app = ?", [self.app_name]
        if state is not None:
            where += " AND state = ?"
            args.append(state)
        if name is not None:
            where += " AND name = ?"
            args.append(name)
        rows = self._select(
            f"SELECT {_COLUMNS} FROM threadctx_tasks WHERE {where} ORDER BY rowid DESC LIMIT ?",
            [*args, limit],
        )
        return [_record(row) for row in rows]

    def history(self, seconds: int = 300) -> list[dict[str, int]]:
        steps = history_steps(seconds)
        rows = self._select(
            "SELECT at, name, n FROM threadctx_history WHERE app = ? AND at >= ?",
            (self.app_name, steps[0]),
        )
        found: dict[int, dict[str, int]] = {}
        for at, name, n in rows:
            found.setdefault(at, {})[name] = n
        return [history_row(at, found.get(at, {})) for at in steps]

    def children(self, task_id: str) -> list[Record]:
        rows = self._select(
            f"SELECT {_COLUMNS} FROM threadctx_tasks WHERE app = ? AND parent_id = ?"
            " ORDER BY rowid",
            (self.app_name, task_id),
        )
        return [_record(row) for row in rows]


def _row(app: str, record: Record) -> tuple[t.Any, ...]:
    record = storable_record(record)
    progress = record.progress
    done, total, note = (None, None, None) if progress is None else progress
    done, total = _storable_number(done), _storable_number(total)
    return (
        app,
        *record[:8],
        done,
        total,
        note,
        record.error,
        record.process,
        record.backend,
        record.result,
        record.retries,
        record.due_at,
        record.rerun_of,
        record.rerun,
    )


def _storable_number(value: float | None) -> float | None:
    """An ``int`` beyond SQLite's 64 bits as the float nearest it: the number stays about
    right, and the batch it is in is written."""
    if isinstance(value, int) and not -(2**63) <= value < 2**63:
        return float(value)
    return value


def _record(row: tuple[t.Any, ...]) -> Record:
    done, total, note = row[8:11]
    progress = None if done is None else Progress(done, total, note)
    id, name, parent_id, request, state, submitted_at, started_at, finished_at = row[:8]
    return Record(
        id,
        name,
        parent_id,
        request,
        state,
        submitted_at,
        started_at,
        finished_at,
        progress,
        row[11],
        row[12],
        row[13],
        row[14],
        retries=row[15],
        due_at=row[16],
        rerun_of=row[17],
        rerun=row[18],
    )


_inherited: list[sqlite3.Connection] = []
"""The writer connections a forked child got from its parent: kept open, not to be used."""


def _close_if_mine(db: sqlite3.Connection, pid: int) -> None:
    if os.getpid() == pid:
        db.close()


def open_url(url: str, app: flask.Flask, settings: Settings) -> SQLiteTaskStore:
    """The store of ``app`` in the SQLite file of ``url`` (relative to the instance folder
    unless absolute); see :func:`flask_threadctx.stores.open_store`."""
    path = url[len("sqlite:///") :]
    if not os.path.isabs(path):
        os.makedirs(app.instance_path, exist_ok=True)
        path = os.path.join(app.instance_path, path)
    try:
        return SQLiteTaskStore(path, app.name, settings.keep_finished)
    except sqlite3.Error as error:
        raise ValueError(
            f"'THREADCTX_TASK_STORE' is {url!r}, but the SQLite file {path!r} cannot be"
            f" opened ({error}): {_why_not_sqlite(path)}"
        ) from None


def _why_not_sqlite(path: str) -> str:
    """What is wrong with the place of a SQLite file that cannot be opened, and what to do."""
    if os.path.isdir(path):
        return "it is a folder. Name a file in it, such as 'tasks.db'."
    folder = os.path.dirname(path)
    existing = folder
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"{existing!r} is a file, not a folder. Name a path in a folder."
    if existing != folder:
        return f"the folder {folder!r} does not exist. Create it, or name a path in a folder."
    if os.path.exists(path):
        return "the file is not a SQLite database this process may write. Name another file."
    return (
        f"this process may not create files in the folder {folder!r} (its permissions, or a"
        " read-only file system). Name a path in a folder it can write to."
    )
