"""
Leases: which namespaces have requests in flight, and waiting for them.

A data request (or a backup) holds a L{Lease} on a running child while it
talks to it; hibernation, archive and restore stop a child only once its
leases are back (L{Leases.drained}, bounded by the drain timeout), and never
pick a leased child to hibernate.
"""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType

import attrs
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from .channel import BackendChannel
from .supervisor import Child


@attrs.define(eq=False)
class Lease:
    """
    Permission to send requests to a namespace's running child until
    L{release} (or the end of a C{with} block); the child is not stopped
    while a lease on it is out.
    """

    leases: Leases
    name: str
    child: Child
    #: Called once the lease is back (a claim on the namespace ends with it).
    on_release: Callable[[], None] | None = None
    _released: bool = False

    @property
    def channel(self) -> BackendChannel:
        return self.child.channel

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.leases._release(self.name)
            if self.on_release is not None:
                self.on_release()

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.release()


@attrs.define(eq=False)
class Leases:
    """
    The leases out, per namespace.
    """

    clock: IReactorTime
    drain_timeout: float = 10.0
    #: Told when a drain of a name starts while leases on it are out (the
    #: data workers give back what they hold).
    on_drain: Callable[[str], object] | None = None
    _inflight: dict[str, int] = attrs.field(factory=dict)
    _waiters: dict[str, list[Deferred[None]]] = attrs.field(factory=dict)
    _log = Logger()

    def take(self, child: Child) -> Lease:
        self._inflight[child.name] = self._inflight.get(child.name, 0) + 1
        return Lease(self, child.name, child)

    def _release(self, name: str) -> None:
        count = self._inflight.get(name, 0) - 1
        if count > 0:
            self._inflight[name] = count
            return
        self._inflight.pop(name, None)
        for waiter in self._waiters.pop(name, []):
            if not waiter.called:
                waiter.callback(None)

    def busy(self, name: str) -> bool:
        return bool(self._inflight.get(name))

    def count(self, name: str | None = None) -> int:
        """
        Leases out on C{name}, or on every namespace.
        """
        if name is None:
            return sum(self._inflight.values())
        return self._inflight.get(name, 0)

    def drained(self, name: str) -> Deferred[None]:
        """
        Fire when no lease on C{name} is out, or after the drain timeout.
        """
        done: Deferred[None] = Deferred()
        if not self._inflight.get(name):
            done.callback(None)
            return done

        def give_up() -> None:
            if not done.called:
                self._log.warn("{inflight} requests to namespace {name} still in flight after the "
                               "drain timeout; stopping it anyway",
                               name=name, inflight=self._inflight.get(name, 0))
                done.callback(None)

        timeout = self.clock.callLater(self.drain_timeout, give_up)

        def finished(_: None) -> None:
            if timeout.active():
                timeout.cancel()

        self._waiters.setdefault(name, []).append(done)
        done.addCallback(finished)
        if self.on_drain is not None:
            self.on_drain(name)
        return done

    def all_drained(self) -> Deferred[list[tuple[bool, None]]]:
        """
        Fire when no lease on any namespace is out, or after the drain timeout.
        """
        return DeferredList([self.drained(name) for name in list(self._inflight)])
