"""
Cluster mode: which node owns which namespace, agreed through etcd.

etcd holds one key per namespace, C{<prefix>/ns/<name>}, whose value names
the owning node, the namespace's id and an epoch; it is created and changed
only by transactions that compare the key's create or mod revision, so two
nodes can never both own a name, even when two first requests for it reach
two nodes at once.  Each live node has C{<prefix>/nodes/<node>} (its
internal URL) under a lease it keeps alive: a node that dies drops out when
its lease ends, and its names answer C{owner_unavailable} until it is back.
Nothing is ever re-created elsewhere.

L{Cluster} keeps both in memory (read once, then followed with a watch), so
a request costs no etcd round trip unless it creates a name.  While etcd is
out of reach, names already known keep being served; only new placements
wait for it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.defer import Deferred, DeferredLock
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from .errors import Unavailable
from .etcd import (
    Compacted,
    Etcd,
    EtcdError,
    EtcdUnavailable,
    Event,
    KeyValue,
    Watch,
    created_at,
    delete,
    get,
    leased_by,
    modified_at,
    put,
)


class NodeNameTaken(EtcdError):
    """Another live lease holds this node's name."""


class OwnedElsewhere(Exception):
    """Another node owns the namespace: a request for it goes there."""

    def __init__(self, node: str, url: str) -> None:
        super().__init__(node, url)
        self.node = node
        self.url = url


def owner_unavailable(name: str, node: str) -> Unavailable:
    return Unavailable("owner_unavailable",
                       f"namespace {name!r} is served by node {node!r}, which is not reachable now; "
                       "retry later (its data is never re-created elsewhere)", retry_after=5)


def cluster_unavailable(name: str, why: str) -> Unavailable:
    return Unavailable("cluster_unavailable",
                       f"namespace {name!r} cannot be placed while the cluster's etcd is out of reach "
                       f"({why}); retry later", retry_after=5)


@attrs.frozen
class Placement:
    """Who owns a namespace: the node, the namespace's id there, and how often it moved."""

    node: str
    id: str
    epoch: int = 1
    #: The etcd key's revisions (a change compares against C{revision}).
    created: int = 0
    revision: int = 0

    def to_value(self) -> bytes:
        return json.dumps({"node": self.node, "id": self.id, "epoch": self.epoch},
                          separators=(",", ":")).encode()

    @classmethod
    def from_kv(cls, kv: KeyValue) -> Placement:
        data = json.loads(kv.value)
        return cls(str(data["node"]), str(data.get("id", "")), int(data.get("epoch", 1)),
                   kv.create_revision, kv.mod_revision)


@attrs.frozen
class Node:
    """
    A live node, where its peers reach it, whether it takes new names
    (it serves: joined and settled, not stopping), and the bytes and
    names it held when it last measured them.
    """

    name: str
    url: str
    bytes_held: int | None = None
    names_held: int | None = None
    ready: bool = False

    def to_value(self) -> bytes:
        report: dict[str, Any] = {"url": self.url, "ready": self.ready}
        if self.bytes_held is not None:
            report["bytes"] = self.bytes_held
            report["namespaces"] = self.names_held
        return json.dumps(report, separators=(",", ":")).encode()

    @classmethod
    def from_value(cls, name: str, value: bytes) -> Node:
        report = json.loads(value)
        held, names_held = report.get("bytes"), report.get("namespaces")
        return cls(name, str(report["url"]), None if held is None else int(held),
                   None if names_held is None else int(names_held), bool(report.get("ready", False)))


