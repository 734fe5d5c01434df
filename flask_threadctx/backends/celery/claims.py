"""The Celery backend's records in Redis: the task store's key layout, plus what a Celery task
goes through there.

Every process of an app reads and writes the same records: the submitting process adds a task,
the process that runs it claims, starts and finishes it, and any process can look it up or count
tasks by state. Each change is one round trip, except a submit's, which a background thread
(:mod:`.writer`) writes in batches so that the submit does not wait.

The *claim* decides, once and for all, who may act on a pending task: a worker that runs it
(``"run"``), a waiting parent that runs it itself (``"inline"``), or ``cancel()``
(``"cancelled"``). Whoever sets it first wins; the others see the winner's value, but for a
cancel that finds the task cancelled already, which sees :data:`CANCELLED_BEFORE`: the cancel
that won books the task, once.

A task claimed to run has a *sign of life*, a key that expires unless the process running it
(or its worker's main process) renews it: a running task without one has lost its process,
even if nobody saw it go. A task a worker has received but not started has a sign that it is
held, likewise. Whatever books a task's end (``finish``) or decides it (``claim``) does so in
one step that checks the record first: the first end booked is the only one. Each of these steps
is a Lua script, below.
"""

from __future__ import annotations

import collections.abc as cabc
import contextlib
import functools
import json
import logging
import time
import typing as t

from ..._process import PerProcess
from ...progress import Progress
from ...stores.base import storable_text
from ...stores.base import summary as error_summary
from ...stores.redis import progress_from
from ...stores.redis import RedisTaskRecords
from ...stores.redis import rerun_fields
from ...stores.redis import text_of
from .control_steps import EXPIRE
from .control_steps import RETRYING_STEP
from .heartbeat import Heartbeat
from .heartbeat import started
from .writer import Writer

if t.TYPE_CHECKING:
    from ...model import TaskInfo

# Under the name it always logged under: users filter on it.
_logger = logging.getLogger("flask_threadctx.records")

Claim = t.Literal["run", "inline", "cancelled", "rejected"]

CANCELLED_BEFORE = "cancelled before"
"""What a claim to cancel a task that another cancel claimed first returns."""

# The states after which nothing changes a task's record: its end is booked once, by whoever
# books it first (the script that books it checks, in the same step).
ENDED = "local ended = {succeeded=1, failed=1, cancelled=1, rejected=1, expired=1, timed_out=1}\n"

# KEYS: the task's hash, the app's counts, its sign of life, and, to run it, its stop request
# (see :mod:`.stopping`). ARGV: the claim wanted, the time
# now, how long a sign of life lasts, the worker; then, to say who won, a message, '1' to publish
# it on the task's reply channel, and more channels to publish it on (all in the claim's round
# trip). A task that was claimed for running already and starts again is a retry or a
# redelivery: counted as started only once; one whose end is booked already (a duplicate
# delivery, or a task declared lost) is not run again: the claim says 'finished'. A claim to
# run that holds comes with the task's stop request, if one was made (a retry, a redelivery).
# A task that starts is due no more; a retry that starts waits no more.
_CLAIM = (
    ENDED
    + """
local won = redis.call('HSETNX', KEYS[1], 'claim', ARGV[1]) == 1
local claim = redis.call('HGET', KEYS[1], 'claim')
if claim ~= ARGV[1] then return claim end
if claim == 'cancelled' or claim == 'rejected' then
    if not won then return claim == 'cancelled' and 'cancelled before' or claim end
    redis.call('HSET', KEYS[1], 'state', claim, 'finished_at', ARGV[2])
    redis.call('HDEL', KEYS[1], 'due_at')
    redis.call('HINCRBY', KEYS[2], claim, 1)
else
    local state = redis.call('HGET', KEYS[1], 'state')
    if state and ended[state] then return 'finished' end
    redis.call('HDEL', KEYS[1], 'held_at', 'redelivery_at', 'due_at')  -- its worker has it now
    if won or (state ~= 'running' and state ~= 'retrying') then
        redis.call('HINCRBY', KEYS[2], 'started', 1)
    end
    if state == 'retrying' then redis.call('HINCRBY', KEYS[2], 'retrying', -1) end
    redis.call('HSET', KEYS[1], 'state', 'running', 'started_at', ARGV[2], 'worker', ARGV[4])
    redis.call('SET', KEYS[3], ARGV[4], 'PX', ARGV[3])
end
if ARGV[5] then
    local reply = ARGV[6] == '1' and redis.call('HGET', KEYS[1], 'reply')
    if reply then redis.call('PUBLISH', reply, ARGV[5]) end
    for i = 7, #ARGV do redis.call('PUBLISH', ARGV[i], ARGV[5]) end
end
if KEYS[4] and (claim == 'run' or claim == 'inline') then
    local stop = redis.call('GET', KEYS[4])
    if stop then return {claim, stop} end
end
return claim
"""
)

