"""The stop requests of a Redis task store (see :mod:`.stops`): one hash per process they are
addressed to, ``threadctx:<app>:stops:<host:pid>``, a field per request whose value is
``"<state> <asked at> <task id>"``. Each step that must be atomic is a Lua script. The hash
expires :data:`~.stops.STALE` seconds after the last request to its process, so that nothing
is left of a process that is gone."""

from __future__ import annotations

import time
import typing as t

from .stops import STALE
from .stops import StopRequests

if t.TYPE_CHECKING:
    import collections.abc as cabc

    from .base import Record
    from .redis import RedisTaskRecords
    from .stops import StopState

# KEYS: the process's hash. ARGV: the request, its value, the time before which requests are
# stale, how long the hash lasts.
_ASK = """
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
    local asked_at = tonumber(string.match(all[i + 1], '^%a+ (%S+) '))
    if asked_at == nil or asked_at < tonumber(ARGV[3]) then redis.call('HDEL', KEYS[1], all[i]) end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[4])
return 0
"""

# KEYS: the process's hash. ARGV: the requests to take. Returns those that were still asked.
_TAKE = """
local taken = {}
for _, request in ipairs(ARGV) do
    local value = redis.call('HGET', KEYS[1], request)
    if value and string.sub(value, 1, 6) == 'asked ' then
        redis.call('HSET', KEYS[1], request, 'taken ' .. string.sub(value, 7))
        taken[#taken + 1] = request
    end
end
return taken
"""

# KEYS: the process's hash. ARGV: a request and its answer, for each. Written only where taken.
_ANSWER = """
for i = 1, #ARGV, 2 do
    local value = redis.call('HGET', KEYS[1], ARGV[i])
    if value and string.sub(value, 1, 6) == 'taken ' then
        redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1] .. ' ' .. string.sub(value, 7))
    end
end
return 0
"""

# KEYS: the process's hash. ARGV: the request, '1' to remove it only if asked. Returns its state.
_WITHDRAW = """
local value = redis.call('HGET', KEYS[1], ARGV[1])
if not value then return false end
local state = string.match(value, '^%a+')
if ARGV[2] ~= '1' or state == 'asked' then redis.call('HDEL', KEYS[1], ARGV[1]) end
return state
"""


class RedisStops(StopRequests):
    """The stop requests of ``records``' app."""

    def __init__(self, records: RedisTaskRecords) -> None:
        self.records = records
        client = records.client
        self._ask = client.register_script(_ASK)
        self._take = client.register_script(_TAKE)
        self._answer = client.register_script(_ANSWER)
        self._withdraw = client.register_script(_WITHDRAW)

    def key(self, process: str) -> str:
        return f"{self.records.prefix}stops:{process}"

    def ask(self, request: str, task_id: str, process: str) -> None:
        now = time.time()
        self._ask(
            keys=[self.key(process)],
            args=[request, f"asked {now!r} {task_id}", now - STALE, int(STALE)],
        )

    def look(
        self, request: str, task_id: str, process: str
    ) -> tuple[StopState | None, Record | None]:
        value = self.records.client.hget(self.key(process), request)
        state = None if value is None else _text(value).partition(" ")[0]
        return t.cast("StopState | None", state), self.records.get(task_id)

    def withdraw(self, request: str, process: str, *, only_asked: bool) -> StopState | None:
        state = self._withdraw(keys=[self.key(process)], args=[request, "1" if only_asked else ""])
        return None if state is None else t.cast("StopState", _text(state))

    def asked(self, process: str) -> list[tuple[str, str]]:
        found: dict[bytes | str, bytes | str] = self.records.client.hgetall(self.key(process))
        requests = []
        for request, value in found.items():
            state, _, rest = _text(value).partition(" ")
            if state == "asked":
                task_id = rest.partition(" ")[2]
                requests.append((_text(request), task_id))
        return requests

    def take(self, process: str, requests: cabc.Sequence[str]) -> list[str]:
        taken: list[bytes | str] = self._take(keys=[self.key(process)], args=list(requests))
        return [_text(request) for request in taken]

    def answer(self, process: str, answers: cabc.Mapping[str, bool]) -> None:
        args: list[str] = []
        for request, stopped in answers.items():
            args += [request, "stopped" if stopped else "finished"]
        self._answer(keys=[self.key(process)], args=args)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
