"""
The main process's side of the data workers (C{TURSO_DATA_WORKERS} > 1):
it binds the data port, starts the workers and restarts one that dies,
and answers them on the control channel (see L{turso_twisted.control}):
which worker holds which namespace, leases held on their behalf (so that
hibernation and drains never stop a child a worker uses: a drain asks the
holder to give the namespace back first), what changed in the state, and
their figures and traffic.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import sys
from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.error import ProcessDone, ProcessExitedAlready
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Factory, ProcessProtocol
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure

from . import control
from .channel import BackendResponse
from .cluster import OwnedElsewhere
from .config import Config
from .dataport import DataRequest
from .errors import INTERNAL, Refusal, Unavailable, from_os_error, not_found, refusal_to_json
from .hibernation import Hibernator
from .leases import Lease, Leases
from .metrics import DataFigures
from .namespaces import NamespaceManager
from .policy import authorize
from .proxy import HANDED_OVER_HEADERS_DROPPED, end_to_end
from .relay import relayed_bytes
from .routing import ClusterGate, not_here
from .state import StateStore
from .stats import NamespaceStats
from .supervisor import Reactor, Supervisor
from .syncproto import CreationFacts, HistoryGuard
from .tokens import Access
from .worker import worker_peers

#: How long a worker that is told to stop may take beyond the shutdown timeout.
STOP_MARGIN = 5.0

#: A namespace the main process itself uses (a backup, say): workers wait for it.
MAIN = -1


def worker_pids(main_pid: int) -> list[int]:
    """The pids of the data workers of the daemon whose main process is C{main_pid} (from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                parent = int(handle.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                command = handle.read()
        except (OSError, ValueError, IndexError):
            continue
        if parent == main_pid and b"turso_twisted.worker" in command:
            found.append(int(entry))
    return sorted(found)


class _Worker(ProcessProtocol):
    """One data worker process, and its end of the control channel."""

    def __init__(self, pool: WorkerPool, index: int) -> None:
        self.pool, self.index = pool, index
        self.channel: MainControl | None = None
        self.ready = False
        #: What it holds: a lease on the child each, and which grant of it.
        self.held: dict[str, Lease] = {}
        self.grants: dict[str, int] = {}
        #: Revokes sent to it, by name.
        self.revoking: dict[str, Deferred[None]] = {}
        #: Its figures, as last reported.
        self.figures = DataFigures()
        #: What it was last sent of each held namespace (to push changes only).
        self.sent: dict[str, str] = {}
        self.ended: Deferred[None] = Deferred()

    def processEnded(self, reason: Failure) -> None:
        self.pool._ended(self, reason)
        self.ended.callback(None)


class MainControl(amp.AMP):
    """The main process's end of one worker's control channel."""

    def __init__(self, pool: WorkerPool, worker: _Worker) -> None:
        super().__init__()
        self.pool, self.worker = pool, worker

    @control.Ready.responder
    def ready(self, index: int) -> dict[str, Any]:
        return self.pool._ready(self.worker)

    @control.Lease.responder
    def lease(self, name: str, access: dict[str, Any], writes: bool, facts: dict[str, Any],
              dead_port: int | None = None, here: bool | None = None) -> Deferred[dict[str, Any]]:
        leased = Deferred.fromCoroutine(self.pool._lease(self.worker, name, access, writes, facts, dead_port,
                                                         bool(here)))
        return leased.addCallback(lambda outcome: {"outcome": outcome})

    @control.Release.responder
    def release(self, name: str, last_access: float, grant: int | None = None) -> dict[str, Any]:
        self.pool._release(self.worker, name, grant)
        return {}

    @control.NoteClients.responder
    def note_clients(self, name: str, clients: list[str]) -> dict[str, Any]:
        return {"outcome": self.pool._note_clients(name, set(clients))}

    @control.Wedged.responder
    def wedged(self, name: str, port: int) -> dict[str, Any]:
        self.pool._wedged(name, port)
        return {}

    @control.Report.responder
    def report(self, figures: dict[str, Any], usage: dict[str, list[int]]) -> dict[str, Any]:
        self.pool._report(self.worker, figures, usage)
        return {}


class WorkerPool:
    """The data workers, and what the main process keeps for them."""

    _log = Logger()

    def __init__(self, reactor: Reactor, config: Config, options: Mapping[str, str | None], count: int,
                 manager: NamespaceManager, guard: HistoryGuard, supervisor: Supervisor, state: StateStore,
                 stats: NamespaceStats, leases: Leases, hibernator: Hibernator,
                 gate: ClusterGate | None = None) -> None:
        self.reactor, self.config, self.count = reactor, config, count
        #: In a cluster, the check every data request passes here first.
        self.gate = gate
        self.options = {key: value for key, value in options.items() if isinstance(value, str)}
        self.manager, self.guard, self.supervisor = manager, guard, supervisor
        self.state, self.stats, self.leases = state, stats, leases
        self.workers: dict[int, _Worker] = {}
        #: Which worker (or L{MAIN}) holds each namespace.
        self.holders: dict[str, int] = {}
        #: Fired when the main process is done with a namespace it held.
        self._main_done: dict[str, Deferred[None]] = {}
        self.listener: socket.socket | None = None
        #: Figures of workers that have exited (counters never go back).
        self.retired = DataFigures()
        self.restarts = 0
        self.stopping = False
        self._auth_sent: dict[str, Any] = {}
        #: Names the workers' sockets: this process's pid and a part nobody can guess.
        self.run = f"{os.getpid()}-{secrets.token_hex(8)}"
        #: Connections to the workers, for requests the internal listener takes.
        self.handovers = worker_peers(reactor, self.run, config.client_idle_timeout / 2)
        #: Numbers each namespace given to a worker (see L{_let_go}).
        self._grants = 0
        self._syncs: list[Deferred[Any]] = []
        self._all_ready: Deferred[None] = Deferred()
        leases.on_drain = self.revoke
        hibernator.reclaim = self.reclaim
        manager.claim = self.claim
        manager.changed = self.synced
        state.on_save.append(self.sync)

    # -- starting and stopping ---------------------------------------------------------

    def listen(self, host: str, port: int) -> None:
        """Bind the data port (the workers accept on it; this process never does)."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(1024)
        listener.setblocking(False)
        self.listener = listener

    def start(self) -> Deferred[None]:
        """Start every worker; fires once all serve."""
        for index in range(self.count):
            self._spawn(index)
        return self._all_ready

    def _spawn(self, index: int) -> None:
        assert self.listener is not None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        worker = _Worker(self, index)
        self.workers[index] = worker
        env = {**os.environ, "TURSO_WORKER_INDEX": str(index), "TURSO_WORKER_RUN": self.run,
               "TURSO_WORKER_OPTIONS": json.dumps(self.options)}
        self.reactor.spawnProcess(worker, sys.executable, [sys.executable, "-m", "turso_twisted.worker"],
                                  env=env, childFDs={0: "w", 1: 1, 2: 2, 3: self.listener.fileno(),
                                                     4: theirs.fileno()})
        theirs.close()
        channel = MainControl(self, worker)
        worker.channel = channel
        factory = Factory.forProtocol(lambda: channel)
        self.reactor.adoptStreamConnection(ours.fileno(), socket.AF_UNIX, factory)  # type: ignore[attr-defined]
        ours.close()

    def signal_all(self, name: str) -> None:
        """Send signal C{name} (C{"HUP"}: read the TLS certificate again) to every worker."""
        for worker in self.workers.values():
            # One still starting has no certificate to read again yet (and reads the files anyway).
            if worker.transport is not None and worker.ready and not worker.ended.called:
                try:
                    worker.transport.signalProcess(name)
                except ProcessExitedAlready:
                    pass

    def stop(self) -> Deferred[None]:
        """Tell every worker to stop (they finish what is in flight); fires once all have exited."""
        self.stopping = True
        waits = []
        for worker in list(self.workers.values()):
            if worker.channel is not None:
                worker.channel.callRemote(control.Stop)
            waits.append(worker.ended)

            def kill(worker: _Worker = worker) -> None:
                if not worker.ended.called and worker.transport is not None:
                    self._log.warn("data worker {index} did not stop in time; killing it", index=worker.index)
                    worker.transport.signalProcess("KILL")

            timer = self.reactor.callLater(self.config.shutdown_timeout + STOP_MARGIN, kill)

            def cancel(_: None, timer: IDelayedCall = timer) -> None:
                if timer.active():
                    timer.cancel()

            worker.ended.addCallback(cancel)
        done: Deferred[Any] = DeferredList(waits)

        def closed(_: object) -> None:
            if self.listener is not None:
                self.listener.close()
                self.listener = None

        return done.addCallback(closed)

    def _ready(self, worker: _Worker) -> dict[str, Any]:
        worker.ready = True
        if not self._all_ready.called and all(w.ready for w in self.workers.values()) \
                and len(self.workers) == self.count:
            self._all_ready.callback(None)
        return {"auth": self._auth_entries()}

    def _ended(self, worker: _Worker, reason: Failure) -> None:
        """A worker exited: what it held is free; it is started again unless we are stopping."""
        for name in list(worker.held):
            self._let_go(worker, name)
        for name, index in list(self.holders.items()):
            if index == worker.index:
                del self.holders[name]
        for waiting in worker.revoking.values():
            if not waiting.called:
                waiting.callback(None)
        self.retired.add(worker.figures)
        if self.workers.get(worker.index) is worker:
            del self.workers[worker.index]
        if self.stopping:
            return
        self.restarts += 1
        status = "exited" if reason.check(ProcessDone) else f"ended: {reason.getErrorMessage()}"
        self._log.error("data worker {index} {status}; starting it again", index=worker.index, status=status)
        self.reactor.callLater(0.5, self._respawn, worker.index)

    def _respawn(self, index: int) -> None:
        if not self.stopping and index not in self.workers:
            self._spawn(index)

    # -- holding namespaces ------------------------------------------------------------

    def holder(self, name: str) -> int:
        """The worker that holds C{name}, else the one to take it (the fewest held)."""
        holder = self.holders.get(name)
        if holder is not None and holder in self.workers:
            return holder
        counts = {index: 0 for index, worker in self.workers.items() if worker.ready}
        for index in self.holders.values():
            if index in counts:
                counts[index] += 1
        return min(counts, key=lambda index: (counts[index], index), default=0)

    def hand_over(self, index: int, request: DataRequest) -> Deferred[BackendResponse]:
        """Hand a request the internal listener took to data worker C{index} (it checks it again)."""
        return self.handovers.send(index, relayed_bytes(
            request, end_to_end(request.headers, HANDED_OVER_HEADERS_DROPPED)))

    async def _lease(self, worker: _Worker, name: str, access_json: dict[str, Any], writes: bool,
                     facts_json: dict[str, Any], dead_port: int | None, here: bool = False) -> dict[str, Any]:
        try:
            if self.gate is not None:
                await self.gate.admit(name, choose=not here)
            return await self._lease_here(worker, name, access_json, writes, facts_json, dead_port, here)
        except OwnedElsewhere as owner:
            if here:
                # Relayed or handed here already: it goes no further.
                return {"refusal": refusal_to_json(not_here(name, owner))}
            return {"node": owner.node, "url": owner.url}
        except Exception as error:
            return {"refusal": refusal_to_json(self._refusal(error, "taking namespace " + repr(name)))}

    async def _lease_here(self, worker: _Worker, name: str, access_json: dict[str, Any], writes: bool,
                          facts_json: dict[str, Any], dead_port: int | None, here: bool = False,
                          ) -> dict[str, Any]:
        access = Access.from_json(access_json)
        while True:
            holder = self.holders.get(name)
            if holder == MAIN:
                # The main process uses the child (a backup): wait, as a queue would.
                waiting: Deferred[Any] = _chained(self._main_done[name])
                try:
                    await waiting.addTimeout(self.config.queue_timeout, self.reactor)
                except defer.TimeoutError:
                    raise Unavailable("namespace_busy", f"namespace {name!r} is busy (a backup or a "
                                      "fork); retry shortly", retry_after=1) from None
                continue
            record = self.manager.get(name)
            authorize(access, name, record, writes, self.config.data_dir)
            if record is None:
                self.guard.check_creation(name, CreationFacts(bool(facts_json.get("has_revision")),
                                                              frozenset(facts_json.get("clients", ()))))
            if holder is None:
                chosen = worker if here else self._least_busy(worker)
                if chosen is not worker:
                    # It goes to the worker holding fewest: this one hands the request over.
                    self.holders[name] = chosen.index
                    return {"owner": chosen.index}
                break
            if holder != worker.index:
                return {"owner": holder}
            if name in worker.revoking:
                await worker.revoking[name]
                continue
            if name in worker.held:
                # It asks again: it gave the namespace back (a failed child).
                self._let_go(worker, name)
                continue
            break  # given to it: it comes for the lease
        if dead_port is not None:
            child = self.supervisor.running(name)
            if child is not None and child.port == dead_port:
                ended: Deferred[Any] = child.process.whenEnded()
                await ended.addTimeout(2.0, self.reactor, onTimeoutCancel=lambda *_: None)
        lease = await self.manager.lease(name)
        holder = self.holders.get(name)
        if holder not in (None, worker.index) or self.workers.get(worker.index) is not worker:
            lease.release()
            if holder is not None and holder != MAIN:
                return {"owner": holder}
            raise Unavailable("namespace_moving", f"namespace {name!r} is changing hands; retry shortly",
                              retry_after=1)
        self.holders[name] = worker.index
        worker.held[name] = lease
        self._grants += 1
        worker.grants[name] = self._grants
        record = self.manager.get(name)
        assert record is not None
        worker.sent[name] = _digest(record.to_json())
        return {"port": lease.child.port, "record": record.to_json(), "grant": self._grants}

    def _refusal(self, error: Exception, doing: str) -> Refusal:
        """
        What a worker's request answers when C{error} happened here: never
        an AMP error, which would cut the worker's control channel.
        """
        if isinstance(error, Refusal):
            return error
        refusal = from_os_error(error)
        if refusal is not None:
            self._log.warn("{doing}: {error}", doing=doing, error=str(error))
            return refusal
        self._log.failure("unexpected error {doing} for a data worker", Failure(error), doing=doing)
        return INTERNAL

    def _least_busy(self, asking: _Worker) -> _Worker:
        """The serving worker holding fewest namespaces (C{asking} on a tie)."""
        counts = {index: 0 for index, worker in self.workers.items() if worker.ready}
        for index in self.holders.values():
            if index in counts:
                counts[index] += 1
        best = min(counts.values(), default=0)
        if counts.get(asking.index) == best:
            return asking
        return next(self.workers[index] for index, count in counts.items() if count == best)

    def _release(self, worker: _Worker, name: str, grant: int | None) -> None:
        if name in worker.held:
            self._let_go(worker, name, grant)

    def _let_go(self, worker: _Worker, name: str, grant: int | None = None) -> None:
        """Free what C{worker} holds of C{name} (only that grant of it, if given: a late word about an
        earlier one must not free a newer one)."""
        if grant is not None and worker.grants.get(name) != grant:
            return
        worker.grants.pop(name, None)
        lease = worker.held.pop(name, None)
        worker.sent.pop(name, None)
        if self.holders.get(name) == worker.index:
            del self.holders[name]
        if lease is not None:
            lease.release()

    def revoke(self, name: str) -> Deferred[None]:
        """Ask the worker holding C{name} to give it back; fires once it has."""
        holder = self.holders.get(name)
        if holder is None or holder == MAIN:
            return succeed(None)
        worker = self.workers.get(holder)
        if worker is None or worker.channel is None:
            del self.holders[name]  # given to a worker that is gone
            return succeed(None)
        waiting = worker.revoking.get(name)
        if waiting is not None:
            return waiting
        waiting = worker.revoking[name] = Deferred()

        def given_back(_: object) -> None:
            worker.revoking.pop(name, None)
            self._let_go(worker, name)
            if not waiting.called:
                waiting.callback(None)

        worker.channel.callRemote(control.Revoke, name=name).addBoth(given_back)
        return waiting

    def claim(self, name: str) -> Deferred[Callable[[], None]]:
        """
        Hold C{name} for the main process's own use of its child (a
        backup): the worker holding it gives it back first, and workers
        wait until the returned function is called.
        """

        async def claimed() -> Callable[[], None]:
            while True:
                holder = self.holders.get(name)
                if holder == MAIN:
                    await self._main_done[name]
                elif holder is not None:
                    await self.revoke(name)
                else:
                    break
            self.holders[name] = MAIN
            done = self._main_done[name] = Deferred()

            def release() -> None:
                if self.holders.get(name) == MAIN:
                    del self.holders[name]
                self._main_done.pop(name, None)
                if not done.called:
                    done.callback(None)

            return release

        return Deferred.fromCoroutine(claimed())

    def _note_clients(self, name: str, clients: set[str]) -> dict[str, Any]:
        record = self.manager.get(name)
        try:
            if record is None:
                raise not_found(name)
            self.guard.note_clients(record, clients)
        except Exception as error:
            return {"refusal": refusal_to_json(self._refusal(error, "noting replicas of " + repr(name)))}
        return {}

    def _wedged(self, name: str, port: int) -> None:
        child = self.supervisor.running(name)
        if child is not None and child.port == port:
            self.supervisor.kill_wedged(child)

    def reclaim(self, name: str) -> Deferred[bool]:
        """Have the worker holding C{name} give it back now, if nothing is in flight on it."""
        holder = self.holders.get(name)
        worker = self.workers.get(holder) if holder is not None else None
        if worker is None or worker.channel is None or name not in worker.held or name in worker.revoking:
            return succeed(False)
        grant = worker.grants.get(name)

        def answered(answer: dict[str, Any]) -> bool:
            if answer["given"]:
                self._let_go(worker, name, grant)
            return bool(answer["given"]) and name not in worker.held

        asked: Deferred[Any] = worker.channel.callRemote(control.GiveBackIfIdle, name=name)
        return asked.addCallbacks(answered, lambda _: False)

    def _report(self, worker: _Worker, figures: dict[str, Any], usage: dict[str, list[int]]) -> None:
        worker.figures = DataFigures.from_json(figures)
        for name, (requests, received, sent) in usage.items():
            self.stats.add(name, requests, received, sent)
            if name in self.state.records:
                self.state.touch(name)

    def gather(self) -> Deferred[None]:
        """Take every worker's figures and traffic now (for C{/metrics} and stats)."""
        asks = []
        for worker in self.workers.values():
            if worker.channel is not None and worker.ready:
                asked = worker.channel.callRemote(control.ReportNow)
                asked.addCallback(lambda answer, worker=worker: self._report(worker, answer["figures"],
                                                                             answer["usage"]))
                asks.append(asked)
        done: Deferred[Any] = DeferredList(asks, consumeErrors=True)
        return done.addCallback(lambda _: None)

    def figures(self) -> DataFigures:
        total = DataFigures()
        total.add(self.retired)
        for worker in self.workers.values():
            total.add(worker.figures)
        return total

    # -- what changed ------------------------------------------------------------------

    def _auth_entries(self) -> dict[str, Any]:
        """The credentials table: the namespaces with keys of their own or revoked tokens."""
        entries: dict[str, Any] = {}
        for name in set(self.state.token_floors) | {
                name for name, record in self.state.records.items()
                if record.config.jwt_key is not None or record.config.tokens_not_before is not None}:
            record = self.state.records.get(name)
            entries[name] = {"jwt_key": None if record is None else record.config.jwt_key,
                             "not_before": self.state.tokens_not_before(name)}
        return entries

    def sync(self) -> None:
        """
        After a state write: push changed credentials to every worker, and
        changed records to their holders (acknowledged: see L{synced}).
        """
        entries = self._auth_entries()
        changes = {name: entry for name, entry in entries.items() if self._auth_sent.get(name) != entry}
        changes.update({name: None for name in self._auth_sent.keys() - entries.keys()})
        self._auth_sent = entries
        self._syncs = [sync for sync in self._syncs if not sync.called]
        for worker in self.workers.values():
            if worker.channel is None or not worker.ready:
                continue
            if changes:
                self._push(worker.channel.callRemote(control.AuthTable, entries=changes, complete=False))
            for name in list(worker.held):
                record = self.state.records.get(name)
                if record is None:
                    continue
                view = record.to_json()
                digest = _digest(view)
                if worker.sent.get(name) != digest:
                    worker.sent[name] = digest
                    self._push(worker.channel.callRemote(control.Refresh, name=name, record=view))

    def _push(self, sent: Deferred[Any]) -> None:
        # A worker that dies meanwhile is started again with the whole table.
        self._syncs.append(sent.addErrback(lambda _: None))

    def synced(self) -> Deferred[None]:
        """Fires once every worker has taken what was pushed so far."""
        pending = [sync for sync in self._syncs if not sync.called]
        if not pending:
            return succeed(None)
        done: Deferred[Any] = DeferredList(pending, consumeErrors=True)
        return done.addCallback(lambda _: None)


def _chained(source: Deferred[None]) -> Deferred[None]:
    """A Deferred firing with C{source} that can time out without cancelling C{source}."""
    out: Deferred[None] = Deferred()

    def passed(result: object) -> object:
        if not out.called:
            out.callback(None)
        return result

    source.addBoth(passed)
    return out


def _digest(view: dict[str, Any]) -> str:
    """What a holder must know again when it changes (not the access time, which changes always)."""
    return json.dumps([view.get("config"), view["history"], view["retiredClients"], view["locked"]],
                      sort_keys=True)

