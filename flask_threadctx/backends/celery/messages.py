"""What a Celery message carries, and how: the one task name, the options of
``task(backend="celery")``, the JSON a submit encodes once, and the markers on the reply channel.

Pure functions of their arguments: the submitting side (:mod:`.backend`), the worker side
(:mod:`.worker`) and the listener (:mod:`.listener`) share them.
"""

from __future__ import annotations

import typing as t

import flask
from kombu.utils import json as kombu_json

from ...contexts import json_message
from ...contexts.json_message import check_keys
from ...model import task_name
from .claims import PROGRESS_MESSAGE
from .claims import RETRYING

if t.TYPE_CHECKING:
    import datetime

    from kombu.entity import Exchange
    from kombu.entity import Queue


R = t.TypeVar("R")

TASK_NAME = "flask_threadctx.run"
"""The name of the one Celery task that runs every submitted function."""

PUBLISH_OPTIONS = frozenset(
    ("queue", "routing_key", "exchange", "priority", "countdown", "eta", "expires")
)
"""The options of a Celery task that go to Celery with each message."""

TIME_LIMITS = ("soft_time_limit", "time_limit")
"""The options of a Celery task that Celery's worker enforces, in seconds: a soft limit raises
``SoftTimeLimitExceeded`` in the task, a hard one kills its pool process."""


class CeleryOptions(t.TypedDict, total=False):
    """The options of ``task(backend="celery", ...)`` as
    :func:`~flask_threadctx.options.check_options` leaves them, and
    as the Celery backend reads them from the ``options`` of
    :meth:`~flask_threadctx.backends.base.Backend.submit`: each of the type checked there,
    every number of seconds a :class:`float`; ``None`` for one given as ``None``."""

    queue: str | Queue | None
    routing_key: str | None
    exchange: str | Exchange | None
    priority: int | None
    countdown: float | None
    eta: datetime.datetime | None
    expires: float | datetime.datetime | None
    max_retries: int | None
    retry_for: tuple[type[BaseException], ...]
    retry_delay: float | None
    retry_backoff: float | bool
    retry_backoff_max: float | None
    retry_jitter: bool
    soft_time_limit: float | None
    time_limit: float | None


json_dumps: t.Callable[[t.Any], str] = kombu_json.dumps
json_loads: t.Callable[[str], t.Any] = kombu_json.loads
assert json_dumps is json_message.json_dumps  # the encoding of messages, checked, is Celery's


STARTED = "threadctx-started:"
"""What a worker says on the reply channel when a task starts: just that, and the task's id,
rather than a result message to decode."""
STARTED_BYTES = STARTED.encode()
PROGRESS_BYTES = PROGRESS_MESSAGE.encode()
RETRYING_BYTES = RETRYING.encode()
STOP_ANSWER = "threadctx-stop-answer:"
"""How the process that runs a task answers a stop request on the asker's reply channel: JSON
``[request id, stopped]`` follows (``stopped``: whether the task will not finish normally)."""
STOP_ANSWER_BYTES = STOP_ANSWER.encode()


def returning_json(app: flask.Flask, fn: t.Callable[..., R]) -> t.Callable[..., R]:
    """``fn``, failing if what it returns cannot be sent back as JSON: inside the task, so that
    the task is booked and signalled as failed, as it would be on a worker."""
    run = app.ensure_sync(fn)

    def returning_json(*args: t.Any, **kwargs: t.Any) -> R:
        result = run(*args, **kwargs)
        try:
            json_dumps(result)
        except (TypeError, ValueError) as error:
            raise TypeError(
                f"{task_name(fn)!r} returned {result!r}, which cannot be sent back as JSON."
                f" Return plain data (strings, numbers, lists, dicts): {error}"
            ) from None
        check_keys("result", result, f"{task_name(fn)!r} returned a dict key")
        return t.cast(R, result)

    return returning_json


def raise_error(error: BaseException, *args: t.Any, **kwargs: t.Any) -> t.NoReturn:
    raise error
