"""Copying plain data out of :data:`flask.g` for a task.

``THREADCTX_COPY_G = "data"`` gives a task the ``g`` attributes that are plain data, each copied so
that the task cannot change what the request or another task sees. Anything else (a database
connection, a user object, a lock) belongs to the thread that made it and is left behind.
"""

from __future__ import annotations

import collections
import datetime
import decimal
import enum
import typing as t
import uuid

_SCALARS: frozenset[type] = frozenset(
    {
        str,
        bytes,
        int,
        float,
        complex,
        bool,
        type(None),
        datetime.date,
        datetime.datetime,
        datetime.time,
        datetime.timedelta,
        datetime.timezone,
        uuid.UUID,
        decimal.Decimal,
    }
)
_MAPPINGS: frozenset[type] = frozenset(
    {collections.OrderedDict, collections.defaultdict, collections.Counter}
)
_SCALAR_BASES = (str, bytes, int, float, datetime.date, datetime.time, uuid.UUID, enum.Enum)

# Deeper nesting than this is not what anyone keeps in ``g`` as data, and stopping here means a
# self-referencing list cannot recurse forever.
_MAX_DEPTH = 32


class NotPlainData(Exception):
    """Raised inside this module when a value holds something other than plain data."""


def copy_plain_data(value: t.Any, depth: int = 0) -> t.Any:
    """Return a copy of ``value`` that shares no mutable object with it.

    :raise NotPlainData: ``value`` is, or contains, something that is not plain data.
    """
    kind = type(value)
    if kind in _SCALARS:
        return value
    if depth >= _MAX_DEPTH:
        raise NotPlainData
    if kind is list or kind is tuple or kind is set or kind is frozenset:
        return kind(copy_plain_data(item, depth + 1) for item in value)
    if kind is dict:
        return {
            copy_plain_data(key, depth + 1): copy_plain_data(item, depth + 1)
            for key, item in value.items()
        }
    if kind in _MAPPINGS:
        # The default factory of a defaultdict is shared, as ``copy.copy`` shares it: it is a
        # type or a function.
        copied = kind(value.default_factory) if kind is collections.defaultdict else kind()
        for key, item in value.items():
            copied[copy_plain_data(key, depth + 1)] = copy_plain_data(item, depth + 1)
        return copied
    if isinstance(value, tuple) and _is_named_tuple(kind):
        return kind._make(copy_plain_data(item, depth + 1) for item in value)
    # Subclasses of the immutable scalars (``markupsafe.Markup``, ``IntEnum`` members, ...) are
    # immutable too.
    if isinstance(value, _SCALAR_BASES):
        return value
    raise NotPlainData


def _is_named_tuple(kind: type) -> bool:
    """Whether ``kind`` was made by :func:`collections.namedtuple` or :class:`typing.NamedTuple`,
    whose instances are plain records (a tuple subclass of another kind may hold anything)."""
    return tuple in kind.__bases__ and isinstance(getattr(kind, "_fields", None), tuple)


def plain_data_items(namespace: dict[str, t.Any]) -> tuple[dict[str, t.Any], list[str] | None]:
    """Return copies of the plain-data items of ``namespace``, and the names of the items that
    were left out because they are not plain data, or ``None`` if none was."""
    copied = {}
    left_out = None
    for name, value in namespace.items():
        try:
            copied[name] = copy_plain_data(value)
        except NotPlainData:
            if left_out is None:
                left_out = [name]
            else:
                left_out.append(name)
    return copied, left_out
