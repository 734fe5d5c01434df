"""What a Celery message carries, and how: the one task name, the options of
``task(backend="celery")``, the JSON a submit encodes once, and the markers on the reply channel.

Pure functions of their arguments: the submitting side (:mod:`.backend`), the worker side
(:mod:`.worker`) and the listener (:mod:`.listener`) share them.
"""

from __future__ import annotations

import datetime
import math
import numbers
import typing as t

import flask
from kombu.entity import Exchange
from kombu.entity import Queue
from kombu.utils import json as kombu_json

from ...config import shown
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


class CeleryOptions(t.TypedDict, total=False):
    """The options of ``task(backend="celery", ...)`` as :func:`check_options` leaves them, and
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
    soft_time_limit: float | None
    time_limit: float | None


json_dumps: t.Callable[[t.Any], str] = kombu_json.dumps
json_loads: t.Callable[[str], t.Any] = kombu_json.loads


MAX_SECONDS = 365 * 24 * 3600
"""The most seconds that ``time_limit``, ``soft_time_limit``, ``countdown``, ``expires`` and
``retry_delay`` take, and how far ahead ``eta`` and ``expires`` may lie: one year. Beyond the
range of a float, or of a date, Celery fails to send the task or its worker fails to run it;
long before that, a message held for later sits unacknowledged in the broker."""

# Each option in seconds, and whether 0 is one of its values.
_SECONDS = {
    "soft_time_limit": False,
    "time_limit": False,
    "countdown": True,
    "expires": False,
    "retry_delay": True,
}


def check_options(options: cabc.Mapping[str, object]) -> dict[str, object]:
    """``options`` as Celery is sent them: every number of seconds a :class:`float`; what
    :class:`CeleryOptions` says of each.

    :raise TypeError: ``options`` has a name that ``task(backend="celery")`` does not take,
        or a value of the wrong type.
    :raise ValueError: a value out of its range (see :data:`MAX_SECONDS`), or the soft time
        limit not below the hard one."""
    unknown = sorted(set(options) - TASK_OPTIONS)
    if unknown:
        raise TypeError(
            f"'task(backend=\"celery\")' does not take {', '.join(map(repr, unknown))}. It takes"
            f" {', '.join(sorted(TASK_OPTIONS))}."
        )
    checked = dict(options)
    retry_for = options.get("retry_for", ())
    if not isinstance(retry_for, tuple) or not all(
        isinstance(cls, type) and issubclass(cls, BaseException) for cls in retry_for
    ):
        raise TypeError(f"'retry_for' must be a tuple of exception classes, not {retry_for!r}.")
    seconds: dict[str, float] = {}
    for name, zero in _SECONDS.items():
        value = options.get(name)
        if value is None or (name == "expires" and isinstance(value, datetime.datetime)):
            continue
        seconds[name] = _seconds(name, value, zero)
    checked.update(seconds)
    if options.get("eta") is not None:
        _check_date("eta", options["eta"])
    if isinstance(options.get("expires"), datetime.datetime):
        _check_date("expires", options["expires"])
    if options.get("countdown") is not None and options.get("eta") is not None:
        raise TypeError(
            "Give 'countdown' or 'eta', not both: Celery would run the task at the countdown."
        )
    for name, least, most in (("max_retries", 0, None), ("priority", 0, 255)):
        value = options.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name!r} must be an integer, not {shown(value)}.")
        if value < least or (most is not None and value > most):
            bounds = f"from {least} to {most}" if most is not None else f"{least} or more"
            raise ValueError(f"{name!r} must be an integer {bounds}, not {shown(value)}.")
    for name, kinds in (
        ("queue", (str, Queue)),
        ("exchange", (str, Exchange)),
        ("routing_key", (str,)),
    ):
        value = options.get(name)
        if value is not None and not isinstance(value, kinds):
            raise TypeError(
                f"{name!r} must be a {' or a '.join(kind.__name__ for kind in kinds)}, not"
                f" {shown(value)}."
            )
    soft, hard = (seconds.get(name) for name in TIME_LIMITS)
    if soft is not None and hard is not None and soft >= hard:
        raise ValueError(
            f"'soft_time_limit' ({soft:g}) must be less than 'time_limit' ({hard:g}): the soft"
            " limit lets the task clean up before the hard one kills it."
        )
    # Each a number of seconds, a date (checked above), or None.
    eta, expires_at = options.get("eta"), options.get("expires")
    start: float | datetime.datetime | None = seconds.get("countdown")
    if start is None and isinstance(eta, datetime.datetime):
        start = eta
    expires = expires_at if isinstance(expires_at, datetime.datetime) else seconds.get("expires")
    if (isinstance(start, float) and isinstance(expires, float) and start >= expires) or (
        isinstance(start, datetime.datetime)
        and isinstance(expires, datetime.datetime)
        and start >= expires
    ):
        when = {
            name: value.isoformat() if isinstance(value, datetime.datetime) else f"{value:g} s"
            for name, value in (("expires", expires), ("start", start))
        }
        raise ValueError(
            f"'expires' ({when['expires']}) must come after the start ('countdown' or 'eta',"
            f" {when['start']}): every task would expire before it runs."
        )
    return checked


def _seconds(name: str, value: object, zero: bool) -> float:
    """``value``, a number of seconds, as a float within ``0``..:data:`MAX_SECONDS`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        kind = "a number of seconds or an aware datetime" if name == "expires" else None
        raise TypeError(f"{name!r} must be {kind or 'a number of seconds'}, not {value!r}.")
    try:
        seconds = float(value)
    except OverflowError:
        seconds = math.inf if t.cast(float, value) > 0 else -math.inf
    if seconds < 0 or (seconds == 0 and not zero) or math.isnan(seconds):
        least = "0 or more" if zero else "above 0"
        raise ValueError(f"{name!r} must be a number of seconds {least}, not {shown(value)}.")
    if seconds > MAX_SECONDS:
        leave_out = " Leave it out for no limit." if name in TIME_LIMITS else ""
        raise ValueError(
            f"{name!r} must be at most {MAX_SECONDS} seconds (365 days), not {shown(value)}."
            f"{leave_out}"
        )
    return seconds


def _check_date(name: str, value: object) -> None:
    """:raise TypeError: ``value`` is not a datetime.
    :raise ValueError: it is naive, or further off than :data:`MAX_SECONDS`."""
    example = "such as 'datetime.now(timezone.utc) + timedelta(hours=1)'"
    if not isinstance(value, datetime.datetime):
        instead = " For a delay, give 'countdown' in seconds." if name == "eta" else ""
        raise TypeError(
            f"{name!r} must be an aware datetime, {example}, not {shown(value)}.{instead}"
        )
    if value.utcoffset() is None:
        raise ValueError(
            f"{name!r} must be an aware datetime, {example}, not the naive {value!r}: its time"
            " zone would be a guess."
        )
    now = datetime.datetime.now(datetime.timezone.utc)
    if value - now > datetime.timedelta(seconds=MAX_SECONDS):
        raise ValueError(f"{name!r} must lie at most 365 days ahead, not at {value.isoformat()}.")
    if name == "expires" and value <= now:
        raise ValueError(
            f"'expires' must lie ahead, not at {value.isoformat()}: every task would expire"
            " before it runs."
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