@attrs.define(eq=False)
class Cluster:
    """This node's membership of the cluster, and its view of who owns what."""

    reactor: IReactorTime
    etcd: Etcd
    prefix: str
    node: str
    url: str
    lease_ttl: int = 10
    #: Which node a new name is placed on (see L{choose}).
    placement: str = "local"
    #: Measures the bytes this node holds, reported every C{report_interval}
    #: seconds (for C{least-bytes} placement, rebalancing and C{/v1/cluster}).
    measure: Callable[[], Deferred[int]] | None = None
    report_interval: float = 30.0
    #: How often the watch is checked against etcd: one that has fallen
    #: behind on two checks in a row (a half-open connection delivers
    #: nothing, and says nothing) is opened again.
    check_interval: float = 30.0
    placements: dict[str, Placement] = attrs.field(factory=dict)
    nodes: dict[str, Node] = attrs.field(factory=dict)
    #: Whether the view follows etcd now (the watch runs).
    following: bool = False
    #: Set once the node has joined and settled what it holds: no data is
    #: served before (its copies may be stale, or belong to another node now).
    ready: bool = False
    #: Called with each name whose placement changed or went (the data workers learn it).
    on_change: list[Callable[[str], None]] = attrs.field(factory=list)
    _lease: int = 0
    _watch: Watch | None = None
    _renewal: LoopingCall | None = None
    _reporting: LoopingCall | None = None
    _checking: LoopingCall | None = None
    #: What this node last put in its key.
    _me: Node | None = None
    _putting: DeferredLock = attrs.field(factory=DeferredLock)
    #: Every key under the prefix as the watch saw it (set against etcd's count).
    _keys: set[bytes] = attrs.field(factory=set)
    _behind: bool = False
    _log = Logger()

    # -- keys --------------------------------------------------------------------

    @property
    def _ns_prefix(self) -> bytes:
        return f"{self.prefix}/ns/".encode()

    @property
    def _node_prefix(self) -> bytes:
        return f"{self.prefix}/nodes/".encode()

    def namespace_key(self, name: str) -> bytes:
        """The etcd key of C{name}'s placement."""
        return self._ns_prefix + name.encode()

    def _node_key(self, node: str) -> bytes:
        return self._node_prefix + node.encode()

    @property
    def _root(self) -> bytes:
        return f"{self.prefix}/".encode()

    # -- joining and leaving -----------------------------------------------------

    async def join(self) -> None:
        """
        Register this node (under a lease), read every placement and node,
        and follow changes from then on.

        @raise EtcdUnavailable: if etcd cannot be reached.
        """
        await self._register()
        await self._load()
        self._renewal = LoopingCall(self._renew)
        self._renewal.clock = self.reactor
        self._renewal.start(max(1.0, self.lease_ttl / 3), now=False)
        if self.measure is not None:
            self._reporting = LoopingCall(self._report)
            self._reporting.clock = self.reactor
            self._reporting.start(self.report_interval, now=True)
        self._checking = LoopingCall(self._check_watch)
        self._checking.clock = self.reactor
        self._checking.start(self.check_interval, now=False)

    async def leave(self) -> None:
        """Stop following, and drop this node's key (its names become unavailable at once)."""
        for looping in (self._renewal, self._reporting, self._checking):
            if looping is not None and looping.running:
                looping.stop()
        if self._watch is not None:
            self._watch.stop()
            self._watch = None
        self.following = False
        lease, self._lease = self._lease, 0
        if lease:
            try:
                await self.etcd.revoke(lease)
            except (EtcdUnavailable, EtcdError) as error:
                self._log.warn("could not leave the cluster cleanly: {error}", error=str(error))
        await self.etcd.close()

    async def _register(self) -> None:
        """
        Take this node's key under a new lease, only if no live process
        holds it: two processes with one node name would both think they
        own its namespaces.

        @raise NodeNameTaken: while another lease holds the key (another
            process, or this node's previous life, until its lease ends).
        """
        lease = await self.etcd.grant(self.lease_ttl)
        key = self._node_key(self.node)
        me = attrs.evolve(self._me or Node(self.node, self.url), ready=self.ready)
        result = await self.etcd.txn([created_at(key, 0)], [put(key, me.to_value(), lease)], [])
        if not result.succeeded:
            await self.etcd.revoke(lease)
            raise NodeNameTaken(f"node name {self.node!r} is held in etcd by another lease (another process "
                                f"with TURSO_NODE_NAME={self.node}, or this node's previous run until its "
                                f"lease of {self.lease_ttl} s ends)")
        self._lease = lease
        self._me = self.nodes[self.node] = me

    async def _load(self) -> None:
        kvs, revision = await self.etcd.range_all(self._root)
        self.placements.clear()
        self._keys.clear()
        self.nodes = {self.node: self._me or Node(self.node, self.url)}
        for kv in kvs:
            self._apply(kv, deleted=False)
        if self._watch is not None:
            self._watch.stop()
        self._watch = self.etcd.watch(self._root, revision + 1, self._changed)
        self._watch.on_lost = self._lost
        self._watch.on_restored = self._restored
        self.following = True

    def _renew(self) -> Deferred[None]:
        async def renew() -> None:
            try:
                if self._lease and await self.etcd.keep_alive(self._lease) > 0:
                    return
                self._log.warn("this node's cluster lease ended; registering again")
                await self._register()
            except (EtcdUnavailable, EtcdError) as error:
                self._log.warn("cannot renew this node's cluster lease: {error}", error=str(error))
            except Exception:
                # The renewal must go on whatever happened this time.
                self._log.failure("renewing this node's cluster lease failed")

        return Deferred.fromCoroutine(renew())

    def _report(self) -> Deferred[None]:
        """Measure the bytes this node holds, and put them in its key if they changed."""

        async def report() -> None:
            assert self.measure is not None
            try:
                held = await self.measure()
                if self._me is None or held != self._me.bytes_held:
                    await self._put_me(bytes_held=held, names_held=self.counts().get(self.node, 0))
            except (EtcdUnavailable, EtcdError) as error:
                if self._lease:
                    self._log.warn("cannot report this node's bytes to the cluster: {error}",
                                   error=str(error))
            except Exception:
                # The reports must go on whatever happened this time.
                self._log.failure("reporting this node's bytes to the cluster failed")

        return Deferred.fromCoroutine(report())

    def announce(self, ready: bool) -> Deferred[None]:
        """
        Serve data from now on (C{ready}), or stop taking new names (a
        shutdown has begun); the other nodes learn it from this node's key.
        """
        self.ready = ready

        async def announce() -> None:
            try:
                await self._put_me()
            except (EtcdUnavailable, EtcdError) as error:
                # The next registration or report puts it.
                self._log.warn("cannot tell the cluster this node is {state}: {error}",
                               state="ready" if ready else "stopping", error=str(error))

        return Deferred.fromCoroutine(announce())

    async def _put_me(self, **changes: Any) -> None:
        """
        Put this node's key again with C{changes}: only its own key, only
        under its own lease, one put at a time (each from what the last one put).
        """
        await self._putting.acquire()
        try:
            if not self._lease:
                return
            me = attrs.evolve(self._me or Node(self.node, self.url), ready=self.ready, **changes)
            key = self._node_key(self.node)
            result = await self.etcd.txn([leased_by(key, self._lease)],
                                         [put(key, me.to_value(), self._lease)], [])
            if result.succeeded:
                self._me = self.nodes[self.node] = me
        finally:
            self._putting.release()

    # -- following changes -------------------------------------------------------

    def _changed(self, events: list[Event], revision: int) -> None:
        for event in events:
            try:
                self._apply(event.kv, event.deleted)
            except Exception:
                # One change that breaks a listener must not keep the others out of the view.
                self._log.failure("applying a cluster change to {key} failed", key=event.kv.key.decode())

    def _apply(self, kv: KeyValue, deleted: bool) -> None:
        if deleted:
            self._keys.discard(kv.key)
        else:
            self._keys.add(kv.key)
        if kv.key.startswith(self._ns_prefix):
            name = kv.key[len(self._ns_prefix):].decode()
            if deleted:
                self.placements.pop(name, None)
            else:
                try:
                    self.placements[name] = Placement.from_kv(kv)
                except (ValueError, KeyError, TypeError):
                    self._log.error("unreadable placement of {name} in etcd; ignored", name=name)
                    return
            for listener in self.on_change:
                listener(name)
        elif kv.key.startswith(self._node_prefix):
            node = kv.key[len(self._node_prefix):].decode()
            if deleted:
                if node == self.node:
                    # Our lease ended while etcd could not be reached: the next
                    # renewal registers again (one place does, so one lease is used).
                    self._lease = 0
                    return
                self.nodes.pop(node, None)
                self._log.warn("cluster node {node} left", node=node)
                return
            try:
                entry = Node.from_value(node, kv.value)
            except (ValueError, KeyError, TypeError, AttributeError):
                self._log.error("unreadable node entry {node} in etcd; ignored", node=node)
                return
            if node not in self.nodes:
                self._log.info("cluster node {node} joined at {url}", node=node, url=entry.url)
            self.nodes[node] = entry

    def _check_watch(self) -> Deferred[None]:
        """
        Compare the watch with etcd: a change newer than it delivered, or
        another count of keys, on two checks in a row (one may cross a
        change in flight) means its connection is dead without having
        closed; it is opened again from what it saw.
        """

        async def check() -> None:
            watch = self._watch
            if watch is None or not self.following:
                self._behind = False
                return
            try:
                count, newest = await self.etcd.newest(self._root)
            except (EtcdUnavailable, EtcdError):
                return  # the watch finds that out itself
            behind = newest > watch.seen or count != len(self._keys)
            if behind and self._behind and watch is self._watch:
                self._log.warn("the watch on the cluster's etcd fell behind (newest change {newest}, "
                               "seen {seen}; {count} keys, {known} known); opening it again",
                               newest=newest, seen=watch.seen, count=count, known=len(self._keys))
                watch.reopen()
                behind = False
            self._behind = behind

        return Deferred.fromCoroutine(check()).addErrback(
            lambda failure: self._log.failure("checking the cluster watch failed", failure))

    def _lost(self, error: Exception) -> None:
        if self.following:
            self._log.warn("lost the cluster's etcd ({error}); serving the names known until it is back",
                           error=str(error))
        self.following = False
        if isinstance(error, Compacted):
            # What happened meanwhile is gone from etcd's history: read it all again.
            assert self._watch is not None
            self._watch.stop()
            self._watch = None
            self._reload_later()

    def _reload_later(self) -> None:
        def reload() -> None:
            Deferred.fromCoroutine(self._load()).addErrback(lambda _: self._reload_later())

        self.reactor.callLater(1.0, reload)

    def _restored(self) -> None:
        if not self.following:
            self._log.info("following the cluster's etcd again")
        self.following = True

    # -- placements --------------------------------------------------------------

    def owner(self, name: str) -> Placement | None:
        """Who owns C{name}, as last seen."""
        return self.placements.get(name)

    def where(self, name: str) -> str | None:
        """
        C{None} if this node owns C{name} (or nobody does yet).

        @raise OwnedElsewhere: if another live node owns it.
        @raise Unavailable: if the node that owns it is not live.
        """
        placement = self.placements.get(name)
        if placement is None or placement.node == self.node:
            return None
        node = self.nodes.get(placement.node)
        if node is None:
            raise owner_unavailable(name, placement.node)
        raise OwnedElsewhere(node.name, node.url)

    def counts(self) -> dict[str, int]:
        """How many names each node owns (live or not)."""
        counts: dict[str, int] = {}
        for placement in self.placements.values():
            counts[placement.node] = counts.get(placement.node, 0) + 1
        return counts

    def choose(self) -> str:
        """
        The node a new name goes to, by this cluster's placement policy:
        this one (C{local}), or among the nodes that take new names (live
        and ready), the one that owns the fewest names (C{least-namespaces})
        or holds the fewest bytes (C{least-bytes}: its last report, plus an
        average namespace for each name placed on it since, so that new
        names spread before the next report; ties go to the fewest names).
        Every node reads the same etcd, so nodes asked for one new name at
        once mostly choose alike; where not, one placement still wins.
        """
        candidates = [node for node in self.nodes.values() if node.ready or node.name == self.node]
        if self.placement == "local" or len(candidates) < 2:
            return self.node
        counts = self.counts()
        if self.placement == "least-namespaces":
            return min(candidates, key=lambda node: (counts.get(node.name, 0), node.name)).name
        reported = [node for node in self.nodes.values() if node.bytes_held is not None]
        names_reported = sum(node.names_held or 0 for node in reported)
        average = sum(node.bytes_held or 0 for node in reported) / names_reported if names_reported else 0.0

        def estimate(node: Node) -> tuple[float, int, str]:
            owned = counts.get(node.name, 0)
            since = max(0, owned - (node.names_held or 0))
            return (node.bytes_held or 0) + since * average, owned, node.name

        return min(candidates, key=estimate).name

    async def place(self, name: str, namespace_id: str) -> Placement:
        """
        Make this node the owner of the new namespace C{name}, unless a
        node already is; return the placement that holds.

        @raise Unavailable: (C{cluster_unavailable}) if etcd cannot be reached.
        """
        key = self.namespace_key(name)
        mine = Placement(self.node, namespace_id)
        try:
            result = await self.etcd.txn([created_at(key, 0)], [put(key, mine.to_value())], [get(key)])
        except (EtcdUnavailable, EtcdError) as error:
            raise cluster_unavailable(name, str(error)) from None
        if result.succeeded:
            placement = attrs.evolve(mine, created=result.revision, revision=result.revision)
            self._log.info("namespace {name} placed on this node", name=name)
        else:
            [kvs] = result.ranges
            if not kvs:  # deleted in between: try once more
                return await self.place(name, namespace_id)
            placement = Placement.from_kv(kvs[0])
        current = self.placements.get(name)
        if current is None or current.revision < placement.revision:
            self.placements[name] = placement
        return placement

    async def adopt(self, name: str, placement: Placement, namespace_id: str) -> Placement:
        """
        Point this node's placement of C{name} (left by an earlier
        incarnation that could not be unplaced) at the new C{namespace_id}.

        @raise Unavailable: if etcd cannot be reached, or the placement changed meanwhile.
        """
        key = self.namespace_key(name)
        mine = Placement(self.node, namespace_id, placement.epoch)
        try:
            result = await self.etcd.txn([modified_at(key, placement.revision)], [put(key, mine.to_value())],
                                         [])
        except (EtcdUnavailable, EtcdError) as error:
            raise cluster_unavailable(name, str(error)) from None
        if not result.succeeded:
            raise Unavailable("namespace_moving", f"namespace {name!r} changed owner meanwhile; retry",
                              retry_after=1)
        adopted = attrs.evolve(mine, created=placement.created, revision=result.revision)
        self.placements[name] = adopted
        return adopted

    async def fence(self, name: str, placement: Placement) -> bool:
        """
        Put C{placement} again as it is, if etcd still holds it: any change
        prepared against it (a move's switch in flight) fails from then on.
        Whether it held.
        """
        key = self.namespace_key(name)
        result = await self.etcd.txn([modified_at(key, placement.revision)],
                                     [put(key, placement.to_value())], [])
        if result.succeeded:
            self.placements[name] = attrs.evolve(placement, revision=result.revision)
        return result.succeeded

    async def unplace(self, name: str, namespace_id: str) -> None:
        """Remove this node's placement of C{name} (that incarnation only), after a delete."""
        key = self.namespace_key(name)
        placement = self.placements.get(name)
        if placement is None:
            kvs, _ = await self.etcd.range(key)
            if not kvs:
                return
            placement = Placement.from_kv(kvs[0])
        if placement.node != self.node or placement.id != namespace_id:
            return
        await self.etcd.txn([modified_at(key, placement.revision)], [delete(key)], [])
        if self.placements.get(name) == placement:
            del self.placements[name]

    def describe(self) -> dict[str, Any]:
        """The per-node view: nodes, whether each is live, how many names each owns, its bytes."""
        counts = self.counts()
        nodes = set(self.nodes) | set(counts)
        return {
            "node": self.node,
            "following": self.following,
            "placement": self.placement,
            "nodes": [{"name": node, "url": self.nodes[node].url if node in self.nodes else None,
                       "live": node in self.nodes, "ready": node in self.nodes and self.nodes[node].ready,
                       "namespaces": counts.get(node, 0),
                       "bytes": self.nodes[node].bytes_held if node in self.nodes else None}
                      for node in sorted(nodes)],
        }
