"""
The namespace lifecycle: provisioning on a data request, create and
update, each serialized per name (the moves of files out and in are in
L{turso_twisted.archival}).

Every operation on a name runs under that name's lock (L{KeyedLocks}): N
concurrent first requests spawn one child, and a delete never races a
request into files being moved.  A data request holds the lock only while
it makes sure the child runs, then holds a L{Lease} (see
L{turso_twisted.leases}); stopping a child waits (bounded) for its leases.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any, Protocol, TypeVar

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from . import names
from .archive import Archiver
from .errors import LimitReached, NotFound, Unavailable, not_found
from .hibernation import Hibernator
from .leases import Lease, Leases
from .locks import KeyedLocks
from .state import NamespaceRecord, Origin, StateStore
from .supervisor import Child, Supervisor
from .syncproto import HistoryGuard

T = TypeVar("T")


def _make_explicit(record: NamespaceRecord) -> None:
    record.origin = "explicit"
    record.locked = True


class Placer(Protocol):
    """Where a new namespace may live: anywhere on one node; in a cluster, agreed through etcd."""

    def claim(self, name: str, namespace_id: str) -> Deferred[None]:
        """
        Make this node the owner of the new namespace C{name} (of id
        C{namespace_id}), before any file of it is made here.

        @raise turso_twisted.cluster.OwnedElsewhere: if another node owns the name.
        @raise Unavailable: if that cannot be agreed now.
        """

    def release(self, name: str, namespace_id: str) -> None:
        """That namespace is gone from this node (archived): its name is free again."""


class SingleNode:
    """The placer of a daemon that is not part of a cluster: every name is its own."""

    def claim(self, name: str, namespace_id: str) -> Deferred[None]:
        return succeed(None)

    def release(self, name: str, namespace_id: str) -> None:
        pass


@attrs.define(eq=False)
class Admission:
    """
    Whether new work is taken: not while shutting down, no new namespace
    past C{TURSO_MAX_NAMESPACES}, and in a cluster only names this node may
    own (L{placer}).
    """

    state: StateStore
    max_namespaces: int = 0
    #: Set at shutdown: new leases and creates are refused with a 503.
    stopping: bool = False
    placer: Placer = attrs.field(factory=SingleNode)

    def check_open(self) -> None:
        """
        @raise Unavailable: while shutting down.
        """
        if self.stopping:
            raise Unavailable("shutting_down", "turso-server is shutting down; retry shortly",
                              retry_after=5)

    def check_capacity(self) -> None:
        """
        @raise LimitReached: at C{max_namespaces} live namespaces.
        """
        if self.max_namespaces and len(self.state.records) >= self.max_namespaces:
            raise LimitReached(
                "namespace_limit",
                f"TURSO_MAX_NAMESPACES={self.max_namespaces} live namespaces reached; "
                "delete one or raise the limit")


@attrs.define(eq=False)
class NamespaceManager:
    clock: IReactorTime
    state: StateStore
    supervisor: Supervisor
    archiver: Archiver
    guard: HistoryGuard
    leases: Leases
    locks: KeyedLocks
    hibernator: Hibernator
    admission: Admission
    allow_auto_provision: bool
    #: With data workers: hold a name for this process's own use of its
    #: child; the result gives it back.
    claim: Callable[[str], Deferred[Callable[[], None]]] | None = None
    #: With data workers: fires once they have taken the last state change.
    changed: Callable[[], Deferred[None]] | None = None
    _log = Logger()

    # -- queries -----------------------------------------------------------------

    def get(self, name: str) -> NamespaceRecord | None:
        return self.state.records.get(name)

    def __iter__(self) -> Iterator[NamespaceRecord]:
        return iter(self.state)

    # -- data path ---------------------------------------------------------------

    def lease(self, name: str, data_request: bool = True) -> Deferred[Lease]:
        """
        Make sure C{name} exists and its child runs; fire with a lease on
        that child.  A data request may auto-provision the name and counts
        as an access; an admin task (a backup, say) does neither.
        """
        names.validate(name)
        if not data_request and self.claim is not None:
            return self._claimed_lease(name, self.claim)
        return self._lease(name, data_request)

    def _lease(self, name: str, data_request: bool) -> Deferred[Lease]:
        fast = self._lease_now(name, data_request)
        if fast is not None:
            return succeed(fast)

        async def work() -> Lease:
            self.admission.check_open()
            new = None
            if name not in self.state.records:
                if not (data_request and self.allow_auto_provision):
                    raise NotFound("namespace_not_found",
                                   f"namespace {name!r} does not exist"
                                   + (" and auto-provisioning is off" if data_request else ""))
                self.admission.check_capacity()
                new = self._new_record(name, "auto")
            child = await self._running_child(name, new)
            return self.leases.take(child)

        def touched(lease: Lease) -> Lease:
            if data_request:
                self.state.touch(name)
            return lease

        return self.locks.run(name, work).addCallback(touched)

    def _claimed_lease(self, name: str,
                       claim: Callable[[str], Deferred[Callable[[], None]]]) -> Deferred[Lease]:
        """An admin task's lease, with the data workers kept off the child until it is back."""

        async def work() -> Lease:
            give_back = await claim(name)
            try:
                lease = await self._lease(name, data_request=False)
            except BaseException:
                give_back()
                raise

            def released() -> None:
                # This process's spare connection goes before the data
                # workers come back: theirs would wait behind it.
                lease.child.channel.drop_spare().addBoth(lambda _: give_back())

            lease.on_release = released
            return lease

        return Deferred.fromCoroutine(work())

    def _lease_now(self, name: str, data_request: bool) -> Lease | None:
        """
        The common case without a lock round trip: the namespace exists,
        its child runs, and no operation on it is under way (everything
        here is synchronous on the reactor thread, so nothing can come in
        between).
        """
        if self.admission.stopping or self.locks.is_locked(name) or name not in self.state.records:
            return None
        child = self.supervisor.running(name)
        if child is None:
            return None
        if data_request:
            self.state.touch(name)
        return self.leases.take(child)

    async def _running_child(self, name: str, new: NamespaceRecord | None = None) -> Child:
        """
        The running child of C{name}, started if need be.  A namespace that
        has run before must still have its data file: one that vanished is
        refused, never started empty over.

        A C{new} namespace is placed (in a cluster) and recorded before its
        child starts; one that cannot start is removed again, with the
        empty files its child made, so that a failure leaves nothing behind.
        """
        child = self.supervisor.running(name)
        if child is not None:
            return child
        db_path = names.db_path(self.archiver.data_dir, name)
        if new is None and not os.path.exists(db_path):
            self._log.error("the data file of namespace {name} is missing; refusing to start it empty",
                            name=name, path=db_path)
            raise Unavailable("namespace_data_missing",
                              f"namespace {name!r}: its data file is missing from the data dir; "
                              "restore it, or delete the namespace")
        files = names.data_files(self.archiver.data_dir, name)
        new_files = [p for p in files if not os.path.exists(p)]
        recorded = claimed = False

        def record(new: NamespaceRecord) -> None:
            nonlocal recorded
            self.state.records[name] = new
            try:
                self.state.save()
            except BaseException:
                del self.state.records[name]
                raise
            recorded = True
            self._log.info("namespace {name} created ({origin})", name=name, origin=new.origin, id=new.id)

        try:
            if new is not None and len(new_files) < len(files):
                self._log.error("files of the new namespace {name} are already in the data dir; "
                                "refusing to start it over them", name=name)
                new_files = []
                raise Unavailable("namespace_files_present",
                                  f"namespace {name!r}: files of that name are already in the data dir "
                                  "(left by a crash or by hand); move them away")
            if new is not None:
                await self.admission.placer.claim(name, new.id)
                claimed = True
                record(new)
            await self.hibernator.make_room(name)
            return await self.supervisor.start(name)
        except BaseException:
            if new is not None:
                if recorded:
                    self.state.records.pop(name, None)
                    self.state.save()
                for path in new_files:
                    if os.path.exists(path) and os.path.getsize(path) == 0:
                        os.unlink(path)
                if claimed:
                    self.admission.placer.release(name, new.id)
            raise

    # -- admin operations ----------------------------------------------------------

    def _new_record(self, name: str, origin: Origin) -> NamespaceRecord:
        """A record for a new C{name}, not yet in the state (L{_running_child} puts it there)."""
        record = NamespaceRecord.new(name, origin, self.clock.seconds())
        # Replicas of earlier incarnations of the name must not push here.
        record.retired = self.guard.retired(name)
        return record

    def create(self, name: str) -> Deferred[tuple[NamespaceRecord, bool]]:
        """
        Create C{name} as an explicit namespace and start it.  An existing
        explicit one is returned as it is; an auto-provisioned one becomes
        explicit and locked (the operator wants to keep it).  Fires with
        (record, created).
        """
        names.validate(name)

        async def work() -> tuple[NamespaceRecord, bool]:
            self.admission.check_open()
            existing = self.state.records.get(name)
            if existing is not None:
                if existing.origin == "auto":
                    self._change(existing, _make_explicit)
                    self._log.info("namespace {name} made explicit", name=name, id=existing.id)
                return existing, False
            self.admission.check_capacity()
            record = self._new_record(name, "explicit")
            await self._running_child(name, record)
            return record, True

        return self.locks.run(name, work)

    def update(self, name: str, change: Callable[[NamespaceRecord], None]) -> Deferred[NamespaceRecord]:
        """
        Apply C{change} to C{name}'s record and save it.
        """
        names.validate(name)

        async def work() -> NamespaceRecord:
            record = self.state.records.get(name)
            if record is None:
                raise not_found(name)
            self._change(record, change)
            if self.changed is not None:
                # Data workers act on what changed (a revocation, say) before this returns.
                await self.changed()
            return record

        return self.locks.run(name, work)

    def configure(self, name: str, changes: dict[str, Any]) -> Deferred[NamespaceRecord]:
        """
        Apply config C{changes} (see L{NamespaceConfig.updated}) to C{name}
        and save.  A C{tokens_not_before} is kept for the name as well, so
        that a revocation outlives a delete and a re-creation.

        @raise ValueError: for a bad change (nothing is changed: the new
            config is made before anything is assigned).
        """

        def apply(live: NamespaceRecord) -> None:
            live.config = live.config.updated(changes)
            if "tokens_not_before" in changes:
                floors = self.state.token_floors
                if live.config.tokens_not_before is None:
                    floors.pop(name, None)
                else:
                    floors[name] = live.config.tokens_not_before

        return self.update(name, apply)

    def record_access(self, name: str) -> Deferred[NamespaceRecord]:
        """
        Note an access now, as a data request would, and save it.
        """
        now = self.clock.seconds()
        return self.update(name, lambda record: setattr(record, "last_access_at", now))

    def _change(self, record: NamespaceRecord, change: Callable[[NamespaceRecord], None]) -> None:
        """
        Apply C{change} and save; if saving fails, memory goes back to what
        the disk says, so the two never disagree.
        """
        before = attrs.evolve(record)
        change(record)
        try:
            self.state.save()
        except BaseException:
            for field in attrs.fields(NamespaceRecord):
                setattr(record, field.name, getattr(before, field.name))
            raise

    # -- shutdown ----------------------------------------------------------------

    def stop_all(self) -> Deferred[None]:
        """
        Refuse new work, wait (bounded) for requests in flight, stop every child.
        """
        self.admission.stopping = True

        async def stop() -> None:
            await self.leases.all_drained()
            await self.supervisor.stop_all()

        return Deferred.fromCoroutine(stop())
