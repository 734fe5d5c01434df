"""The retries of a Celery task, as on threads: the retry options a submit sends in its message
(:func:`retry_options`), the policy a worker reads back from it (:func:`policy_of`), and
:class:`RetryHere`, which decides an attempt's retry in the task's own thread and contexts,
books it in the records, tells the submitter and sends ``task_retried``.

A task's retry options travel in its message, not read from the declared task on the worker:
options given per call (``submit_with_options``) replace the declared ones there too.
``retry_for`` travels as its classes' import paths, checked at the submit.
"""

from __future__ import annotations

import datetime
import functools
import logging
import time
import typing as t

import celery.exceptions

from ... import signals
from ...contexts.wire import class_path
from ...contexts.wire import find
from ...options import Policy
from ...signals import task_retried

if t.TYPE_CHECKING:
    import collections.abc as cabc

    import flask

    from ...model import TaskInfo
    from .claims import CeleryRecords
    from .stopping import StopHearer

_logger = logging.getLogger("flask_threadctx.celery_backend")

RETRY_OPTIONS = (
    "max_retries",
    "retry_delay",
    "retry_backoff",
    "retry_backoff_max",
    "retry_jitter",
)
"""The retry options besides ``retry_for`` that a message carries, as JSON has them."""


def retry_options(options: cabc.Mapping[str, object], task: str) -> dict[str, object] | None:
    """The retry options of a submit as its message carries them, ``retry_for`` by its classes'
    import paths; ``None`` for a task that is never retried (no ``retry_for``), whose message
    carries none.

    :raise TypeError: a class of ``retry_for`` cannot be imported by its path, so a worker could
        not tell its errors from others."""
    retry_for = t.cast("tuple[type[BaseException], ...] | None", options.get("retry_for"))
    if not retry_for:
        return None
    sent: dict[str, object] = {"retry_for": [_class_path(cls, task) for cls in retry_for]}
    for name in RETRY_OPTIONS:
        value = options.get(name)
        if value is not None:
            sent[name] = value
    return sent


_paths: dict[type[BaseException], str] = {}
"""The import paths of the classes of ``retry_for`` found so far: checked once each."""


def _class_path(cls: type[BaseException], task: str) -> str:
    path = _paths.get(cls)
    if path is not None:
        return path
    path, findable = class_path(cls)
    if not findable:
        raise TypeError(
            f"The 'retry_for' of {task!r} holds {cls!r}, which a Celery worker cannot find by"
            f" its import path {path!r}, so it could not tell that error from another: define"
            " the exception class at the top level of a module."
        )
    if len(_paths) < 1000:  # a bound, for classes made on the fly
        _paths[cls] = path
    return path


def policy_of(sent: cabc.Mapping[str, t.Any] | None) -> Policy | None:
    """The retry policy of a message's retry options (see :func:`retry_options`); ``None``
    when it has none. A class of ``retry_for`` that this process cannot import (the code
    deployed here differs) is left out, with a warning: no error raised here is one."""
    if not sent:
        return None
    classes = []
    for path in sent.get("retry_for", ()):
        found = _class_at(path)
        if found is None:
            _logger.warning(
                "The class %r of a task's 'retry_for' cannot be imported on this worker:"
                " its errors are not retried here. Deploy the same code to every process.",
                path,
            )
        else:
            classes.append(found)
    return Policy({**sent, "retry_for": tuple(classes)})


@functools.lru_cache(maxsize=256)
def _class_at(path: str) -> type[BaseException] | None:
    try:
        found = find(path)
    except LookupError:
        return None
    return found if isinstance(found, type) and issubclass(found, BaseException) else None


class RetryHere:
    """Decides whether a failed attempt of a task that a worker runs is retried, in the
    attempt's own thread and contexts (the runner's retry hook): as on threads, a retried
    attempt is ``"retrying"``, counted so in the records, with ``retries`` and ``due_at``,
    its submitter hears it, and ``task_retried`` is sent instead of ``task_failed``. The
    worker then hands the retry to Celery, due at :attr:`eta`, the task's ``due_at``."""

    __slots__ = ("app", "eta", "hearer", "policy", "records", "reply")

    def __init__(
        self,
        app: flask.Flask,
        policy: Policy,
        records: CeleryRecords,
        hearer: StopHearer,
        reply: str | None,
    ) -> None:
        self.app = app
        self.policy = policy
        self.records = records
        self.hearer = hearer
        self.reply = reply
        self.eta: datetime.datetime | None = None
        """When the retry is due, once one was booked: what Celery is sent as its ``eta``."""

    def __call__(self, info: TaskInfo, error: BaseException) -> bool:
        retries = info.retries
        retry = functools.partial(self.policy.retries, error, retries)
        # Decided once, against a stop request (see 'StopHearer.end_attempt').
        if not self.hearer.end_attempt(info.id, retry):
            return False
        delay = self.policy.retry_delay(retries)
        due = time.time() + delay
        try:
            booked = self.records.retrying(info.id, retries + 1, due, self.reply)
        except Exception:  # Redis away: the task fails with its error, stored once it is back
            _logger.exception("Could not book the retry of %s; it fails instead.", info)
            return False
        if not booked:  # its end was booked meanwhile (declared lost, say)
            return False
        self.eta = datetime.datetime.fromtimestamp(due, datetime.timezone.utc)
        info.retries = retries + 1
        info.state = "retrying"
        info.due_at = due
        self.hearer.retrying(info.id)
        if task_retried.receivers:
            signals.send(task_retried, self.app, task=info, exception=error, delay=delay)
        return True

    def by_celery(
        self, task: t.Any, error: BaseException | None, info: TaskInfo
    ) -> BaseException | None:
        """Hand Celery the retry booked for ``info``'s task, run by the Celery ``task``, whose
        attempt raised ``error``: its ``Retry``, to raise, due at :attr:`eta`, without the
        ``expires`` Celery would copy into it (the expiry is of the start, and the task has
        started). ``None`` if none was booked, or Celery could not send it: then the task
        fails with ``error`` (its state says so), to be stored as any end."""
        if self.eta is None:
            return None
        try:
            # Celery's own count (this retry's number) agrees: its 'max_retries' never refuses.
            sent = task.retry(
                exc=error, eta=self.eta, max_retries=info.retries, expires=None, throw=False
            )
        except celery.exceptions.Reject as rejected:  # the broker refused it
            _logger.error("Could not send the retry of %s (%s); it fails.", info, rejected.reason)
            info.state = "failed"
            info.due_at = None
            return None
        return t.cast(BaseException, sent)
