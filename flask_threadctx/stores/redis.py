"""The task store in Redis, for the processes of several machines: :class:`RedisTaskRecords`.

One hash per task and one hash of counts per app, under ``threadctx:<app>:``. The same records
are the Celery backend's: :class:`~flask_threadctx.backends.celery.claims.CeleryRecords` adds the
claims, signs of life and ends a Celery task goes through, on this key layout. The dependency
runs that way only: nothing here knows Celery.
"""

from __future__ import annotations

import collections.abc as cabc
import os
import stat
import time
import typing as t

from ..model import task_counts
from ..progress import Progress
from .base import COUNTS
from .base import findable
from .base import HISTORY_KEPT
from .base import history_steps
from .base import kept_for_rerun
from .base import merge
from .base import Record
from .base import storable_record
from .base import tally
from .base import TaskStore
from .redis_stops import RedisStops

if t.TYPE_CHECKING:
    import flask
    import redis

    from ..config import Settings
    from ..model import TaskInfo
    from ..model import TaskState

# KEYS: the index of all tasks, of finished ones. ARGV: how many finished tasks to keep (-1:
# all), the time before which index entries are of expired tasks, the prefix of task keys.
_TRIM = """
local keep = tonumber(ARGV[1])
if keep >= 0 then
    local gone = redis.call('ZRANGE', KEYS[2], 0, -keep - 1)
    for i = 1, #gone, 500 do
        local chunk = {unpack(gone, i, math.min(i + 499, #gone))}
        local keys = {}
        for j, id in ipairs(chunk) do keys[j] = ARGV[3] .. 'task:' .. id end
        redis.call('DEL', unpack(keys))
        redis.call('ZREM', KEYS[1], unpack(chunk))
        redis.call('ZREM', KEYS[2], unpack(chunk))
    end
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[2])
return 0
"""


