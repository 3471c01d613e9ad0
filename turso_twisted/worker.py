"""
A data worker: one of C{TURSO_DATA_WORKERS} processes that serve the
data port, which they share (a listening socket the main process made),
so that the data plane uses every core.

A worker parses requests, checks credentials and SQL, and talks to the
children itself, through channels of its own, for the namespaces it
holds.  Everything else is the main process's (children, state, GC,
hibernation, the admin API); a worker asks it for a namespace when it has
a request for one it does not hold, and gives it back once idle (see
L{turso_twisted.control}).  One worker holds a namespace at a time: a
request that reaches another worker is handed to the holder over a local
socket, with its credentials, and checked there again.

Run by the main process as C{python -m turso_twisted.worker}; fd 3 is the
data port's listening socket, fd 4 the control channel.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import sys
from collections.abc import Callable
from functools import lru_cache, partial
from types import TracebackType
from typing import Any, cast

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectError, ConnectionDone, ConnectionLost, ReactorNotRunning
from twisted.internet.interfaces import IListeningPort, IReactorFromThreads, IReactorTime
from twisted.internet.protocol import ClientCreator, ClientFactory, Factory, connectionDone
from twisted.internet.task import LoopingCall
from twisted.logger import ILogObserver, Logger, globalLogBeginner
from twisted.protocols import amp
from twisted.python.failure import Failure

from . import control, names
from .channel import BackendChannel, BackendResponse
from .cluster import OwnedElsewhere
from .config import Config
from .datadir import temp_dir
from .dataport import DataConnection, DataPort, DataRequest
from .errors import Refusal, Unavailable, refusal_from_json
from .logs import flush_with, log_observer, use_format
from .metrics import DataFigures, Metrics, gather
from .policy import authorize
from .proxy import (
    HANDED_OVER_HEADERS_DROPPED,
    AnswerBudget,
    ChildLease,
    CreationProbe,
    DataPlane,
    HeldElsewhere,
    end_to_end,
)
from .relay import Peers, relayed_bytes, request_bytes
from .routing import Relay
from .state import NamespaceRecord
from .syncproto import CreationFacts, inbound_body
from .tls import Certificate, serving_tls
from .tokens import Access, DataAuth, KeySet, TokenVerifier, load_keys

#: The fds the main process gives a worker.
LISTEN_FD, CONTROL_FD = 3, 4

#: How often a worker reports its figures and traffic.
REPORT_INTERVAL = 1.0


def forward_address(run: str, index: int) -> str:
    """
    Where worker C{index} takes requests handed over by the others: an
    abstract socket named after the main process's run (its pid and a
    random part, so that nothing can take the name first).
    """
    return f"\0turso-server-{run}-data-worker-{index}"


def worker_peers(reactor: Any, run: str, keep_idle: float) -> Peers:
    """Kept-alive connections to the data workers of C{run}, to hand them requests."""
    return Peers(reactor, lambda index, to: reactor.connectUNIX(forward_address(run, index), to, timeout=5),
                 lambda index: f"data worker {index}", keep_idle=keep_idle)


def connections_address(run: str, index: int) -> str:
    """Where worker C{index} takes client connections moved to it (see L{forward_address})."""
    return f"\0turso-server-{run}-data-worker-{index}-connections"


@lru_cache(maxsize=1024)
def _keys(text: str) -> KeySet:
    return load_keys(text)


@attrs.define(eq=False)
class Held:
    """A namespace this worker holds: its record, its child's port, its channel."""

    name: str
    record: NamespaceRecord
    port: int
    channel: BackendChannel
    last_used: float
    #: Which grant of it this is (the main process's number for it).
    grant: int | None = None
    in_flight: int = 0
    #: Set when the main process asks for it back: fires once nothing is in flight.
    revoking: Deferred[None] | None = None


