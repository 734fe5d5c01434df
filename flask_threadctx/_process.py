"""What lives once per process: the daemon threads the package starts on first use, and the
objects that start afresh in a child made by :func:`os.fork` (``gunicorn --preload``, Celery's
prefork pool), where the parent's threads do not run.

Two tools, used everywhere the package needs them: :class:`PerProcess` holds the one thread of a
kind that an owner runs in this process, and :func:`reset_in_child` has an object reset itself in
a forked child, from the package's one at-fork hook.
"""

from __future__ import annotations

import os
import threading
import typing as t
import weakref


class Started(t.Protocol):
    """A thread, or a few, started in the process whose id it keeps."""

    pid: int


T = t.TypeVar("T", bound=Started)


class PerProcess(t.Generic[T]):
    """The one :class:`Started` of a kind that an owner runs in this process: made on first
    use, and made again in a forked child."""

    __slots__ = ("_lock", "current")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.current: T | None = None
        """The last one made: this process's, or, in a forked child, the parent's."""

    def here(self) -> T | None:
        """The one made in this process, if any."""
        current = self.current
        return current if current is not None and current.pid == os.getpid() else None

    def get(self, make: t.Callable[[], T]) -> T:
        """This process's, made (and started) by ``make`` if there is none yet."""
        current = self.current
        if current is None or current.pid != os.getpid():  # none yet, or the parent's, forked
            with self._lock:
                current = self.current
                if current is None or current.pid != os.getpid():
                    current = self.current = make()
        return current


class ForkReset(t.Protocol):
    def reset_after_fork(self) -> None:
        """Called in a forked child: forget what belongs to the parent process."""


_resettable: weakref.WeakSet[ForkReset] = weakref.WeakSet()


def reset_in_child(owner: ForkReset) -> None:
    """Call ``owner.reset_after_fork()`` in the child of each :func:`os.fork` while ``owner``
    lives."""
    _resettable.add(owner)


def _reset_after_fork() -> None:
    for owner in list(_resettable):
        owner.reset_after_fork()


os.register_at_fork(after_in_child=_reset_after_fork)
