"""What the thread engine does later: one heap of due times and one thread per pool that
wakes at the earliest, for tasks with a ``countdown`` or ``eta``, retries waiting out their
delay, and time limits' graces. Ten thousand delayed tasks cost ten thousand heap entries, not
ten thousand threads (as :class:`threading.Timer` would).

The thread starts with the first entry and ends with the last, and starts again in a forked
child that gets one.
"""

from __future__ import annotations

import heapq
import itertools
import os
import threading
import time
import typing as t

Kind = t.Literal["start", "grace"]
"""Why an entry is due: a task to queue (``"start"``: its delay or a retry's passed), or a
time limit's grace to check (``"grace"``)."""

T = t.TypeVar("T")


class Timer(t.Generic[T]):
    """Calls ``on_due(item, kind)`` in its own thread when each entry is due.

    ``on_due`` must not raise; it is called without the timer's lock, so it may add entries.
    """

    def __init__(self, name: str, on_due: t.Callable[[T, Kind], None]) -> None:
        self.name = name
        self._on_due = on_due
        self._entries: list[tuple[float, int, Kind, T]] = []
        self._order = itertools.count()  # entries due at once keep their order
        self._changed = threading.Condition(threading.Lock())
        self._thread: threading.Thread | None = None
        self.pid = os.getpid()

    def __len__(self) -> int:
        return len(self._entries)

    def call_at(self, when: float, item: T, kind: Kind = "start") -> None:
        """Have ``on_due(item, kind)`` called at the Unix time ``when`` (at once if it passed)."""
        with self._changed:
            earliest = self._entries[0][0] if self._entries else None
            heapq.heappush(self._entries, (when, next(self._order), kind, item))
            if self._thread is None or self.pid != os.getpid():
                self._start()
            elif earliest is None or when < earliest:
                self._changed.notify()

    def _start(self) -> None:
        self.pid = os.getpid()
        thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        thread.start()  # before it is kept: a thread that failed to start is not waited for
        self._thread = thread

    def take(self, kind: Kind) -> list[T]:
        """Take out the entries of ``kind`` not yet due, earliest first, for the owner to
        settle; the others stay."""
        with self._changed:
            taken = sorted(entry for entry in self._entries if entry[2] == kind)
            self._entries[:] = [entry for entry in self._entries if entry[2] != kind]
            heapq.heapify(self._entries)
            self._changed.notify()
        return [item for _, _, _, item in taken]

    def prune(self, keep: t.Callable[[T, Kind], bool]) -> None:
        """Drop the entries that ``keep`` refuses, as their owner no longer needs them: once
        none is left, the thread ends instead of waiting for them."""
        with self._changed:
            self._entries[:] = [entry for entry in self._entries if keep(entry[3], entry[2])]
            heapq.heapify(self._entries)
            self._changed.notify()

    def reset_after_fork(self) -> None:
        """Forget the parent's entries and thread: its tasks do not run in a forked child."""
        self._changed = threading.Condition(threading.Lock())
        self._entries.clear()
        self._thread = None

    def _run(self) -> None:
        while True:
            with self._changed:
                while True:
                    if not self._entries:  # ends, so that it keeps no pool alive; 'call_at'
                        self._thread = None  # starts another
                        return
                    now = time.time()
                    if self._entries[0][0] <= now:
                        _, _, kind, item = heapq.heappop(self._entries)
                        break
                    self._changed.wait(self._entries[0][0] - now)
            self._on_due(item, kind)
            del item
