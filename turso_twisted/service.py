"""
Wiring: one reactor hosts the data port, the admin port and the children.

L{make_service} is what the twistd plugin calls.  Everything that can be
wrong with the configuration or the state file is found there, before
twistd starts logging, and reported as one line with a non-zero exit.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Mapping
from typing import Any, cast

from twisted.application.service import Service
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IReactorFromThreads
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.python.failure import Failure

from . import logs, names
from .admin import AdminAPI, Readiness
from .adminrelay import PREFIX as ADMIN_RELAY_PREFIX
from .adminrelay import AdminRelay
from .archival import Archival
from .archive import Archiver
from .auth import BearerToken
from .backup import Backups
from .channel import BackendChannel, BackendResponse
from .cluster import Cluster, OwnedElsewhere
from .config import Address, Config, ConfigError
from .confine import Confinement, ConfinementUnavailable, choose
from .datadir import DataDirBusy, lock_data_dir, temp_dir
from .dataport import DataPort, DataRequest
from .errors import Refusal
from .etcd import Etcd, EtcdError, EtcdUnavailable
from .gc import GarbageCollector
from .hibernation import Hibernator
from .leases import Leases
from .locks import KeyedLocks
from .metrics import DataFigures, Metrics, gather
from .moves import PREFIX as MOVES_PREFIX
from .moves import Moves
from .namespaces import Admission, NamespaceManager
from .ports import PortAllocator
from .process import child_environment, child_wrappers
from .proxy import AnswerBudget, DataPlane, LocalNamespaces, Namespaces
from .recovery import recover
from .routing import ClusterGate, ClusterNamespaces, ClusterPlacer, Relay, WorkersBehind
from .sites import CappedSite
from .state import StateError, StateStore
from .stats import NamespaceStats
from .supervisor import Reactor, Supervisor
from .syncproto import HistoryGuard
from .tls import Certificate, CertificateError, serving_plain, serving_tls
from .tokens import DataAuth, KeySet, TokenVerifier, load_keys
from .workers import WorkerPool

#: How long a node waits before trying to join the cluster again.
JOIN_RETRY = 2.0


class TursoService(Service):
    """
    The daemon: listeners, namespaces and children, started and stopped
    together.
    """

    _log = Logger()

    def __init__(self, config: Config, reactor: Reactor, state: StateStore,
                 confinement: Confinement | None = None,
                 options: Mapping[str, str | None] | None = None) -> None:
        self.config = config
        self.reactor = reactor
        self.state = state
        self.supervisor = Supervisor(
            reactor=reactor,
            tursodb_bin=config.tursodb_bin,
            data_dir=config.data_dir,
            ports=PortAllocator(config.backend_port_start, config.backend_port_end),
            startup_timeout=config.startup_timeout,
            child_env=child_environment(os.environ),
            wrappers=child_wrappers(),
            confinement=confinement or Confinement(reason="not configured"),
            make_channel=lambda port: BackendChannel(reactor, port, max_queue=config.queue_depth,
                                                     queue_timeout=config.queue_timeout,
                                                     backend_timeout=config.backend_timeout),
        )
        locks = KeyedLocks()
        self.leases = Leases(reactor, drain_timeout=config.shutdown_timeout)
        self.guard = HistoryGuard(state)
        self.hibernator = Hibernator(reactor, state, self.supervisor, self.leases, locks,
                                     idle_after=config.hibernate_after, max_running=config.max_running)
        self.admission = Admission(state, config.max_namespaces)
        archiver = Archiver(config.data_dir)
        self.archival = Archival(reactor, state, self.supervisor, archiver, self.guard, self.leases, locks,
                                 self.admission)
        self.manager = NamespaceManager(
            clock=reactor,
            state=state,
            supervisor=self.supervisor,
            archiver=archiver,
            guard=self.guard,
            leases=self.leases,
            locks=locks,
            hibernator=self.hibernator,
            admission=self.admission,
            allow_auto_provision=config.allow_auto_provision,
        )
        self.gc = GarbageCollector(
            clock=reactor,
            manager=self.manager,
            archival=self.archival,
            leases=self.leases,
            interval=config.gc_interval,
            auto_idle=config.auto_idle_duration,
            retention=config.archive_retention,
        )
        #: The certificate the HTTPS ports serve (C{None}: plain HTTP).
        self.certificate = Certificate(config.tls_cert_file, config.tls_key_file, reactor) \
            if config.tls_cert_file else None
        self.readiness = Readiness(config.data_dir, state_loaded=True)
        self.metrics = Metrics()
        self.stats = NamespaceStats(reactor, config.data_dir, state, self.supervisor)
        scratch = temp_dir(config.data_dir)

        #: In a cluster: this node's membership, its moves, its check of
        #: every data request, and its internal listener.
        self.cluster: Cluster | None = None
        self.moves: Moves | None = None
        self.gate: ClusterGate | None = None
        self.admin_relay: AdminRelay | None = None
        self.cluster_port: DataPort | None = None
        self.data_auth = self._data_auth()
        if config.clustered:
            self.cluster = Cluster(reactor, Etcd(reactor, config.cluster_etcd), config.cluster_prefix,
                                   config.node_name, config.node_url, placement=config.cluster_placement,
                                   measure=self._bytes_held)
            self.admission.placer = ClusterPlacer(self.cluster, self._archived_ids)
            self.moves = Moves(reactor, self.cluster, self.archival, state, config.data_dir, scratch,
                               config.cluster_token)
            self.gate = ClusterGate(self.cluster, state, self.admission.placer, self.moves)
            self.admin_relay = AdminRelay(reactor, self.cluster, config.cluster_token)
        #: The data port: served here (one process), or by data workers.
        self.data_port: DataPort | None = None
        self.workers: WorkerPool | None = None
        if config.data_workers > 1:
            self.workers = WorkerPool(reactor, config, options or {}, config.data_workers, self.manager,
                                      self.guard, self.supervisor, state, self.stats, self.leases,
                                      self.hibernator, gate=self.gate)
            if self.gate is not None:
                # Requests other nodes relay here go to the data worker that holds
                # their namespace (or takes it), checked in full again there.
                self._serve_internal(WorkersBehind(self.workers, self.gate), self.workers.hand_over,
                                     scratch, AnswerBudget(config.max_held_bytes))
        else:
            self._serve_data_here(scratch)
        self.backups = Backups(reactor, self.manager, self.archival, self.supervisor, scratch)
        admin_token = BearerToken(config.admin_token)
        self.admin = AdminAPI(self.manager, self.archival, self.stats, admin_token, self.readiness,
                              self.backups, self.metrics, metrics_public=config.metrics_public,
                              gather=None if self.workers is None else self.workers.gather,
                              cluster=self.cluster, moves=self.moves, relay=self.admin_relay)
        self.admin_site = CappedSite(self.admin.resource(), config.max_restore_bytes, admin_token,
                                     limit_name="TURSO_MAX_RESTORE_BYTES", scratch_dir=scratch)
        self.ports: dict[str, IListeningPort] = {}
        #: Files start-up recovery found with no namespace and quarantined.
        self.quarantined: list[str] = []
        self.metrics.watch(self)
        #: The data dir lock (see L{turso_twisted.datadir}), held until exit.
        self.lock_fd: int | None = None
        self._bound = False

    def _data_auth(self) -> DataAuth:
        """The data port's credentials check (also the internal listener's, for relayed requests)."""
        config, state = self.config, self.state

        def namespace_keys(name: str) -> KeySet | None:
            record = state.records.get(name)
            return None if record is None else record.config.keys

        return DataAuth(config.auth_token, load_keys(config.jwt_key) if config.jwt_key else None,
                        TokenVerifier(self.reactor, leeway=config.jwt_leeway),
                        namespace_keys=namespace_keys, namespace_not_before=state.tokens_not_before,
                        namespace_of=names.of_target)

    def _serve_data_here(self, scratch: str) -> None:
        """The data port in this process (C{TURSO_DATA_WORKERS=1})."""
        config, reactor = self.config, self.reactor
        local = LocalNamespaces(reactor, self.manager, self.guard, config.data_dir)
        namespaces: Namespaces = local
        relay = None
        budget = AnswerBudget(config.max_held_bytes)
        if self.cluster is not None:
            assert self.gate is not None
            namespaces = ClusterNamespaces(local, self.cluster, self.gate)
            relay = Relay.for_config(reactor, config)
            self._serve_internal(ClusterNamespaces(local, self.cluster, self.gate, relayed=True), None,
                                 scratch, budget)
        self.data_plane = DataPlane(reactor, namespaces, self.stats, self.metrics,
                                    access_log=config.access_log, scratch_dir=scratch,
                                    budget=budget, auth=self.data_auth, relay=relay)
        self.data_port = DataPort(reactor, self.data_plane.handle, self.data_plane.refused_at_headers,
                                  self.data_auth, config.max_body_bytes, scratch_dir=scratch,
                                  idle_timeout=config.client_idle_timeout)

    def _serve_internal(self, namespaces: Namespaces,
                        forward: Callable[[int, DataRequest], Deferred[BackendResponse]] | None,
                        scratch: str, budget: AnswerBudget) -> None:
        """The internal listener: requests other nodes relay here (checked in full again, never sent on)."""
        config, reactor = self.config, self.reactor
        self.cluster_plane = DataPlane(reactor, namespaces, self.stats, self.metrics,
                                       access_log=config.access_log, scratch_dir=scratch, budget=budget,
                                       auth=self.data_auth, forward=forward)
        # Bodies up to a restore's cap: relayed admin calls bring restores
        # (the relaying node capped a data request's body already).
        limit = "TURSO_MAX_RESTORE_BYTES" if config.max_restore_bytes > config.max_body_bytes \
            else "TURSO_MAX_BODY_BYTES"
        self.cluster_port = DataPort(reactor, self._internal, self.cluster_plane.refused_at_headers,
                                     self.data_auth, max(config.max_body_bytes, config.max_restore_bytes),
                                     limit_name=limit,
                                     scratch_dir=scratch,
                                     idle_timeout=config.client_idle_timeout,
                                     peer_token=config.cluster_token.encode())

    def _bytes_held(self) -> Deferred[int]:
        """The bytes of every namespace's files on this node (measured off the reactor)."""
        data_dir = self.config.data_dir
        # A copy on its way out is counted by its target.
        held = [record.name for record in self.state.records.values() if record.moving_to is None]

        def measure() -> int:
            return sum(sum(names.data_file_sizes(data_dir, name).values()) for name in held)

        return deferToThread(measure)

    def _archived_ids(self, name: str) -> Deferred[set[str]]:
        """The ids of C{name}'s incarnations in this node's archive."""
        listed = self.archival.entries(name)
        return listed.addCallback(lambda entries: {str(entry.manifest.get("id")) for entry in entries
                                                   if entry.manifest is not None})

    def _internal(self, request: DataRequest) -> None:
        """The internal listener: the cluster's own endpoints, and requests other nodes relay."""
        assert self.moves is not None and self.admin_relay is not None
        if request.target.startswith(ADMIN_RELAY_PREFIX + b"/"):
            self.admin_relay.serve(request)
        elif request.target.startswith(MOVES_PREFIX):
            self.moves.serve(request)
        else:
            self.cluster_plane.handle(request)

    def data_figures(self) -> DataFigures:
        """What the data plane counted (here, or in the data workers), for C{/metrics}."""
        if self.workers is not None:
            return self.workers.figures()
        assert self.data_port is not None
        return gather(self.metrics, self.data_auth, self.data_plane, self.data_port, self.supervisor.queued())

    def privilegedStartService(self) -> None:
        """
        Bind both listeners before the reactor runs; a taken address ends
        start-up with one line and exit status 1.
        """
        # SIGHUP reads the TLS certificate again (`systemctl reload`); without
        # TLS it does nothing, rather than end the daemon as by default (from
        # the first moment the reactor can take it).
        threads = cast(IReactorFromThreads, self.reactor)
        signal.signal(signal.SIGHUP, lambda *_: threads.callFromThread(self._hangup))
        os.makedirs(temp_dir(self.config.data_dir), exist_ok=True)
        listeners: list[tuple[str, str, Address, Any]] = [
            ("data", "TURSO_DATA_ADDR", self.config.data_addr, self.data_port),
            ("admin", "TURSO_ADMIN_ADDR", self.config.admin_addr, self.admin_site),
        ]
        if self.cluster_port is not None:
            listeners.append(("cluster", "TURSO_CLUSTER_ADDR", self.config.cluster_addr, self.cluster_port))
        for kind, variable, address, site in listeners:
            try:
                if site is None:
                    # The data workers accept on it; this process only binds it.
                    assert self.workers is not None
                    self.workers.listen(address.host, address.port)
                    continue
                if self.certificate is not None and self.config.tls_on(kind):
                    if site is self.data_port:
                        self.data_port.tls = True
                    site = serving_tls(site, self.certificate)
                elif kind == "admin":
                    # twisted.web would wait for a line end in a TLS handshake
                    # (the data port's parser refuses one at its first byte).
                    site = serving_plain(site)
                self.ports[kind] = self.reactor.listenTCP(address.port, site, interface=address.host)
            except (CannotListenError, OSError) as error:
                for port in self.ports.values():
                    port.stopListening()
                cause = getattr(error, "socketError", error)
                reason = getattr(cause, "strerror", None) or str(cause)
                # Logging has begun by now: the line goes to the log, as JSON.
                self._log.critical("{variable}={address}: cannot listen: {reason}",
                                   variable=variable, address=str(address), reason=reason)
                raise SystemExit(1) from None
        if self.cluster is not None:
            self.cluster.url = self._node_url()
            assert self.admin_relay is not None
            admin = cast("IPv4Address | IPv6Address", self.ports["admin"].getHost())
            host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(admin.host, admin.host)
            scheme = "https" if self.config.tls_on("admin") else "http"
            self.admin_relay.admin_url = f"{scheme}://{f'[{host}]' if ':' in host else host}:{admin.port}"
        self._bound = True
        super().privilegedStartService()

    def _node_url(self) -> str:
        """How peers reach the internal listener: as configured, else as bound."""
        if self.config.node_url:
            return self.config.node_url
        bound = cast("IPv4Address | IPv6Address", self.ports["cluster"].getHost())
        host = bound.host
        if host in ("", "0.0.0.0", "::"):
            host = self.config.node_name
        elif ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{bound.port}"

    def startService(self) -> None:
        super().startService()
        # Log lines of one reactor turn are written out together.
        logs.flush_with(self.reactor)
        if not self._bound:
            self.privilegedStartService()
        # We hold the data dir lock: any child still serving it is an orphan.
        self.quarantined = recover(self.config.data_dir, self.config.tursodb_bin, self.state, self.guard,
                                   self.reactor.seconds())
        confinement = self.supervisor.confinement
        if confinement.helper is None:
            self._log.warn("{confinement}: a statement that gets past the gate could write any file "
                           "this user can", confinement=confinement.describe())
        else:
            self._log.info("{confinement}", confinement=confinement.describe())
        if confinement.helper is None and not any(w.endswith("setpriv") for w in self.supervisor.wrappers):
            self._log.warn("setpriv not found: children may outlive a daemon killed with SIGKILL "
                           "(they are cleaned up at the next start)")
        open_ports = [port for port, token in (("data", self.config.auth_token or self.config.jwt_key),
                                               ("admin", self.config.admin_token)) if not token]
        if open_ports:
            self._log.warn("auth is off (dev only): no token for the {ports} port(s); set "
                           "TURSO_AUTH_TOKEN or TURSO_JWT_KEY / TURSO_ADMIN_TOKEN in production",
                           ports=" and ".join(open_ports), open_ports=open_ports)
        bound = [(kind, port.getHost()) for kind, port in self.ports.items()]
        if self.workers is not None and self.workers.listener is not None:
            host, number = self.workers.listener.getsockname()[:2]
            bound.insert(0, ("data", IPv4Address("TCP", host, number)))
        for kind, address in bound:
            # A listenTCP port has an IP address.
            where = cast("IPv4Address | IPv6Address", address)
            self._log.info("listening: {listener} port on {host}:{port}", listener=kind, host=where.host,
                           port=where.port, scheme="https" if self.config.tls_on(kind) else "http")
        if self.certificate is not None:
            self.certificate.start()
        self.gc.start()
        self.hibernator.start()
        if self.cluster is not None:
            # Joined first: nothing is served before (the data workers included).
            self._join_cluster(self.cluster)
            return
        self._serve()

    def _serve(self) -> None:
        if self.workers is None:
            self._ready()
            return
        self.workers.start().addCallback(lambda _: self._ready())

    def _join_cluster(self, cluster: Cluster) -> None:
        def failed(failure: Failure) -> None:
            self._log.failure("joining the cluster failed; trying again", failure)
            self.reactor.callLater(JOIN_RETRY, self._join_cluster, cluster)

        ensureDeferred(self._join(cluster)).addCallbacks(lambda _: self._serve(), failed)

    async def _join(self, cluster: Cluster) -> None:
        """
        Join the cluster (waiting for etcd as long as it takes: not ready
        until then), and claim the names this node holds.
        """
        while True:
            try:
                await cluster.join()
                break
            except (EtcdUnavailable, EtcdError) as error:
                self._log.warn("cannot join the cluster yet: {error}; retrying", error=str(error))
                await deferLater(self.reactor, JOIN_RETRY, lambda: None)
        self._log.info("joined the cluster as node {node} ({url}); {nodes} node(s) live",
                       node=cluster.node, url=cluster.url, nodes=len(cluster.nodes))
        assert self.moves is not None
        await self.moves.reconcile()
        for record in list(self.state.records.values()):
            if record.moving_in:
                continue
            placement = cluster.owner(record.name)
            if placement is not None and placement.node == cluster.node and placement.id == record.id:
                continue
            if placement is not None and placement.node != cluster.node:
                self._log.error("namespace {name} is here, but node {owner} owns that name in the cluster; "
                                "this copy is not served", name=record.name, owner=placement.node)
                continue
            try:
                await self.admission.placer.claim(record.name, record.id)
            except OwnedElsewhere as owner:
                self._log.error("namespace {name} is here, but node {owner} owns that name in the cluster; "
                                "this copy is not served", name=record.name, owner=owner.node)
            except Refusal as refusal:
                # Claimed at its first request instead.
                self._log.warn("could not claim namespace {name} in the cluster: {error}", name=record.name,
                               error=str(refusal))

    def _ready(self) -> None:
        if self.cluster is not None:
            # Joined, settled, and the data workers (if any) serve: from now on
            # data is served here, and the other nodes may send new names.
            self.cluster.announce(True)
        self.readiness.listening = True
        workers = self.config.data_workers if self.workers is not None else 1
        self._log.info("turso-server ready: {namespaces} namespaces in {data_dir}, {workers} data "
                       "process(es)", data_dir=self.config.data_dir, namespaces=len(self.state.records),
                       workers=workers)

    def _hangup(self) -> None:
        """SIGHUP: read the TLS certificate again, here and in the data workers."""
        if self.certificate is None:
            self._log.info("SIGHUP: nothing to read again (no TLS certificate)")
            return
        self.certificate.reload()
        if self.workers is not None:
            self.workers.signal_all("HUP")

    def stopService(self) -> Deferred[None]:
        """
        Stop accepting, let requests in flight finish (bounded), stop the
        children (SIGTERM, SIGKILL after a grace period), flush state.
        """
        super().stopService()
        self.readiness.stopping = True
        if self.certificate is not None:
            self.certificate.stop()
        return ensureDeferred(self._shutdown())

    async def _shutdown(self) -> None:
        self._log.info("shutting down with {inflight} requests in flight", inflight=self.leases.count())
        # Connections already open may still send requests: they get a 503.
        self.admission.stopping = True
        if self.cluster is not None:
            # No node chooses this one for a new name any more (the lease goes at the end).
            self.cluster.announce(False)
        await DeferredList([stopped for port in self.ports.values()
                            if (stopped := port.stopListening()) is not None])
        self.ports = {}
        if self.workers is not None:
            # They finish what is in flight (bounded) and give back what they hold.
            await self.workers.stop()
        await self.gc.stop()
        await self.hibernator.stop()
        await self.manager.stop_all()
        if self.cluster is not None:
            # Peers see this node gone at once, not when its lease runs out.
            await self.cluster.leave()
        try:
            self.state.flush_pending()
        except Exception:
            self._log.failure("could not flush the state file at shutdown")
        self._log.info("stopped")
        logs.flush_with(None)


