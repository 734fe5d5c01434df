"""The ``THREADCTX_*`` configuration keys: defaults, validation, and the settings read from them."""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import typing as t
import warnings

from .backends import NAMES

CopyG: t.TypeAlias = bool | t.Literal["data"] | tuple[str, ...]

DEFAULTS: dict[str, t.Any] = {
    "THREADCTX_MAX_WORKERS": None,
    "THREADCTX_MAX_QUEUE": None,
    "THREADCTX_COPY_G": "data",
    "THREADCTX_PRELOAD_BODY": True,
    "THREADCTX_COPY_FILES": False,
    "THREADCTX_TEARDOWN_REQUEST": False,
    "THREADCTX_EAGER": False,
    "THREADCTX_SHUTDOWN_TIMEOUT": 30.0,
    "THREADCTX_THREAD_NAME_PREFIX": "threadctx",
    "THREADCTX_KEEP_FINISHED": 1000,
    "THREADCTX_LOG_EXCEPTIONS": True,
    "THREADCTX_BACKEND": "threads",
    "THREADCTX_CELERY": None,
    "THREADCTX_CELERY_APP": None,
    "THREADCTX_CELERY_MAX_BODY": 1024 * 1024,
    "THREADCTX_CELERY_PRIVATE_HEADERS": ("Authorization", "Cookie", "Proxy-Authorization"),
    "THREADCTX_CELERY_PUBLIC_HEADERS": (),
    "THREADCTX_CELERY_HEARTBEAT": 30.0,
    "THREADCTX_CELERY_SUBMIT_TIMEOUT": 5.0,
    "THREADCTX_TASK_STORE": None,
    "THREADCTX_KEEP_RESULTS": False,
    "THREADCTX_RESULT_MAX_BYTES": 64 * 1024,
    "THREADCTX_METRICS": False,
    "THREADCTX_METRICS_TOKEN": None,
    "THREADCTX_TIME_LIMIT": None,
    "THREADCTX_TIME_LIMIT_GRACE": 5.0,
    "THREADCTX_CANCEL_TIMEOUT": 5.0,
    "THREADCTX_RERUNNABLE": False,
}

BACKENDS = tuple(NAMES)  # the registry of engines


@dataclasses.dataclass(frozen=True)
class Settings:
    """The validated configuration of one app, read once by ``init_app``."""

    max_workers: int
    max_queue: int | None
    copy_g: CopyG
    preload_body: bool
    copy_files: bool
    teardown_request: bool
    eager: bool
    shutdown_timeout: float
    thread_name_prefix: str
    keep_finished: int
    log_exceptions: bool
    backend: t.Literal["threads", "celery"] = "threads"
    celery: dict[str, t.Any] | None = None
    celery_app: str | None = None
    celery_max_body: int = 1024 * 1024
    celery_private_headers: frozenset[str] = frozenset()
    """Lower-case names of the headers that never leave the web process, besides those whose
    name suggests a secret."""
    celery_public_headers: frozenset[str] = frozenset()
    """Lower-case names of headers that cross although their name suggests a secret, or
    ``celery_private_headers`` names them: the app opted in by name."""
    celery_heartbeat: float = 30.0
    celery_submit_timeout: float = 5.0
    """The most a Celery ``submit`` waits for Redis before it raises ``BrokerUnavailable``."""
    task_store: str | None = None
    """The URL of the shared task store, ``sqlite:///...`` or ``redis://...``, or
    ``"celery"``."""
    keep_results: bool = False
    """Whether the store keeps the results of tasks not decorated with ``keep_result``."""
    result_max_bytes: int = 64 * 1024
    metrics: bool = False
    metrics_token: str | None = None
    """The bearer token that lets a scraper read the monitor's ``/metrics``."""
    time_limit: float | None = None
    """The time limit of tasks submitted without a ``time_limit`` of their own."""
    time_limit_grace: float = 5.0
    """Seconds a task past its time limit has to stop before it is written off."""
    cancel_timeout: float = 5.0
    """Seconds ``cancel_task`` waits for the process that runs a task elsewhere to answer."""
    rerunnable: bool = False
    """Whether tasks keep what ``rerun`` needs unless their ``rerunnable`` option says."""

    @property
    def celery_configured(self) -> bool:
        return self.celery is not None or self.celery_app is not None


def default_max_workers() -> int:
    """The same default as :class:`concurrent.futures.ThreadPoolExecutor`."""
    return min(32, (os.cpu_count() or 1) + 4)


