"""
Cluster mode on the data path: a request for a name this node owns is
served here; one for a name another live node owns is relayed there, one
hop, over that node's internal listener; one whose owner is down gets 503
C{owner_unavailable}, and is never served from an empty namespace made
here.  A new name is placed by an etcd transaction (L{ClusterPlacer}),
before any file of it exists, on the node that creates it: the one its
first request reached, or the one the placement policy chose, which that
request is relayed to.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol
from urllib.parse import urlsplit

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.protocol import ClientFactory
from twisted.logger import Logger
from twisted.python.failure import Failure

from .adminrelay import RELAYED_BY_HEADER
from .channel import BackendResponse
from .cluster import Cluster, OwnedElsewhere, owner_unavailable
from .config import Config
from .dataport import PEER_TOKEN_HEADER, DataRequest
from .errors import NotFound, Refusal, Unavailable
from .moves import Moves
from .namespaces import Placer
from .proxy import (
    HANDED_OVER_HEADERS_DROPPED,
    ChildLease,
    CreationProbe,
    HeldElsewhere,
    Namespaces,
    end_to_end,
)
from .relay import Peers, relayed_bytes
from .state import NamespaceRecord, StateStore
from .tokens import Access


@attrs.define(eq=False)
class ClusterPlacer:
    """Names are placed through the cluster's etcd (see L{turso_twisted.namespaces.Placer})."""

    cluster: Cluster
    #: The ids of C{name}'s incarnations archived on this node.
    archived_ids: Callable[[str], Deferred[set[str]]]
    _log = Logger()

    def claim(self, name: str, namespace_id: str) -> Deferred[None]:
        async def claim() -> None:
            cluster = self.cluster
            placement = await cluster.place(name, namespace_id)
            if placement.node != cluster.node:
                node = cluster.nodes.get(placement.node)
                if node is None:
                    raise owner_unavailable(name, placement.node)
                raise OwnedElsewhere(node.name, node.url)
            if placement.id != namespace_id:
                # The cluster says this node holds another incarnation of the name.
                # Only one this node archived (deleted, while etcd could not be
                # told) may be replaced; else its data is missing here, and an
                # empty namespace must not take its place.
                if placement.id not in await self.archived_ids(name):
                    self._log.error("the cluster says this node holds namespace {name} (id {expected}), "
                                    "but its data is not here; refusing to make a new one in its place",
                                    name=name, expected=placement.id)
                    raise Unavailable("namespace_data_missing",
                                      f"namespace {name!r}: the cluster places it on this node, whose data "
                                      "dir does not have it; restore it, or delete the namespace")
                await cluster.adopt(name, placement, namespace_id)

        return Deferred.fromCoroutine(claim())

    def release(self, name: str, namespace_id: str) -> None:
        def failed(failure: Failure) -> None:
            self._log.warn("could not free the name {name} in the cluster: {error}; the name stays on "
                           "this node", name=name, error=failure.getErrorMessage())

        Deferred.fromCoroutine(self.cluster.unplace(name, namespace_id)).addErrback(failed)


@attrs.define(eq=False)
class ClusterGate:
    """
    Whether this node may serve a name now, as the cluster places it: the
    check every data request passes before this node's own namespaces see
    it (in the main process, also for the data workers' requests).
    """

    cluster: Cluster
    state: StateStore
    placer: Placer
    moves: Moves | None = None
    _log = Logger()

    def admit(self, name: str, choose: bool = False) -> Deferred[None]:
        """
        Fire once C{name} may be served here (claiming it first if this
        node holds it with no placement).  With C{choose}, a new name goes
        to the node the cluster's placement policy chooses (a request
        relayed here already is not sent on: it is placed here).

        @raise OwnedElsewhere: another live node owns it, or is to make it.
        @raise Refusal: it may not be served now.
        """
        try:
            unplaced = self.check(name, choose)
        except (OwnedElsewhere, Refusal) as error:
            return fail(error)
        if unplaced is not None:
            # Held here with no placement (etcd was out of reach when it was
            # made or joined): claimed first, so that no other node makes it.
            return self.placer.claim(name, unplaced.id)
        return succeed(None)

    def check(self, name: str, choose: bool = False) -> NamespaceRecord | None:
        """
        Whether this node may serve C{name} now; the local record to claim
        first if it has no placement.
        """
        if not self.cluster.ready:
            raise Unavailable("node_starting", "this node is joining its cluster; retry shortly",
                              retry_after=1)
        # The owner first: a copy here that the cluster does not name is never served.
        self.cluster.where(name)
        if self.moves is not None:
            if name in self.moves.outgoing:
                raise Unavailable("namespace_moving", f"namespace {name!r} is moving to another node; retry "
                                  "shortly", retry_after=1)
            self.moves.settle(name)
        record = self.state.records.get(name)
        if record is None and choose and self.cluster.owner(name) is None:
            target = self.cluster.choose()
            if target != self.cluster.node and target in self.cluster.nodes:
                node = self.cluster.nodes[target]
                raise OwnedElsewhere(node.name, node.url)
        if record is None or record.moving_in:
            return None
        if record.moving_to is not None:
            raise Unavailable("namespace_moving", f"namespace {name!r} is moving to node "
                              f"{record.moving_to!r}; retry shortly", retry_after=1)
        placement = self.cluster.owner(name)
        if placement is None:
            return record
        if placement.id != record.id:
            self._log.error("namespace {name} here is id {id}, the cluster places id {placed} on this node; "
                            "not serving it", name=name, id=record.id, placed=placement.id)
            raise Unavailable("namespace_conflict", f"namespace {name!r}: this node's copy is not the one "
                              "the cluster places here; see the server log")
        return None