def _fatal(message: str) -> None:
    sys.stderr.write(f"turso-server: {message}\n")
    sys.stderr.flush()
    raise SystemExit(1)


def make_service(options: Mapping[str, str | None], reactor: Reactor | None = None,
                 environ: Mapping[str, str] | None = None) -> TursoService:
    """
    Build the daemon from twistd options and the environment, or exit with
    one clear line if the configuration or the state file is unusable.
    """
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        # It provides IReactorProcess, IReactorTCP and IReactorTime, though
        # not the interface that names the three together.
        reactor = cast(Reactor, global_reactor)
    try:
        config = Config.load(options, environ)
    except ConfigError as error:
        _fatal(str(error))
    logs.use_format(config.log_format)
    try:
        confinement = choose(config.confine, config.landlock_bin)
    except ConfinementUnavailable as error:
        _fatal(str(error))
    try:
        lock_fd = lock_data_dir(config.data_dir)
    except (DataDirBusy, OSError) as error:
        _fatal(str(error))
    state = StateStore.for_data_dir(config.data_dir, reactor)
    try:
        state.load()
    except (StateError, OSError) as error:
        _fatal(str(error))
    try:
        service = TursoService(config, reactor, state, confinement, options)
    except CertificateError as error:
        _fatal(f"TURSO_TLS_CERT_FILE/TURSO_TLS_KEY_FILE: {error}")
    service.lock_fd = lock_fd
    return service