def read_settings(config: dict[str, t.Any]) -> Settings:
    """Fill in the defaults on an app's ``config`` and return the validated settings.

    :raise TypeError: a key has a value of the wrong type.
    :raise ValueError: a key has a value of the right type but out of range.
    """
    for key, value in DEFAULTS.items():
        config.setdefault(key, value)
    _warn_unknown_keys(config)

    max_workers = _optional_count(config, "THREADCTX_MAX_WORKERS")
    return Settings(
        max_workers=default_max_workers() if max_workers is None else max_workers,
        max_queue=_optional_count(config, "THREADCTX_MAX_QUEUE"),
        copy_g=_copy_g(config["THREADCTX_COPY_G"]),
        preload_body=_flag(config, "THREADCTX_PRELOAD_BODY"),
        copy_files=_flag(config, "THREADCTX_COPY_FILES"),
        teardown_request=_flag(config, "THREADCTX_TEARDOWN_REQUEST"),
        eager=_flag(config, "THREADCTX_EAGER"),
        shutdown_timeout=_seconds(config, "THREADCTX_SHUTDOWN_TIMEOUT", DAY),
        thread_name_prefix=_text(config, "THREADCTX_THREAD_NAME_PREFIX"),
        keep_finished=_count(config, "THREADCTX_KEEP_FINISHED", minimum=0, maximum=10**9),
        log_exceptions=_flag(config, "THREADCTX_LOG_EXCEPTIONS"),
        task_store=_task_store(config),
        keep_results=_keep_results(config),
        result_max_bytes=_count(config, "THREADCTX_RESULT_MAX_BYTES"),
        metrics=_flag(config, "THREADCTX_METRICS"),
        metrics_token=_metrics_token(config),
        time_limit=_time_limit(config),
        time_limit_grace=_seconds(config, "THREADCTX_TIME_LIMIT_GRACE", HOUR),
        cancel_timeout=_seconds(config, "THREADCTX_CANCEL_TIMEOUT", HOUR),
        rerunnable=_rerunnable(config),
        **_celery_settings(config),
    )


def _time_limit(config: dict[str, t.Any]) -> float | None:
    key = "THREADCTX_TIME_LIMIT"
    if config[key] is None:
        return None
    seconds = _seconds(config, key, DAY)
    if seconds == 0:
        raise ValueError(f"'{key}' must be above 0 seconds, or None for no limit.")
    return seconds


def _rerunnable(config: dict[str, t.Any]) -> bool:
    rerunnable = _flag(config, "THREADCTX_RERUNNABLE")
    if rerunnable and config["THREADCTX_TASK_STORE"] is None:
        raise ValueError(
            "'THREADCTX_RERUNNABLE' is True, but a task keeps what a re-run needs in the task"
            " store, and 'THREADCTX_TASK_STORE' is None. Set it too, or leave"
            " 'THREADCTX_RERUNNABLE' False."
        )
    return rerunnable


def _task_store(config: dict[str, t.Any]) -> str | None:
    url = config["THREADCTX_TASK_STORE"]
    if url is None:
        return None
    celery = config["THREADCTX_CELERY"] is not None or config["THREADCTX_CELERY_APP"] is not None
    if url == "celery":
        if not celery:
            raise ValueError(
                "'THREADCTX_TASK_STORE' is \"celery\" (the Celery backend's records), but"
                " Celery is not configured: set 'THREADCTX_CELERY', or give the URL of a store."
            )
        return "celery"
    if celery and isinstance(url, str):
        raise ValueError(
            "With Celery configured, the task store is the Celery backend's records in its"
            " result backend, which every worker writes: set 'THREADCTX_TASK_STORE' to"
            f' "celery", not {url!r}.'
        )
    from .stores import SCHEMES  # the registry of stores; imported when a store is named

    if not isinstance(url, str) or not url.startswith(tuple(SCHEMES)) or url == "sqlite:///":
        raise ValueError(
            "'THREADCTX_TASK_STORE' must be the URL of a SQLite file ('sqlite:///tasks.db',"
            " relative to the app's instance folder, or 'sqlite:////abs/path/tasks.db'), of"
            " a Redis database ('redis://host:6379/0'), \"celery\" or None; not"
            f" {url!r}."
        )
    return url


def _keep_results(config: dict[str, t.Any]) -> bool:
    keep = _flag(config, "THREADCTX_KEEP_RESULTS")
    if keep and config["THREADCTX_TASK_STORE"] is None:
        raise ValueError(
            "'THREADCTX_KEEP_RESULTS' is True, but there is no store to keep results in: set"
            " 'THREADCTX_TASK_STORE' too, or leave results in the process that ran the task."
        )
    return keep


