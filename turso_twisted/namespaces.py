"""
The namespace lifecycle: provisioning on a data request, and the admin
operations (create, archive, unarchive, replace files, install, update),
each serialized per name.

Every operation on a name runs under that name's lock (L{KeyedLocks}): N
concurrent first requests spawn one child, and a delete never races a
request into files being moved.  A data request holds the lock only while
it makes sure the child runs, then holds a L{Lease} (see
L{turso_twisted.leases}); stopping a child waits (bounded) for its leases.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from . import names
from .archive import ArchiveEntry, Archiver, record_from_manifest
from .errors import Conflict, LimitReached, NotFound, Unavailable, not_found
from .files import fsync_directory, move_no_clobber
from .hibernation import Hibernator
from .leases import Lease, Leases
from .locks import KeyedLocks
from .state import NamespaceRecord, Origin, StateStore, new_history
from .supervisor import Child, Supervisor
from .syncproto import HistoryGuard

T = TypeVar("T")


def _move_files_in(build_dir: str, data_dir: str, name: str) -> None:
    """
    Move a built database's files into the data dir, never over a file,
    the main file last: where it is, the whole set is.
    """
    for source in reversed(names.data_files(build_dir, name)):
        if os.path.exists(source):
            move_no_clobber(source, os.path.join(data_dir, os.path.basename(source)))
    fsync_directory(data_dir)


def _make_explicit(record: NamespaceRecord) -> None:
    record.origin = "explicit"
    record.locked = True


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
    max_namespaces: int
    allow_auto_provision: bool
    #: Set at shutdown: new leases and creates are refused with a 503.
    stopping: bool = False
    _log = Logger()

    # -- queries -----------------------------------------------------------------

    def get(self, name: str) -> NamespaceRecord | None:
        return self.state.records.get(name)

    def __iter__(self) -> Iterator[NamespaceRecord]:
        return iter(self.state)

    def archive_entries(self, name: str | None = None) -> Deferred[list[ArchiveEntry]]:
        """
        Complete archive entries (of C{name}), oldest first, read in a thread.
        """
        return self.archiver.list_entries(name)

    # -- data path ---------------------------------------------------------------

    def lease(self, name: str, data_request: bool = True) -> Deferred[Lease]:
        """
        Make sure C{name} exists and its child runs; fire with a lease on
        that child.  A data request may auto-provision the name and counts
        as an access; an admin task (a backup, say) does neither.
        """
        names.validate(name)
        fast = self._lease_now(name, data_request)
        if fast is not None:
            return succeed(fast)

        async def work() -> Lease:
            self._check_open()
            record = self.state.records.get(name)
            created = False
            if record is None:
                if not (data_request and self.allow_auto_provision):
                    raise NotFound("namespace_not_found",
                                   f"namespace {name!r} does not exist"
                                   + (" and auto-provisioning is off" if data_request else ""))
                self._check_capacity()
                record = self._add(name, "auto")
                created = True
            child = await self._running_child(name, created)
            return self.leases.take(child)

        def touched(lease: Lease) -> Lease:
            if data_request:
                self.state.touch(name)
            return lease

        return self.locks.run(name, work).addCallback(touched)

    def _lease_now(self, name: str, data_request: bool) -> Lease | None:
        """
        The common case without a lock round trip: the namespace exists,
        its child runs, and no operation on it is under way (everything
        here is synchronous on the reactor thread, so nothing can come in
        between).
        """
        if self.stopping or self.locks.is_locked(name) or name not in self.state.records:
            return None
        child = self.supervisor.running(name)
        if child is None:
            return None
        if data_request:
            self.state.touch(name)
        return self.leases.take(child)

    async def _running_child(self, name: str, created: bool) -> Child:
        """
        The running child of C{name}, started if need be.  A namespace that
        has run before must still have its data file: one that vanished is
        refused, never started empty over.  A namespace created just now
        that cannot start is removed again, with the empty files its child
        made, so that a failure leaves nothing behind.
        """
        child = self.supervisor.running(name)
        if child is not None:
            return child
        db_path = names.db_path(self.archiver.data_dir, name)
        if not created and not os.path.exists(db_path):
            self._log.error("the data file of namespace {name} is missing; refusing to start it empty",
                            name=name, path=db_path)
            raise Unavailable("namespace_data_missing",
                              f"namespace {name!r}: its data file is missing from the data dir; "
                              "restore it, or delete the namespace")
        files = names.data_files(self.archiver.data_dir, name)
        new_files = [p for p in files if not os.path.exists(p)]
        try:
            if created and len(new_files) < len(files):
                self._log.error("files of the new namespace {name} are already in the data dir; "
                                "refusing to start it over them", name=name)
                new_files = []
                raise Unavailable("namespace_files_present",
                                  f"namespace {name!r}: files of that name are already in the data dir "
                                  "(left by a crash or by hand); move them away")
            await self.hibernator.make_room(name)
            return await self.supervisor.start(name)
        except BaseException:
            if created:
                self.state.records.pop(name, None)
                self.state.save()
                for path in new_files:
                    if os.path.exists(path) and os.path.getsize(path) == 0:
                        os.unlink(path)
            raise

    def _check_open(self) -> None:
        if self.stopping:
            raise Unavailable("shutting_down", "turso-server is shutting down; retry shortly",
                              retry_after=5)

    def _check_capacity(self) -> None:
        if self.max_namespaces and len(self.state.records) >= self.max_namespaces:
            raise LimitReached(
                "namespace_limit",
                f"TURSO_MAX_NAMESPACES={self.max_namespaces} live namespaces reached; "
                "delete one or raise the limit")

    # -- admin operations ----------------------------------------------------------

    def _add(self, name: str, origin: Origin) -> NamespaceRecord:
        record = NamespaceRecord.new(name, origin, self.clock.seconds())
        # Replicas of earlier incarnations of the name must not push here.
        record.retired = self.guard.retired(name)
        self.state.records[name] = record
        try:
            self.state.save()
        except BaseException:
            del self.state.records[name]
            raise
        self._log.info("namespace {name} created ({origin})", name=name, origin=origin, id=record.id)
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
            self._check_open()
            existing = self.state.records.get(name)
            if existing is not None:
                if existing.origin == "auto":
                    self._change(existing, _make_explicit)
                    self._log.info("namespace {name} made explicit", name=name, id=existing.id)
                return existing, False
            self._check_capacity()
            record = self._add(name, "explicit")
            await self._running_child(name, created=True)
            return record, True

        return self.locks.run(name, work)

    def delete(self, name: str) -> Deferred[dict[str, Any]]:
        """
        Stop C{name} and move its files into the archive; fires with the
        archive manifest.
        """

        def found(manifest: dict[str, Any] | None) -> dict[str, Any]:
            if manifest is None:
                raise not_found(name)
            return manifest

        return self.archive(name, "deleted via admin API").addCallback(found)

    def archive(self, name: str, reason: str,
                still: Callable[[NamespaceRecord, float], bool] | None = None,
                ) -> Deferred[dict[str, Any] | None]:
        """
        Stop C{name} and move its files into the archive; fires with the
        manifest, or C{None} if C{name} is not live or C{still} (checked
        again under the lock, so a request that came in meanwhile counts)
        says no.
        """
        names.validate(name)

        async def work() -> dict[str, Any] | None:
            record = self.state.records.get(name)
            if record is None or (still is not None and not still(record, self.clock.seconds())):
                return None
            await self.leases.drained(name)
            await self.supervisor.stop(name)
            manifest = await self._move_to_archive(record, reason)
            del self.state.records[name]
            self.guard.retire(name, record.clients | record.retired)
            self.state.save()
            return manifest

        return self.locks.run(name, work)

    async def _move_to_archive(self, record: NamespaceRecord, reason: str) -> dict[str, Any]:
        """
        Move a stopped namespace's files into a new archive entry, having
        first saved that intent (see L{turso_twisted.recovery}).
        """
        now = self.clock.seconds()
        record.archiving = self.archiver.new_entry_name(record.name, now)
        self.state.save()
        manifest = await self.archiver.archive(record, reason, now, record.archiving)
        self._log.info("namespace {name} archived into {entry}: {reason}", name=record.name, id=record.id,
                       entry=manifest["entry"], reason=reason)
        return manifest

    def unarchive(self, name: str, archived_at: str | None = None,
                  locked: bool = True) -> Deferred[NamespaceRecord]:
        """
        Bring back C{name}'s newest archive entry (or the one archived at
        C{archived_at}) after checking its manifest and checksums.  The
        namespace keeps its id, origin, creation time and ttl.
        """
        names.validate(name)

        async def work() -> NamespaceRecord:
            if name in self.state.records:
                raise Conflict("namespace_exists",
                               f"namespace {name!r} is live; delete it before unarchiving")
            self._check_capacity()
            entry = self.archiver.find(name, archived_at)
            manifest = await self.archiver.unarchive(entry)
            record = record_from_manifest(manifest, locked, self.clock.seconds())
            # The files come back with their history: their replicas are
            # good again, every other replica of the name is not.
            record.retired = (self.guard.retired(name) | record.retired) - record.clients
            self.state.records[name] = record
            self.state.save()
            await self.archiver.finish_unarchive(entry)
            self._log.info("namespace {name} unarchived from {entry}", name=name, id=record.id,
                           entry=entry.entry)
            return record

        return self.locks.run(name, work)

    def replace_files(self, name: str, build_dir: str, retired: set[str], namespace_id: str | None,
                      reason: str) -> Deferred[NamespaceRecord]:
        """
        Swap C{name}'s files for the database built in C{build_dir} (a
        restore).  The current files go to the archive; the namespace keeps
        its id, origin, lock and ttl and gets a new history, so every
        replica of the old data is refused.  A name that is not live is
        created (explicit, locked).
        """
        names.validate(name)

        async def work() -> NamespaceRecord:
            self._check_open()
            record = self.state.records.get(name)
            if record is None:
                return await self._install(name, build_dir, retired, namespace_id, reason)
            await self.leases.drained(name)
            await self.supervisor.stop(name)
            old_replicas = record.clients | record.retired
            # The new history is saved before any file moves: a crash can
            # never pair the old replicas with the new data.
            record.history = new_history()
            record.clients = set()
            record.retired = self.guard.retired(name) | old_replicas | retired
            record.last_access_at = self.clock.seconds()
            if any(os.path.exists(p) for p in names.data_files(self.archiver.data_dir, name)):
                await self._move_to_archive(record, reason)
            self.guard.retire(name, old_replicas)
            await self.archiver.run_in_thread(_move_files_in, build_dir, self.archiver.data_dir, name)
            record.archiving = None
            self.state.save()
            return record

        return self.locks.run(name, work)

    def install_new(self, name: str, build_dir: str, reason: str) -> Deferred[NamespaceRecord]:
        """
        Make C{name} a new explicit namespace from the database built in
        C{build_dir} (a fork).

        @raise Conflict: if it exists.
        """
        names.validate(name)

        async def work() -> NamespaceRecord:
            self._check_open()
            if name in self.state.records:
                raise Conflict("namespace_exists", f"namespace {name!r} exists already")
            return await self._install(name, build_dir, set(), None, reason)

        return self.locks.run(name, work)

    async def _install(self, name: str, build_dir: str, retired: set[str], namespace_id: str | None,
                       reason: str) -> NamespaceRecord:
        self._check_capacity()
        # Files first: a crash before the state is saved leaves files that
        # the next start adopts (explicit, locked, a new history).
        await self.archiver.run_in_thread(_move_files_in, build_dir, self.archiver.data_dir, name)
        record = NamespaceRecord.new(name, "explicit", self.clock.seconds())
        if namespace_id:
            record.id = namespace_id
        record.retired = self.guard.retired(name) | retired
        self.state.records[name] = record
        self.state.save()
        self._log.info("namespace {name} created (explicit): {reason}", name=name, origin="explicit",
                       id=record.id, reason=reason)
        return record

    def remove_archive_entry(self, entry: ArchiveEntry) -> Deferred[None]:
        """
        Delete one archive entry for good, under its namespace's lock.
        """

        async def work() -> None:
            await self.archiver.remove(entry)

        return self.locks.run(entry.name, work)

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
            return record

        return self.locks.run(name, work)

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
        self.stopping = True

        async def stop() -> None:
            await self.leases.all_drained()
            await self.supervisor.stop_all()

        return Deferred.fromCoroutine(stop())