@attrs.define(eq=False)
class WorkerLease:
    """A request's use of a held namespace (a L{turso_twisted.proxy.ChildLease})."""

    namespaces: WorkerNamespaces
    held: Held
    _released: bool = False

    @property
    def name(self) -> str:
        return self.held.name

    @property
    def channel(self) -> BackendChannel:
        return self.held.channel

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.namespaces._done(self.held)

    def __enter__(self) -> WorkerLease:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.release()


@attrs.define(eq=False)
class WorkerNamespaces:
    """
    The namespaces as a worker's data plane sees them (a
    L{turso_twisted.proxy.Namespaces}): the ones it holds, and the main
    process for the rest.
    """

    clock: IReactorTime
    data_dir: str
    make_channel: Callable[[int], BackendChannel]
    #: Held namespaces idle this long are given back (the channel's spare time).
    release_after: float = 5.0
    control: amp.AMP | None = None
    held: dict[str, Held] = attrs.field(factory=dict)
    #: Lease calls in flight, by name: a second request waits for the first.
    _taking: dict[str, Deferred[None]] = attrs.field(factory=dict)
    #: The port of a child that failed us, by name, for the next lease.
    _dead_ports: dict[str, int] = attrs.field(factory=dict)
    #: Traffic since the last report: name -> [requests, bytes in, bytes out].
    usage: dict[str, list[int]] = attrs.field(factory=dict)
    #: The credentials table: name -> (its own keys, its tokens_not_before).
    auth: dict[str, tuple[KeySet | None, float | None]] = attrs.field(factory=dict)
    #: Which worker holds a namespace, as last told (until a handover to it fails).
    elsewhere: dict[str, int] = attrs.field(factory=dict)
    _log = Logger()

    # -- the data plane's side ---------------------------------------------------------

    def admit(self, name: str, access: Access, writes: bool, probe: CreationProbe,
              here: bool = False) -> Deferred[ChildLease]:
        held = self.held.get(name)
        if held is not None and held.revoking is None:
            try:
                authorize(access, name, held.record, writes, self.data_dir)
            except Refusal as refusal:
                return fail(refusal)
            return succeed(self._lease(held))
        holder = self.elsewhere.get(name)
        if holder is not None and not here:
            # The holder checks the access rules.
            return fail(HeldElsewhere(holder))
        return Deferred.fromCoroutine(self._take(name, access, writes, probe, here))

    def moved(self, name: str) -> None:
        """A handover to C{name}'s holder failed: ask the main process next time."""
        self.elsewhere.pop(name, None)

    async def _take(self, name: str, access: Access, writes: bool, probe: CreationProbe,
                    here: bool = False) -> ChildLease:
        while (waiting := self._taking.get(name)) is not None:
            # Another request is asking for it: its answer may serve this one.
            await waiting
            held = self.held.get(name)
            if held is not None and held.revoking is None:
                authorize(access, name, held.record, writes, self.data_dir)
                return self._lease(held)
            if name in self.elsewhere and not here:
                raise HeldElsewhere(self.elsewhere[name])
        facts = CreationFacts.of(probe.method, probe.path, probe.body, probe.pipeline)
        assert self.control is not None
        done: Deferred[None] = Deferred()
        self._taking[name] = done
        try:
            answer = await self._ask(
                control.Lease, name=name, access=access.to_json(), writes=writes,
                facts={"has_revision": facts.has_revision, "clients": sorted(facts.clients)},
                dead_port=self._dead_ports.pop(name, None), here=here)
            outcome = answer["outcome"]
            if "refusal" in outcome:
                raise refusal_from_json(outcome["refusal"])
            if "node" in outcome:
                # Another cluster node owns it: the request is relayed there.
                raise OwnedElsewhere(str(outcome["node"]), str(outcome["url"]))
            if "owner" in outcome:
                if len(self.elsewhere) > 100_000:
                    self.elsewhere.clear()
                self.elsewhere[name] = int(outcome["owner"])
                raise HeldElsewhere(self.elsewhere[name])
            port = int(outcome["port"])
            self.elsewhere.pop(name, None)
            held = Held(name, NamespaceRecord.from_json(name, outcome["record"]), port,
                        self.make_channel(port), self.clock.seconds(), outcome.get("grant"))
            held.channel.on_wedged = partial(self._wedged, held)
            self.held[name] = held
            return self._lease(held)
        finally:
            # Only now are the requests waiting for this answer woken: one
            # woken before the namespace is noted as held would ask for it
            # again, and the main process, taking that as a give-back, would
            # free the lease this request is about to use.
            if self._taking.get(name) is done:
                del self._taking[name]
            done.callback(None)

    async def _ask(self, command: type[amp.Command], **arguments: Any) -> dict[str, Any]:
        """Ask the main process; a channel that fails is the client's 503, not our crash."""
        if self.control is None:
            raise Unavailable("data_worker_starting", "this data worker is starting; retry shortly",
                              retry_after=1)
        try:
            answer: dict[str, Any] = await self.control.callRemote(command, **arguments)
        except Exception as error:
            self._log.warn("control channel: {command} failed: {error}", command=command.__name__,
                           error=str(error))
            raise Unavailable("data_worker_unavailable", "this data worker lost touch with the main "
                              "process; retry shortly", retry_after=1) from None
        return answer

    def _lease(self, held: Held) -> WorkerLease:
        held.in_flight += 1
        return WorkerLease(self, held)

    def _done(self, held: Held) -> None:
        held.in_flight -= 1
        held.last_used = self.clock.seconds()
        if held.in_flight == 0 and held.revoking is not None and not held.revoking.called:
            held.revoking.callback(None)

    def record(self, lease: ChildLease) -> NamespaceRecord:
        assert isinstance(lease, WorkerLease)
        return lease.held.record

    def inbound(self, lease: ChildLease, method: bytes, path: bytes, body: bytes,
                pipeline: Any) -> Deferred[bytes]:
        assert isinstance(lease, WorkerLease)
        record = lease.held.record
        try:
            sent, new = inbound_body(record, method, path, body, pipeline)
        except Refusal as refusal:
            return fail(refusal)
        if not new:
            return succeed(sent)

        async def note() -> bytes:
            # Saved by the main process before the push goes on: it is
            # what retires these replicas should the files be replaced.
            assert self.control is not None
            answer = await self._ask(control.NoteClients, name=record.name, clients=sorted(new))
            if "refusal" in answer["outcome"]:
                raise refusal_from_json(answer["outcome"]["refusal"])
            record.clients.update(new)
            return sent

        return Deferred.fromCoroutine(note())

    def ended(self, lease: ChildLease) -> Deferred[None]:
        """The child failed a request: give the namespace back; the next lease waits for its death."""
        assert isinstance(lease, WorkerLease)
        held = lease.held
        if self.held.get(held.name) is held:
            self._dead_ports[held.name] = held.port
            self._give_back(held)
        return succeed(None)

    def count(self, name: str, received: int, sent: int) -> None:
        counts = self.usage.get(name)
        if counts is None:
            counts = self.usage[name] = [0, 0, 0]
        counts[0] += 1
        counts[1] += received
        counts[2] += sent

    # -- the main process's side ---------------------------------------------------------

    def revoke(self, name: str) -> Deferred[None]:
        """Give C{name} back once nothing is in flight on it."""
        held = self.held.get(name)
        if held is None:
            return succeed(None)
        if held.revoking is None:
            held.revoking = Deferred()
            if held.in_flight == 0:
                held.revoking.callback(None)

        async def when_done() -> None:
            assert held.revoking is not None
            await held.revoking
            if self.held.get(name) is held:
                del self.held[name]
            await held.channel.close()

        return Deferred.fromCoroutine(when_done())

    def give_back_if_idle(self, name: str) -> Deferred[bool]:
        """Give C{name} back at once unless a request is using it."""
        held = self.held.get(name)
        if held is None:
            return succeed(True)
        if held.in_flight or held.revoking is not None or held.channel.busy:
            return succeed(False)
        del self.held[name]
        return held.channel.close().addCallback(lambda _: True)

    def refresh(self, name: str, record: dict[str, Any]) -> None:
        held = self.held.get(name)
        if held is not None:
            held.record = NamespaceRecord.from_json(name, record)

    def update_auth(self, entries: dict[str, Any], complete: bool) -> None:
        if complete:
            self.auth = {}
        for name, entry in entries.items():
            if entry is None:
                self.auth.pop(name, None)
                continue
            key = entry.get("jwt_key")
            self.auth[name] = (None if key is None else _keys(key), entry.get("not_before"))

    def namespace_keys(self, name: str) -> KeySet | None:
        entry = self.auth.get(name)
        return None if entry is None else entry[0]

    def namespace_not_before(self, name: str) -> float | None:
        entry = self.auth.get(name)
        return None if entry is None else entry[1]

    def release_idle(self) -> None:
        """Give back what has been idle for L{release_after}."""
        now = self.clock.seconds()
        for held in list(self.held.values()):
            if (held.in_flight == 0 and held.revoking is None and not held.channel.busy
                    and now - held.last_used >= self.release_after):
                self._give_back(held)

    def _give_back(self, held: Held) -> None:
        del self.held[held.name]

        def closed(_: object) -> None:
            # Only once the spare is retired: the next holder's connections
            # would otherwise wait behind it.
            if self.control is not None:
                self.control.callRemote(control.Release, name=held.name, last_access=held.last_used,
                                        grant=held.grant)

        held.channel.close().addBoth(closed)

    def _wedged(self, held: Held) -> None:
        if self.control is not None:
            self.control.callRemote(control.Wedged, name=held.name, port=held.port)

    def take_usage(self) -> dict[str, list[int]]:
        usage, self.usage = self.usage, {}
        return usage