class RedisTaskRecords(TaskStore):
    """The task records of the app ``app_name`` in the Redis of ``client``, each kept for
    ``expires`` seconds after its last change."""

    def __init__(
        self,
        client: redis.Redis,
        app_name: str,
        expires: int,
        heartbeat: float,
        keep_finished: int | None = None,
    ) -> None:
        self.client = client
        self.prefix = f"threadctx:{app_name}:"
        self.expires = expires
        self.heartbeat = heartbeat
        """How long a running task's sign of life lasts: its process renews it three times as
        often, so a task without one for this long has lost its process."""
        self.keep_finished = keep_finished
        """How many finished tasks written with :meth:`write` to keep; ``None``: all, until
        they expire."""
        self.counts_key = f"{self.prefix}counts"
        self._recent = f"{self.prefix}recent"
        self._finished = f"{self.prefix}finished"
        self._trimmed_at = 0.0
        self._indexed_at = 0.0
        self._trim = client.register_script(_TRIM)
        self.prepare()

    _stops: RedisStops | None = None

    def stop_requests(self) -> RedisStops:
        """The requests to stop a thread task of another process, in keys of their own."""
        stops = self._stops
        if stops is None:
            stops = self._stops = RedisStops(self)
        return stops

    def prepare(self) -> None:
        """Called at the end of ``__init__``: where a subclass that keeps more in the same
        records (the Celery backend's) sets up its part."""

    def task_key(self, task_id: str) -> str:
        return f"{self.prefix}task:{task_id}"

    def children_key(self, task_id: str) -> str:
        return f"{self.prefix}children:{task_id}"

    def index(self, pipe: t.Any, task_id: str, parent_id: str | None, submitted_at: float) -> None:
        """Make a task findable by :meth:`recent` and :meth:`children`; once a second, let go
        of the index entries of tasks that expired (a Celery task's record is never trimmed
        otherwise)."""
        pipe.zadd(self._recent, {task_id: submitted_at})
        now = time.monotonic()
        if now - self._indexed_at >= 1.0:
            self._indexed_at = now
            pipe.zremrangebyscore(self._recent, "-inf", time.time() - self.expires)
        if parent_id is not None:
            children = self.children_key(parent_id)
            pipe.zadd(children, {task_id: submitted_at})
            pipe.expire(children, self.expires)

    # -- the task store ------------------------------------------------------------------

    def write(self, records: cabc.Sequence[Record]) -> None:
        """Merge records of tasks that run in the processes that submit them (the thread
        backend's): one round trip to read what is stored of them, one to write."""
        with self.client.pipeline(transaction=False) as pipe:
            for record in records:
                pipe.hgetall(self.task_key(record.id))
            stored = pipe.execute()
        moves = []
        with self.client.pipeline(transaction=False) as pipe:
            for record, raw in zip(records, stored, strict=True):
                old = _record(raw)
                new = record if old is None else merge(old, record)
                moves.append((None if old is None else old.state, new))
                key = self.task_key(new.id)
                pipe.hset(key, mapping=_fields(new))
                if old is not None and old.due_at is not None and new.due_at is None:
                    pipe.hdel(key, "due_at")  # it started, or ended, since it was due
                pipe.expire(key, self.expires)
                if old is None:
                    self.index(pipe, new.id, new.parent_id, new.submitted_at)
                if new.finished_at is not None:
                    pipe.zadd(self._finished, {new.id: new.finished_at})
            counts, history = tally(moves)
            for name, change in counts.items():
                pipe.hincrby(self.counts_key, name, change)
            for (at, name), change in history.items():
                step = f"{self.prefix}history:{at}"
                pipe.hincrby(step, name, change)
                pipe.expire(step, HISTORY_KEPT)
            pipe.execute()
        now = time.monotonic()
        if now - self._trimmed_at >= 1.0:
            self._trimmed_at = now
            self.trim()

    def trim(self) -> None:
        """Remove the finished tasks beyond ``keep_finished``, and the index entries of tasks
        that expired."""
        keep = -1 if self.keep_finished is None else self.keep_finished
        self._trim(
            keys=[self._recent, self._finished],
            args=[keep, time.time() - self.expires, self.prefix],
        )

    def get(self, task_id: str) -> Record | None:
        if not findable(task_id):
            return None
        return _record(self.client.hgetall(self.task_key(task_id)))

    def recent(
        self, *, state: str | None = None, name: str | None = None, limit: int = 50
    ) -> list[Record]:
        found: list[Record] = []
        start, page = 0, max(limit, 100)
        while len(found) < limit:
            ids: list[bytes] = self.client.zrevrange(self._recent, start, start + page - 1)  # type: ignore[assignment]
            if not ids:
                break
            start += page
            for record in self._records(ids):
                if (state is None or record.state == state) and (
                    name is None or record.name == name
                ):
                    found.append(record)
        return found[:limit]

    def history(self, seconds: int = 300) -> list[dict[str, int]]:
        steps = history_steps(seconds)
        with self.client.pipeline(transaction=False) as pipe:
            for at in steps:
                pipe.hgetall(f"{self.prefix}history:{at}")
            found = pipe.execute()
        history = []
        for at, raw in zip(steps, found, strict=True):
            counts = {text_of(name): int(n) for name, n in raw.items()}
            history.append(
                {
                    "at": at,
                    "succeeded": counts.get("succeeded", 0),
                    "failed": counts.get("failed", 0),
                }
            )
        return history

    def children(self, task_id: str) -> list[Record]:
        ids: list[bytes] = self.client.zrange(self.children_key(task_id), 0, -1)  # type: ignore[assignment]
        return self._records(ids)

    def _records(self, ids: cabc.Sequence[bytes | str]) -> list[Record]:
        with self.client.pipeline(transaction=False) as pipe:
            for task_id in ids:
                pipe.hgetall(self.task_key(text_of(task_id)))
            found = (_record(raw) for raw in pipe.execute())
            return [record for record in found if record is not None]

    def counts(self) -> dict[str, int]:
        """What ``stats()`` reports. The counts live in Redis: a Redis that lost its data
        (restarted without persistence) starts them again from zero, and the tasks that were
        under way then are counted only as they go on, so ``queued`` and ``running``, the
        differences, are held at 0 rather than go below it."""
        raw = {text_of(k): int(v) for k, v in self.client.hgetall(self.counts_key).items()}
        counts = task_counts(*(raw.get(name, 0) for name in COUNTS))
        counts["queued"], counts["running"] = max(counts["queued"], 0), max(counts["running"], 0)
        return counts


def _fields(record: Record) -> dict[t.Any, t.Any]:
    record = storable_record(record)
    fields = {
        "id": record.id,
        "name": record.name,
        "state": record.state,
        "submitted_at": repr(record.submitted_at),
        "process": record.process,
        "backend": record.backend,
    }
    for name in ("parent_id", "request", "error", "result", "rerun_of", "rerun"):
        value = getattr(record, name)
        if value is not None:
            fields[name] = value
    if record.retries:
        fields["retries"] = str(record.retries)
    for name in ("started_at", "finished_at", "due_at"):
        value = getattr(record, name)
        if value is not None:
            fields[name] = repr(value)
    if record.progress is not None:
        done, total, note = record.progress
        fields.update(
            progress_done=repr(done), progress_total=repr(total), progress_note=note or ""
        )
    return fields


