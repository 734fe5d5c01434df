"""The options of a task, one policy for both engines: when it may start (``countdown``,
``eta``), until when it may start (``expires``), how long it may run (``time_limit``) and how
it is retried (``retry_for``, ``max_retries``, ``retry_delay``, ``retry_backoff``,
``retry_backoff_max``, ``retry_jitter``), and whether what a re-run needs is kept
(``rerunnable``).

They are checked once, where a task is declared (``@threadctx.task(...)``) or submitted with
options (``submit_with_options``), into a plain dict: the form :attr:`Task.options
<flask_threadctx.Task.options>` shows and Celery is sent. :class:`Policy` reads that dict for an
engine, so that both engines compute a start, an expiry and a retry's delay the same way. The
options only Celery has (its routing and its soft time limit) are checked here too, and refused
for the thread engine.
"""

from __future__ import annotations

import datetime
import math
import numbers
import random
import typing as t

from .config import shown

if t.TYPE_CHECKING:
    import collections.abc as cabc

MAX_SECONDS = 365 * 24 * 3600
"""The most seconds that ``time_limit``, ``soft_time_limit``, ``countdown``, ``expires``,
``retry_delay``, ``retry_backoff`` and ``retry_backoff_max`` take, and how far ahead ``eta``
and ``expires`` may lie: one year. Beyond the range of a float, or of a date, Celery fails to
send the task or its worker fails to run it; long before that, a message held for later sits
unacknowledged in the broker."""

CONTROL_OPTIONS = frozenset(
    (
        "countdown",
        "eta",
        "expires",
        "time_limit",
        "retry_for",
        "max_retries",
        "retry_delay",
        "retry_backoff",
        "retry_backoff_max",
        "retry_jitter",
        "rerunnable",
    )
)
"""The options both engines take and carry out the same way."""

CELERY_ONLY_OPTIONS = frozenset(("queue", "routing_key", "exchange", "priority", "soft_time_limit"))
"""The options only the Celery engine takes: its routing, and its soft time limit."""

TASK_OPTIONS = CONTROL_OPTIONS | CELERY_ONLY_OPTIONS

DEFAULT_MAX_RETRIES = 3
"""How many times a task whose ``retry_for`` matches is retried, without ``max_retries``."""
DEFAULT_BACKOFF_MAX = 600.0
"""The longest delay before a retry with ``retry_backoff``, without ``retry_backoff_max``."""

# Each option in seconds, and whether 0 is one of its values.
_SECONDS = {
    "soft_time_limit": False,
    "time_limit": False,
    "countdown": True,
    "expires": False,
    "retry_delay": True,
    "retry_backoff_max": False,
}
_TIME_LIMITS = ("soft_time_limit", "time_limit")


def check_options(options: cabc.Mapping[str, object], engine: str) -> dict[str, object]:
    """``options`` as they are kept and sent: every number of seconds a :class:`float`,
    ``retry_backoff`` a number of seconds (``True`` is 1) or ``False``.

    :param engine: ``"celery"`` for a task declared with ``backend="celery"``; anything else
        for a task that may run on threads, which takes no Celery-only option.
    :raise TypeError: ``options`` has a name that the engine does not take, or a value of the
        wrong type.
    :raise ValueError: a value out of its range (see :data:`MAX_SECONDS`), the soft time limit
        not below the hard one, or an expiry not after the start."""
    known = TASK_OPTIONS if engine == "celery" else CONTROL_OPTIONS
    unknown = sorted(set(options) - known)
    if unknown:
        only_celery = [name for name in unknown if name in CELERY_ONLY_OPTIONS]
        hint = (
            f" {', '.join(map(repr, only_celery))} only with 'backend=\"celery\"'."
            if only_celery
            else ""
        )
        where = 'task(backend="celery")' if engine == "celery" else "task()"
        raise TypeError(
            f"'{where}' does not take {', '.join(map(repr, unknown))}. It takes"
            f" {', '.join(sorted(known))}.{hint}"
        )
    checked = dict(options)
    retry_for = options.get("retry_for", ())
    if not isinstance(retry_for, tuple) or not all(
        isinstance(cls, type) and issubclass(cls, BaseException) for cls in retry_for
    ):
        raise TypeError(f"'retry_for' must be a tuple of exception classes, not {retry_for!r}.")
    for name, zero in _SECONDS.items():
        value = options.get(name)
        if value is None or (name == "expires" and isinstance(value, datetime.datetime)):
            continue
        checked[name] = _seconds(name, value, zero)
    if "retry_backoff" in options:
        checked["retry_backoff"] = _backoff(options["retry_backoff"])
    for name in ("retry_jitter", "rerunnable"):
        if name in options and not isinstance(options[name], bool):
            if name == "rerunnable" and options[name] is None:
                continue
            raise TypeError(f"{name!r} must be True or False, not {shown(options[name])}.")
    if options.get("eta") is not None:
        _check_date("eta", options["eta"])
    if isinstance(options.get("expires"), datetime.datetime):
        _check_date("expires", options["expires"])
    if options.get("countdown") is not None and options.get("eta") is not None:
        raise TypeError("Give 'countdown' or 'eta', not both: each says when the task starts.")
    _check_integers(options)
    for name, kinds in _KINDS.items():
        value = options.get(name)
        if value is not None and not isinstance(value, kinds()):
            raise TypeError(
                f"{name!r} must be a {' or a '.join(kind.__name__ for kind in kinds())}, not"
                f" {shown(value)}."
            )
    soft, hard = (t.cast("float | None", checked.get(name)) for name in _TIME_LIMITS)
    if soft is not None and hard is not None and soft >= hard:
        raise ValueError(
            f"'soft_time_limit' ({soft:g}) must be less than 'time_limit' ({hard:g}): the soft"
            " limit lets the task clean up before the hard one kills it."
        )
    _check_expiry(checked)
    return checked


