"""
Every move of a namespace's file set out of the data dir and back, under
the name's lock: archive (delete, the GC), unarchive, and putting a
database built elsewhere in place of a namespace's files (a restore) or as
a new namespace (a fork).

Each move is announced in the state before a file moves and settled after
(see L{turso_twisted.recovery} for what start-up does with a move a crash
interrupted); a child is stopped only once its leases are back.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from . import names
from .archive import ArchiveEntry, Archiver, record_from_manifest
from .errors import Conflict, not_found
from .files import fsync_directory, move_no_clobber
from .leases import Leases
from .locks import KeyedLocks
from .namespaces import Admission
from .state import NamespaceRecord, StateStore, new_history
from .supervisor import Supervisor
from .syncproto import HistoryGuard


def _move_files_in(build_dir: str, data_dir: str, name: str) -> None:
    """
    Move a built database's files into the data dir, never over a file,
    the main file last: where it is, the whole set is.
    """
    for source in reversed(names.data_files(build_dir, name)):
        if os.path.exists(source):
            move_no_clobber(source, os.path.join(data_dir, os.path.basename(source)))
    fsync_directory(data_dir)


@attrs.define(eq=False)
class Archival:
    clock: IReactorTime
    state: StateStore
    supervisor: Supervisor
    archiver: Archiver
    guard: HistoryGuard
    leases: Leases
    locks: KeyedLocks
    admission: Admission
    _log = Logger()

    def entries(self, name: str | None = None) -> Deferred[list[ArchiveEntry]]:
        """
        Complete archive entries (of C{name}), oldest first, read in a thread.
        """
        return self.archiver.list_entries(name)

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
            self.admission.placer.release(name, record.id)
            return manifest

        return self.locks.run(name, work)

    # -- moves between cluster nodes (see turso_twisted.moves) ---------------------------

    def move_out(self, name: str, namespace_id: str, hand_over: Callable[[NamespaceRecord, list[str]],
                                                                          Awaitable[str]],
                 ) -> Deferred[dict[str, Any]]:
        """
        Move C{name} to another node: under its lock, with its child
        stopped once nothing is in flight, C{hand_over} gets the record and
        its files and fires with the node that owns the name now (the
        copy there is complete and the cluster says so); this node's copy
        then goes to the archive.  Its replicas stay good: they sync with
        the copy there.  If C{hand_over} fails, nothing here changed.
        """

        async def work() -> dict[str, Any]:
            record = self.state.records.get(name)
            if record is None or record.id != namespace_id:
                raise not_found(name)
            await self.leases.drained(name)
            await self.supervisor.stop(name)
            files = [path for path in names.data_files(self.archiver.data_dir, name) if os.path.exists(path)]
            node = await hand_over(record, files)
            manifest = await self._move_to_archive(record, f"moved to cluster node {node}")
            del self.state.records[name]
            self.state.save()
            return manifest

        return self.locks.run(name, work)

    def move_in(self, record: NamespaceRecord, build_dir: str) -> Deferred[None]:
        """
        Put a namespace moving here from another node in place, files and
        record (marked L{NamespaceRecord.moving_in}: not served until the
        cluster names this node its owner).  An earlier incoming copy of
        the name that never became this node's is replaced; a live one is not.
        """
        name = record.name

        async def work() -> None:
            existing = self.state.records.get(name)
            if existing is not None:
                if not existing.moving_in:
                    raise Conflict("namespace_exists", f"namespace {name!r} is live on this node")
                await self._drop(existing, "an incoming move that did not complete")
            record.moving_in = True
            await self.archiver.run_in_thread(_move_files_in, build_dir, self.archiver.data_dir, name)
            # Files first, then the record: a crash in between leaves files no
            # record owns (quarantined at start-up), and the move was not
            # acknowledged, so the source still owns the name.
            self.state.records[name] = record
            self.state.save()

        return self.locks.run(name, work)

    def drop_incoming(self, name: str, namespace_id: str, reason: str) -> Deferred[None]:
        """Set aside an incoming copy of C{name} that is not to be served here (into the archive)."""

        async def work() -> None:
            record = self.state.records.get(name)
            if record is not None and record.moving_in and record.id == namespace_id:
                await self._drop(record, reason)

        return self.locks.run(name, work)

    def drop_moved_away(self, name: str, namespace_id: str, node: str) -> Deferred[None]:
        """This node's copy of a namespace another node owns now (a move a crash interrupted): archived."""

        async def work() -> None:
            record = self.state.records.get(name)
            if record is not None and not record.moving_in and record.id == namespace_id:
                await self.leases.drained(name)
                await self.supervisor.stop(name)
                await self._drop(record, f"moved to cluster node {node}")

        return self.locks.run(name, work)

    async def _drop(self, record: NamespaceRecord, reason: str) -> None:
        await self._move_to_archive(record, reason)
        del self.state.records[record.name]
        self.state.save()

    async def _move_to_archive(self, record: NamespaceRecord, reason: str) -> dict[str, Any]:
        """
        Move a stopped namespace's files into a new archive entry, having
        first saved that intent (see L{turso_twisted.recovery}).
        """
        now = self.clock.seconds()
        record.archiving = self.archiver.new_entry_name(record.name, now)
        try:
            self.state.save()
        except BaseException:
            record.archiving = None
            raise
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
            self.admission.check_capacity()
            entry = self.archiver.find(name, archived_at)
            namespace_id = (entry.manifest or {}).get("id")
            if isinstance(namespace_id, str):
                # The name is this node's before a file moves back (in a cluster);
                # a manifest without an id is refused by the unarchive itself.
                await self.admission.placer.claim(name, namespace_id)
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
            self.admission.check_open()
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
            self.admission.check_open()
            if name in self.state.records:
                raise Conflict("namespace_exists", f"namespace {name!r} exists already")
            return await self._install(name, build_dir, set(), None, reason)

        return self.locks.run(name, work)

    async def _install(self, name: str, build_dir: str, retired: set[str], namespace_id: str | None,
                       reason: str) -> NamespaceRecord:
        self.admission.check_capacity()
        # The record first, marked as installing: a crash before the files
        # are in leaves a record that start-up drops, never files without
        # a record (which start-up quarantines).
        record = NamespaceRecord.new(name, "explicit", self.clock.seconds())
        if namespace_id:
            record.id = namespace_id
        record.retired = self.guard.retired(name) | retired
        await self.admission.placer.claim(name, record.id)
        record.installing = True
        self.state.records[name] = record
        self.state.save()
        try:
            await self.archiver.run_in_thread(_move_files_in, build_dir, self.archiver.data_dir, name)
        except BaseException:
            del self.state.records[name]
            self.state.save()
            raise
        record.installing = False
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
