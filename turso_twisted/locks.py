"""
One L{DeferredLock} per key, made on demand and forgotten when idle, so
that thousands of names cost nothing between uses.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import attrs
from twisted.internet.defer import Deferred, DeferredLock, ensureDeferred

T = TypeVar("T")


@attrs.define
class KeyedLocks:
    _locks: dict[str, DeferredLock] = attrs.field(factory=dict)

    def run(self, key: str, work: Callable[[], Awaitable[T]]) -> Deferred[T]:
        """
        Run C{work} holding C{key}'s lock.
        """
        lock = self._locks.setdefault(key, DeferredLock())

        async def locked() -> T:
            await lock.acquire()
            try:
                return await work()
            finally:
                lock.release()
                if not lock.locked and not lock.waiting and self._locks.get(key) is lock:
                    del self._locks[key]

        return ensureDeferred(locked())

    def is_locked(self, key: str) -> bool:
        lock = self._locks.get(key)
        return lock is not None and bool(lock.locked or lock.waiting)
