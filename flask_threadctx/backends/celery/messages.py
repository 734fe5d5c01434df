"""What a Celery message carries, and how: the one task name, the options of
``task(backend="celery")``, the JSON a submit encodes once, and the markers on the reply channel.

Pure functions of their arguments: the submitting side (:mod:`.backend`), the worker side
(:mod:`.worker`) and the listener (:mod:`.listener`) share them.
"""

from __future__ import annotations

import typing as t

import flask
from kombu.utils import json as kombu_json

from ...model import task_name
from .claims import PROGRESS_MESSAGE
from .claims import RETRYING

if t.TYPE_CHECKING:
    import collections.abc as cabc
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
        _check_keys("result", result, f"{task_name(fn)!r} returned a dict key")
        return t.cast(R, result)

    return returning_json


def encode(message: list[t.Any], fn: t.Callable[..., t.Any]) -> str:
    """``message`` as JSON, or a :exc:`TypeError` naming the part that cannot be, or that JSON
    would change: a dict key that is not a string would arrive as one, or not at all."""
    # The session's own keys; those of the values in it are looked at with each value.
    for key in message[4]["context"].get("session", ()):
        if not isinstance(key, str):
            raise TypeError(
                f"The session of {task_name(fn)!r} has the key {key!r}: {_json_key_fate(key)}."
                " Use string keys."
            )
    try:
        encoded = json_dumps(message)
    except (TypeError, ValueError) as error:
        for what, value in _parts(message):
            _check_keys(what, value, f"The {what} of {task_name(fn)!r} has the dict key")
            try:
                json_dumps(value)
            except (TypeError, ValueError):
                raise TypeError(
                    f"The {what} of {task_name(fn)!r}, {value!r}, cannot cross to a worker"
                    " process as JSON. Pass plain data (strings, numbers, lists, dicts; an id"
                    " rather than an object)."
                ) from None
        raise TypeError(f"The task {task_name(fn)!r} cannot be sent as JSON: {error}") from None
    for what, value in _parts(message):
        _check_keys(what, value, f"The {what} of {task_name(fn)!r} has the dict key")
    return encoded


def _parts(message: list[t.Any]) -> list[tuple[str, t.Any]]:
    """The parts of ``message`` that the caller chose, each named as the user knows it."""
    _, _, args, kwargs, meta = message
    context = meta["context"]
    return [
        *((f"argument {i}", value) for i, value in enumerate(args)),
        *((f"argument {name!r}", value) for name, value in kwargs.items()),
        *((f"'g.{name}'", value) for name, value in context.get("g", {}).items()),
        *((f"session[{key!r}]", value) for key, value in context.get("session", {}).items()),
    ]


def _check_keys(what: str, value: t.Any, says: str) -> None:
    """:raise TypeError: ``value``, the ``what`` of a task, holds a dict key that is not a
    string; the message starts with ``says``."""
    found = _non_str_key(value)
    if found is not None:
        where, key = found
        raise TypeError(f"{says} {key!r} at {what}{where}: {_json_key_fate(key)}. Use string keys.")


def _json_key_fate(key: t.Any) -> str:
    if key is not None and not isinstance(key, (int, float)):
        return "JSON cannot carry it"
    return (
        f"JSON would turn it into the string {json_dumps(key)!r}, and drop its value if that"
        " string is a key too"
    )


def _non_str_key(value: t.Any) -> tuple[str, t.Any] | None:
    """Where in ``value`` a dict has a key that is not a string, as a subscript path, and that
    key; ``None`` if nowhere. Looked for as deep as ``value`` goes, without recursion (JSON
    encodes deeper than Python's recursion limit lets a function recurse), and in each container
    once (one met again is shared, or loops back, which JSON refuses)."""
    if not isinstance(value, (dict, list, tuple)):
        return None
    seen = {id(value)}
    # The containers from ``value`` down to the one looked through now: the subscript that
    # leads to each, and its entries not yet looked at.
    stack: list[tuple[t.Any, cabc.Iterator[tuple[t.Any, t.Any, bool]]]] = [(None, _entries(value))]
    while stack:
        for key, item, is_key in stack[-1][1]:
            if is_key and not isinstance(key, str):
                return "".join(f"[{subscript!r}]" for subscript, _ in stack[1:]), key
            if isinstance(item, (dict, list, tuple)) and id(item) not in seen:
                seen.add(id(item))
                stack.append((key, _entries(item)))
                break
        else:
            stack.pop()
    return None


def _entries(
    value: dict[t.Any, t.Any] | list[t.Any] | tuple[t.Any, ...],
) -> cabc.Iterator[tuple[t.Any, t.Any, bool]]:
    """The subscripts and items of ``value``, each with whether the subscript is a dict key."""
    if isinstance(value, dict):
        return ((key, item, True) for key, item in value.items())
    return ((i, item, False) for i, item in enumerate(value))


def raise_error(error: BaseException, *args: t.Any, **kwargs: t.Any) -> t.NoReturn:
    raise error
