"""
The children: one C{tursodb --sync-server} per running namespace.

The supervisor starts a child on a free port of the range and waits until it
serves, stops children (SIGTERM, then SIGKILL after a grace period), notices
children that die on their own, and backs off a namespace whose child keeps
dying so that clients get a quick 503 instead of a hang.  Each child is one
L{Child} record, from its spawn to its end.  Callers serialize work on one
name (see L{turso_twisted.namespaces}); the supervisor itself keeps no
per-name locks.
"""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Callable
from functools import partial
from typing import Literal

import attrs
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IReactorProcess, IReactorTCP
from twisted.logger import Logger

from . import names
from .channel import BackendChannel
from .confine import Confinement
from .datadir import temp_dir
from .errors import Unavailable
from .loopback import ConnectReactor
from .ports import PortAllocator, PortsExhausted
from .process import TursodbProcess, owns_listener, spawn_tursodb

#: How often a spawn moves on to another port after "Address already in use".
PORT_ATTEMPTS = 5
#: A child that ran this long before dying starts its backoff afresh.
STABLE_AFTER = 30.0
#: The longest wait between restarts of a crash-looping namespace.
MAX_BACKOFF = 60.0

Phase = Literal["starting", "running", "stopping"]


class Reactor(IReactorProcess, IReactorTCP, ConnectReactor):
    """
    What the daemon needs of the reactor: processes; descriptors and time
    for the channels to its children; TCP for its ports.
    """


def spawn_failed(name: str, why: str, retry_after: float | None = None) -> Unavailable:
    return Unavailable("namespace_unavailable", f"namespace {name!r} could not be started: {why}",
                       retry_after)


@attrs.define(eq=False)
class Child:
    """
    One C{tursodb} child: its process, the channel that is the one way to
    talk to it, and where it is in its life.
    """

    name: str
    process: TursodbProcess
    channel: BackendChannel
    started_at: float
    #: The child's own temp dir (its TMPDIR), which it may write.
    scratch: str
    phase: Phase = "starting"

    @property
    def port(self) -> int:
        return self.process.port

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def whenEnded(self) -> Deferred[TursodbProcess]:
        return self.process.whenEnded()


@attrs.define
class _Backoff:
    failures: int = 0
    retry_at: float = 0.0


def _default_channels(supervisor: Supervisor) -> Callable[[int], BackendChannel]:
    return partial(BackendChannel, supervisor.reactor)


