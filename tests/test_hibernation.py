"""
Scale to zero: hibernation after idle, waking on request, and making room
at TURSO_MAX_RUNNING by hibernating the least recently used idle child.
"""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from turso_twisted.errors import Refusal, status_for

from .fakes import end
from .support import ManagerFixture


class HibernationTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.fx = ManagerFixture(self.mktemp())
        self.fx.reactor.exit_on_signal = True
        self.hibernator = self.fx.hibernator
        self.hibernator.idle_after = 600

    def lease(self, name: str) -> Any:
        leased = self.fx.manager.lease(name)
        self.fx.settle()
        return self.successResultOf(leased)

    def use(self, name: str) -> None:
        self.lease(name).release()

    def running(self) -> list[str]:
        return sorted(c.name for c in self.fx.supervisor.children())

    def test_idle_children_stop_and_wake_on_request(self) -> None:
        self.use("alpha")
        self.use("beta")
        self.hibernator.start()
        self.assertEqual(self.hibernator.interval, 30)
        self.fx.reactor.advance(300)
        self.use("beta")
        self.fx.reactor.advance(330)
        self.assertEqual(self.running(), ["beta"])
        self.assertEqual(sorted(self.fx.state.records), ["alpha", "beta"], "records stay")
        self.assertFalse(self.fx.stats.describe(self.fx.state.records["alpha"])["running"])
        self.use("alpha")
        self.assertEqual(self.running(), ["alpha", "beta"])
        self.assertEqual(len(self.fx.children("alpha")), 2)
        self.successResultOf(self.hibernator.stop())

    def test_busy_children_are_not_hibernated(self) -> None:
        lease = self.lease("alpha")
        self.fx.reactor.advance(700)
        self.successResultOf(self.hibernator.sweep())
        self.assertEqual(self.running(), ["alpha"])
        lease.release()
        self.successResultOf(self.hibernator.sweep())
        self.assertEqual(self.running(), [])

    def test_zero_means_never(self) -> None:
        self.hibernator.idle_after = 0
        self.hibernator.start()
        self.use("alpha")
        self.fx.reactor.advance(10**6)
        self.assertEqual(self.running(), ["alpha"])


class MaxRunningTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.fx = ManagerFixture(self.mktemp())
        self.fx.reactor.exit_on_signal = True
        self.fx.hibernator.max_running = 2

    def lease(self, name: str) -> Any:
        leased = self.fx.manager.lease(name)
        self.fx.settle()
        return leased

    def test_least_recently_used_idle_child_makes_room(self) -> None:
        for name in ("a", "b"):
            self.successResultOf(self.lease(name)).release()
            self.fx.reactor.advance(10)
        self.successResultOf(self.lease("a")).release()
        self.fx.reactor.advance(10)
        self.successResultOf(self.lease("c")).release()
        self.assertEqual(sorted(c.name for c in self.fx.supervisor.children()), ["a", "c"])
        self.assertEqual(self.fx.hibernator.hibernations, 1)
        self.assertEqual(sorted(self.fx.state.records), ["a", "b", "c"])

    def test_all_busy_is_a_503(self) -> None:
        held = [self.successResultOf(self.lease(name)) for name in ("a", "b")]
        failure = self.failureResultOf(self.lease("c"), Refusal)
        self.assertEqual((status_for(failure.value), failure.value.code), (503, "too_many_running"))
        self.assertNotIn("c", self.fx.state.records, "a refused first request leaves no record")
        for lease in held:
            lease.release()
        self.successResultOf(self.lease("c"))


class ConcurrentMakeRoomTests(SynchronousTestCase):
    def test_the_cap_holds_when_starts_overlap(self) -> None:
        fx = ManagerFixture(self.mktemp())
        fx.hibernator.max_running = 2
        for name in ("a", "b"):
            leased = fx.manager.lease(name)
            fx.settle()
            self.successResultOf(leased).release()
            fx.reactor.advance(1)
        def alive() -> int:
            return len([p for p, _, _ in fx.reactor.spawned if not p.has_ended])

        c, d = fx.manager.lease("c"), fx.manager.lease("d")
        fx.settle()
        self.assertLessEqual(alive(), 2)
        # Children stop only when they exit: let each exit in turn.
        for name in ("a", "b"):
            [child] = [p for p in fx.children(name) if not p.has_ended]
            self.assertEqual(child.transport.signals, ["TERM"])
            end(child, signal=15)
            fx.settle()
            self.assertLessEqual(alive(), 2)
        self.successResultOf(c).release()
        self.successResultOf(d).release()
        self.assertEqual(sorted(c.name for c in fx.supervisor.children()), ["c", "d"])
        self.assertEqual(fx.hibernator.refused_running, 0, "idle children made room; nobody was refused")
