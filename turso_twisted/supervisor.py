"""
The children: one C{tursodb --sync-server} per running namespace.

The supervisor starts a child on a free port of the range and waits until it
serves, stops children (SIGTERM, then SIGKILL after a grace period), notices
children that die on their own, and backs off a namespace whose child keeps
dying so that clients get a quick 503 instead of a hang.  Callers serialize
work on one name (see L{turso_twisted.namespaces}); the supervisor itself
keeps no per-name locks.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.logger import Logger

from . import names
from .channel import BackendChannel
from .datadir import temp_dir
from .errors import ApiError
from .ports import PortAllocator, PortsExhausted
from .process import TursodbProcess, owns_listener, spawn_tursodb

#: How often a spawn moves on to another port after "Address already in use".
PORT_ATTEMPTS = 5
#: A child that ran this long before dying starts its backoff afresh.
STABLE_AFTER = 30.0
#: The longest wait between restarts of a crash-looping namespace.
MAX_BACKOFF = 60.0


class SpawnFailed(ApiError):
    pass


def spawn_failed(name: str, why: str, retry_after: float | None = None) -> SpawnFailed:
    return SpawnFailed(503, "namespace_unavailable", f"namespace {name!r} could not be started: {why}",
                       retry_after)


@attrs.define
class _Backoff:
    failures: int = 0
    retry_at: float = 0.0


@attrs.define(eq=False)
class Supervisor:
    """
    Starts, watches and stops the C{tursodb} children.
    """

    reactor: Any
    tursodb_bin: str
    data_dir: str
    ports: PortAllocator
    startup_timeout: float
    child_env: dict[str, str]
    wrappers: list[str] = attrs.field(factory=list)
    stop_grace: float = 5.0
    is_serving: Callable[[int, int], bool] = owns_listener
    #: Settings of each child's channel (see L{BackendChannel}).
    queue_depth: int = 128
    queue_timeout: float = 30.0
    children: dict[str, TursodbProcess] = attrs.field(factory=dict)
    started_at: dict[str, float] = attrs.field(factory=dict)
    spawns: int = 0
    spawn_failures: int = 0
    unexpected_exits: int = 0
    _stopping: set[str] = attrs.field(factory=set)
    _starting: set[str] = attrs.field(factory=set)
    _backoff: dict[str, _Backoff] = attrs.field(factory=dict)
    _log = Logger()

    @property
    def stopping_names(self) -> set[str]:
        return self._stopping

    def resident(self, besides: str = "") -> int:
        """
        Children that exist or are being started, other than C{besides}'s.
        """
        return len(self.children) + len(self._starting - {besides})

    def running(self, name: str) -> TursodbProcess | None:
        child = self.children.get(name)
        return None if child is None or child.has_ended else child

    async def start(self, name: str) -> TursodbProcess:
        """
        Start C{name}'s child and return it once it serves.

        @raise SpawnFailed: (a 503) if it cannot be started now.
        """
        names.validate(name)
        existing = self.running(name)
        if existing is not None:
            return existing
        backoff = self._backoff.get(name)
        now = self.reactor.seconds()
        if backoff is not None and now < backoff.retry_at:
            raise spawn_failed(
                name, f"its tursodb child failed {backoff.failures} times in a row; "
                "retrying after a backoff (see the server log)", backoff.retry_at - now)
        self._starting.add(name)
        try:
            child, startup = await self._spawn(name, names.db_path(self.data_dir, name))
        except SpawnFailed:
            self.spawn_failures += 1
            self._note_failure(name)
            raise
        finally:
            self._starting.discard(name)
        self.children[name] = child
        self.started_at[name] = self.reactor.seconds()
        child.ended.addCallback(self._ended)
        self._log.info("namespace running", name=name, port=child.port, pid=child.pid,
                       startup_ms=round(startup * 1000, 1))
        return child

    async def start_scratch(self, label: str, db_path: str) -> TursodbProcess:
        """
        Start a child on C{db_path} outside any namespace (to build a
        database for a restore or a fork); stop it with L{stop_scratch}.
        """
        child, _ = await self._spawn(label, db_path)
        child.ended.addCallback(lambda ended: (self.ports.release(ended.port), ended)[1])
        return child

    def stop_scratch(self, child: TursodbProcess) -> Deferred[None]:
        """
        Stop a scratch child (SIGTERM, SIGKILL after the grace period).
        """
        return self._terminate(child, child.name)

    async def _spawn(self, label: str, db_path: str) -> tuple[TursodbProcess, float]:
        """
        Start a child on C{db_path} and wait until it serves, moving to
        another port if its port turns out to be taken.
        """
        for _ in range(PORT_ATTEMPTS):
            try:
                port = self.ports.acquire()
            except PortsExhausted as error:
                raise spawn_failed(label, str(error), retry_after=5) from None
            began = self.reactor.seconds()
            scratch = self._scratch_dir(label, port)
            child = spawn_tursodb(self.reactor, self.tursodb_bin, db_path, port, label, self.wrappers,
                                  {**self.child_env, "TMPDIR": scratch})
            child.ended.addBoth(self._remove_scratch, scratch)
            self.spawns += 1
            why = await self._wait_serving(child)
            if why is None:
                child.channel = BackendChannel(self.reactor, port, max_queue=self.queue_depth,
                                               queue_timeout=self.queue_timeout)
                child.ended.addBoth(self._close_channel, child.channel)
                return child, self.reactor.seconds() - began
            self.ports.release(port)
            if child.has_ended and child.port_was_taken():
                self._log.warn("backend port taken by another process; trying another",
                               name=label, port=port)
                continue
            break
        else:
            why = f"{PORT_ATTEMPTS} ports in a row were taken by other processes"
        self._log.error("namespace failed to start", name=label, reason=why,
                        stderr=child.stderr_summary())
        raise spawn_failed(label, why)

    def _scratch_dir(self, name: str, port: int) -> str:
        """
        A temp dir for one child (tursodb puts its temp database there),
        inside the data dir and removed when the child ends, so nothing of
        a tenant lingers in the system's /tmp.
        """
        path = os.path.join(temp_dir(self.data_dir), f"tursodb-{name}-{port}")
        os.makedirs(path, exist_ok=True)
        return path

    def _remove_scratch(self, result: object, path: str) -> object:
        shutil.rmtree(path, ignore_errors=True)
        return result

    def _wait_serving(self, child: TursodbProcess) -> Deferred[str | None]:
        """
        Fire with C{None} once C{child} serves on its port, else with why not
        (it exited, or the start-up timeout passed and it was killed).
        """
        result: Deferred[str | None] = Deferred()
        began = self.reactor.seconds()
        deadline = began + self.startup_timeout

        def check() -> None:
            if child.has_ended:
                result.callback(f"tursodb exited at start-up ({child.exit_description()})")
            elif child.pid is not None and self.is_serving(child.pid, child.port):
                result.callback(None)
            elif self.reactor.seconds() >= deadline:
                child.signal("KILL")
                child.ended.addCallback(lambda _: result.callback(
                    f"tursodb did not listen within {self.startup_timeout:g}s"))
            else:
                # tursodb listens within a few ms: poll closely at first.
                waited = self.reactor.seconds() - began
                self.reactor.callLater(0.001 if waited < 0.1 else 0.01, check)

        self.reactor.callLater(0.001, check)
        return result

    def _ended(self, child: TursodbProcess) -> TursodbProcess:
        name = child.name
        if self.children.get(name) is child:
            del self.children[name]
            self.ports.release(child.port)
            uptime = self.reactor.seconds() - self.started_at.pop(name, self.reactor.seconds())
            if name not in self._stopping:
                self.unexpected_exits += 1
                self._note_failure(name, uptime)
                self._log.error(
                    "tursodb exited unexpectedly", name=name, port=child.port, pid=child.pid,
                    status=child.exit_description(), uptime=round(uptime, 3),
                    stderr=child.stderr_summary())
        return child

    def _note_failure(self, name: str, uptime: float = 0.0) -> None:
        backoff = self._backoff.setdefault(name, _Backoff())
        backoff.failures = 1 if uptime >= STABLE_AFTER else backoff.failures + 1
        delay = 0.0 if backoff.failures == 1 else min(MAX_BACKOFF, 2.0 ** (backoff.failures - 2))
        backoff.retry_at = self.reactor.seconds() + delay

    def stop(self, name: str) -> Deferred[None]:
        """
        Stop C{name}'s child: SIGTERM, then SIGKILL after the grace period.
        """
        child = self.running(name)
        self._backoff.pop(name, None)
        if child is None:
            return succeed(None)
        self._stopping.add(name)
        return self._terminate(child, name).addCallback(lambda _: self._stopping.discard(name))

    def _close_channel(self, result: object, channel: BackendChannel) -> object:
        channel.close()
        return result

    def _terminate(self, child: TursodbProcess, name: str) -> Deferred[None]:
        done: Deferred[None] = Deferred()
        if child.has_ended:
            done.callback(None)
            return done
        # Drop the channel's spare first, so the child logs no noise.
        quiet = child.channel.close() if child.channel is not None else succeed(None)
        quiet.addTimeout(1.0, self.reactor, onTimeoutCancel=lambda *_: None)
        quiet.addCallback(lambda _: self._signal_stop(child, name, done))
        return done

    def _signal_stop(self, child: TursodbProcess, name: str, done: Deferred[None]) -> None:
        if child.has_ended:
            if not done.called:
                done.callback(None)
            return
        child.signal("TERM")
        kill = self.reactor.callLater(self.stop_grace, child.signal, "KILL")

        def stopped(ended: TursodbProcess) -> TursodbProcess:
            if kill.active():
                kill.cancel()
            self._log.info("namespace stopped", name=name, pid=ended.pid,
                           status=ended.exit_description())
            done.callback(None)
            return ended

        child.ended.addCallback(stopped)

    def stop_all(self) -> Deferred[Any]:
        return DeferredList([self.stop(name) for name in list(self.children)])