# KEYS: the task's hash, the app's counts, the engine's result key, the task's sign of life, its
# stop request. ARGV: the state, the time, the error summary or '', how long the record is kept,
# the result message, how long it is kept (0: for ever), the reply channel or '' for the one in
# the task's hash, '1' to book the end only if the task is running without a sign of life
# (lost), and the count to add it to ('stopped' for a task stopped while it ran; '': the
# state's). The message is stored and published on the result key (for anyone watching that
# task) and on the reply channel (for the submitter). The first end booked stays, whoever books
# it: the worker, its main process that saw it die, or a submitter that found it lost; a result
# stored already as a success stays too, even if the record is gone (as Celery's own store
# keeps it).
_FINISH = (
    ENDED
    + """
local state = redis.call('HGET', KEYS[1], 'state')
if state and ended[state] then return 0 end
if ARGV[8] == '1' and (state ~= 'running' or redis.call('EXISTS', KEYS[4]) == 1) then
    return 0
end
local stored = redis.call('GET', KEYS[3])
if stored then
    local ok, meta = pcall(cjson.decode, stored)
    if ok and type(meta) == 'table' and meta['status'] == 'SUCCESS' then return 0 end
end
if tonumber(ARGV[6]) > 0 then
    redis.call('SET', KEYS[3], ARGV[5], 'EX', ARGV[6])
else
    redis.call('SET', KEYS[3], ARGV[5])
end
redis.call('PUBLISH', KEYS[3], ARGV[5])
local reply = ARGV[7] ~= '' and ARGV[7] or redis.call('HGET', KEYS[1], 'reply')
if reply then redis.call('PUBLISH', reply, ARGV[5]) end
redis.call('HSET', KEYS[1], 'state', ARGV[1], 'finished_at', ARGV[2])
redis.call('HDEL', KEYS[1], 'due_at')
if state == 'retrying' then redis.call('HINCRBY', KEYS[2], 'retrying', -1) end
if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], 'error', ARGV[3]) end
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('HINCRBY', KEYS[2], ARGV[9] ~= '' and ARGV[9] or ARGV[1], 1)
local step = string.sub(KEYS[2], 1, -7) .. 'history:' .. math.floor(tonumber(ARGV[2]) / 10) * 10
redis.call('HINCRBY', step, ARGV[1], 1)
redis.call('EXPIRE', step, 3600)
redis.call('DEL', KEYS[4], KEYS[5])
return 1
"""
)

# KEYS: the task's hash. ARGV: when the broker delivers it again. Only while it is pending.
_REDELIVERY = """
if redis.call('HGET', KEYS[1], 'state') ~= 'pending' then return 0 end
redis.call('HSET', KEYS[1], 'redelivery_at', ARGV[1])
return 1
"""

# KEYS: the task's hash. ARGV: done, total, note, the report's number (-1: keep it whatever
# is kept), the message that tells it, the channel to tell it on or ''.
_KEEP_PROGRESS = """
local seq = tonumber(ARGV[4])
if seq >= 0 and seq <= tonumber(redis.call('HGET', KEYS[1], 'progress_seq') or '-1') then
    return 0
end
redis.call('HSET', KEYS[1], 'progress_done', ARGV[1], 'progress_total', ARGV[2],
           'progress_note', ARGV[3], 'progress_seq', ARGV[4])
if ARGV[6] ~= '' then redis.call('PUBLISH', ARGV[6], ARGV[5]) end
return 1
"""

RETRYING = "threadctx-retrying:"
"""How the news that a task waits for a retry starts on a reply channel; JSON ``[task id,
retries, due_at]`` follows."""

PROGRESS_MESSAGE = "threadctx-progress:"
"""How a progress report starts on a reply channel; JSON ``[task id, done, total, note, seq]``
follows (``seq``: the report's number, or ``null``)."""

_PROGRESS_FIELDS = ("progress_done", "progress_total", "progress_note", "progress_seq")