# -- handing requests to the worker that holds their namespace ------------------------------


# -- the control channel, worker side ----------------------------------------------------------


class _Peer(amp.AMP):
    """Another worker's connection to this one, to move client connections here."""

    def __init__(self, worker: DataWorker) -> None:
        super().__init__()
        self.worker = worker

    @control.TakeConnection.responder
    def take_connection(self, fd: int, head: bytes) -> dict[str, Any]:
        try:
            self.worker.adopt(fd, head)
        except Exception as error:
            # The client may have gone meanwhile: the sender hands the request over instead.
            self.worker._log.info("could not take a moved connection: {error}", error=str(error))
            return {"taken": False}
        return {"taken": True}


class _Recorder(Factory):
    """The data port's factory, for one adopted connection whose protocol we need."""

    noisy = False

    def __init__(self, port: DataPort) -> None:
        self.port = port
        self.made: DataConnection | None = None

    def buildProtocol(self, addr: object) -> DataConnection:
        self.made = self.port.buildProtocol(addr)
        return self.made


class _PeerFactory(Factory):
    noisy = False

    def __init__(self, worker: DataWorker) -> None:
        self.worker = worker

    def buildProtocol(self, addr: object) -> _Peer:
        return _Peer(self.worker)


@attrs.define(eq=False)
class Migrations:
    """Moving client connections to the worker that holds their namespace."""

    reactor: Any
    run: str
    _peers: dict[int, Deferred[amp.AMP]] = attrs.field(factory=dict)

    def migrate(self, index: int, request: DataRequest) -> Deferred[bool]:
        connection = request.connection
        if request.received > 1 << 20 or connection.port.tls:
            # A large body is handed over, not moved; so is a request over TLS
            # (its session lives in this process).
            return succeed(False)
        data = request_bytes(request)
        fd = connection.detach()

        async def move() -> bool:
            try:
                peer = await self._peer(index)
                answer = await peer.callRemote(control.TakeConnection, fd=fd, head=data)
                if not answer["taken"]:
                    raise ConnectError(string="not taken")
            except Exception:
                self._peers.pop(index, None)
                connection.reattach()
                return False
            finally:
                os.close(fd)
            connection.hand_off(request)
            return True

        return Deferred.fromCoroutine(move())

    def _peer(self, index: int) -> Deferred[amp.AMP]:
        known = self._peers.get(index)
        if known is not None:
            return _chain(known)
        made: Deferred[amp.AMP] = ClientCreator(self.reactor, amp.AMP).connectUNIX(
            connections_address(self.run, index), timeout=5)

        def lost(failure: Failure) -> Failure:
            self._peers.pop(index, None)
            return failure

        made.addErrback(lost)
        self._peers[index] = made
        return _chain(made)


