"""The cases of ``cancel_task`` from another process through the task store, run on each store
(SQLite in tests/test_store_stop.py, Redis and the Celery backend's records in
tests/on_celery/test_store_stop_redis.py). ``here`` runs the tasks, ``there`` asks: two apps of
one name sharing a store stand for two processes, each with its own pool and store writer."""

from __future__ import annotations

import threading
import time
import typing as t

import flask
import pytest
from flask_threadctx import report_progress
from flask_threadctx import TaskCancelled
from flask_threadctx import TaskFuture
from flask_threadctx.app_state import app_state
from flask_threadctx.signals import task_cancelled
from flask_threadctx.stores.base import Record
from flask_threadctx.stores.stops import stop_elsewhere
from flask_threadctx.stores.stops import StopRequests
from flask_threadctx.stores.stops import stops_of

from family import recorder
from family import until_seen

HOSTILE_IDS = [
    "\ud800",
    "caf\udce9",
    "x" * 100_000,
    "",
    "' OR '1'='1",
    "1; DROP TABLE threadctx_stops; --",
    "*",
    "a\x00b",
    "<script>alert(1)</script>",
]


def report_until_stopped(ready: threading.Event) -> None:
    ready.set()
    while True:
        report_progress(1, 2)  # raises TaskCancelled once asked to stop
        threading.Event().wait(0.001)


def seven() -> int:
    return 7


def on_threads(
    app: flask.Flask, fn: t.Callable[..., t.Any], *args: t.Any, **options: t.Any
) -> TaskFuture[t.Any]:
    """Submit ``fn`` to ``app``'s thread pool, whatever its default backend."""
    task = app_state(app).extension.task(backend="threads", **options)(fn)
    return task.submit_with_options(args=args) if options else task.submit(*args)


def stops(app: flask.Flask) -> StopRequests:
    found = stops_of(app)
    assert found is not None
    return found


def check_a_running_task_is_stopped_from_another_process(
    here: flask.Flask, there: flask.Flask
) -> None:
    """The task stops in its own process, as a stop made there: its future, state, signal,
    record and counts."""
    ready = threading.Event()
    signalled: list[str] = []
    with (
        here.app_context(),
        task_cancelled.connected_to(lambda sender, task: signalled.append(task.id), here),
    ):
        future = on_threads(here, report_until_stopped, ready)
        assert ready.wait(10)
        recorder(here).flush()  # the record says "running": the asker needs it
        other = app_state(there).extension
        with there.app_context():
            assert other.cancel_task(future.task.id) is True
        with pytest.raises(TaskCancelled, match=r"was asked to stop \('cancel_task'\)"):
            future.result(10)
    assert (future.task.state, signalled) == ("cancelled", [future.task.id])
    with there.app_context():
        until_seen(other, future.task.id, "cancelled")
        assert other.cancel_task(future.task.id) is False  # finished: no one is asked
        counts = other.stats()
    assert (counts["cancelled"], counts["running"], counts["succeeded"]) == (1, 0, 0)


def check_a_delayed_task_is_cancelled_from_another_process(
    here: flask.Flask, there: flask.Flask
) -> None:
    with here.app_context():
        future = on_threads(here, report_until_stopped, threading.Event(), countdown=3600)
        recorder(here).flush()
    with there.app_context():
        assert app_state(there).extension.cancel_task(future.task.id) is True
    assert future.cancelled() and future.task.state == "cancelled"
    assert future.task.started_at is None


def check_a_finished_task_answers_false(here: flask.Flask, there: flask.Flask) -> None:
    with here.app_context():
        future = on_threads(here, seven)
        assert future.result(10) == 7
        recorder(here).flush()
    with there.app_context():
        assert app_state(there).extension.cancel_task(future.task.id) is False
        assert future.task.state == "succeeded"
        # A finished record answers for a process that is gone, at once: no one is asked.
        recorder(there).store.write([record_of("gone.example:7", "t-done", "succeeded")])
        assert app_state(there).extension.cancel_task("t-done") is False


def check_unknown_and_hostile_ids(here: flask.Flask, there: flask.Flask) -> None:
    """An id that names no task, whatever it holds, is unknown: nothing reaches the store
    beyond a look-up, which finds nothing, and the store works on."""
    with there.app_context():
        ext = app_state(there).extension
        for task_id in HOSTILE_IDS:
            with pytest.raises(
                LookupError, match=rf"^No task .* of '{there.name}' is known here"
            ) as raised:
                ext.cancel_task(task_id)
            assert len(str(raised.value)) < 300
    check_a_finished_task_answers_false(here, there)


