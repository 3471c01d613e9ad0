"""
The garbage collector: a L{LoopingCall} every C{TURSO_GC_INTERVAL} that
applies the design note's lifecycle rules.

  - locked namespaces are skipped by every rule;
  - C{origin=auto} namespaces idle longer than C{TURSO_AUTO_IDLE_DURATION}
    are archived (idle is judged on the in-memory C{lastAccessAt}, not the
    debounced copy on disk, and never while a request is in flight);
  - namespaces whose C{createdAt + ttl} has passed are archived, any origin;
  - archive entries older than C{TURSO_ARCHIVE_RETENTION} are deleted.

Times are wall-clock seconds from the injected clock, compared with the
timestamps in the state, so a restart between sweeps changes nothing.  A
rule is checked again under the namespace's lock before acting, and one
failing namespace is logged and retried on the next sweep while the sweep
goes on.
"""

from __future__ import annotations

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from .archival import Archival
from .archive import ArchiveEntry
from .leases import Leases
from .namespaces import NamespaceManager
from .state import NamespaceRecord
from .sweeps import Sweeper
from .timefmt import format_duration


@attrs.define(eq=False)
class GarbageCollector:
    clock: IReactorTime
    manager: NamespaceManager
    archival: Archival
    leases: Leases
    interval: float
    auto_idle: float
    retention: float
    sweeps: int = 0
    archives: int = 0
    purges: int = 0
    failures: int = 0
    _sweeper: Sweeper | None = None
    _log = Logger()

    def start(self) -> None:
        self._sweeper = Sweeper(self.clock, self.interval, self.sweep, "gc")
        self._sweeper.start()

    def stop(self) -> Deferred[None]:
        """
        Stop sweeping; fires when a sweep under way has finished.
        """
        return succeed(None) if self._sweeper is None else self._sweeper.stop()

    # -- rules ---------------------------------------------------------------

    def why_archive(self, record: NamespaceRecord, now: float) -> str | None:
        """
        Why C{record} should be archived at C{now}, or C{None}.
        """
        if record.locked or record.moving_in or record.moving_to is not None:
            return None  # a copy in the middle of a move between cluster nodes is the move's
        if record.ttl is not None and record.created_at + record.ttl < now:
            return f"ttl {format_duration(record.ttl)} expired"
        if (record.origin == "auto" and now - record.last_access_at > self.auto_idle
                and not self.leases.busy(record.name)):
            return f"auto-created idle > {format_duration(self.auto_idle)}"
        return None

    def why_purge(self, entry: ArchiveEntry, now: float) -> str | None:
        if entry.archived_at + self.retention < now:
            return f"archive age > {format_duration(self.retention)}"
        return None

    # -- the sweep -------------------------------------------------------------

    async def sweep(self) -> None:
        """
        Apply every rule once.  Never fails: problems are logged and the
        namespace is tried again on the next sweep.
        """
        self.sweeps += 1
        now = self.clock.seconds()
        for record in list(self.manager):
            reason = self.why_archive(record, now)
            if reason is None:
                continue
            try:
                manifest = await self.archival.archive(
                    record.name, reason, still=lambda r, t: self.why_archive(r, t) is not None)
            except Exception:
                self.failures += 1
                self._log.failure("gc could not archive namespace {name}; retrying next sweep",
                                  name=record.name)
                continue
            if manifest is not None:
                self.archives += 1
                self._log.info("gc archived namespace {name} into {entry}: {reason}", name=record.name,
                               reason=reason, entry=manifest["entry"])

        try:
            entries = await self.archival.entries()
        except Exception:
            self.failures += 1
            self._log.failure("gc could not list the archive; retrying next sweep")
            return
        for entry in entries:
            reason = self.why_purge(entry, now)
            if reason is None:
                continue
            try:
                await self.archival.remove_archive_entry(entry)
            except Exception:
                self.failures += 1
                self._log.failure("gc could not purge archive entry {entry}; retrying next sweep",
                                  name=entry.name, entry=entry.entry)
                continue
            self.purges += 1
            self._log.info("gc purged archive entry {entry}: {reason}", name=entry.name, entry=entry.entry,
                           reason=reason)
