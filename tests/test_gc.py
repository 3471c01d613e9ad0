"""
The GC rules, driven by a Clock: thresholds, locks, TTLs, restarts,
failures and archive retention.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.defer import fail
from twisted.trial.unittest import SynchronousTestCase

from turso_twisted.gc import GarbageCollector
from turso_twisted.state import NamespaceRecord

from .support import ManagerFixture

DAY = 86400.0


class GCTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.data_dir = self.mktemp()
        self.fx = self.fixture()

    def fixture(self) -> ManagerFixture:
        fx = ManagerFixture(self.data_dir)
        fx.reactor.exit_on_signal = True
        self.gc = GarbageCollector(clock=fx.reactor, manager=fx.manager, archival=fx.archival,
                                   leases=fx.leases, interval=3600, auto_idle=7 * DAY, retention=30 * DAY)
        return fx

    def add(self, name: str, origin: str = "auto", locked: bool | None = None,
            ttl: float | None = None) -> NamespaceRecord:
        record = NamespaceRecord.new(name, origin, self.fx.reactor.seconds())  # type: ignore[arg-type]
        if locked is not None:
            record.locked = locked
        record.ttl = ttl
        self.fx.state.records[name] = record
        self.fx.state.save()
        with open(os.path.join(self.data_dir, f"{name}.db"), "wb") as handle:
            handle.write(name.encode())
        return record

    def lease(self, name: str) -> Any:
        leased = self.fx.manager.lease(name)
        self.fx.settle()
        return self.successResultOf(leased)

    def sweep(self) -> None:
        self.successResultOf(self.gc.sweep())

    def live(self) -> list[str]:
        return sorted(self.fx.state.records)

    def test_idle_auto_archived_only_past_the_threshold(self) -> None:
        self.add("idle")
        self.fx.reactor.advance(7 * DAY)
        self.sweep()
        self.assertEqual(self.live(), ["idle"], "exactly at the threshold is not past it")
        self.fx.reactor.advance(0.001)
        self.sweep()
        self.assertEqual(self.live(), [])
        [entry] = self.fx.archival.archiver.entries("idle")
        self.assertEqual(entry.manifest["reason"], "auto-created idle > 168h0m0s")
        self.assertEqual(self.gc.archives, 1)

    def test_explicit_and_locked_are_kept(self) -> None:
        self.add("explicit", origin="explicit")
        self.add("locked-auto", locked=True)
        self.add("unlocked-explicit", origin="explicit", locked=False)
        self.fx.reactor.advance(365 * DAY)
        self.sweep()
        self.assertEqual(self.live(), ["explicit", "locked-auto", "unlocked-explicit"])

    def test_ttl_archives_any_origin_unless_locked(self) -> None:
        self.add("ttl-explicit", origin="explicit", locked=False, ttl=DAY)
        self.add("ttl-locked", origin="explicit", ttl=DAY)
        self.add("ttl-auto", ttl=DAY)
        self.fx.reactor.advance(DAY)
        self.sweep()
        self.assertEqual(self.live(), ["ttl-auto", "ttl-explicit", "ttl-locked"])
        self.fx.reactor.advance(1)
        self.sweep()
        self.assertEqual(self.live(), ["ttl-locked"])
        reasons = {e.name: e.manifest["reason"] for e in self.fx.archival.archiver.entries()}
        self.assertEqual(reasons, {"ttl-auto": "ttl 24h0m0s expired", "ttl-explicit": "ttl 24h0m0s expired"})

    def test_cleared_ttl_does_not_fire(self) -> None:
        record = self.add("cleared", origin="explicit", locked=False, ttl=DAY)
        record.ttl = None
        self.fx.reactor.advance(2 * DAY)
        self.sweep()
        self.assertEqual(self.live(), ["cleared"])

    def test_idle_uses_the_in_memory_access_time(self) -> None:
        self.add("busy")
        self.fx.reactor.advance(6 * DAY)
        lease = self.lease("busy")
        lease.release()
        # The debounced copy on disk is still 6 days old; memory is not.
        self.fx.reactor.advance(2 * DAY)
        self.sweep()
        self.assertEqual(self.live(), ["busy"])

    def test_request_in_flight_keeps_it(self) -> None:
        self.add("busy")
        self.fx.reactor.advance(DAY)
        lease = self.lease("busy")
        self.fx.reactor.advance(8 * DAY)
        self.sweep()
        self.assertEqual(self.live(), ["busy"])
        lease.release()
        self.sweep()
        self.assertEqual(self.live(), [])

    def test_request_arriving_before_the_lock_saves_it(self) -> None:
        self.add("racy")
        self.fx.reactor.advance(8 * DAY)
        self.fx.auto_serve = False
        leased = self.fx.manager.lease("racy")  # holds the lock while its child starts
        swept = self.gc.sweep()
        self.fx.serving.update(p.pid for p in self.fx.children("racy"))
        self.fx.settle()
        self.successResultOf(leased).release()
        self.successResultOf(swept)
        self.assertEqual(self.live(), ["racy"])

    def test_restart_between_sweeps_keeps_the_clock_semantics(self) -> None:
        self.add("idle")
        self.fx.reactor.advance(3 * DAY)
        now = self.fx.reactor.seconds()
        self.fx = self.fixture()
        self.fx.reactor.advance(now + 4 * DAY + 1 - self.fx.reactor.seconds())
        self.assertEqual(self.live(), ["idle"])
        self.sweep()
        self.assertEqual(self.live(), [])

    def test_one_failing_namespace_does_not_stop_the_sweep(self) -> None:
        self.add("broken")
        self.add("fine")
        self.fx.reactor.advance(8 * DAY)
        archiver = self.fx.archival.archiver
        real = archiver.run_in_thread

        def flaky(function: Any, *args: Any) -> Any:
            if any(isinstance(a, NamespaceRecord) and a.name == "broken" for a in args):
                return fail(OSError("disk error"))
            return real(function, *args)

        archiver.run_in_thread = flaky
        self.sweep()
        self.assertEqual(self.live(), ["broken"])
        self.assertEqual(self.gc.failures, 1)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.assertTrue(os.path.exists(os.path.join(self.data_dir, "broken.db")))
        archiver.run_in_thread = real
        self.sweep()
        self.assertEqual(self.live(), [])

    def test_retention_purges_old_entries(self) -> None:
        self.add("old", origin="explicit")
        self.successResultOf(self.fx.archival.delete("old"))
        self.fx.reactor.advance(10 * DAY)
        self.add("young", origin="explicit")
        self.successResultOf(self.fx.archival.delete("young"))
        self.fx.reactor.advance(20 * DAY)
        self.sweep()
        self.assertEqual([e.name for e in self.fx.archival.archiver.entries()], ["old", "young"])
        self.fx.reactor.advance(1)
        self.sweep()
        self.assertEqual([e.name for e in self.fx.archival.archiver.entries()], ["young"])
        self.assertEqual(self.gc.purges, 1)

    def test_looping_call_runs_every_interval_until_stopped(self) -> None:
        self.gc.start()
        self.fx.reactor.advance(3599)
        self.assertEqual(self.gc.sweeps, 0)
        self.fx.reactor.advance(1)
        self.assertEqual(self.gc.sweeps, 1)
        self.fx.reactor.advance(3600)
        self.assertEqual(self.gc.sweeps, 2)
        self.successResultOf(self.gc.stop())
        self.fx.reactor.advance(7200)
        self.assertEqual(self.gc.sweeps, 2)
