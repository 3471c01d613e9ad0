"""
The etcd client and the cluster's placements against a real etcd.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks, succeed
from twisted.trial.unittest import SynchronousTestCase, TestCase

from turso_twisted import names
from turso_twisted.cluster import Cluster, OwnedElsewhere, Placement
from turso_twisted.errors import Unavailable
from turso_twisted.etcd import Etcd, EtcdUnavailable, created_at, get, modified_at, prefix_end, put
from turso_twisted.moves import Moves
from turso_twisted.routing import ClusterPlacer
from turso_twisted.state import NamespaceRecord

from .daemon import wait_for
from .etcd import EtcdServer, free_port
from .support import ManagerFixture


class PrefixTests(SynchronousTestCase):
    def test_prefix_end(self) -> None:
        self.assertEqual(prefix_end(b"/a/"), b"/a0")
        self.assertEqual(prefix_end(b"a\xff"), b"b")
        self.assertEqual(prefix_end(b"\xff"), b"\0")


class EtcdClientTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def setUp(self) -> Any:
        self.server = yield EtcdServer(self).start()
        self.etcd = Etcd(reactor, [self.server.url])
        self.addCleanup(self.etcd.close)

    def d(self, coroutine: Any) -> Deferred[Any]:
        return Deferred.fromCoroutine(coroutine)

    @inlineCallbacks
    def test_put_range_and_create_only_once(self) -> Any:
        yield self.d(self.etcd.put(b"/p/a", b"1"))
        yield self.d(self.etcd.put(b"/p/b", b"2"))
        yield self.d(self.etcd.put(b"/q", b"3"))
        kvs, revision = yield self.d(self.etcd.range(b"/p/", prefix=True))
        self.assertEqual([(kv.key, kv.value) for kv in kvs], [(b"/p/a", b"1"), (b"/p/b", b"2")])
        self.assertGreaterEqual(revision, 3)
        results = yield DeferredList([
            self.d(self.etcd.txn([created_at(b"/p/new", 0)], [put(b"/p/new", str(i).encode())],
                                 [get(b"/p/new")]))
            for i in range(10)])
        won = [result for ok, result in results if result.succeeded]
        self.assertEqual(len(won), 1)
        lost = [result for ok, result in results if not result.succeeded]
        self.assertTrue(all(len(r.ranges) == 1 and len(r.ranges[0]) == 1 for r in lost))

    @inlineCallbacks
    def test_lease_ends_its_keys(self) -> Any:
        lease = yield self.d(self.etcd.grant(5))
        yield self.d(self.etcd.put(b"/n/me", b"x", lease))
        ttl = yield self.d(self.etcd.keep_alive(lease))
        self.assertGreater(ttl, 0)
        yield self.d(self.etcd.revoke(lease))
        kvs, _ = yield self.d(self.etcd.range(b"/n/me"))
        self.assertEqual(kvs, [])
        self.assertEqual((yield self.d(self.etcd.keep_alive(lease))), 0)

    @inlineCallbacks
    def test_watch_sees_changes_and_survives_a_restart(self) -> Any:
        seen: list[tuple[bytes, bool]] = []
        _, revision = yield self.d(self.etcd.range(b"/w/", prefix=True))
        watch = self.etcd.watch(b"/w/", revision + 1,
                                lambda events, _: seen.extend((e.kv.key, e.deleted) for e in events))
        watch.retry_delay = 0.1
        self.addCleanup(watch.stop)
        yield self.d(self.etcd.put(b"/w/a", b"1"))
        yield self.d(self.etcd.delete(b"/w/a"))
        yield wait_for(lambda: len(seen) == 2, "two events")
        self.assertEqual(seen, [(b"/w/a", False), (b"/w/a", True)])
        yield self.server.stop()
        yield self.server.start()
        yield self.d(self.etcd.put(b"/w/b", b"2"))
        yield wait_for(lambda: len(seen) == 3, "the event after etcd restarted")
        self.assertEqual(seen[-1], (b"/w/b", False))

    @inlineCallbacks
    def test_unreachable_is_a_domain_error(self) -> Any:
        etcd = Etcd(reactor, [f"http://127.0.0.1:{free_port()}"], timeout=2)
        self.addCleanup(etcd.close)
        yield self.assertFailure(self.d(etcd.range(b"/x")), EtcdUnavailable)


class ClusterViewTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def setUp(self) -> Any:
        self.server = yield EtcdServer(self).start()

    @inlineCallbacks
    def member(self, node: str, **options: Any) -> Any:
        cluster = Cluster(reactor, Etcd(reactor, [self.server.url]), "/t", node, f"http://{node}:1",
                          lease_ttl=5, **options)
        yield Deferred.fromCoroutine(cluster.join())
        self.addCleanup(lambda: Deferred.fromCoroutine(cluster.leave()))
        return cluster

    @inlineCallbacks
    def test_a_watch_that_fell_behind_is_opened_again(self) -> Any:
        a = yield self.member("a")
        b = yield self.member("b")
        yield wait_for(lambda: set(a.nodes) == {"a", "b"}, "a to see b")
        watch = a._watch
        # A dead connection that never closes: nothing it would bring is read.
        watch._stream.transport.pauseProducing()
        yield Deferred.fromCoroutine(b.place("late", "id-1"))
        yield a._check_watch()
        self.assertIsNone(a.owner("late"))
        yield a._check_watch()  # a second check, still behind: opened again
        yield wait_for(lambda: a.owner("late") is not None, "a to see the placement after all")
        self.assertIs(a._watch, watch)
        # Caught up: checks find nothing to do.
        yield a._check_watch()
        yield a._check_watch()
        self.assertFalse(a._behind)

    @inlineCallbacks
    def test_the_first_read_is_paged(self) -> Any:
        etcd = Etcd(reactor, [self.server.url])
        self.addCleanup(etcd.close)
        for index in range(7):
            yield Deferred.fromCoroutine(etcd.put(b"/p/k%d" % index, b"v"))
        yield Deferred.fromCoroutine(etcd.put(b"/q", b"outside"))
        kvs, revision = yield Deferred.fromCoroutine(etcd.range_all(b"/p/", page=3))
        self.assertEqual([kv.key for kv in kvs], [b"/p/k%d" % index for index in range(7)])
        self.assertEqual(revision, max(kv.mod_revision for kv in kvs) + 1)
        count, newest = yield Deferred.fromCoroutine(etcd.newest(b"/p/"))
        self.assertEqual((count, newest), (7, kvs[-1].mod_revision))

    @inlineCallbacks
    def test_nodes_report_their_bytes_and_new_names_go_where_the_policy_says(self) -> Any:
        held = {"a": 5000, "b": 200, "c": 900}

        def measure(node: str) -> Any:
            return lambda: succeed(held[node])

        a = yield self.member("a", placement="least-bytes", measure=measure("a"))
        b = yield self.member("b", placement="least-namespaces", measure=measure("b"))
        c = yield self.member("c", measure=measure("c"))
        yield wait_for(lambda: all(node.bytes_held is not None for node in a.nodes.values())
                       and len(a.nodes) == 3, "a to see every node's bytes")
        self.assertEqual({name: node.bytes_held for name, node in a.nodes.items()}, held)
        self.assertEqual([(n["name"], n["bytes"], n["ready"]) for n in a.describe()["nodes"]],
                         [("a", 5000, False), ("b", 200, False), ("c", 900, False)])
        # No node takes new names before it is ready: each keeps its own.
        self.assertEqual(a.choose(), "a")
        for member in (a, b, c):
            yield member.announce(True)
        yield wait_for(lambda: all(node.ready for node in a.nodes.values()), "a to see every node ready")
        self.assertEqual((a.choose(), c.choose()), ("b", "c"))  # least bytes; local
        yield wait_for(lambda: len(b.nodes) == 3 and all(node.ready for node in b.nodes.values()),
                       "b to see every node ready")
        yield Deferred.fromCoroutine(b.place("one", "id-1"))
        yield Deferred.fromCoroutine(c.place("two", "id-2"))
        yield wait_for(lambda: len(b.placements) == len(a.placements) == 2, "both placements seen")
        self.assertEqual(b.choose(), "a")  # owns none; b and c own one each
        # Names placed since a report count as an average namespace each.
        held["c"] = 1000
        yield c._report()
        yield wait_for(lambda: a.nodes["c"].names_held == 1, "a to see c's report")
        # The average namespace: 6200 bytes over the one name reported. b: 200
        # + 6200 for "one", placed since its report; c: 1000; a: 5000.
        self.assertEqual(a.choose(), "c")
        # A stopping node takes no new names.
        yield c.announce(False)
        yield wait_for(lambda: not a.nodes["c"].ready, "a to see c stopping")
        self.assertEqual(a.choose(), "a")
        # A report goes only into the node's own key, only under its own lease.
        c._lease += 1
        held["c"] = 1
        yield c._report()
        c._lease -= 1
        self.assertEqual(c.nodes["c"].bytes_held, 1000)

    @inlineCallbacks
    def test_one_owner_and_every_view_agrees(self) -> Any:
        a = yield self.member("a")
        b = yield self.member("b")
        yield wait_for(lambda: set(a.nodes) == set(b.nodes) == {"a", "b"}, "both nodes seen")
        first = yield Deferred.fromCoroutine(a.place("alpha", "id-1"))
        second = yield Deferred.fromCoroutine(b.place("alpha", "id-2"))
        self.assertEqual((first.node, second.node, second.id), ("a", "a", "id-1"))
        yield wait_for(lambda: b.owner("alpha") is not None, "b to see the placement")
        self.assertIsNone(a.where("alpha"))
        with self.assertRaises(OwnedElsewhere) as raised:
            b.where("alpha")
        self.assertEqual((raised.exception.node, raised.exception.url), ("a", "http://a:1"))
        # a leaves: b refuses its names rather than serving them itself.
        yield Deferred.fromCoroutine(a.leave())
        yield wait_for(lambda: "a" not in b.nodes, "a gone from b's view")
        with self.assertRaises(Unavailable) as refused:
            b.where("alpha")
        self.assertEqual(refused.exception.code, "owner_unavailable")
        # Unplacing another node's name does nothing.
        yield Deferred.fromCoroutine(b.unplace("alpha", "id-1"))
        self.assertEqual(b.owner("alpha").node, "a")


class MoveRecoveryTests(TestCase):
    """
    What a node does on joining with a move a crash interrupted: the etcd
    transaction decided who owns the name; the other copy is set aside.
    """

    timeout = 60

    @inlineCallbacks
    def setUp(self) -> Any:
        self.server = yield EtcdServer(self).start()
        self.fx = ManagerFixture(self.mktemp())
        self.cluster = Cluster(reactor, Etcd(reactor, [self.server.url]), "/t", "a", "http://a:1",
                               lease_ttl=5)
        yield Deferred.fromCoroutine(self.cluster.join())
        self.addCleanup(lambda: Deferred.fromCoroutine(self.cluster.leave()))
        self.moves = Moves(reactor, self.cluster, self.fx.archival, self.fx.state, self.fx.data_dir,
                           self.fx.data_dir, "token")

    @inlineCallbacks
    def namespace(self, name: str, owner: str, moving_in: bool = False) -> Any:
        record = NamespaceRecord.new(name, "explicit", 0)
        record.moving_in = moving_in
        for path in names.data_files(self.fx.data_dir, name)[:2]:
            with open(path, "wb") as handle:
                handle.write(b"data of " + name.encode())
        self.fx.state.records[name] = record
        self.fx.state.save()
        value = Placement(owner, record.id).to_value()
        yield Deferred.fromCoroutine(self.cluster.etcd.put(f"/t/ns/{name}".encode(), value))
        yield wait_for(lambda: getattr(self.cluster.owner(name), "node", None) == owner, "the placement")
        return record

    def reasons(self) -> dict[str, str]:
        return {entry.name: (entry.manifest or {}).get("reason", "")
                for entry in self.fx.archival.archiver.entries()}

    @inlineCallbacks
    def test_each_copy_is_kept_or_set_aside_by_the_placement(self) -> Any:
        yield self.namespace("moved-away", "b")  # the switch happened, the archive did not
        yield self.namespace("arrived", "a", moving_in=True)  # the switch happened, the settle did not
        yield self.namespace("never-switched", "b", moving_in=True)  # the source kept it
        yield self.namespace("mine", "a")
        stale = yield self.namespace("stale", "b", moving_in=True)  # the name was deleted since
        yield Deferred.fromCoroutine(self.cluster.etcd.delete(b"/t/ns/stale"))
        yield wait_for(lambda: self.cluster.owner("stale") is None or "stale" not in self.fx.state.records,
                       "the name to go")
        yield self.moves.reconcile()
        records = self.fx.state.records
        self.assertEqual(sorted(records), ["arrived", "mine"])
        self.assertFalse(records["arrived"].moving_in)
        self.assertEqual(self.reasons(), {"moved-away": "moved to cluster node b",
                                          "never-switched": "an incoming move that did not complete",
                                          "stale": "an incoming move that did not complete"})
        self.assertTrue(stale.id)

    @inlineCallbacks
    def test_an_incoming_copy_is_served_only_once_it_is_this_nodes(self) -> Any:
        yield self.namespace("incoming", "b", moving_in=True)
        with self.assertRaises(Unavailable) as refused:
            self.moves.settle("incoming")
        self.assertEqual(refused.exception.code, "namespace_moving")
        record = self.fx.state.records["incoming"]
        yield Deferred.fromCoroutine(self.cluster.etcd.put(b"/t/ns/incoming",
                                                           Placement("a", record.id, 2).to_value()))
        # The watch sees the switch and the copy is served from then on.
        yield wait_for(lambda: not self.fx.state.records["incoming"].moving_in, "the copy to settle")


class LostAnswers(Etcd):
    """An etcd whose transactions commit but whose answers are lost (a timeout, a dropped connection)."""

    async def txn(self, *args: Any, **kwargs: Any) -> Any:
        await super().txn(*args, **kwargs)
        raise EtcdUnavailable("the answer was lost")


class SwitchAndClaimTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def setUp(self) -> Any:
        self.server = yield EtcdServer(self).start()
        self.fx = ManagerFixture(self.mktemp())

    @inlineCallbacks
    def member(self, etcd: Etcd) -> Any:
        cluster = Cluster(reactor, etcd, "/t", "a", "http://a:1", lease_ttl=5)
        yield Deferred.fromCoroutine(cluster.join())
        self.addCleanup(lambda: Deferred.fromCoroutine(cluster.leave()))
        return cluster

    @inlineCallbacks
    def test_a_switch_whose_answer_is_lost_is_read_back(self) -> Any:
        """A committed switch reported as failed would make both copies go: it is read back instead."""
        cluster = yield self.member(Etcd(reactor, [self.server.url]))
        placed = yield Deferred.fromCoroutine(cluster.place("alpha", "id-1"))
        self.addCleanup(cluster.etcd.close)
        cluster.etcd = LostAnswers(reactor, [self.server.url])
        moves = Moves(reactor, cluster, self.fx.archival, self.fx.state, self.fx.data_dir, self.fx.data_dir,
                      "t")
        switched = yield Deferred.fromCoroutine(moves._switch("alpha", placed, "b"))
        self.assertIs(switched, True)
        kvs, _ = yield Deferred.fromCoroutine(cluster.etcd.range(b"/t/ns/alpha"))
        self.assertEqual((Placement.from_kv(kvs[0]).node, Placement.from_kv(kvs[0]).epoch), ("b", 2))

    @inlineCallbacks
    def test_a_fence_fails_a_switch_prepared_before_it(self) -> Any:
        cluster = yield self.member(Etcd(reactor, [self.server.url]))
        placed = yield Deferred.fromCoroutine(cluster.place("alpha", "id-1"))
        self.assertTrue((yield Deferred.fromCoroutine(cluster.fence("alpha", placed))))
        result = yield Deferred.fromCoroutine(cluster.etcd.txn(
            [modified_at(b"/t/ns/alpha", placed.revision)], [put(b"/t/ns/alpha", b"{}")], []))
        self.assertFalse(result.succeeded)

    @inlineCallbacks
    def test_another_incarnation_is_replaced_only_if_archived_here(self) -> Any:
        """
        The cluster places id-1 of a name on this node, which does not have
        it: a new incarnation must not take its place (its data is missing),
        unless this node archived id-1 (a delete etcd was not told of).
        """
        cluster = yield self.member(Etcd(reactor, [self.server.url]))
        yield Deferred.fromCoroutine(cluster.place("alpha", "id-1"))
        archived: set[str] = set()
        placer = ClusterPlacer(cluster, lambda name: succeed(archived))
        failure = yield self.assertFailure(placer.claim("alpha", "id-2"), Unavailable)
        self.assertEqual(failure.code, "namespace_data_missing")
        self.assertEqual(cluster.owner("alpha").id, "id-1")
        archived.add("id-1")
        yield placer.claim("alpha", "id-2")
        self.assertEqual(cluster.owner("alpha").id, "id-2")