def _check_integers(options: cabc.Mapping[str, object]) -> None:
    for name, least, most in (("max_retries", 0, None), ("priority", 0, 255)):
        value = options.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name!r} must be an integer, not {shown(value)}.")
        if value < least or (most is not None and value > most):
            bounds = f"from {least} to {most}" if most is not None else f"{least} or more"
            raise ValueError(f"{name!r} must be an integer {bounds}, not {shown(value)}.")


def _routing_kinds(name: str) -> t.Callable[[], tuple[type, ...]]:
    def kinds() -> tuple[type, ...]:
        from kombu.entity import Exchange  # only a Celery task has these: kombu is there
        from kombu.entity import Queue

        return {"queue": (str, Queue), "exchange": (str, Exchange)}.get(name, (str,))

    return kinds


_KINDS = {name: _routing_kinds(name) for name in ("queue", "exchange", "routing_key")}


def _check_expiry(checked: cabc.Mapping[str, object]) -> None:
    start = checked.get("eta") if checked.get("countdown") is None else checked["countdown"]
    expires = checked.get("expires")
    if start is None or expires is None:
        return
    # Seconds count from the submit, which is now; either may be a date.
    now = datetime.datetime.now(datetime.timezone.utc)
    start_at, expires_at = (
        value if isinstance(value, datetime.datetime) else now + datetime.timedelta(seconds=value)
        for value in t.cast("tuple[float | datetime.datetime, ...]", (start, expires))
    )
    if start_at >= expires_at:
        when = {
            name: value.isoformat() if isinstance(value, datetime.datetime) else f"{value:g} s"
            for name, value in (("expires", expires), ("start", start))
        }
        raise ValueError(
            f"'expires' ({when['expires']}) must come after the start ('countdown' or 'eta',"
            f" {when['start']}): every task would expire before it runs."
        )


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
        leave_out = " Leave it out for no limit." if name in _TIME_LIMITS else ""
        raise ValueError(
            f"{name!r} must be at most {MAX_SECONDS} seconds (365 days), not {shown(value)}."
            f"{leave_out}"
        )
    return seconds


def _backoff(value: object) -> float | bool:
    """``retry_backoff`` as kept: ``False``, or its base in seconds (``True`` is 1)."""
    if value is False:
        return False
    if value is True:
        return 1.0
    if not isinstance(value, numbers.Real):
        raise TypeError(
            f"'retry_backoff' must be True, False or a number of seconds, not {shown(value)}."
        )
    return _seconds("retry_backoff", value, zero=False)


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


class Policy:
    """What a task's checked options say, as an engine asks it: when the task may start, when
    it expires, how long it may run, and whether and when an error is retried.

    ``expires`` in seconds counts from the submit, as Celery counts it, not from the start."""

    __slots__ = ("_options",)

    def __init__(self, options: cabc.Mapping[str, object]) -> None:
        # An option given as None is the same as one left out.
        self._options = {name: value for name, value in options.items() if value is not None}

    def start_at(self, submitted_at: float) -> float | None:
        """When the task is due, a Unix time, for a task submitted at ``submitted_at``;
        ``None`` to run it at once."""
        countdown = t.cast("float | None", self._options.get("countdown"))
        if countdown is not None:
            return submitted_at + countdown
        eta = t.cast("datetime.datetime | None", self._options.get("eta"))
        return None if eta is None else eta.timestamp()

    def expires_at(self, submitted_at: float) -> float | None:
        """When the task expires unless it has started, a Unix time; ``None`` never."""
        expires = t.cast("float | datetime.datetime | None", self._options.get("expires"))
        if isinstance(expires, datetime.datetime):
            return expires.timestamp()
        return None if expires is None else submitted_at + expires

    @property
    def time_limit(self) -> float | None:
        """Seconds the task may run before it is asked to stop, if it has a limit."""
        return t.cast("float | None", self._options.get("time_limit"))

    def retries(self, error: BaseException, retries: int) -> bool:
        """Whether ``error`` is retried, after ``retries`` retries so far."""
        retry_for = t.cast("tuple[type[BaseException], ...]", self._options.get("retry_for", ()))
        most = t.cast(int, self._options.get("max_retries", DEFAULT_MAX_RETRIES))
        return bool(retry_for) and isinstance(error, retry_for) and retries < most

    def retry_delay(self, retries: int, draw: t.Callable[[], float] = random.random) -> float:
        """Seconds to wait before retry number ``retries + 1``.

        With ``retry_backoff`` (a base in seconds), the delay doubles with each retry, from the
        base up to ``retry_backoff_max``, and with ``retry_jitter`` (the default) it is drawn
        at random from 0 up to that, as Celery's own backoff does ("full jitter": tasks that
        failed together do not all come back together). Without it, ``retry_delay`` (0 by
        default) each time."""
        options = self._options
        base = t.cast("float | bool", options.get("retry_backoff", False))
        if not base:
            return t.cast(float, options.get("retry_delay", 0.0))
        most = t.cast(float, options.get("retry_backoff_max", DEFAULT_BACKOFF_MAX))
        delay = min(most, float(base) * 2.0 ** min(retries, 64))
        if options.get("retry_jitter", True):
            delay *= draw()
        return delay
