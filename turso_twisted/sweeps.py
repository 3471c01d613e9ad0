"""
Sweeps on the injected clock (the GC, hibernation).

A L{LoopingCall} of a coroutine: the loop already waits for one sweep's
Deferred before it schedules the next, and the Deferred that C{start}
returns fires once a sweep under way has finished after C{stop}.  All this
adds is that a sweep that fails is logged and does not end the loop.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure


@attrs.define(eq=False)
class Sweeper:
    clock: IReactorTime
    interval: float
    sweep: Callable[[], Coroutine[Any, Any, None]]
    #: What is swept, for the log (C{"gc"}, C{"hibernation"}).
    what: str
    _loop: LoopingCall | None = None
    _finished: Deferred[LoopingCall] | None = None
    _log = Logger()

    def start(self) -> None:
        """
        Sweep every C{interval} seconds, the first time after one interval.
        """
        self._loop = LoopingCall(self._run)
        self._loop.clock = self.clock
        self._finished = self._loop.start(self.interval, now=False)

    def stop(self) -> Deferred[None]:
        """
        Stop sweeping; fires when a sweep under way has finished.
        """
        if self._loop is None or self._finished is None:
            return succeed(None)
        if self._loop.running:
            self._loop.stop()
        return self._finished.addCallback(lambda _: None)

    def _run(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self.sweep()).addErrback(self._failed)

    def _failed(self, failure: Failure) -> None:
        self._log.failure("{what} sweep failed; sweeping again next interval", failure, what=self.what)
