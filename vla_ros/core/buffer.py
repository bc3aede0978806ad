"""A thread-safe, size-1, drop-oldest buffer: producers overwrite, the consumer takes the freshest.

Camera callbacks only write here and the inference worker only reads, so a slow consumer never
builds a backlog and never blocks the executor; the buffer counts what it dropped.
"""

from __future__ import annotations

import threading
from typing import Generic, TypeVar

T = TypeVar('T')


class LatestBuffer(Generic[T]):
    """Holds at most one item; ``put`` replaces it, ``take`` removes it, ``peek`` reads it."""

    def __init__(self) -> None:
        self._item: T | None = None
        self._cond = threading.Condition()
        self._version = 0
        self.dropped = 0

    def put(self, item: T) -> None:
        """Store ``item``, dropping an unconsumed older one, and wake a waiting consumer."""
        with self._cond:
            if self._item is not None:
                self.dropped += 1
            self._item = item
            self._version += 1
            self._cond.notify_all()

    def peek(self) -> T | None:
        """The current item without consuming it (None when empty)."""
        with self._cond:
            return self._item

    def take(self, timeout: float | None = None) -> T | None:
        """Remove and return the item, waiting up to ``timeout`` s for one (None on timeout)."""
        with self._cond:
            if self._item is None and timeout:
                self._cond.wait_for(lambda: self._item is not None, timeout)
            item, self._item = self._item, None
            return item

    def clear(self) -> None:
        """Drop the current item, if any (not counted as dropped)."""
        with self._cond:
            self._item = None
