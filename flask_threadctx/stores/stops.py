"""Stopping a thread task of another process through the task store: the asker's side
(:func:`stop_elsewhere`), the side of the process that runs the task (:func:`take_stops`), and
the :class:`StopRequests` protocol each store implements for them.

Python cannot reach into another process's threads, so ``cancel_task`` there leaves a *stop
request* in the store, addressed to the process that runs the task (its record's ``process``),
and waits for the answer. The store writer of each process (:mod:`.feed`), in its round every
50 ms, after its batch and only while it follows unfinished tasks, reads the requests addressed
to its process, takes those for its thread tasks, applies each with its pool's own ``stop`` (so
a stop from afar does all that one made here does), and writes the answers; the tasks' new
states go in its next batch.

A request moves ``asked`` (by the asker) -> ``taken`` (by the process, before it applies it)
-> ``stopped`` or ``finished`` (its answer), each step one atomic change in the store, and the
asker removes it once it has the answer. An asker that gets no answer within
``THREADCTX_CANCEL_TIMEOUT`` removes it too, and raises :exc:`TimeoutError`: a request not yet
taken then is *withdrawn*, and never acted on, so a process that was stopped (SIGSTOP) or hung
does not stop the task when it runs on, and nothing is left behind for a process that is gone;
a request already taken was applied there, and the task stops when that process runs on.

Each request has an id of its own, so that two askers of one task are each answered. A request
whose asker died while it waited is removed once it is :data:`STALE`: by the next request
(SQLite), or with its process's hash, which expires (Redis).
"""

from __future__ import annotations

import contextlib
import threading
import time
import typing as t
import uuid

from ..app_state import app_state
from .base import FINISHED_STATES

if t.TYPE_CHECKING:
    import collections.abc as cabc

    import flask

    from .base import Record

StopState = t.Literal["asked", "taken", "stopped", "finished"]
"""Where a request is: asked; taken by the process that runs the task; answered, the task
will not finish normally (``"stopped"``) or had finished (``"finished"``)."""

ANSWERS: frozenset[StopState] = frozenset({"stopped", "finished"})

STALE = 2 * 3600.0
"""Seconds after which a request is removed whatever its state: twice the longest
``THREADCTX_CANCEL_TIMEOUT``, so never one that an asker still waits for."""

_FIRST_PAUSE = 0.005
_LONGEST_PAUSE = 0.02  # within half a round of the writer (50 ms): a few looks per answer


class StopRequests(t.Protocol):
    """The stop requests of one app's tasks in its store. ``process`` is ``"host:pid"``, as
    in :attr:`Record.process <flask_threadctx.stores.base.Record.process>`; ``request`` the
    request's own id (hex). Every method raises if the store cannot be reached."""

    # -- the asker's side, in any thread --

    def ask(self, request: str, task_id: str, process: str) -> None:
        """Add the request ``request`` to stop the task ``task_id`` of ``process``; remove
        the requests older than :data:`STALE` (those to ``process`` at least: a store may
        let the others expire)."""

    def look(
        self, request: str, task_id: str, process: str
    ) -> tuple[StopState | None, Record | None]:
        """The state of the request (``None``: it is not there), and the task's record."""

    def withdraw(self, request: str, process: str, *, only_asked: bool) -> StopState | None:
        """Remove the request, if it is still ``"asked"`` or if not ``only_asked``, in one
        atomic step: its state before (``None``: it was not there)."""

    # -- the side of the process that runs the task, in its store writer --

    def asked(self, process: str) -> list[tuple[str, str]]:
        """The requests to ``process`` that are asked and not taken: ``(request, task id)``."""

    def take(self, process: str, requests: cabc.Sequence[str]) -> list[str]:
        """Mark the ``requests`` to ``process`` taken, those still asked (an asker may have
        withdrawn one meanwhile), in one atomic step: those taken."""

    def answer(self, process: str, answers: cabc.Mapping[str, bool]) -> None:
        """Write each answer to a request taken: ``True``, stopped; ``False``, finished. An
        answer to a request that its asker removed meanwhile is not written."""


def stops_of(app: flask.Flask) -> StopRequests | None:
    """The stop requests of ``app``'s task store; ``None`` without a store that keeps them."""
    state = app_state(app, "cancel_task")
    return None if state.recorder is None else state.recorder.store.stop_requests()


# -- the asker ------------------------------------------------------------------------------


def stop_in_its_process(app: flask.Flask, record: Record, timeout: float) -> bool:
    """``cancel_task`` of the unfinished task of ``record``, which runs in another process:
    see :func:`stop_elsewhere`.

    :raise RuntimeError: not a thread task, or ``app`` has no store that keeps requests.
    """
    stops = stops_of(app) if record.backend == "threads" else None
    if stops is None:
        raise RuntimeError(
            f"Task {record.id} runs in another process ({record.process}); 'cancel_task'"
            " stops it only in the process that runs it. Call it there."
        )
    return stop_elsewhere(stops, record, timeout)


