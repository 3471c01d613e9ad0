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
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from .config import format_duration
from .namespaces import NamespaceManager


@attrs.define(eq=False)
class Hibernator:
    clock: Any
    manager: NamespaceManager
    idle_after: float
    _loop: LoopingCall | None = None
    _sweeping: Deferred[None] | None = None
    _log = Logger()

    @property
    def interval(self) -> float:
        return min(30.0, max(1.0, self.idle_after / 10))

    def start(self) -> None:
        if not self.idle_after:
            return
        loop = LoopingCall(self._sweep_in_background)
        loop.clock = self.clock
        loop.start(self.interval, now=False)
        self._loop = loop

    def stop(self) -> Deferred[None]:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        return succeed(None) if self._sweeping is None else self._sweeping

    def _sweep_in_background(self) -> Deferred[None]:
        self._sweeping = Deferred.fromCoroutine(self.sweep())

        def done(_: object) -> None:
            self._sweeping = None

        self._sweeping.addBoth(done)
        return self._sweeping

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