def not_here(name: str, owner: OwnedElsewhere) -> Unavailable:
    """What a request relayed from another node gets when this node is not the owner either."""
    return Unavailable("namespace_moving", f"namespace {name!r} is served by node {owner.node!r} now; retry",
                       retry_after=1)


@attrs.define(eq=False)
class ClusterNamespaces:
    """
    The namespaces of a cluster node, on top of its own (C{local}).  On
    the internal listener (C{relayed}) a request came from another node
    and goes no further: if this node does not own its name (any more),
    it is refused with a 503 the client retries.
    """

    local: Namespaces
    cluster: Cluster
    gate: ClusterGate
    relayed: bool = False

    def admit(self, name: str, access: Access, writes: bool, probe: CreationProbe,
              here: bool = False) -> Deferred[ChildLease]:
        admitted: Deferred[Any] = self.gate.admit(name, choose=not self.relayed)
        admitted.addCallback(lambda _: self.local.admit(name, access, writes, probe, here))
        admitted.addErrback(self._moved_meanwhile, name)
        if self.relayed:
            admitted.addErrback(self._trap_elsewhere, name)
        return admitted

    def _moved_meanwhile(self, failure: Failure, name: str) -> Any:
        """A request that waited while its namespace moved away: it goes to the new owner."""
        failure.trap(NotFound)
        self.cluster.where(name)
        return failure

    def _trap_elsewhere(self, failure: Failure, name: str) -> Any:
        failure.trap(OwnedElsewhere)
        owner = failure.value
        assert isinstance(owner, OwnedElsewhere)
        raise not_here(name, owner)

    def record(self, lease: ChildLease) -> NamespaceRecord:
        return self.local.record(lease)

    def inbound(self, lease: ChildLease, method: bytes, path: bytes, body: bytes,
                pipeline: Any) -> Deferred[bytes]:
        return self.local.inbound(lease, method, path, body, pipeline)

    def ended(self, lease: ChildLease) -> Deferred[None]:
        return self.local.ended(lease)

    def moved(self, name: str) -> None:
        self.local.moved(name)


class Holders(Protocol):
    """Which data worker holds (or is to take) a namespace."""

    def holder(self, name: str) -> int: ...


@attrs.define(eq=False)
class WorkersBehind:
    """
    A node's namespaces as its internal listener sees them when data
    workers serve them: checked against the cluster here, then handed to
    the worker that holds each (or takes it), which checks the request in
    full again.
    """

    workers: Holders
    gate: ClusterGate

    def admit(self, name: str, access: Access, writes: bool, probe: CreationProbe,
              here: bool = False) -> Deferred[ChildLease]:
        def hand_over(_: object) -> ChildLease:
            raise HeldElsewhere(self.workers.holder(name))

        def not_sent_on(failure: Failure) -> Any:
            failure.trap(OwnedElsewhere)
            owner = failure.value
            assert isinstance(owner, OwnedElsewhere)
            raise not_here(name, owner)

        admitted: Deferred[Any] = self.gate.admit(name)
        return admitted.addCallback(hand_over).addErrback(not_sent_on)

    def record(self, lease: ChildLease) -> NamespaceRecord:
        raise AssertionError("the main process leases no child to its internal listener")

    def inbound(self, lease: ChildLease, method: bytes, path: bytes, body: bytes,
                pipeline: Any) -> Deferred[bytes]:
        raise AssertionError("the main process leases no child to its internal listener")

    def ended(self, lease: ChildLease) -> Deferred[None]:
        raise AssertionError("the main process leases no child to its internal listener")

    def moved(self, name: str) -> None:
        pass


def _connect_tcp(reactor: Any) -> Any:
    def connect(url: str, factory: ClientFactory) -> None:
        parts = urlsplit(url)
        reactor.connectTCP(parts.hostname or "", parts.port or 80, factory, timeout=5)

    return connect


@attrs.define(eq=False)
class Relay:
    """Sends requests to the nodes that own their namespaces, with the cluster's token."""

    reactor: Any
    node: str
    token: str = attrs.field(repr=False)
    keep_idle: float = 60.0
    #: How long the owner may take to answer (0: no limit).
    timeout: float = 0.0
    peers: Peers = attrs.field(init=False)

    @classmethod
    def for_config(cls, reactor: Any, config: Config) -> Relay:
        """The relay of a node configured with C{config}: the owner may take its queue, then its child."""
        timeout = config.queue_timeout + config.backend_timeout + 5 if config.backend_timeout else 0.0
        return cls(reactor, config.node_name, config.cluster_token, keep_idle=config.client_idle_timeout / 2,
                   timeout=timeout)

    def __attrs_post_init__(self) -> None:
        self.peers = Peers(self.reactor, _connect_tcp(self.reactor), lambda url: f"cluster node at {url}",
                           keep_idle=self.keep_idle)

    def __call__(self, owner: OwnedElsewhere, request: DataRequest) -> Deferred[BackendResponse]:
        headers = end_to_end(request.headers, HANDED_OVER_HEADERS_DROPPED | {RELAYED_BY_HEADER})
        headers += [(PEER_TOKEN_HEADER, self.token.encode()), (RELAYED_BY_HEADER, self.node.encode())]
        sent = self.peers.send(owner.url, relayed_bytes(request, headers))
        if self.timeout:
            sent.addTimeout(self.timeout, self.reactor)
        return sent