def record_of(process: str, task_id: str = "t-elsewhere", state: str = "running") -> Record:
    now = time.time()
    return Record(
        task_id,
        "far_away",
        None,
        None,
        t.cast(t.Any, state),
        now,
        now,
        now if state == "succeeded" else None,
        None,
        None,
        process,
    )


def check_a_process_that_never_answers_times_out(
    there: flask.Flask, leftovers: t.Callable[[], int]
) -> None:
    """A task whose process is gone: TimeoutError naming it and its process, after
    THREADCTX_CANCEL_TIMEOUT (0.2 s in the test's config); nothing is left in the store."""
    store = recorder(there).store
    store.write([record_of("gone.example:4242")])
    with there.app_context(), pytest.raises(TimeoutError) as raised:
        app_state(there).extension.cancel_task("t-elsewhere")
    assert str(raised.value) == (
        "Task t-elsewhere runs in the process gone.example:4242, which did not answer the"
        " request to stop it within 'THREADCTX_CANCEL_TIMEOUT' (0.2 s): it is stopped, hung,"
        " or gone. The request was withdrawn: the task was not stopped, and that process will"
        " not act on the request later. If the process runs, call 'cancel_task' again, or"
        " raise 'THREADCTX_CANCEL_TIMEOUT'; if it is gone, so is the task (its record stays"
        " 'running')."
    )
    assert leftovers() == 0
    assert stops(there).asked("gone.example:4242") == []


def _serve_once(
    found: StopRequests, process: str, act: t.Callable[[list[str]], None]
) -> threading.Thread:
    """A thread that plays the process ``process``: once a request to it is there, ``act``
    on the requests."""

    def serve() -> None:
        deadline = time.monotonic() + 10
        while not (asked := found.asked(process)):
            assert time.monotonic() < deadline
            threading.Event().wait(0.001)
        act([request for request, _ in asked])

    thread = threading.Thread(target=serve)
    thread.start()
    return thread


def check_a_request_taken_but_not_answered(
    there: flask.Flask, leftovers: t.Callable[[], int]
) -> None:
    """A process that took the request and stopped before it answered (SIGSTOP): the
    TimeoutError says the stop is applied there; a late answer is not written."""
    found = stops(there)
    process = "frozen.example:1"
    recorder(there).store.write([record_of(process)])
    taken: list[str] = []

    def take(requests: list[str]) -> None:
        taken.extend(found.take(process, requests))

    thread = _serve_once(found, process, take)
    with pytest.raises(TimeoutError, match=r"it took the request, and was stopped") as raised:
        stop_elsewhere(found, record_of(process), 0.3)
    thread.join()
    assert "unless it had finished; 'get_task' shows how it ended" in str(raised.value)
    assert len(taken) == 1
    found.answer(process, {taken[0]: True})  # the process runs on: its answer is not kept
    assert leftovers() == 0


def check_a_task_that_ends_before_its_process_takes_the_request(
    there: flask.Flask, leftovers: t.Callable[[], int]
) -> None:
    """The record says the task ended while the request waited (its process no longer looks
    for requests for it): the answer is False, from the record, and the request withdrawn."""
    store = recorder(there).store
    found = stops(there)
    process = "idle.example:2"
    store.write([record_of(process)])
    thread = _serve_once(
        found, process, lambda requests: store.write([record_of(process, state="succeeded")])
    )
    assert stop_elsewhere(found, record_of(process), 10) is False
    thread.join()
    assert leftovers() == 0


def check_two_askers_are_each_answered(here: flask.Flask, there: flask.Flask) -> None:
    ready = threading.Event()
    with here.app_context():
        future = on_threads(here, report_until_stopped, ready)
        assert ready.wait(10)
        recorder(here).flush()
    answers: list[bool] = []

    def ask() -> None:
        with there.app_context():
            answers.append(app_state(there).extension.cancel_task(future.task.id))

    askers = [threading.Thread(target=ask) for _ in range(4)]
    for asker in askers:
        asker.start()
    for asker in askers:
        asker.join()
    with pytest.raises(TaskCancelled):
        future.result(10)
    # Each is answered as a stop made in the task's process: True until it has ended.
    assert len(answers) == 4 and True in answers
    assert future.task.state == "cancelled"