@attrs.define(eq=False)
class Supervisor:
    """
    Starts, watches and stops the C{tursodb} children.
    """

    reactor: Reactor
    tursodb_bin: str
    data_dir: str
    ports: PortAllocator
    startup_timeout: float
    child_env: dict[str, str]
    wrappers: list[str] = attrs.field(factory=list)
    stop_grace: float = 5.0
    is_serving: Callable[[int, int], bool] = owns_listener
    #: How children are confined (see L{turso_twisted.confine}).
    confinement: Confinement = attrs.field(factory=lambda: Confinement(reason="not configured"))
    #: Makes the channel to a child on a port (see L{BackendChannel}).
    make_channel: Callable[[int], BackendChannel] = attrs.field(
        default=attrs.Factory(_default_channels, takes_self=True))
    spawns: int = 0
    spawn_failures: int = 0
    unexpected_exits: int = 0
    _children: dict[str, Child] = attrs.field(factory=dict)
    _backoff: dict[str, _Backoff] = attrs.field(factory=dict)
    _log = Logger()

    # -- queries ---------------------------------------------------------------

    def running(self, name: str) -> Child | None:
        """
        C{name}'s child if it serves (started, not stopping, not ended).
        """
        child = self._children.get(name)
        if child is None or child.phase != "running" or child.process.has_ended:
            return None
        return child

    def children(self) -> list[Child]:
        """
        Every child that exists, in any phase.
        """
        return list(self._children.values())

    def resident(self, besides: str = "") -> int:
        """
        Children that exist, other than C{besides}'s if it is starting.
        """
        return sum(1 for child in self._children.values()
                   if not (child.name == besides and child.phase == "starting"))

    def queued(self) -> int:
        """
        Requests waiting in every child's channel.
        """
        return sum(child.channel.queued for child in self._children.values())

    # -- starting --------------------------------------------------------------

    async def start(self, name: str) -> Child:
        """
        Start C{name}'s child and return it once it serves.

        @raise Unavailable: if it cannot be started now.
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
        try:
            child, startup = await self._spawn(name, names.db_path(self.data_dir, name), register=True)
        except Unavailable:
            self.spawn_failures += 1
            self._note_failure(name)
            raise
        child.phase = "running"
        child.started_at = self.reactor.seconds()
        child.whenEnded().addCallback(lambda _: self._ended(child))
        self._log.info("namespace {name} running on port {port} (pid {pid}, {startup_ms} ms)",
                       name=name, port=child.port, pid=child.pid, startup_ms=round(startup * 1000, 1))
        return child

    async def start_scratch(self, label: str, db_path: str) -> Child:
        """
        Start a child on C{db_path} outside any namespace (to build a
        database for a restore or a fork); stop it with L{stop_scratch}.
        """
        child, _ = await self._spawn(label, db_path, register=False)
        child.phase = "running"
        child.whenEnded().addCallback(lambda _: self.ports.release(child.port))
        return child

    def stop_scratch(self, child: Child) -> Deferred[None]:
        """
        Stop a scratch child (SIGTERM, SIGKILL after the grace period).
        """
        child.phase = "stopping"
        return self._terminate(child)

    async def _spawn(self, label: str, db_path: str, register: bool) -> tuple[Child, float]:
        """
        Start a child on C{db_path} and wait until it serves, moving to
        another port if its port turns out to be taken.  With C{register},
        the child counts as C{label}'s (starting) from its spawn on.
        """
        for _ in range(PORT_ATTEMPTS):
            try:
                port = self.ports.acquire()
            except PortsExhausted as error:
                raise spawn_failed(label, str(error), retry_after=5) from None
            began = self.reactor.seconds()
            root, scratch, cwd = self._scratch_dirs(label, port)
            files = self._files_of(db_path)
            if self.confinement.helper is not None:
                # The helper also enters cwd, a session of its own and the
                # parent-death signal: one exec, and the reactor can use
                # posix_spawn (no fork of the daemon) as no cwd is passed.
                wrappers = self.confinement.wrap(files, [scratch], port, cwd=cwd, parent=os.getpid())
                spawn_cwd = None
            else:
                wrappers, spawn_cwd = self.wrappers, cwd
            process = spawn_tursodb(self.reactor, self.tursodb_bin, db_path, port, label, wrappers,
                                    {**self.child_env, "TMPDIR": scratch}, spawn_cwd)
            process.whenEnded().addBoth(self._remove_scratch, root)
            child = Child(label, process, self.make_channel(port), began, scratch)
            child.channel.on_wedged = partial(self.kill_wedged, child)
            process.whenEnded().addBoth(self._close_channel, child.channel)
            if register:
                self._children[label] = child
            self.spawns += 1
            why = await self._wait_serving(process)
            if why is None:
                return child, self.reactor.seconds() - began
            if register and self._children.get(label) is child:
                del self._children[label]
            self.ports.release(port)
            if process.has_ended and process.port_was_taken():
                self._log.warn("backend port {port} of namespace {name} taken by another process; "
                               "trying another", name=label, port=port)
                continue
            break
        else:
            why = f"{PORT_ATTEMPTS} ports in a row were taken by other processes"
        self._log.error("namespace {name} failed to start: {reason}", name=label, reason=why,
                        stderr=process.stderr_summary())
        raise spawn_failed(label, why)

    def _scratch_dirs(self, name: str, port: int) -> tuple[str, str, str]:
        """
        One child's own dirs inside the data dir, removed when it ends: the
        root, its temp dir (tursodb puts its temp databases there; so
        nothing of a tenant lingers in the system's /tmp) and an empty
        working dir it cannot write, so a relative path lands nowhere.
        """
        root = os.path.join(temp_dir(self.data_dir), f"tursodb-{name}-{port}")
        scratch, cwd = os.path.join(root, "tmp"), os.path.join(root, "cwd")
        os.makedirs(scratch, exist_ok=True)
        os.makedirs(cwd, exist_ok=True)
        return root, scratch, cwd

    @staticmethod
    def _files_of(db_path: str) -> list[str]:
        """
        The files a child writes: its database and WAL, made now if new
        (tursodb would make them at once; confinement needs them to exist).
        """
        files = [db_path, db_path + "-wal"]
        for path in files:
            if os.path.lexists(path) and not stat.S_ISREG(os.lstat(path).st_mode):
                raise Unavailable("namespace_files_invalid",
                                  f"{os.path.basename(path)} is not a regular file; refusing to start on it")
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644))
        return files

    def _remove_scratch(self, result: object, path: str) -> object:
        shutil.rmtree(path, ignore_errors=True)
        return result

    def _close_channel(self, result: object, channel: BackendChannel) -> object:
        channel.close()
        return result

    def _wait_serving(self, process: TursodbProcess) -> Deferred[str | None]:
        """
        Fire with C{None} once C{process} serves on its port, else with why
        not (it exited, or the start-up timeout passed and it was killed).
        """
        result: Deferred[str | None] = Deferred()
        began = self.reactor.seconds()
        deadline = began + self.startup_timeout

        def check() -> None:
            if process.has_ended:
                result.callback(f"tursodb exited at start-up ({process.exit_description()})")
            elif process.pid is not None and self.is_serving(process.pid, process.port):
                result.callback(None)
            elif self.reactor.seconds() >= deadline:
                process.signal("KILL")
                process.whenEnded().addCallback(lambda _: result.callback(
                    f"tursodb did not listen within {self.startup_timeout:g}s"))
            else:
                # tursodb listens within a few ms: poll closely at first.
                waited = self.reactor.seconds() - began
                self.reactor.callLater(0.001 if waited < 0.1 else 0.01, check)

        self.reactor.callLater(0.001, check)
        return result

    # -- ending ----------------------------------------------------------------

    def _ended(self, child: Child) -> None:
        name = child.name
        if self._children.get(name) is not child:
            return
        del self._children[name]
        self.ports.release(child.port)
        uptime = self.reactor.seconds() - child.started_at
        if child.phase != "stopping":
            self.unexpected_exits += 1
            self._note_failure(name, uptime)
            self._log.error(
                "tursodb of namespace {name} exited unexpectedly ({status}) after {uptime} s",
                name=name, port=child.port, pid=child.pid, status=child.process.exit_description(),
                uptime=round(uptime, 3), stderr=child.process.stderr_summary())

    def kill_wedged(self, child: Child) -> None:
        """
        A child missed the backend deadline: it cannot be trusted to answer
        SIGTERM either.  Kill it; the next request starts a new one.
        """
        self._log.error("tursodb of namespace {name} did not answer within the backend timeout; "
                        "killing it (pid {pid})", name=child.name, pid=child.pid, port=child.port)
        child.process.signal("KILL")

    def _note_failure(self, name: str, uptime: float = 0.0) -> None:
        backoff = self._backoff.setdefault(name, _Backoff())
        backoff.failures = 1 if uptime >= STABLE_AFTER else backoff.failures + 1
        delay = 0.0 if backoff.failures == 1 else min(MAX_BACKOFF, 2.0 ** (backoff.failures - 2))
        backoff.retry_at = self.reactor.seconds() + delay

    def stop(self, name: str) -> Deferred[None]:
        """
        Stop C{name}'s child: SIGTERM, then SIGKILL after the grace period.
        A child still starting is left to its start (callers hold the
        name's lock, so only shutdown meets one; it dies with the daemon).
        """
        child = self._children.get(name)
        self._backoff.pop(name, None)
        if child is None or child.phase == "starting" or child.process.has_ended:
            return succeed(None)
        child.phase = "stopping"
        return self._terminate(child)

    def _terminate(self, child: Child) -> Deferred[None]:
        done: Deferred[None] = Deferred()
        if child.process.has_ended:
            done.callback(None)
            return done
        # Drop the channel's spare first, so the child logs no noise.
        quiet = child.channel.close()
        quiet.addTimeout(1.0, self.reactor, onTimeoutCancel=lambda *_: None)
        quiet.addCallback(lambda _: self._signal_stop(child, done))
        return done

    def _signal_stop(self, child: Child, done: Deferred[None]) -> None:
        process = child.process
        if process.has_ended:
            if not done.called:
                done.callback(None)
            return
        process.signal("TERM")
        kill = self.reactor.callLater(self.stop_grace, process.signal, "KILL")

        def stopped(ended: TursodbProcess) -> None:
            if kill.active():
                kill.cancel()
            self._log.info("namespace {name} stopped ({status})", name=child.name, pid=ended.pid,
                           status=ended.exit_description())
            done.callback(None)

        process.whenEnded().addCallback(stopped)

    def stop_all(self) -> Deferred[list[tuple[bool, None]]]:
        return DeferredList([self.stop(name) for name in list(self._children)])
