"""Encoding what crosses to another process as JSON: a Celery message, and what a
``rerunnable`` task keeps for its re-run (:mod:`flask_threadctx.rerun`), with errors that name
the part that cannot cross.

The JSON is kombu's where kombu is installed (Celery's own, so dates, times, decimals, UUIDs and
bytes cross as Celery carries them), and the standard library's otherwise: a threads-only app
re-runs tasks without Celery. What kombu tagged, read where kombu is missing, is refused rather
than read back as the tagged dict.
"""

from __future__ import annotations

import json
import typing as t

from ..model import task_name

if t.TYPE_CHECKING:
    import collections.abc as cabc

json_dumps: t.Callable[[t.Any], str]
json_loads: t.Callable[[str], t.Any]
try:
    from kombu.utils import json as kombu_json
except ImportError:  # no Celery: the standard library's JSON, and a reader that refuses tags
    json_dumps = json.dumps

    def json_loads(text: str) -> t.Any:
        return json.loads(text, object_hook=_untagged)

else:
    json_dumps, json_loads = kombu_json.dumps, kombu_json.loads


class KombuTagged(ValueError):
    """JSON that kombu tagged (a date, a decimal, a UUID, bytes), read where kombu is missing."""


def _untagged(value: dict[str, t.Any]) -> dict[str, t.Any]:
    if "__type__" in value and "__value__" in value:
        raise KombuTagged(
            f"This JSON holds a {value['__type__']!r} as kombu writes one, and kombu is not"
            " installed here to read it: 'pip install Flask-ThreadCtx[celery]'."
        )
    return value


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
            check_keys(what, value, f"The {what} of {task_name(fn)!r} has the dict key")
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
        check_keys(what, value, f"The {what} of {task_name(fn)!r} has the dict key")
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


def check_keys(what: str, value: t.Any, says: str) -> None:
    """:raise TypeError: ``value``, the ``what`` of a task, holds a dict key that is not a
    string; the message starts with ``says``."""
    found = _non_str_key(value)
    if found is None:
        return
    where, key = found
    if key is _TAGGED:
        raise TypeError(
            f"A dict at {what}{where} has the keys '__type__' and '__value__': kombu's JSON"
            " (Celery's) would read it back as the value that such a dict tags (a date, a"
            " UUID), not as this dict. Rename its keys."
        )
    raise TypeError(f"{says} {key!r} at {what}{where}: {_json_key_fate(key)}. Use string keys.")


_TAGGED = object()
"""What :func:`_non_str_key` finds for a dict shaped as the values kombu's JSON tags."""


def _tagged(value: object) -> bool:
    return isinstance(value, dict) and "__type__" in value and "__value__" in value


def _json_key_fate(key: t.Any) -> str:
    if key is not None and not isinstance(key, (int, float)):
        return "JSON cannot carry it"
    return (
        f"JSON would turn it into the string {json_dumps(key)!r}, and drop its value if that"
        " string is a key too"
    )


def _non_str_key(value: t.Any) -> tuple[str, t.Any] | None:
    """Where in ``value`` a dict has a key that is not a string, as a subscript path, and that
    key (or a dict is shaped as kombu's tagged values: :data:`_TAGGED`); ``None`` if nowhere.
    Looked for as deep as ``value`` goes, without recursion (JSON encodes deeper than Python's
    recursion limit lets a function recurse), and in each container once (one met again is
    shared, or loops back, which JSON refuses)."""
    if not isinstance(value, (dict, list, tuple)):
        return None
    if _tagged(value):
        return "", _TAGGED
    seen = {id(value)}
    # The containers from ``value`` down to the one looked through now: the subscript that
    # leads to each, and its entries not yet looked at.
    stack: list[tuple[t.Any, cabc.Iterator[tuple[t.Any, t.Any, bool]]]] = [(None, _entries(value))]
    while stack:
        for key, item, is_key in stack[-1][1]:
            if is_key and not isinstance(key, str):
                return "".join(f"[{subscript!r}]" for subscript, _ in stack[1:]), key
            if isinstance(item, (dict, list, tuple)) and id(item) not in seen:
                if _tagged(item):
                    path = [subscript for subscript, _ in stack[1:]] + [key]
                    return "".join(f"[{subscript!r}]" for subscript in path), _TAGGED
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