def _celery_settings(config: dict[str, t.Any]) -> dict[str, t.Any]:
    backend = config["THREADCTX_BACKEND"]
    if backend not in BACKENDS:
        raise ValueError(f'\'THREADCTX_BACKEND\' must be "threads" or "celery", not {backend!r}.')
    celery = config["THREADCTX_CELERY"]
    if celery is not None and not (
        isinstance(celery, dict) and all(isinstance(key, str) for key in celery)
    ):
        raise TypeError(
            "'THREADCTX_CELERY' must be a dict of Celery settings, such as"
            f" {{'broker_url': 'redis://localhost:6379/0', ...}}, not {celery!r}."
        )
    celery_app = config["THREADCTX_CELERY_APP"]
    if celery_app is not None and (
        not isinstance(celery_app, str) or not re.fullmatch(r"[\w.]+:[\w.]+", celery_app)
    ):
        raise ValueError(
            "'THREADCTX_CELERY_APP' must be the import path of a Celery app, such as"
            f" 'myproject.tasks:celery', not {celery_app!r}."
        )
    if celery is not None and celery_app is not None:
        raise ValueError(
            "Set one of 'THREADCTX_CELERY' (settings for a Celery app that the extension"
            " makes) and 'THREADCTX_CELERY_APP' (your own Celery app), not both."
        )
    if (
        backend == "celery"
        and celery is None
        and celery_app is None
        and not config["THREADCTX_EAGER"]
    ):
        raise ValueError(
            "'THREADCTX_BACKEND' is \"celery\", but neither 'THREADCTX_CELERY' nor"
            " 'THREADCTX_CELERY_APP' says which Celery to use. Set 'THREADCTX_CELERY' to"
            " {'broker_url': ..., 'result_backend': ...}."
        )
    return {
        "backend": backend,
        "celery": celery,
        "celery_app": celery_app,
        "celery_max_body": _count(config, "THREADCTX_CELERY_MAX_BODY", minimum=0),
        "celery_private_headers": _header_names(config, "THREADCTX_CELERY_PRIVATE_HEADERS"),
        "celery_public_headers": _header_names(config, "THREADCTX_CELERY_PUBLIC_HEADERS"),
        "celery_heartbeat": _heartbeat(config),
        "celery_submit_timeout": _submit_timeout(config),
    }


def _header_names(config: dict[str, t.Any], key: str) -> frozenset[str]:
    """The lower-case header names that ``key`` lists."""
    headers = config[key]
    if isinstance(headers, str) or not isinstance(headers, (list, tuple, set, frozenset)):
        raise TypeError(f"{key!r} must be a list of header names, not {headers!r}.")
    bad = [name for name in headers if not isinstance(name, str) or not name]
    if bad:
        raise ValueError(f"{key!r} lists invalid names: {bad!r}.")
    return frozenset(name.lower() for name in headers)


def _heartbeat(config: dict[str, t.Any]) -> float:
    seconds = _seconds(config, "THREADCTX_CELERY_HEARTBEAT", DAY)
    if seconds < 1:
        raise ValueError(
            f"'THREADCTX_CELERY_HEARTBEAT' must be at least 1 second, not {seconds!r}: a busy"
            " worker process must have time to show it is alive."
        )
    return seconds


def _submit_timeout(config: dict[str, t.Any]) -> float:
    seconds = _seconds(config, "THREADCTX_CELERY_SUBMIT_TIMEOUT", HOUR)
    if seconds <= 0:
        raise ValueError(
            f"'THREADCTX_CELERY_SUBMIT_TIMEOUT' must be more than 0 seconds, not {seconds!r}:"
            " a submit needs time to reach Redis."
        )
    return seconds


class UnknownConfigKeyWarning(UserWarning):
    """A ``THREADCTX_*`` key in an app's config is not one the extension reads: most likely a
    typo, which would otherwise leave the setting at its default without a word."""


_PREFIX_LENGTH = len("THREADCTX_")
_NAMES = [key[_PREFIX_LENGTH:] for key in DEFAULTS]


def _warn_unknown_keys(config: dict[str, t.Any]) -> None:
    for key in config:
        if isinstance(key, str) and key.startswith("THREADCTX_") and key not in DEFAULTS:
            # Compared without the prefix, which every key shares.
            close = difflib.get_close_matches(key[_PREFIX_LENGTH:], _NAMES, n=1, cutoff=0.6)
            hint = f" Did you mean 'THREADCTX_{close[0]}'?" if close else ""
            warnings.warn(
                f"{key!r} is not a Flask-ThreadCtx setting and is ignored.{hint} The settings"
                f" are: {', '.join(DEFAULTS)}.",
                UnknownConfigKeyWarning,
                stacklevel=4,
            )


