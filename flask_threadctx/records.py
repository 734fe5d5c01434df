"""The :class:`~flask_threadctx.TaskInfo` of tasks that run in other processes, kept in Redis.

Every process of an app reads and writes the same records: the submitting process adds a task,
the process that runs it claims, starts and finishes it, and any process can look it up or count
tasks by state. One hash per task and one hash of counts per app; each change is one round trip.

The *claim* decides, once and for all, who may act on a pending task: a worker that runs it
(``"run"``), a waiting parent that runs it itself (``"inline"``), or ``cancel()``
(``"cancelled"``). Whoever sets it first wins; the others see the winner's value.
"""

from __future__ import annotations

import time
import typing as t

from .executor import task_counts
from .executor import TaskInfo

if t.TYPE_CHECKING:
    import redis

Claim = t.Literal["run", "inline", "cancelled"]

# KEYS: the task's hash, the app's counts. ARGV: the claim wanted, the time now.
# A task that was claimed for running already and starts again is a retry or a redelivery:
# counted as started only once.
_CLAIM = """
local won = redis.call('HSETNX', KEYS[1], 'claim', ARGV[1]) == 1
local claim = redis.call('HGET', KEYS[1], 'claim')
if claim ~= ARGV[1] then return claim end
if claim == 'cancelled' then
    if won then
        redis.call('HSET', KEYS[1], 'state', 'cancelled', 'finished_at', ARGV[2])
        redis.call('HINCRBY', KEYS[2], 'cancelled', 1)
    end
    return claim
end
local state = redis.call('HGET', KEYS[1], 'state')
if won or (state ~= 'running' and state ~= 'retrying') then
    redis.call('HINCRBY', KEYS[2], 'started', 1)
end
redis.call('HSET', KEYS[1], 'state', 'running', 'started_at', ARGV[2])
return claim
"""

_COUNTS = ("submitted", "started", "succeeded", "failed", "cancelled", "rejected")


class RedisTaskRecords:
    """The task records of the app ``app_name`` in the Redis of ``client``, each kept for
    ``expires`` seconds after its last change."""

    def __init__(self, client: redis.Redis, app_name: str, expires: int) -> None:
        self.client = client
        self.prefix = f"threadctx:{app_name}:"
        self.expires = expires
        self._counts = f"{self.prefix}counts"
        self._claim = client.register_script(_CLAIM)

    def _key(self, task_id: str) -> str:
        return f"{self.prefix}task:{task_id}"

    def add(self, info: TaskInfo) -> None:
        key = self._key(info.id)
        fields: dict[t.Any, t.Any] = {
            "id": info.id,
            "name": info.name,
            "state": "pending",
        }
        fields["submitted_at"] = repr(info.submitted_at)
        if info.parent_id is not None:
            fields["parent_id"] = info.parent_id
        if info.request is not None:
            fields["request"] = info.request
        with self.client.pipeline(transaction=False) as pipe:
            pipe.hset(key, mapping=fields)
            pipe.expire(key, self.expires)
            pipe.hincrby(self._counts, "submitted", 1)
            pipe.execute()

    def reject(self, info: TaskInfo) -> None:
        """Book a task that was added but could not be sent."""
        self._end(info.id, "rejected", info.finished_at or time.time())

    def claim(self, task_id: str, how: Claim) -> str:
        """Claim the task for ``how``; return the claim that holds: ``how`` if it won."""
        result = self._claim(keys=[self._key(task_id), self._counts], args=[how, time.time()])
        return result.decode() if isinstance(result, bytes) else str(result)

    def retrying(self, task_id: str) -> None:
        self.client.hset(self._key(task_id), "state", "retrying")

    def finish(self, task_id: str, error: BaseException | None) -> None:
        state = "succeeded" if error is None else "failed"
        summary = None if error is None else f"{type(error).__name__}: {error}"
        self._end(task_id, state, time.time(), summary)

    def _end(self, task_id: str, state: str, when: float, error: str | None = None) -> None:
        key = self._key(task_id)
        fields: dict[t.Any, t.Any] = {
            "state": state,
            "finished_at": repr(when),
        }
        if error is not None:
            fields["error"] = error[:1000]
        with self.client.pipeline(transaction=False) as pipe:
            pipe.hset(key, mapping=fields)
            pipe.expire(key, self.expires)
            pipe.hincrby(self._counts, state, 1)
            pipe.execute()

    def get(self, task_id: str) -> TaskInfo | None:
        data = {_text(k): _text(v) for k, v in self.client.hgetall(self._key(task_id)).items()}
        if not data:
            return None
        info = TaskInfo(data["id"], data["name"], data.get("parent_id"), data.get("request"))
        state = data["state"]
        info.state = t.cast("t.Any", "running" if state == "retrying" else state)
        info.submitted_at = float(data["submitted_at"])
        if "started_at" in data:
            info.started_at = float(data["started_at"])
        if "finished_at" in data:
            info.finished_at = float(data["finished_at"])
        return info

    def counts(self) -> dict[str, int]:
        raw = {_text(k): int(v) for k, v in self.client.hgetall(self._counts).items()}
        return task_counts(*(raw.get(name, 0) for name in _COUNTS))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
