"""
Scale to zero: children of namespaces nobody used for
C{TURSO_HIBERNATE_AFTER} are stopped; files and records stay, and the next
request wakes the namespace (a child starts in a few milliseconds).  With
thousands of namespaces on disk, only the busy ones cost a process.  Under
C{TURSO_MAX_RUNNING}, the least recently used idle child is hibernated to
make room for one that must start (L{Hibernator.make_room}).

A L{LoopingCall} looks every tenth of the period (1 s to 30 s); each
namespace is then stopped under its own lock, only if no request is in
flight and it is still idle, so no request ever reaches a child that is
stopping.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from .errors import Unavailable
from .leases import Leases
from .locks import KeyedLocks
from .state import StateStore
from .supervisor import Supervisor
from .sweeps import Sweeper
from .timefmt import format_duration


@attrs.define(eq=False)
class Hibernator:
    clock: IReactorTime
    state: StateStore
    supervisor: Supervisor
    leases: Leases
    locks: KeyedLocks
    #: Idle time after which a child is stopped (0: never).
    idle_after: float = 0.0
    #: Cap on resident children (0: none).
    max_running: int = 0
    hibernations: int = 0
    refused_running: int = 0
    #: With data workers: ask the worker holding a namespace to give it back
    #: now if it has nothing in flight on it (fires with whether it did).
    reclaim: Callable[[str], Deferred[bool]] | None = None
    _sweeper: Sweeper | None = None
    _log = Logger()

    @property
    def interval(self) -> float:
        return min(30.0, max(1.0, self.idle_after / 10))

    def start(self) -> None:
        if self.idle_after:
            self._sweeper = Sweeper(self.clock, self.interval, self.sweep, "hibernation")
            self._sweeper.start()

    def stop(self) -> Deferred[None]:
        """
        Stop sweeping; fires when a sweep under way has finished.
        """
        return succeed(None) if self._sweeper is None else self._sweeper.stop()

    async def sweep(self) -> None:
        now = self.clock.seconds()
        reason = f"idle > {format_duration(self.idle_after)}"
        for child in self.supervisor.children():
            record = self.state.records.get(child.name)
            if record is None or now - record.last_access_at <= self.idle_after:
                continue
            try:
                await self.hibernate(child.name, reason, idle_for=self.idle_after)
            except Exception:
                self._log.failure("could not hibernate namespace {name}", name=child.name)

    def hibernate(self, name: str, reason: str, idle_for: float | None = None) -> Deferred[bool]:
        """
        Stop C{name}'s child, keeping its files and record, unless it is
        serving a request (or, with C{idle_for}, was used more recently than
        that); the next request wakes it.  Fires with whether it stopped.
        """

        async def work() -> bool:
            record = self.state.records.get(name)
            if self.supervisor.running(name) is None or self.leases.busy(name):
                return False
            if idle_for is not None and record is not None and \
                    self.clock.seconds() - record.last_access_at <= idle_for:
                return False
            await self.supervisor.stop(name)
            self.hibernations += 1
            self._log.info("namespace {name} hibernated: {reason}", name=name, reason=reason)
            return True

        return self.locks.run(name, work)

    async def make_room(self, name: str) -> None:
        """
        At C{max_running} resident children (running, starting or still
        stopping), hibernate the least recently used idle one, under its own
        lock, to make room for C{name}.  Only when every resident child is
        serving a request is the request refused.

        @raise Unavailable: when every resident child is busy.
        """
        supervisor = self.supervisor
        tries = 0
        while self.max_running and supervisor.resident(besides=name) >= self.max_running:
            children = supervisor.children()
            stopping = [child.whenEnded() for child in children
                        if child.phase == "stopping" and not child.process.has_ended]
            if stopping:
                # Room is being made already: wait until a child has gone.
                await DeferredList(stopping, fireOnOneCallback=True)
                continue
            idle = [child.name for child in children if child.phase == "running"
                    and child.name != name and not self.leases.busy(child.name)]
            if not idle and self.reclaim is not None:
                # Held by data workers: the least recently used one they are not using.
                held = sorted((child.name for child in children if child.phase == "running"
                               and child.name != name), key=self._last_used)
                for candidate in held:
                    if await self.reclaim(candidate):
                        idle = [candidate]
                        break
            tries += 1
            if not idle or tries > len(children) + 1:
                self.refused_running += 1
                raise Unavailable("too_many_running",
                                  f"TURSO_MAX_RUNNING={self.max_running} namespaces are busy; retry shortly",
                                  retry_after=1)
            victim = min(idle, key=self._last_used)
            await self.hibernate(victim, reason="making room (TURSO_MAX_RUNNING)")

    def _last_used(self, name: str) -> float:
        record = self.state.records.get(name)
        return record.last_access_at if record is not None else 0.0
