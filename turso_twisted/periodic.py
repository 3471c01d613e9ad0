"""
A sweep that runs every so often on the injected clock (the GC, hibernation).
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import LoopingCall


@attrs.define(eq=False)
class Periodic:
    """
    Run C{sweep} every C{interval} seconds of C{clock} (first after one
    interval), never two at once; L{stop} waits for a sweep under way.
    """

    clock: Any
    interval: float
    sweep: Callable[[], Coroutine[Any, Any, None]]
    _loop: LoopingCall | None = None
    _running: Deferred[None] | None = None

    def start(self) -> None:
        loop = LoopingCall(self._run)
        loop.clock = self.clock
        loop.start(self.interval, now=False)
        self._loop = loop

    def stop(self) -> Deferred[None]:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        if self._running is None:
            return succeed(None)
        finished: Deferred[None] = Deferred()

        def release(result: object) -> object:
            finished.callback(None)
            return result

        self._running.addBoth(release)
        return finished

    def _run(self) -> Deferred[None]:
        self._running = Deferred.fromCoroutine(self.sweep())

        def done(_: object) -> None:
            self._running = None

        self._running.addBoth(done)
        return self._running