def _record(raw: dict[t.Any, t.Any]) -> Record | None:
    """The record in a task's hash; ``None`` for a task unknown, or claimed by a Celery
    worker a moment before its submitter's add lands."""
    data = {text_of(k): text_of(v) for k, v in raw.items()}
    if "name" not in data:
        return None
    progress = progress_from(data)
    state = data["state"]
    backend = data.get("backend", "celery")
    started_at, finished_at = (data.get(name) for name in ("started_at", "finished_at"))
    return Record(
        data["id"],
        data["name"],
        data.get("parent_id"),
        data.get("request"),
        t.cast("TaskState", state),
        float(data["submitted_at"]),
        None if started_at is None else float(started_at),
        None if finished_at is None else float(finished_at),
        progress,
        data.get("error"),
        data.get("process") or data.get("worker") or "",
        backend,
        data.get("result"),
        None if state != "pending" or "redelivery_at" not in data else float(data["redelivery_at"]),
        int(data.get("retries", 0)),
        # Only while it waits: a field written after the task started (a late add) is stale.
        None if "due_at" not in data or state not in _WAITING else float(data["due_at"]),
        data.get("rerun_of"),
        data.get("rerun"),
    )


_WAITING = frozenset(("pending", "retrying"))


def rerun_fields(info: TaskInfo) -> dict[str, str] | None:
    """The fields of a rerunnable task's first record that its submit keeps for a re-run
    (:data:`~flask_threadctx.stores.base.kept_for_rerun`), or ``None``: read in the submitting
    thread, for a record written by another (the Celery backend's writer)."""
    kept = kept_for_rerun.get()
    if kept is None or not kept.claim(info):
        return None
    fields = {"rerun": kept.payload}
    if kept.rerun_of is not None:
        fields["rerun_of"] = kept.rerun_of
    return fields


def progress_from(data: dict[str, str]) -> Progress | None:
    """The progress in a record; ``None`` for none, or for one that cannot be read back (an
    older version wrote numpy's ``np.float64(4.0)``): one odd field never fails a read."""
    if "progress_done" not in data:
        return None
    total = data.get("progress_total", "None")
    try:
        done, count = _number(data["progress_done"]), None if total == "None" else _number(total)
    except ValueError:
        return None
    return Progress(done, count, data.get("progress_note") or None)


def _number(text: str) -> float:
    """A number as ``repr`` wrote it: an ``int`` stays one, as the task reported it."""
    try:
        return int(text)
    except ValueError:
        return float(text)


def text_of(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def open_url(url: str, app: flask.Flask, settings: Settings) -> RedisTaskRecords:
    """The store of ``app`` in the Redis database of ``url``; see
    :func:`flask_threadctx.stores.open_store`."""
    try:
        import redis
    except ImportError:
        raise RuntimeError(
            "A Redis task store needs the 'redis' package: 'pip install Flask-ThreadCtx[redis]'."
        ) from None
    try:
        client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
    except ValueError as error:
        raise ValueError(
            f"'THREADCTX_TASK_STORE' is {url!r}, which is not a Redis URL that redis-py can"
            f" read ({error}). Write it as 'redis://host:6379/0'."
        ) from None
    if url.startswith("unix:"):
        _check_socket(url, client.connection_pool.connection_kwargs.get("path"))
    return RedisTaskRecords(
        client, app.name, 7 * 24 * 3600, settings.celery_heartbeat, settings.keep_finished
    )


def _check_socket(url: str, path: str | None) -> None:
    """:raise ValueError: the ``unix://`` URL names no socket: no path, or no socket there."""
    if not path or not os.path.isabs(path):
        raise ValueError(
            f"'THREADCTX_TASK_STORE' is {url!r}, which names no socket: write the absolute"
            " path of Redis's 'unixsocket' after the scheme, as 'unix:///run/redis.sock'."
        )
    try:
        is_socket = stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError as error:
        raise ValueError(
            f"'THREADCTX_TASK_STORE' is {url!r}, but there is no socket at {path!r}"
            f" ({error.strerror}). Start Redis with 'unixsocket {path}' before the app, or"
            " correct the path."
        ) from None
    if not is_socket:
        raise ValueError(
            f"'THREADCTX_TASK_STORE' is {url!r}, but {path!r} is not a socket. Give the path"
            " of Redis's 'unixsocket'."
        )
