"""
Scale to zero: children of namespaces nobody used for
C{TURSO_HIBERNATE_AFTER} are stopped; files and records stay, and the next
request wakes the namespace (a child starts in a few milliseconds).  With
thousands of namespaces on disk, only the busy ones cost a process.

A L{LoopingCall} looks every tenth of the period (1 s to 30 s); each
namespace is then stopped under its own lock, only if no request is in
flight and it is still idle, so no request ever reaches a child that is
stopping.
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from .config import format_duration
from .namespaces import NamespaceManager
from .periodic import Periodic


@attrs.define(eq=False)
class Hibernator:
    clock: Any
    manager: NamespaceManager
    idle_after: float
    _periodic: Periodic | None = None
    _log = Logger()

    @property
    def interval(self) -> float:
        return min(30.0, max(1.0, self.idle_after / 10))

    def start(self) -> None:
        if self.idle_after:
            self._periodic = Periodic(self.clock, self.interval, self.sweep)
            self._periodic.start()

    def stop(self) -> Deferred[None]:
        return succeed(None) if self._periodic is None else self._periodic.stop()

    async def sweep(self) -> None:
        now = self.clock.seconds()
        reason = f"idle > {format_duration(self.idle_after)}"
        for name in list(self.manager.supervisor.children):
            record = self.manager.state.records.get(name)
            if record is None or now - record.last_access_at <= self.idle_after:
                continue
            try:
                await self.manager.hibernate(name, reason, idle_for=self.idle_after)
            except Exception:
                self._log.failure("could not hibernate a namespace", name=name)