def _flag(config: dict[str, t.Any], key: str) -> bool:
    value = config[key]
    if not isinstance(value, bool):
        raise TypeError(f"'{key}' must be True or False, not {value!r}.")
    return value


def _count(config: dict[str, t.Any], key: str, minimum: int = 1, maximum: int | None = None) -> int:
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"'{key}' must be a whole number, not {value!r}.")
    if value < minimum:
        raise ValueError(f"'{key}' must be {minimum} or more, not {value!r}.")
    if maximum is not None and value > maximum:
        raise ValueError(f"'{key}' must be at most {maximum:_}, not {shown(value)}.")
    return value


def _optional_count(config: dict[str, t.Any], key: str) -> int | None:
    if config[key] is None:
        return None
    try:
        return _count(config, key)
    except TypeError:
        raise TypeError(f"'{key}' must be a whole number or None, not {config[key]!r}.") from None


HOUR = 3600.0
DAY = 86400.0
_SPANS = {HOUR: "an hour", DAY: "a day"}


def _seconds(config: dict[str, t.Any], key: str, most: float) -> float:
    """The number of seconds of ``key``, ``0`` to ``most``: far beyond, Python's waits and
    sleeps raise :exc:`OverflowError`, and Redis refuses such an expiry."""
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"'{key}' must be a number of seconds, not {value!r}.")
    # An int is compared as it is: one beyond a float would raise 'OverflowError'.
    if value < 0 or (isinstance(value, float) and not math.isfinite(value)):
        raise ValueError(f"'{key}' must be a finite number of seconds >= 0, not {shown(value)}.")
    if value > most:
        raise ValueError(
            f"'{key}' must be at most {most:g} seconds ({_SPANS[most]}), not {shown(value)}."
        )
    return float(value)


def shown(value: t.Any) -> str:
    """``value`` for an error message: a huge integer by its size, a long repr cut."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**16:
        sign = "-" if value < 0 else ""
        return f"an integer of about {sign}10**{math.floor(math.log10(abs(value)))}"
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:77]}..."


def _text(config: dict[str, t.Any], key: str) -> str:
    value = config[key]
    if not isinstance(value, str):
        raise TypeError(f"'{key}' must be a string, not {value!r}.")
    if not value:
        raise ValueError(f"'{key}' must not be empty.")
    return value


def _metrics_token(config: dict[str, t.Any]) -> str | None:
    key = "THREADCTX_METRICS_TOKEN"
    value = config[key]
    if value is None:
        return None
    if not isinstance(value, str) or not value.isascii() or not value.isprintable():
        raise TypeError(
            f"'{key}' must be a string of printable ASCII characters (the bearer token"
            f" Prometheus sends) or None, not {type(value).__name__}."
        )
    if value != value.strip():
        raise ValueError(
            f"'{key}' must not begin or end with whitespace: a scraper's token is read without"
            " it, so this one could never match. Make one with 'python -c \"import secrets;"
            " print(secrets.token_urlsafe())\"'."
        )
    if len(value) < 16:
        raise ValueError(
            f"'{key}' must be at least 16 characters long, not {len(value)}: make one with"
            " 'python -c \"import secrets; print(secrets.token_urlsafe())\"'."
        )
    return value


def _copy_g(value: t.Any) -> CopyG:
    key = "THREADCTX_COPY_G"
    if isinstance(value, bool) or value == "data":
        return t.cast(CopyG, value)
    if isinstance(value, str):
        raise ValueError(
            f"'{key}' must be \"data\", True, False or a list of attribute names, not {value!r}."
        )
    if not isinstance(value, (list, tuple, set, frozenset)):
        raise TypeError(
            f"'{key}' must be \"data\", True, False or a list of attribute names, not {value!r}."
        )
    bad = [name for name in value if not isinstance(name, str) or not name.isidentifier()]
    if bad:
        raise ValueError(f"'{key}' lists names that are not attribute names: {bad!r}.")
    return tuple(value)


DEFAULT_SETTINGS = read_settings(dict(DEFAULTS))
"""The settings of an app that has no :class:`~flask_threadctx.ThreadContext`, for
:func:`~flask_threadctx.copy_current_context` and :class:`~flask_threadctx.ContextThread`."""
