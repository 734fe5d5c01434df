"""The task functions of ``test_celery_stop.py``: importable by name in the test process and in
the worker processes that ``flask --app ctx_tasks threadctx worker`` starts. Each tells the test
through Redis (``THREADCTX_TEST_REDIS``), which both sides reach."""

from __future__ import annotations

import os
import time
import typing as t

import celery.signals
import ctx_tasks
import flask
import redis
from flask_threadctx import check_cancelled
from flask_threadctx import current_task
from flask_threadctx import report_progress
from flask_threadctx import signals

if t.TYPE_CHECKING:
    from flask_threadctx import TaskInfo

threadctx = ctx_tasks.threadctx


def _client() -> redis.Redis:
    return redis.Redis.from_url(os.environ["THREADCTX_TEST_REDIS"])


def _ours(sender: flask.Flask) -> bool:
    """Whether a signal is of an app of these tests, in a process that reaches their Redis: the
    receivers are connected for every sender, and other tests' apps run in this process too."""
    return sender.name == "ctx_tasks" and "THREADCTX_TEST_REDIS" in os.environ


def _told(sender: flask.Flask, task: TaskInfo, **_: t.Any) -> None:
    """In every process that runs these tasks: which of them ``task_cancelled`` and
    ``task_failed`` were sent for, in order, and the state each said."""
    if _ours(sender):
        _client().rpush("signals", f"{task.id} {task.state}")


signals.task_cancelled.connect(_told, weak=False)
signals.task_failed.connect(_told, weak=False)


def _finished(sender: flask.Flask, task: TaskInfo, **_: t.Any) -> None:
    """Likewise, for ``task_finished``: on ``finished``."""
    if _ours(sender):
        _client().rpush("finished", f"{task.id} {task.state}")


signals.task_finished.connect(_finished, weak=False)


def _started() -> str:
    """Say that this task started, and in which process (``id pid`` on ``started``)."""
    task = current_task()
    assert task is not None
    _client().rpush("started", f"{task.id} {os.getpid()}")
    return task.id


def checking(tag: str) -> str:
    """Check for a stop every 10 ms until told to go on (``tag + ':go'``)."""
    task_id = _started()
    client = _client()
    while client.blpop([tag + ":go"], timeout=0.01) is None:
        check_cancelled()
    return task_id


def reporting(tag: str) -> int:
    """Report progress every 10 ms (which checks) until told to go on."""
    _started()
    client = _client()
    done = 0
    while client.blpop([tag + ":go"], timeout=0.01) is None:
        done += 1
        report_progress(done)
    return done


def ignoring(tag: str) -> str:
    """Never check: wait to be told to go on, up to 60 s."""
    task_id = _started()
    _client().blpop([tag + ":go"], timeout=60)
    return task_id


def parent_waiting(tag: str) -> str:
    """Submit a child that waits to be told to go on, and wait for it."""
    _started()
    child = threadctx.submit(ignoring, tag + ":child")
    _client().rpush(tag + ":child-id", child.task.id)
    return child.result(60)


@threadctx.task(backend="celery", time_limit=1)
def checking_within(tag: str) -> str:
    """:func:`checking`, with a time limit of 1 s."""
    return checking(tag)


@threadctx.task(backend="celery", time_limit=1)
def ignoring_past(tag: str) -> str:
    """:func:`ignoring`, with a time limit of 1 s."""
    return ignoring(tag)


@threadctx.task(backend="celery", time_limit=1)
def sleeping_past() -> None:
    """Sleep for 60 s, past its time limit of 1 s, in one C call that never checks: Celery's
    hard limit ends it, its SIGTERM raising ``SystemExit`` in the sleep."""
    _started()
    time.sleep(60)


@threadctx.task(backend="celery", time_limit=30)
def quick_within(a: int, b: int) -> int:
    return a + b


@threadctx.task(backend="celery", retry_for=(KeyError,), max_retries=3, retry_delay=2)
def failing(tag: str) -> None:
    """Fail, to be retried in 2 s, each attempt counted on ``tag + ':attempts'``."""
    _client().rpush(tag + ":attempts", 1)
    raise KeyError(tag)


def _retried(request: t.Any = None, **_: t.Any) -> None:
    """In the worker: Celery's own signal that a task will be retried, sent once its record
    says so."""
    if "THREADCTX_TEST_REDIS" in os.environ:
        _client().rpush("retried", str(getattr(request, "id", "")))


celery.signals.task_retry.connect(_retried, weak=False)