class CeleryRecords(RedisTaskRecords):
    """The records of a Celery app's tasks: the store's, and the claims, signs of life and ends
    of its Celery tasks."""

    def prepare(self) -> None:
        client = self.client
        self._writers: PerProcess[Writer] = PerProcess()
        self._beats: PerProcess[Heartbeat] = PerProcess()
        self._claim = client.register_script(_CLAIM)
        self._finish = client.register_script(_FINISH)
        self._keep_progress = client.register_script(_KEEP_PROGRESS)
        self._redelivery = client.register_script(_REDELIVERY)
        self._retrying = client.register_script(RETRYING_STEP)
        self._expire = client.register_script(EXPIRE)

    def _alive_key(self, task_id: str) -> str:
        return f"{self.prefix}alive:{task_id}"

    def stop_key(self, task_id: str) -> str:
        """Where a request to stop the running task ``task_id`` waits for its next attempt."""
        return f"{self.prefix}stop:{task_id}"

    def add_soon(self, info: TaskInfo, reply: str) -> None:
        """Add a submitted task's record from the background writer of this process. The
        task may be claimed, even finished, before the add is written: the add then leaves the
        task's state as it finds it.

        :param reply: the channel the submitter hears the task's start and end on.
        """
        extra = rerun_fields(info)  # here: it is read in the submitting thread
        self._writer_here().put(functools.partial(self._add, reply=reply, extra=extra), info)

    def progress_soon(
        self, info: TaskInfo, progress: Progress, reply: str | None, seq: int | None = None
    ) -> None:
        """Keep a task's progress in its record, and tell its submitter on ``reply``, from the
        background writer of this process.

        :param seq: the number of the report, higher for each later one: a report is kept
            and told only if it is later than the one kept (a batch written again after
            Redis failed part-way must not take a task's progress back). ``None``: always.
        """
        self._writer_here().put(
            functools.partial(self._progress, progress=progress, reply=reply, seq=seq), info
        )

    def _progress(
        self, pipe: t.Any, info: TaskInfo, progress: Progress, reply: str | None, seq: int | None
    ) -> None:
        done, total, note = progress
        message = PROGRESS_MESSAGE + json.dumps([info.id, done, total, note, seq])
        args: list[str | int] = [repr(done), repr(total), storable_text(note or "")]
        args.append(-1 if seq is None else seq)
        self._keep_progress(
            keys=[self.task_key(info.id)], args=[*args, message, reply or ""], client=pipe
        )

    def progress_of(self, task_id: str) -> tuple[Progress | None, int]:
        """The progress kept in a task's record, and the number of its report (-1: none)."""
        values: list[bytes | None] = self.client.hmget(self.task_key(task_id), [*_PROGRESS_FIELDS])  # type: ignore[assignment]
        found = zip(_PROGRESS_FIELDS, values, strict=True)
        raw = {name: text_of(value) for name, value in found if value}
        return progress_from(raw), int(raw.get("progress_seq", -1))

    def reject_soon(self, info: TaskInfo, reply: str) -> None:
        """Add the record of a task that could not be sent, booked rejected, from the
        background writer of this process; while Redis cannot be reached, the writer keeps
        it (the last :data:`OWED_KEPT` of them) until Redis answers again. The rejection is a
        claim: if the broker took the message after all, the first of it and the worker's
        claim holds."""
        self._writer_here().put(functools.partial(self._reject, reply=reply), info, owed=True)

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until what this process wrote with ``*_soon`` is in Redis: what it reads next
        includes its own submits."""
        writer = self._writers.here()
        if writer is not None:
            writer.flush(timeout)

    def _writer_here(self) -> Writer:
        return self._writers.get(lambda: started(Writer(self.client)))

    def _add(
        self, pipe: t.Any, info: TaskInfo, reply: str, extra: dict[str, str] | None = None
    ) -> None:
        key = self.task_key(info.id)
        fields: dict[t.Any, t.Any] = {
            "id": info.id,
            "name": info.name,
            "submitted_at": repr(info.submitted_at),
            "reply": reply,
            **(extra or {}),
        }
        if info.parent_id is not None:
            fields["parent_id"] = info.parent_id
        if info.due_at is not None:  # delayed, until it starts (its claim lets go of it)
            fields["due_at"] = repr(info.due_at)
        if info.request is not None:
            fields["request"] = info.request
        self.index(pipe, info.id, info.parent_id, info.submitted_at)
        pipe.hset(key, mapping=fields)
        # A worker may have claimed (or even finished) the task before its add is written.
        pipe.hsetnx(key, "state", "pending")
        pipe.expire(key, self.expires)
        pipe.hincrby(self.counts_key, "submitted", 1)

    def _reject(self, pipe: t.Any, info: TaskInfo, reply: str) -> None:
        self._add(pipe, info, reply)
        keys = [self.task_key(info.id), self.counts_key, self._alive_key(info.id)]
        when = info.finished_at or time.time()
        self._claim(keys=keys, args=["rejected", when, 0, ""], client=pipe)

    def claim(
        self,
        task_id: str,
        how: Claim,
        announce: bytes | str | None = None,
        *,
        to_submitter: bool = True,
        channels: cabc.Iterable[bytes | str] = (),
        worker: str = "",
    ) -> str:
        """Claim the task for ``how``; return the claim that holds: ``how`` if it won. A task
        claimed to run here (``"run"``, ``"inline"``) gets its first sign of life: keep it
        alive with :meth:`beating` while it runs.

        :param announce: a message to publish if this claim wins (or, for ``"run"``, holds):
            on the submitter's reply channel if ``to_submitter``, and on ``channels``.
        :param worker: who runs it, for the error if its process is lost.
        """
        return self.claim_to_run(task_id, how, announce, to_submitter, channels, worker)[0]

    def claim_to_run(
        self, task_id: str, how: Claim, announce: bytes | str | None = None,
        to_submitter: bool = True, channels: cabc.Iterable[bytes | str] = (),
        worker: str = "", stop: bool = False,
    ) -> tuple[str, str | None]:  # fmt: skip
        """:meth:`claim`, and with ``stop`` the request to stop the task (:mod:`.stopping`)
        if a claim to run holds and one was made: a retry or redelivery asked to stop."""
        args: list[t.Any] = [how, time.time(), int(self.heartbeat * 1000), worker]
        if announce is not None:
            args += [announce, "1" if to_submitter else "0", *channels]
        keys = [self.task_key(task_id), self.counts_key, self._alive_key(task_id)]
        if stop:
            keys.append(self.stop_key(task_id))
        result = self._claim(keys=keys, args=args)
        if isinstance(result, list):
            claim, request = result
            return text_of(claim), text_of(request)
        return text_of(result), None

    @contextlib.contextmanager
    def beating(self, task_id: str) -> cabc.Iterator[None]:
        """Renew the sign of life of a claimed task while the block runs."""
        beat = self._heartbeat_here()
        beat.running.add(task_id)
        try:
            yield
        finally:
            beat.running.discard(task_id)

    def beat_for(
        self,
        running: cabc.Callable[[], cabc.Iterable[str]],
        held: cabc.Callable[[], cabc.Iterable[str]] | None = None,
    ) -> None:
        """Renew, from this process, the sign of life of the tasks that ``running`` names at
        each beat: those of other processes that this one watches over, such as a Celery
        worker's main process the tasks of its pool, which no task can starve. Likewise a
        sign that the tasks ``held`` names are held here (received, not started yet), and
        when each was first seen held: see :meth:`holders`."""
        beat = self._heartbeat_here()
        beat.sources.append(running)
        if held is not None:
            beat.holders.append(held)

    def let_go(self) -> None:
        """Say that the tasks this process held (see :meth:`beat_for`) are held no more: its
        worker stops, and gives them back to the broker."""
        beat = self._beats.here()
        if beat is None:
            return
        beat.holders.clear()
        held, beat._seen_held = beat._seen_held, set()
        with self.client.pipeline(transaction=False) as pipe:
            for task_id in held:
                pipe.hdel(self.task_key(task_id), "held_at")
                pipe.delete(self._held_key(task_id))
            pipe.execute()

    def _held_key(self, task_id: str) -> str:
        return f"{self.prefix}held:{task_id}"

    def holders(self, task_ids: cabc.Sequence[str]) -> list[tuple[float | None, bool]]:
        """For each pending task, in one round trip: when a worker was first seen holding it
        (received, not started), or ``None``; and whether a worker holds it now."""
        with self.client.pipeline(transaction=False) as pipe:
            for task_id in task_ids:
                pipe.hget(self.task_key(task_id), "held_at")
                pipe.exists(self._held_key(task_id))
            found = pipe.execute()
        return [
            (None if at is None else float(at), bool(now))
            for at, now in zip(found[::2], found[1::2], strict=True)
        ]

    def redelivery(self, task_id: str, at: float) -> bool:
        """Keep in a pending task's record when the broker delivers it again, its worker
        lost; return whether it was still pending. Its start clears it."""
        return bool(self._redelivery(keys=[self.task_key(task_id)], args=[repr(at)]))

    def _heartbeat_here(self) -> Heartbeat:
        return self._beats.get(lambda: started(Heartbeat(self)))

    def signs_of_life(self, task_ids: cabc.Sequence[str]) -> list[bool]:
        """For each task, in one round trip: whether it has a sign of life."""
        with self.client.pipeline(transaction=False) as pipe:
            for task_id in task_ids:
                pipe.exists(self._alive_key(task_id))
            return [bool(found) for found in pipe.execute()]

    def worker_of(self, task_id: str) -> str | None:
        worker = self.client.hget(self.task_key(task_id), "worker")
        return None if worker is None else text_of(worker)

    def results_and_states(
        self, task_ids: cabc.Sequence[str], result_keys: cabc.Sequence[bytes | str]
    ) -> list[tuple[bytes | None, str | None]]:
        """For each task, in one round trip: the result message stored under its key in
        ``result_keys`` if it ended, and the state its record holds."""
        with self.client.pipeline(transaction=False) as pipe:
            for task_id, result_key in zip(task_ids, result_keys, strict=True):
                pipe.get(result_key)
                pipe.hget(self.task_key(task_id), "state")
            found = pipe.execute()
        return [
            (result, None if state is None else text_of(state))
            for result, state in zip(found[::2], found[1::2], strict=True)
        ]

    def retrying(self, task_id: str, retries: int, due_at: float, reply: str | None) -> bool:
        """Book the running task ``task_id`` waiting for retry number ``retries``, due at
        ``due_at``, and tell its submitter on ``reply`` (``None``: the channel its record
        names); whether it was booked (not if its end was, meanwhile)."""
        message = RETRYING + json.dumps([task_id, retries, due_at])
        keys = [self.task_key(task_id), self.counts_key]
        args: list[str | int] = [retries, repr(due_at), message, reply or ""]
        return bool(self._retrying(keys=keys, args=args))

    def expire(self, task_id: str) -> tuple[bool, str | None]:
        """Book the task ``task_id`` expired, unless it was claimed first (to run, or
        cancelled, or expired already): whether this claim won, and then the submitter's reply
        channel if known. Publish the end with :meth:`publish_end`."""
        found = self._expire(keys=[self.task_key(task_id), self.counts_key], args=[time.time()])
        return (False, None) if found is None else (True, text_of(found) or None)

    def publish_end(
        self, result: tuple[bytes | str, bytes | str, int | None], reply: str | None
    ) -> None:
        """Store and publish the end of a task booked already (see :meth:`expire`), as
        :meth:`finish` does: on the engine's result key, and on ``reply`` if given."""
        key, message, expires = result
        with self.client.pipeline(transaction=False) as pipe:
            pipe.set(key, message, ex=expires or None)
            pipe.publish(key, message)
            if reply:
                pipe.publish(reply, message)
            pipe.execute()

    def finish(
        self,
        task_id: str,
        error: BaseException | None,
        result: tuple[bytes | str, bytes | str, int | None],
        reply: str | None = None,
        *,
        lost_since: float | None = None,
        ended_at: float | None = None,
        state: str | None = None,
    ) -> bool:
        """Book how the task ended, and store and publish its result: on the engine's result
        key and on the submitter's reply channel, in the same round trip, so that whoever
        hears the result finds the records final already. Return whether it was booked.

        :param result: the engine's result key, message, and expiry in seconds.
        :param reply: the reply channel, if known; else the one in the task's record.
        :param lost_since: only if the task is running and its sign of life has run out,
            first seen missing at this time (a Unix time); then it ended a heartbeat before,
            when its last sign of life was given at the latest.
        :param ended_at: when the task ended (a Unix time), if before now: a worker that
            stores its end once a restarted Redis is back books the time the task ended, not
            the time Redis came back. ``None``: now.
        :param state: ``"cancelled"`` (stopped while it ran) or ``"timed_out"``; ``None``:
            ``"succeeded"`` or ``"failed"``, by ``error``.
        """
        if state is None:
            state = "succeeded" if error is None else "failed"
        summary = None if error is None else error_summary(error)
        key, message, expires = result
        # A lost task ended by its last sign of life, which lasts a heartbeat and has run out:
        # its run time counts its work, not the wait for the verdict.
        if lost_since is not None:
            ended = lost_since - self.heartbeat
        else:
            ended = time.time() if ended_at is None else ended_at
        booked = self._finish(
            keys=[
                *(self.task_key(task_id), self.counts_key, key),
                *(self._alive_key(task_id), self.stop_key(task_id)),
            ],
            args=[
                *(state, repr(ended), summary or "", self.expires),
                *(message, expires or 0, reply or "", "0" if lost_since is None else "1"),
                "stopped" if state == "cancelled" else "",
            ],
        )
        return bool(booked)