def stop_elsewhere(stops: StopRequests, record: Record, timeout: float) -> bool:
    """Have the process that runs the thread task of ``record``, which has not finished, stop
    it, and return its answer: ``True`` if the task will not finish normally, ``False`` if it
    had finished.

    :raise TimeoutError: no answer within ``timeout`` seconds; the request is removed, or, if
        the store cannot be reached to remove it, the message says that it may still act.
    """
    task_id, process = record.id, record.process
    request = uuid.uuid4().hex
    stops.ask(request, task_id, process)  # raises if the store is away: nothing was asked
    try:
        answer = _wait_for_answer(stops, request, task_id, process, timeout)
    except BaseException:  # interrupted (Ctrl+C): a request left behind would act later
        with contextlib.suppress(Exception):
            stops.withdraw(request, process, only_asked=False)
        raise
    if answer is not None:
        return answer
    try:
        before = stops.withdraw(request, process, only_asked=False)
    except Exception as error:
        raise TimeoutError(_not_withdrawn(task_id, process, timeout, error)) from error
    if before in ANSWERS:  # just in time
        return before == "stopped"
    raise TimeoutError(_no_answer(task_id, process, timeout, taken=before == "taken"))


def _wait_for_answer(
    stops: StopRequests, request: str, task_id: str, process: str, timeout: float
) -> bool | None:
    """The answer to the request ``request``, or ``None`` if none came within ``timeout``
    seconds. A store that fails a look meanwhile is looked at again, until the time is up."""
    deadline = time.monotonic() + timeout
    pause = _FIRST_PAUSE
    waiting = threading.Event()  # never set: a pause that a signal handler cannot cut short
    while True:
        try:
            state, now = stops.look(request, task_id, process)
        except Exception:  # the store hiccups: the answer may come all the same
            state, now = None, None
        if state in ANSWERS:
            with contextlib.suppress(Exception):  # else removed once stale
                stops.withdraw(request, process, only_asked=False)
            return state == "stopped"
        if state == "asked" and (now is None or now.state in FINISHED_STATES):
            # It ended before its process took the request (which it no longer looks for):
            # withdrawn, unless taken meanwhile, the answer is its recorded end. A finished
            # record is trimmed, never one that runs: no record is a finished task.
            try:
                before = stops.withdraw(request, process, only_asked=True)
            except Exception:  # looked at again, as after a failed look
                before = None
            if before == "asked":
                return False
            if before in ANSWERS:
                with contextlib.suppress(Exception):
                    stops.withdraw(request, process, only_asked=False)
                return before == "stopped"
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        waiting.wait(min(pause, left))
        pause = min(pause * 2, _LONGEST_PAUSE)


def _not_withdrawn(task_id: str, process: str, timeout: float, error: Exception) -> str:
    return (
        f"Task {task_id} runs in the process {process}, which did not answer the request to"
        f" stop it within 'THREADCTX_CANCEL_TIMEOUT' ({timeout:g} s), and the task store"
        f" could not be reached to withdraw the request ({error}). The request may still"
        " act: if that process takes it once the store is back, the task stops. 'get_task'"
        " shows how it ended."
    )


def _no_answer(task_id: str, process: str, timeout: float, *, taken: bool) -> str:
    said = (
        f"Task {task_id} runs in the process {process}, which did not answer the request to"
        f" stop it within 'THREADCTX_CANCEL_TIMEOUT' ({timeout:g} s)"
    )
    if taken:
        return (
            f"{said}: it took the request, and was stopped or hung right after. The stop is"
            " applied there: the task stops when that process runs on, unless it had"
            " finished; 'get_task' shows how it ended. If that process is gone, so is the"
            " task."
        )
    return (
        f"{said}: it is stopped, hung, or gone. The request was withdrawn: the task was not"
        " stopped, and that process will not act on the request later. If the process runs,"
        " call 'cancel_task' again, or raise 'THREADCTX_CANCEL_TIMEOUT'; if it is gone, so is"
        " the task (its record stays 'running')."
    )


# -- the process that runs the task -----------------------------------------------------------


def take_stops(
    stops: StopRequests,
    process: str,
    follows: t.Callable[[str], bool],
    stop: t.Callable[[str], bool | None],
) -> dict[str, bool]:
    """Take the requests to ``process`` for the tasks it ``follows``, and ``stop`` each
    task: the answers, by request, for :meth:`StopRequests.answer`. ``stop`` returns ``None``
    for a task no longer known here: it had finished."""
    asked = stops.asked(process)
    if not asked:
        return {}
    ids = {request: task_id for request, task_id in asked if follows(task_id)}
    if not ids:
        return {}
    return {request: bool(stop(ids[request])) for request in stops.take(process, list(ids))}
