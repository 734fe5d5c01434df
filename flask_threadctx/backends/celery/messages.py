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

if t.TYPE_CHECKING:
    import collections.abc as cabc


R = t.TypeVar("R")

TASK_NAME = "flask_threadctx.run"
"""The name of the one Celery task that runs every submitted function."""

PUBLISH_OPTIONS = frozenset(
    ("queue", "routing_key", "exchange", "priority", "countdown", "eta", "expires")
)
"""The options of ``task(backend="celery", ...)`` that go to Celery with each message."""

RETRY_OPTIONS = frozenset(("max_retries", "retry_for", "retry_delay"))
"""The options of ``task(backend="celery", ...)`` that the worker reads when the task raises."""

TIME_LIMITS = ("soft_time_limit", "time_limit")
"""The options of ``task(backend="celery", ...)`` that Celery's worker enforces, in seconds: a
soft limit raises ``SoftTimeLimitExceeded`` in the task, a hard one kills
its pool process."""

TASK_OPTIONS = PUBLISH_OPTIONS | RETRY_OPTIONS | frozenset(TIME_LIMITS)

json_dumps: t.Callable[[t.Any], str] = kombu_json.dumps
json_loads: t.Callable[[str], t.Any] = kombu_json.loads


def check_options(options: cabc.Mapping[str, t.Any]) -> None:
    """:raise TypeError: ``options`` has a name that ``task(backend="celery")`` does not take,
        or a value of the wrong type.
    :raise ValueError: a time limit is not above 0, or the soft one not below the hard one."""
    unknown = sorted(set(options) - TASK_OPTIONS)
    if unknown:
        raise TypeError(
            f"'task(backend=\"celery\")' does not take {', '.join(map(repr, unknown))}. It takes"
            f" {', '.join(sorted(TASK_OPTIONS))}."
        )
    retry_for = options.get("retry_for", ())
    if not isinstance(retry_for, tuple) or not all(
        isinstance(cls, type) and issubclass(cls, BaseException) for cls in retry_for
    ):
        raise TypeError(f"'retry_for' must be a tuple of exception classes, not {retry_for!r}.")
    for name in TIME_LIMITS:
        value = options.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name!r} must be a number of seconds, not {value!r}.")
        if not (0 < value < float("inf")):
            raise ValueError(f"{name!r} must be a number of seconds above 0, not {value!r}.")
    soft, hard = (options.get(name) for name in TIME_LIMITS)
    if soft is not None and hard is not None and soft >= hard:
        raise ValueError(
            f"'soft_time_limit' ({soft!r}) must be less than 'time_limit' ({hard!r}): the soft"
            " limit lets the task clean up before the hard one kills it."
        )


STARTED = "threadctx-started:"
"""What a worker says on the reply channel when a task starts: just that, and the task's id,
rather than a result message to decode."""
STARTED_BYTES = STARTED.encode()
PROGRESS_BYTES = PROGRESS_MESSAGE.encode()


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
    found = _non_str_key(value, "", 0)
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


def _non_str_key(value: t.Any, path: str, depth: int) -> tuple[str, t.Any] | None:
    """Where in ``value`` a dict has a key that is not a string, as a subscript path, and that
    key; ``None`` if nowhere (looked for as deep as JSON encodes, whose encoder refuses
    cycles)."""
    if depth > 100:
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                return path, key
            if isinstance(item, (dict, list, tuple)):
                found = _non_str_key(item, f"{path}[{key!r}]", depth + 1)
                if found is not None:
                    return found
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            if isinstance(item, (dict, list, tuple)):
                found = _non_str_key(item, f"{path}[{i}]", depth + 1)
                if found is not None:
                    return found
    return None


def raise_error(error: BaseException, *args: t.Any, **kwargs: t.Any) -> t.NoReturn:
    raise error
