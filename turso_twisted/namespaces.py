"""
The namespace lifecycle: provisioning, leases for data requests, and the
admin operations, each serialized per name.

Every operation on a name runs under that name's L{DeferredLock}: N
concurrent first requests spawn one child, and a delete never races a
request into files being moved.  A data request holds the lock only while
it makes sure the child runs, then holds a L{Lease}; stopping a child waits
(bounded) for the leases on it to be returned.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import attrs
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.logger import Logger

from . import names
from .archive import ArchiveEntry, Archiver, move_no_clobber
from .config import parse_duration
from .errors import ApiError, not_found
from .locks import KeyedLocks
from .process import TursodbProcess
from .state import NamespaceRecord, Origin, StateStore, fsync_directory, new_history
from .supervisor import Supervisor
from .timefmt import from_rfc3339

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


def _observe(ended: Deferred[Any]) -> Deferred[None]:
    """
    A Deferred that fires when C{ended} does, leaving C{ended}'s own chain
    as it is.
    """
    seen: Deferred[None] = Deferred()

    def fire(result: object) -> object:
        if not seen.called:
            seen.callback(None)
        return result

    ended.addBoth(fire)
    return seen


def _rss_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _make_explicit(record: NamespaceRecord) -> None:
    record.origin = "explicit"
    record.locked = True


def _found(manifest: dict[str, Any] | None, name: str) -> dict[str, Any]:
    if manifest is None:
        raise not_found(name)
    return manifest


class LimitReached(ApiError):
    pass


@attrs.define(eq=False)
class Lease:
    """
    Permission to send requests to a namespace's running child until
    L{release}; the child is not stopped while a lease on it is out.
    """

    manager: NamespaceManager
    name: str
    child: TursodbProcess
    _released: bool = False

    @property
    def port(self) -> int:
        return self.child.port

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.manager._release(self.name)


@attrs.define(eq=False)
class NamespaceManager:
    clock: Any
    state: StateStore
    supervisor: Supervisor
    archiver: Archiver
    max_namespaces: int
    allow_auto_provision: bool
    drain_timeout: float = 10.0
    #: Set at shutdown: new leases and creates are refused with a 503.
    stopping: bool = False
    #: Cap on resident children (0: none); see L{_make_room}.
    max_running: int = 0
    hibernations: int = 0
    refused_running: int = 0
    #: name -> [requests, bytes in, bytes out] since the daemon started.
    usage: dict[str, list[int]] = attrs.field(factory=dict)
    _locks: KeyedLocks = attrs.field(factory=KeyedLocks)
    _inflight: dict[str, int] = attrs.field(factory=dict)
    _drain_waiters: dict[str, list[Deferred[None]]] = attrs.field(factory=dict)
    _log = Logger()

    # -- serialization ----------------------------------------------------

    def _locked(self, name: str, work: Callable[[], Awaitable[T]]) -> Deferred[T]:
        """
        Run C{work} holding C{name}'s lock.
        """
        return self._locks.run(name, work)

    def _check_capacity(self, status: int) -> None:
        if self.max_namespaces and len(self.state.records) >= self.max_namespaces:
            raise LimitReached(
                status, "namespace_limit",
                f"TURSO_MAX_NAMESPACES={self.max_namespaces} live namespaces reached; "
                "delete one or raise the limit")

    # -- data path ----------------------------------------------------------

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
                    raise ApiError(404, "namespace_not_found",
                                   f"namespace {name!r} does not exist"
                                   + (" and auto-provisioning is off" if data_request else ""))
                self._check_capacity(503)
                record = self._add(name, "auto")
                created = True
            child = await self._running_child(name, created)
            self._inflight[name] = self._inflight.get(name, 0) + 1
            return Lease(self, name, child)

        def touched(lease: Lease) -> Lease:
            if data_request:
                self.state.touch(name)
            return lease

        return self._locked(name, work).addCallback(touched)

    def _lease_now(self, name: str, data_request: bool) -> Lease | None:
        """
        The common case without a lock round trip: the namespace exists,
        its child runs, and no operation on it is under way (everything
        here is synchronous on the reactor thread, so nothing can come in
        between).
        """
        if self.stopping or self._locks.is_locked(name) or name not in self.state.records:
            return None
        child = self.supervisor.running(name)
        if child is None:
            return None
        self._inflight[name] = self._inflight.get(name, 0) + 1
        if data_request:
            self.state.touch(name)
        return Lease(self, name, child)

    async def _running_child(self, name: str, created: bool) -> TursodbProcess:
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
            self._log.error("namespace data file is missing; refusing to start it empty",
                            name=name, path=db_path)
            raise ApiError(503, "namespace_data_missing",
                           f"namespace {name!r}: its data file is missing from the data dir; "
                           "restore it, or delete the namespace")
        files = names.data_files(self.archiver.data_dir, name)
        new_files = [p for p in files if not os.path.exists(p)]
        try:
            if created and len(new_files) < len(files):
                self._log.error("files of a new namespace are already in the data dir; refusing to "
                                "start it over them", name=name)
                new_files = []
                raise ApiError(503, "namespace_files_present",
                               f"namespace {name!r}: files of that name are already in the data dir "
                               "(left by a crash or by hand); move them away")
            await self._make_room(name)
            return await self.supervisor.start(name)
        except BaseException:
            if created:
                self.state.records.pop(name, None)
                self.state.save()
                for path in new_files:
                    if os.path.exists(path) and os.path.getsize(path) == 0:
                        os.unlink(path)
            raise

    async def _make_room(self, name: str) -> None:
        """
        At C{max_running} resident children (running, starting or still
        stopping), hibernate the least recently used idle one, under its own
        lock, to make room for C{name}.  Only when every resident child is
        serving a request is the request refused.
        """
        supervisor = self.supervisor
        tries = 0
        while self.max_running and supervisor.resident(besides=name) >= self.max_running:
            stopping = [child.ended for other, child in supervisor.children.items()
                        if other in supervisor.stopping_names]
            if stopping:
                # Room is being made already: wait until a child has gone.
                await DeferredList([_observe(ended) for ended in stopping], fireOnOneCallback=True)
                continue
            idle = [other for other in supervisor.children
                    if other != name and not self._inflight.get(other)]
            tries += 1
            if not idle or tries > len(supervisor.children) + 1:
                self.refused_running += 1
                raise ApiError(503, "too_many_running",
                               f"TURSO_MAX_RUNNING={self.max_running} namespaces are busy; retry shortly",
                               retry_after=1)
            victim = min(idle, key=self._last_used)
            await self.hibernate(victim, reason="making room (TURSO_MAX_RUNNING)")

    def _last_used(self, name: str) -> float:
        record = self.state.records.get(name)
        return record.last_access_at if record is not None else 0.0

    def hibernate(self, name: str, reason: str, idle_for: float | None = None) -> Deferred[bool]:
        """
        Stop C{name}'s child, keeping its files and record, unless it is
        serving a request (or, with C{idle_for}, was used more recently than
        that); the next request wakes it.  Fires with whether it stopped.
        """

        async def work() -> bool:
            record = self.state.records.get(name)
            if self.supervisor.running(name) is None or self._inflight.get(name):
                return False
            if idle_for is not None and record is not None and \
                    self.clock.seconds() - record.last_access_at <= idle_for:
                return False
            await self.supervisor.stop(name)
            self.hibernations += 1
            self._log.info("namespace hibernated", name=name, reason=reason)
            return True

        return self._locked(name, work)

    def _check_open(self) -> None:
        if self.stopping:
            raise ApiError(503, "shutting_down", "turso-server is shutting down; retry shortly",
                           retry_after=5)

    def _release(self, name: str) -> None:
        count = self._inflight.get(name, 0) - 1
        if count > 0:
            self._inflight[name] = count
            return
        self._inflight.pop(name, None)
        for waiter in self._drain_waiters.pop(name, []):
            if not waiter.called:
                waiter.callback(None)

    def inflight(self, name: str | None = None) -> int:
        if name is None:
            return sum(self._inflight.values())
        return self._inflight.get(name, 0)

    def _drained(self, name: str) -> Deferred[None]:
        """
        Fire when no lease on C{name} is out, or after the drain timeout.
        """
        done: Deferred[None] = Deferred()
        if not self._inflight.get(name):
            done.callback(None)
            return done

        def give_up() -> None:
            if not done.called:
                self._log.warn("requests still in flight after the drain timeout; stopping anyway",
                               name=name, inflight=self._inflight.get(name, 0))
                done.callback(None)

        timeout = self.clock.callLater(self.drain_timeout, give_up)

        def finished(_: None) -> None:
            if timeout.active():
                timeout.cancel()

        self._drain_waiters.setdefault(name, []).append(done)
        done.addCallback(finished)
        return done

    # -- admin operations --------------------------------------------------

    def _add(self, name: str, origin: Origin) -> NamespaceRecord:
        record = NamespaceRecord.new(name, origin, self.clock.seconds())
        # Replicas of earlier incarnations of the name must not push here.
        record.retired = set(self.state.tombstones.get(name, ()))
        self.state.records[name] = record
        try:
            self.state.save()
        except BaseException:
            del self.state.records[name]
            raise
        self._log.info("namespace created", name=name, origin=origin, id=record.id)
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
                    self._log.info("namespace made explicit", name=name, id=existing.id)
                return existing, False
            self._check_capacity(409)
            record = self._add(name, "explicit")
            await self._running_child(name, created=True)
            return record, True

        return self._locked(name, work)

    def delete(self, name: str) -> Deferred[dict[str, Any]]:
        """
        Stop C{name} and move its files into the archive; fires with the
        archive manifest.
        """
        return self.archive(name, "deleted via admin API").addCallback(_found, name)

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
            await self._drained(name)
            await self.supervisor.stop(name)
            manifest = await self._archive_files(record, reason)
            del self.state.records[name]
            self._tombstone(name, record.clients | record.retired)
            self.state.save()
            return manifest

        return self._locked(name, work)

    async def _archive_files(self, record: NamespaceRecord, reason: str) -> dict[str, Any]:
        """
        Move a stopped namespace's files into a new archive entry, having
        first saved that intent (see L{Archiver.recover}).
        """
        now = self.clock.seconds()
        record.archiving = self.archiver.new_entry_name(record.name, now)
        self.state.save()
        manifest = await self.archiver.archive(record, reason, now, record.archiving)
        self._log.info("namespace archived", name=record.name, id=record.id, entry=manifest["entry"],
                       reason=reason)
        return manifest

    def _tombstone(self, name: str, client_ids: set[str]) -> None:
        if client_ids:
            self.state.tombstones[name] = self.state.tombstones.get(name, set()) | client_ids

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
                raise ApiError(409, "namespace_exists",
                               f"namespace {name!r} is live; delete it before unarchiving")
            self._check_capacity(409)
            entry = self.archiver.find(name, archived_at)
            manifest = await self.archiver.restore(entry)
            clients = set(manifest.get("clients") or [])
            record = NamespaceRecord(
                name=name,
                id=manifest["id"],
                origin="auto" if manifest.get("origin") == "auto" else "explicit",
                locked=locked,
                ttl=None if manifest.get("ttl") is None else parse_duration(manifest["ttl"]),
                created_at=from_rfc3339(manifest["createdAt"]),
                last_access_at=self.clock.seconds(),
                # The files come back with their history: their replicas
                # are good again, every other replica of the name is not.
                history=manifest.get("history") or new_history(),
                clients=clients,
                retired=(self.state.tombstones.get(name, set())
                         | set(manifest.get("retiredClients") or [])) - clients,
            )
            self.state.records[name] = record
            self.state.save()
            await self.archiver.finish_restore(entry)
            self._log.info("namespace unarchived", name=name, id=record.id, entry=entry.entry)
            return record

        return self._locked(name, work)

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
            await self._drained(name)
            await self.supervisor.stop(name)
            old_replicas = record.clients | record.retired
            # The new history is saved before any file moves: a crash can
            # never pair the old replicas with the new data.
            record.history = new_history()
            record.clients = set()
            record.retired = self.state.tombstones.get(name, set()) | old_replicas | retired
            record.last_access_at = self.clock.seconds()
            if any(os.path.exists(p) for p in names.data_files(self.archiver.data_dir, name)):
                await self._archive_files(record, reason)
            self._tombstone(name, old_replicas)
            await self.archiver.run_in_thread(_move_files_in, build_dir, self.archiver.data_dir, name)
            record.archiving = None
            self.state.save()
            return record

        return self._locked(name, work)

    def install_new(self, name: str, build_dir: str, reason: str) -> Deferred[NamespaceRecord]:
        """
        Make C{name} a new explicit namespace from the database built in
        C{build_dir} (a fork); 409 if it exists.
        """
        names.validate(name)

        async def work() -> NamespaceRecord:
            self._check_open()
            if name in self.state.records:
                raise ApiError(409, "namespace_exists", f"namespace {name!r} exists already")
            return await self._install(name, build_dir, set(), None, reason)

        return self._locked(name, work)

    async def _install(self, name: str, build_dir: str, retired: set[str], namespace_id: str | None,
                       reason: str) -> NamespaceRecord:
        self._check_capacity(409)
        # Files first: a crash before the state is saved leaves files that
        # the next start adopts (explicit, locked, a new history).
        await self.archiver.run_in_thread(_move_files_in, build_dir, self.archiver.data_dir, name)
        record = NamespaceRecord.new(name, "explicit", self.clock.seconds())
        if namespace_id:
            record.id = namespace_id
        record.retired = set(self.state.tombstones.get(name, ())) | retired
        self.state.records[name] = record
        self.state.save()
        self._log.info("namespace created", name=name, origin="explicit", id=record.id, reason=reason)
        return record

    def remove_archive_entry(self, entry: ArchiveEntry) -> Deferred[None]:
        """
        Delete one archive entry for good, under its namespace's lock.
        """

        async def work() -> None:
            await self.archiver.remove(entry)

        return self._locked(entry.name, work)

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

        return self._locked(name, work)

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

    # -- replicas ------------------------------------------------------------------

    def check_pushing_clients(self, name: str, client_ids: set[str]) -> None:
        """
        Refuse a push from a replica of an earlier history of C{name}; note
        new replicas of the current one (saved at once: it is what retires
        them should the files ever be replaced).
        """
        record = self.state.records[name]
        stale = client_ids & record.retired
        if stale:
            raise ApiError(409, "stale_replica",
                           f"this replica ({sorted(stale)[0]}) was made from other data than namespace "
                           f"{name!r} now holds (it was deleted and created again, restored, or its files "
                           "were replaced); delete the local replica files and connect again")
        new = client_ids - record.clients
        if new:
            self._change(record, lambda r: r.clients.update(new))

    def count_usage(self, name: str, received: int, sent: int) -> None:
        counts = self.usage.get(name)
        if counts is None:
            counts = self.usage[name] = [0, 0, 0]
        counts[0] += 1
        counts[1] += received
        counts[2] += sent

    def stats(self, name: str) -> dict[str, Any]:
        """
        What one namespace costs and does: files, traffic since start, child.
        """
        record = self.state.records.get(name)
        if record is None:
            raise not_found(name)
        files = {}
        for path in names.data_files(self.archiver.data_dir, name):
            try:
                files[os.path.basename(path)] = os.path.getsize(path)
            except FileNotFoundError:
                continue
        requests, received, sent = self.usage.get(name, [0, 0, 0])
        child = self.supervisor.running(name)
        started = self.supervisor.started_at.get(name)
        return {
            "name": name,
            "files": files,
            "bytesOnDisk": sum(files.values()),
            "requests": requests,
            "bytesIn": received,
            "bytesOut": sent,
            "lastAccessAt": record.to_json()["lastAccessAt"],
            "running": child is not None,
            "pid": child.pid if child else None,
            "port": child.port if child else None,
            "uptimeSeconds": round(self.clock.seconds() - started, 3) if child and started else None,
            "rssBytes": _rss_bytes(child.pid) if child and child.pid else None,
            "queued": child.channel.queued if child and child.channel else 0,
        }

    def describe(self, record: NamespaceRecord) -> dict[str, Any]:
        """
        A record as the admin API shows it: stored fields plus runtime ones.
        """
        child = self.supervisor.running(record.name)
        out = record.to_json()
        out["running"] = child is not None
        out["port"] = child.port if child else None
        out["pid"] = child.pid if child else None
        # Client ids are for the daemon; the API shows how many there are.
        out["replicas"] = len(out.pop("clients"))
        out["retiredReplicas"] = len(out.pop("retiredClients"))
        del out["archiving"]
        return out

    # -- start-up and shutdown ---------------------------------------------

    def reconcile(self) -> None:
        """
        Make state, archive and data files agree before serving: finish or
        undo archives a crash interrupted, and adopt data files that have no
        record (an operator restoring files, or a lost state file) instead of
        ever serving an empty namespace over them.
        """
        finished = self.archiver.recover(self.state.records)
        changed = False
        for name in finished:
            record = self.state.records.pop(name)
            self._tombstone(name, record.clients | record.retired)
            changed = True
        for record in self.state:
            if record.archiving is not None:
                # Announced but not done (or done and the new files are in):
                # the namespace is live as it stands.
                record.archiving = None
                changed = True
        data_dir = self.archiver.data_dir
        for entry in sorted(os.listdir(data_dir)):
            stem, dot, ext = entry.rpartition(".")
            if not dot or ext != "db" or not names.is_valid(stem) or stem in self.state.records:
                continue
            if not os.path.isfile(os.path.join(data_dir, entry)):
                continue
            record = NamespaceRecord.new(stem, "explicit", self.clock.seconds())
            record.retired = set(self.state.tombstones.get(stem, ()))
            self.state.records[stem] = record
            changed = True
            self._log.warn("adopted a data file that had no state record (explicit, locked)",
                           name=stem, id=record.id)
        for record in self.state:
            if not os.path.exists(names.db_path(data_dir, record.name)) and record.name not in finished:
                self._log.warn("namespace has no data file yet; it starts empty", name=record.name)
        if changed:
            self.state.save()

    def drain_all(self) -> Deferred[Any]:
        """
        Fire when no lease on any namespace is out, or after the drain timeout.
        """
        return DeferredList([self._drained(name) for name in list(self._inflight)])

    def stop_all(self) -> Deferred[Any]:
        return self.supervisor.stop_all()
