"""
Test doubles for unit tests: a reactor that records spawned processes.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

from turso_twisted.process import TursodbProcess


class FakeProcessTransport:
    def __init__(self, pid: int, protocol: Any, exit_on_signal: bool) -> None:
        self.pid = pid
        self.protocol = protocol
        self.exit_on_signal = exit_on_signal
        self.signals: list[str] = []
        self.stdin_closed = False

    def closeStdin(self) -> None:
        self.stdin_closed = True

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)
        if self.exit_on_signal and not self.protocol.has_ended:
            end(self.protocol, signal=15 if name == "TERM" else 9)


class ProcessReactor(MemoryReactorClock):
    """
    A memory reactor with a clock whose C{spawnProcess} records the
    protocols instead of starting anything.
    """

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[tuple[TursodbProcess, list[str], dict[str, Any]]] = []
        self._next_pid = 1000
        #: Whether fake children exit as soon as they are signalled.
        self.exit_on_signal = False

    def spawnProcess(self, protocol: Any, executable: str, args: list[str], env: Any = None,
                     path: Any = None, uid: Any = None, gid: Any = None, usePTY: Any = False,
                     childFDs: Any = None) -> FakeProcessTransport:
        self._next_pid += 1
        transport = FakeProcessTransport(self._next_pid, protocol, self.exit_on_signal)
        if "--sync-server" in args:
            # Like tursodb: the database file exists once the child starts.
            db = args[args.index("--sync-server") - 1]
            if os.path.isdir(os.path.dirname(db)) and not os.path.exists(db):
                open(db, "wb").close()
        protocol.makeConnection(transport)
        self.spawned.append((protocol, list(args), {"env": env, "path": path, "childFDs": childFDs}))
        return transport


def end(protocol: TursodbProcess, code: int | None = 0, signal: int | None = None) -> None:
    """
    Make a fake child exit.
    """
    if signal is None and code == 0:
        reason = Failure(ProcessDone(0))
    else:
        reason = Failure(ProcessTerminated(exitCode=code, signal=signal))
    protocol.processEnded(reason)