def _chain(source: Deferred[amp.AMP]) -> Deferred[amp.AMP]:
    """A Deferred with C{source}'s result, leaving C{source} to fire the next caller too."""
    out: Deferred[amp.AMP] = Deferred()

    def both(result: Any) -> Any:
        if isinstance(result, Failure):
            out.errback(result)
        else:
            out.callback(result)
        return result

    source.addBoth(both)
    return out


class WorkerControl(amp.AMP):
    """The worker's end of the control channel."""

    def __init__(self, worker: DataWorker) -> None:
        super().__init__()
        self.worker = worker

    def connectionMade(self) -> None:
        super().connectionMade()
        self.worker.connected(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        self.worker.main_gone()

    @control.Revoke.responder
    def revoke(self, name: str) -> Deferred[dict[str, Any]]:
        return self.worker.namespaces.revoke(name).addCallback(lambda _: {})

    @control.GiveBackIfIdle.responder
    def give_back_if_idle(self, name: str) -> Deferred[dict[str, Any]]:
        return self.worker.namespaces.give_back_if_idle(name).addCallback(lambda given: {"given": given})

    @control.Refresh.responder
    def refresh(self, name: str, record: dict[str, Any]) -> dict[str, Any]:
        self.worker.namespaces.refresh(name, record)
        return {}

    @control.AuthTable.responder
    def auth_table(self, entries: dict[str, Any], complete: bool) -> dict[str, Any]:
        self.worker.namespaces.update_auth(entries, complete)
        return {}

    @control.ReportNow.responder
    def report_now(self) -> dict[str, Any]:
        return {"figures": self.worker.figures().to_json(), "usage": self.worker.namespaces.take_usage()}

    @control.Stop.responder
    def stop(self) -> dict[str, Any]:
        self.worker.stop()
        return {}


class DataWorker:
    """One data worker: its ports, data planes, namespaces and reports."""

    _log = Logger()

    def __init__(self, reactor: Any, config: Config, index: int, run: str) -> None:
        self.reactor, self.config, self.index, self.run = reactor, config, index, run
        self._family = socket.AF_INET
        self.control: WorkerControl | None = None
        self._ports: list[IListeningPort] = []
        self._listen_fd = -1
        self.namespaces = WorkerNamespaces(
            reactor, config.data_dir,
            lambda port: BackendChannel(reactor, port, max_queue=config.queue_depth,
                                        queue_timeout=config.queue_timeout,
                                        backend_timeout=config.backend_timeout))
        self.metrics = Metrics()
        scratch = temp_dir(config.data_dir)
        verifier = TokenVerifier(reactor, leeway=config.jwt_leeway)
        server_keys = load_keys(config.jwt_key) if config.jwt_key else None

        def auth() -> DataAuth:
            return DataAuth(config.auth_token, server_keys, verifier,
                            namespace_keys=self.namespaces.namespace_keys,
                            namespace_not_before=self.namespaces.namespace_not_before,
                            namespace_of=names.of_target)

        # TURSO_MAX_HELD_BYTES is the daemon's: each worker keeps its share.
        budget = AnswerBudget(config.max_held_bytes // max(1, config.data_workers))
        self.handovers = worker_peers(reactor, run, config.client_idle_timeout / 2)
        self.migrations = Migrations(reactor, run)
        # Clients' requests: logged, counted, handed over when another worker holds the namespace.
        self.auth = auth()
        self.plane = DataPlane(reactor, self.namespaces, self.namespaces, self.metrics,
                               access_log=config.access_log, scratch_dir=scratch,
                               budget=budget, auth=self.auth,
                               forward=self._hand_over, migrate=self.migrations.migrate,
                               relay=Relay.for_config(reactor, config) if config.clustered else None)
        self.port = DataPort(reactor, self.plane.handle, self.plane.refused_at_headers, self.auth,
                             config.max_body_bytes, scratch_dir=scratch,
                             idle_timeout=config.client_idle_timeout)
        #: The certificate the data port serves (C{None}: plain HTTP); the
        #: main process checked it at start-up.
        self.certificate = Certificate(config.tls_cert_file, config.tls_key_file, reactor) \
            if config.tls_on("data") else None
        self.port.tls = self.certificate is not None
        # Requests other workers hand over: served, but logged and counted by the worker the client
        # reached (their credentials are checked again: anything local can reach this socket).
        self.handed_auth = auth()
        self.handed_plane = DataPlane(reactor, self.namespaces, None, None, access_log=False, takes_over=True,
                                      scratch_dir=scratch, budget=budget,
                                      auth=self.handed_auth)
        self.handed_port = DataPort(reactor, self.handed_plane.handle, self.handed_plane.refused_at_headers,
                                    self.handed_auth, config.max_body_bytes, scratch_dir=scratch,
                                    idle_timeout=config.client_idle_timeout)

    def start(self, listen_fd: int, control_fd: int) -> None:
        reactor = self.reactor
        with socket.socket(fileno=os.dup(listen_fd)) as listener:
            self._family = listener.family
        reactor.adoptStreamConnection(control_fd, socket.AF_UNIX, _ControlFactory(self))
        os.close(control_fd)
        self._listen_fd = listen_fd
        LoopingCall(self.namespaces.release_idle).start(1.0, now=False)
        LoopingCall(self.report).start(REPORT_INTERVAL, now=False)

    def connected(self, channel: WorkerControl) -> None:
        self.control = channel
        self.namespaces.control = channel
        # Take connections only once the credentials table is in.
        channel.callRemote(control.Ready, index=self.index).addCallbacks(self._ready, self._failed)

    def _ready(self, answer: dict[str, Any]) -> None:
        self.namespaces.update_auth(answer["auth"], complete=True)
        # Only now, with the credentials table in, is anything taken.
        reactor = self.reactor
        self._ports.append(reactor.listenUNIX(forward_address(self.run, self.index), self.handed_port))
        self._ports.append(reactor.listenUNIX(connections_address(self.run, self.index), _PeerFactory(self)))
        served: Any = self.port
        if self.certificate is not None:
            served = serving_tls(self.port, self.certificate)
            self.certificate.start()
        self._ports.append(reactor.adoptStreamPort(self._listen_fd, self._family, served))
        os.close(self._listen_fd)
        self._log.info("data worker {index} serving", index=self.index)

    def _failed(self, failure: Failure) -> None:
        if failure.check(ConnectionLost, ConnectionDone):
            # The main process went away while this worker started (a shutdown, a kill).
            self._log.info("data worker {index}: the main process is gone; exiting", index=self.index)
        else:
            self._log.failure("data worker {index} could not start", failure, index=self.index)
        self._stop_reactor()

    def _hand_over(self, index: int, request: DataRequest) -> Deferred[BackendResponse]:
        """Hand C{request} to data worker C{index}, with its credentials (checked there again)."""
        return self.handovers.send(index, relayed_bytes(
            request, end_to_end(request.headers, HANDED_OVER_HEADERS_DROPPED)))

    def adopt(self, fd: int, head: bytes) -> None:
        """Serve a client connection another worker moved here, starting with C{head}."""
        recorder = _Recorder(self.port)
        try:
            self.reactor.adoptStreamConnection(fd, self._family, recorder)
        finally:
            os.close(fd)  # adopting made a copy
        assert recorder.made is not None
        recorder.made.moved_in = True
        recorder.made.dataReceived(head)

    def figures(self) -> DataFigures:
        queued = sum(held.channel.queued for held in self.namespaces.held.values())
        total = gather(self.metrics, self.auth, self.plane, self.port, queued)
        handed = gather(Metrics(), self.handed_auth, self.handed_plane, self.handed_port, 0)
        # The worker a client reached counted its credentials; the holder only what it refused.
        handed.auth_accepted, handed.auth_refused, handed.unauthorized = {}, {}, 0
        total.add(handed)
        return total

    def report(self) -> None:
        if self.control is not None:
            self.control.callRemote(control.Report, figures=self.figures().to_json(),
                                    usage=self.namespaces.take_usage())

    def stop(self) -> None:
        """Stop taking connections, let requests in flight finish (bounded), exit."""
        for port in self._ports:
            port.stopListening()
        self._ports = []
        done = Deferred.fromCoroutine(self._drain())
        done.addTimeout(self.config.shutdown_timeout, self.reactor)
        done.addBoth(lambda _: self._stop_reactor())

    async def _drain(self) -> None:
        await self.plane.idle()
        await self.handed_plane.idle()
        # Spare connections are dropped politely: a child logs a connection closed unused.
        for name in list(self.namespaces.held):
            await self.namespaces.revoke(name)
        self.report()

    def main_gone(self) -> None:
        """The main process went away: nothing is left to serve for."""
        self._stop_reactor()

    def _stop_reactor(self) -> None:
        try:
            self.reactor.stop()
        except ReactorNotRunning:
            pass  # stopping already


class _ControlFactory(ClientFactory):
    noisy = False

    def __init__(self, worker: DataWorker) -> None:
        self.worker = worker

    def buildProtocol(self, addr: object) -> WorkerControl:
        return WorkerControl(self.worker)


def _die_with_parent() -> None:
    """Be killed if the main process dies (even by SIGKILL)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def main() -> None:
    main_pid = os.getppid()
    # SIGHUP, passed on by the main process, reads the TLS certificate
    # again; until that is set up (and without TLS) it does nothing.
    on_hangup: list[Callable[[], object]] = []
    signal.signal(signal.SIGHUP, lambda *_: [reload() for reload in on_hangup])
    _die_with_parent()
    if os.getppid() != main_pid:
        raise SystemExit(1)
    index = int(os.environ["TURSO_WORKER_INDEX"])
    options = json.loads(os.environ.get("TURSO_WORKER_OPTIONS", "{}"))
    config = Config.load(options, os.environ)
    use_format(config.log_format)
    observer = cast(ILogObserver, log_observer(sys.stdout, {"worker": index}))
    globalLogBeginner.beginLoggingTo([observer], discardBuffer=True, redirectStandardIO=False)
    from twisted.internet import epollreactor

    epollreactor.install()
    from twisted.internet import reactor

    # SIGTERM is the main process's to handle; a worker stops when told, or with it.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    worker = DataWorker(reactor, config, index, os.environ["TURSO_WORKER_RUN"])
    certificate = worker.certificate
    if certificate is not None:
        threads = cast(IReactorFromThreads, reactor)
        on_hangup.append(lambda: threads.callFromThread(certificate.reload))
    worker.start(LISTEN_FD, CONTROL_FD)
    flush_with(reactor)
    reactor.run(installSignalHandlers=False)  # type: ignore[call-arg]  # the reactor takes it
    flush_with(None)


if __name__ == "__main__":
    main()

