"""
Sweeps on a clock: one at a time, a failure logged and not the end of the
loop, and a stop that waits for the sweep under way.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from turso_twisted.sweeps import Sweeper


class SweeperTests(SynchronousTestCase):
    def test_a_failing_sweep_is_logged_and_the_loop_goes_on(self) -> None:
        clock = Clock()
        runs: list[int] = []

        async def sweep() -> None:
            runs.append(1)
            if len(runs) == 1:
                raise OSError("disk error")

        sweeper = Sweeper(clock, 10, sweep, "test")
        sweeper.start()
        clock.advance(10)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        clock.advance(10)
        self.assertEqual(len(runs), 2)
        self.assertIsNone(self.successResultOf(sweeper.stop()))
        clock.advance(100)
        self.assertEqual(len(runs), 2)

    def test_stop_waits_for_the_sweep_under_way(self) -> None:
        clock = Clock()
        gate: Deferred[None] = Deferred()

        async def sweep() -> None:
            await gate

        sweeper = Sweeper(clock, 10, sweep, "test")
        sweeper.start()
        clock.advance(10)
        stopped = sweeper.stop()
        self.assertNoResult(stopped)
        gate.callback(None)
        self.successResultOf(stopped)

    def test_never_started(self) -> None:
        async def sweep() -> None:
            pass

        self.successResultOf(Sweeper(Clock(), 10, sweep, "test").stop())
