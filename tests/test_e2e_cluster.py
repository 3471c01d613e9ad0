"""
Cluster mode end to end: a real etcd and three real daemons on loopback,
each with its own data dir, agreeing through etcd on who owns each name.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import socket
from typing import Any
from urllib.request import urlopen

import treq
from twisted.internet import reactor
from twisted.internet.defer import DeferredList, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SkipTest

from turso_twisted import cli

from .daemon import Daemon, run_replica, wait_for, with_data_workers
from .etcd import EtcdServer
from .test_e2e import SELECT_1, E2ETestCase, PushLedger, get_json

CLUSTER_TOKEN = "cluster-secret-for-tests"
PREFIX = "/turso-test"


def post(port: int, path: str, body: bytes = SELECT_1, headers: bytes = b"") -> tuple[int, dict[str, Any]]:
    """One request on a fresh connection (blocking; run it in a thread)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n%sContent-Length: %d\r\n\r\n%s"
                     % (path.encode(), headers, len(body), body))
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body_bytes = answer.partition(b"\r\n\r\n")
    try:
        document = json.loads(body_bytes)
    except ValueError:
        document = {"raw": body_bytes.decode("latin-1")}
    return int(head.split(b" ", 2)[1]), document


@inlineCallbacks
def served(port: int, path: str, timeout: float = 30.0) -> Any:
    """Wait until C{path} is answered 200 (a node or etcd coming back); fire with that answer."""
    deadline = reactor.seconds() + timeout
    while True:
        status, document = yield deferToThread(post, port, path)
        if status == 200:
            return document
        if reactor.seconds() > deadline:
            raise AssertionError(f"{path} still answered {status} {document} after {timeout}s")
        yield deferLater(reactor, 0.2, lambda: None)


@inlineCallbacks
def served_json(url: str, document: dict[str, Any], timeout: float = 30.0) -> Any:
    """POST C{document} until it is answered 200 (etcd coming back); fire with the answer."""
    deadline = reactor.seconds() + timeout
    while True:
        status, answer = yield get_json(url, "POST", data=json.dumps(document).encode())
        if status == 200:
            return answer
        if reactor.seconds() > deadline:
            raise AssertionError(f"{url} still answered {status} {answer} after {timeout}s")
        yield deferLater(reactor, 0.2, lambda: None)


class ClusterTestCase(E2ETestCase):
    timeout = 180

    @inlineCallbacks
    def start_cluster(self, count: int = 3, **env: str) -> Any:
        self.etcd = yield EtcdServer(self).start()
        self.nodes: list[Daemon] = []
        for index in range(count):
            node = yield self.start_node(f"node-{'abcdefgh'[index]}", **env)
            self.nodes.append(node)
        yield wait_for(lambda: all(len(self.live(node)) == count for node in self.nodes),
                       "every node to see every other")
        return self.nodes

    def node_daemon(self, name: str, data_dir: str | None = None, **env: str) -> Daemon:
        return Daemon(self, data_dir, TURSO_CLUSTER_ETCD=self.etcd.url, TURSO_CLUSTER_PREFIX=PREFIX,
                      TURSO_NODE_NAME=name, TURSO_CLUSTER_ADDR="127.0.0.1:0",
                      TURSO_CLUSTER_TOKEN=CLUSTER_TOKEN, **env)

    @inlineCallbacks
    def start_node(self, name: str, data_dir: str | None = None, **env: str) -> Any:
        node = yield self.node_daemon(name, data_dir, **env).start()
        return node

    def live(self, node: Daemon) -> list[str]:
        lines = [e for e in node.logs() if e.get("msg", "").startswith("cluster node ")
                 or e.get("msg", "").startswith("joined the cluster")]
        joined = {e["node"] for e in lines if "joined" in e["msg"]}
        left = {e["node"] for e in lines if e["msg"].endswith(" left")}
        return sorted(joined - left)

    def placements_seen(self, node: Daemon) -> int:
        """How many placements C{node}'s view of the cluster holds."""
        with urlopen(node.admin_url("/v1/cluster"), timeout=10) as answer:
            view = json.loads(answer.read())
        return sum(entry["namespaces"] for entry in view["nodes"])

    def owners(self) -> Any:
        keys = self.etcd.keys(PREFIX + "/ns/")
        return keys.addCallback(lambda found: {key.rsplit("/", 1)[1]: value["node"]
                                               for key, value in found.items()})


class PlacementTests(ClusterTestCase):

    @inlineCallbacks
    def test_replicas_on_different_nodes_sync_one_namespace(self) -> Any:
        """
        A replica writes through node A, another reads and writes through
        node C: both reach the one namespace, which lives on node A only.
        """
        a, b, c = yield self.start_cluster()
        writer = yield self.replica(a, "alpha")
        yield run_replica(writer.run, "create table t (x text)", "insert into t values ('via-a')")
        yield run_replica(writer.push)
        reader = yield self.replica(c, "alpha")
        self.assertEqual((yield run_replica(reader.rows, "select x from t")), [("via-a",)])
        yield run_replica(reader.run, "insert into t values ('via-c')")
        yield run_replica(reader.push)
        yield run_replica(writer.pull)
        self.assertEqual((yield run_replica(writer.rows, "select x from t order by x")),
                         [("via-a",), ("via-c",)])
        owners = yield self.owners()
        self.assertEqual(owners, {"alpha": "node-a"})
        for node, holds in ((a, True), (b, False), (c, False)):
            status, listed = yield get_json(node.admin_url("/v1/namespaces?local=true"))
            self.assertEqual([r["name"] for r in listed["namespaces"]], ["alpha"] if holds else [])
        status, view = yield get_json(b.admin_url("/v1/cluster"))
        self.assertEqual(status, 200)
        self.assertEqual({n["name"]: (n["live"], n["namespaces"]) for n in view["nodes"]},
                         {"node-a": (True, 1), "node-b": (True, 0), "node-c": (True, 0)})

    @inlineCallbacks
    def test_admin_calls_on_any_node(self) -> Any:
        """
        Any node's admin API lists every node's namespaces with their node,
        and makes calls about another node's namespace on that node; a
        backup of it is made on that node's own admin API.
        """
        a, b, c = yield self.start_cluster(TURSO_ADMIN_TOKEN="admin-secret")
        admin = {"headers": {b"authorization": [b"Bearer admin-secret"]}}
        for node, name in ((a, "alpha"), (b, "bravo")):
            yield deferToThread(post, node.data_port, f"/{name}/v2/pipeline")
        status, listed = yield get_json(c.admin_url("/v1/namespaces"), **admin)
        self.assertEqual([(e["name"], e["node"]) for e in listed["namespaces"]],
                         [("alpha", "node-a"), ("bravo", "node-b")])
        status, shown = yield get_json(c.admin_url("/v1/namespaces/alpha"), **admin)
        self.assertEqual((status, shown["name"], shown["running"]), (200, "alpha", True))
        status, changed = yield get_json(c.admin_url("/v1/namespaces/alpha/ttl"), "POST",
                                         data=json.dumps({"ttl": "30d"}).encode(), **admin)
        self.assertEqual((status, changed["ttl"]), (200, "720h0m0s"))
        status, record = yield get_json(a.admin_url("/v1/namespaces/alpha"), **admin)
        self.assertEqual(record["ttl"], "720h0m0s")
        # The node asked checks the admin token, and so does the owner (a
        # call on its internal listener with the cluster token alone is refused).
        status, error = yield get_json(c.admin_url("/v1/namespaces/alpha"),
                                       headers={b"authorization": [b"Bearer wrong"]})
        self.assertEqual((status, error["error"]), (401, "unauthorized"))
        internal = next(e["port"] for e in a.logs() if e.get("listener") == "cluster")
        status, error = yield deferToThread(
            post, internal, "/_cluster/v1/admin/v1/namespaces/alpha/lock", b"",
            b"x-turso-cluster-token: %s\r\nauthorization: Bearer wrong\r\n" % CLUSTER_TOKEN.encode())
        self.assertEqual((status, error["error"]), (401, "unauthorized"))
        status, unchanged = yield get_json(a.admin_url("/v1/namespaces/alpha"), **admin)
        self.assertFalse(unchanged["locked"])
        # A backup and a restore stream through the node asked (this one is
        # larger than what a body keeps in memory).
        writer = yield self.replica(a, "alpha")
        yield run_replica(writer.run, "create table t (x text)",
                          *[f"insert into t values ('{i:04d}{'x' * 1000}')" for i in range(400)])
        yield run_replica(writer.push)
        response = yield treq.get(c.admin_url("/v1/namespaces/alpha/backup"), persistent=False, **admin)
        backup = yield response.content()
        self.assertEqual(response.code, 200, backup[:200])
        self.assertGreater(len(backup), 400_000)
        self.assertEqual(response.headers.getRawHeaders(b"x-backup-sha256"),
                         [hashlib.sha256(backup).hexdigest().encode()])
        self.assertEqual(response.headers.getRawHeaders(b"x-backup-namespace-id"), [shown["id"].encode()])
        yield run_replica(writer.run, "delete from t")
        yield run_replica(writer.push)
        status, restored = yield get_json(c.admin_url("/v1/namespaces/alpha/restore"), "POST", data=backup,
                                          **admin)
        self.assertEqual(status, 200, restored)
        self.assertEqual((restored["name"], restored["id"]), ("alpha", shown["id"]))
        reader = yield self.replica(b, "alpha")
        self.assertEqual((yield run_replica(reader.rows, "select count(*) from t")), [(400,)])
        status, listed = yield get_json(c.admin_url("/v1/namespaces?bytes=true"), **admin)
        sizes = {entry["name"]: entry["bytesOnDisk"] for entry in listed["namespaces"]}
        self.assertGreater(sizes["alpha"], 400_000)
        self.assertEqual((yield self.owners()), {"alpha": "node-a", "bravo": "node-b"})
        status, deleted = yield get_json(c.admin_url("/v1/namespaces/bravo"), "DELETE", **admin)
        self.assertEqual(status, 200, deleted)
        self.assertEqual((yield self.owners()), {"alpha": "node-a"})
        b.signal("SIGKILL")
        yield b.exited()
        status, listed = yield get_json(c.admin_url("/v1/namespaces"), **admin)
        self.assertEqual([(e["name"], e["node"]) for e in listed["namespaces"]], [("alpha", "node-a")])

    @inlineCallbacks
    def test_new_names_go_to_the_node_that_owns_the_fewest(self) -> Any:
        """
        With TURSO_CLUSTER_PLACEMENT=least-namespaces, new names made
        through one node (first requests, and create calls) spread over
        every node; each node reports the bytes it holds.
        """
        a, b, c = yield self.start_cluster(TURSO_CLUSTER_PLACEMENT="least-namespaces")
        for index in range(6):
            if index % 2:
                status, created = yield get_json(a.admin_url(f"/v1/namespaces/new{index}/create"), "POST")
                self.assertEqual(status, 201, created)
            else:
                status, answer = yield deferToThread(post, a.data_port, f"/new{index}/v2/pipeline")
                self.assertEqual(status, 200, answer)
            yield wait_for(lambda placed=index + 1: self.placements_seen(a) == placed, "a to see it placed")
        owners = yield self.owners()
        self.assertEqual(sorted(list(owners.values()).count(node) for node in ("node-a", "node-b", "node-c")),
                         [2, 2, 2], owners)
        for node in (a, b, c):
            status, listed = yield get_json(node.admin_url("/v1/namespaces?local=true"))
            self.assertEqual(sorted(entry["name"] for entry in listed["namespaces"]),
                             sorted(name for name, owner in owners.items()
                                    if owner == node.env["TURSO_NODE_NAME"]))
        status, view = yield get_json(b.admin_url("/v1/cluster"))
        self.assertEqual(view["placement"], "least-namespaces")
        self.assertEqual([(entry["live"], entry["ready"]) for entry in view["nodes"]], [(True, True)] * 3)
        # Each node reported its bytes when it joined.
        self.assertTrue(all(isinstance(entry["bytes"], int) for entry in view["nodes"]), view)
        status, listed = yield get_json(c.admin_url("/v1/namespaces?bytes=true"))
        self.assertEqual(len(listed["namespaces"]), 6)
        self.assertTrue(all(isinstance(entry["bytesOnDisk"], int) for entry in listed["namespaces"]), listed)

    @inlineCallbacks
    def test_concurrent_first_requests_on_every_node_create_one_namespace(self) -> Any:
        nodes = yield self.start_cluster()
        ports = [node.data_port for node in nodes]
        results = yield DeferredList([deferToThread(post, ports[i % 3], "/fresh/v2/pipeline")
                                      for i in range(20)], consumeErrors=True)
        self.assertEqual([(ok, result[0]) for ok, result in results], [(True, 200)] * 20, results)
        owners = yield self.owners()
        self.assertEqual(list(owners), ["fresh"])
        holders = []
        for node in nodes:
            status, listed = yield get_json(node.admin_url("/v1/namespaces?local=true"))
            holders += [(node.env["TURSO_NODE_NAME"], r["name"]) for r in listed["namespaces"]]
        self.assertEqual(holders, [(owners["fresh"], "fresh")])

    @inlineCallbacks
    def test_a_dead_owner_is_never_replaced_by_an_empty_namespace(self) -> Any:
        """
        Node B dies: its names get 503 owner_unavailable on every node,
        nothing is created elsewhere; other names are served; B restarted
        serves its data again.
        """
        a, b, c = yield self.start_cluster(TURSO_ALLOW_AUTO_PROVISION="true")
        on_b = yield self.replica(b, "bravo")
        yield run_replica(on_b.run, "create table t (x text)", "insert into t values ('kept')")
        yield run_replica(on_b.push)
        on_a = yield self.replica(a, "alpha")
        yield run_replica(on_a.run, "create table t (x text)")
        yield run_replica(on_a.push)
        b.signal("SIGKILL")
        yield b.exited()
        # Its lease runs out; until then a relay to it fails to connect: the same 503.
        for node in (a, c):
            status, error = yield deferToThread(post, node.data_port, "/bravo/v2/pipeline")
            self.assertEqual((status, error.get("error")), (503, "owner_unavailable"), error)
        status, _ = yield deferToThread(post, c.data_port, "/alpha/v2/pipeline")
        self.assertEqual(status, 200)
        owners = yield self.owners()
        self.assertEqual(owners, {"alpha": "node-a", "bravo": "node-b"})
        for node in (a, c):
            status, listed = yield get_json(node.admin_url("/v1/namespaces?local=true"))
            self.assertNotIn("bravo", [r["name"] for r in listed["namespaces"]])
        status, listed = yield get_json(c.admin_url("/v1/namespaces"))
        self.assertIn({"name": "bravo", "node": "node-b", "available": False}, listed["namespaces"])
        # B comes back on its own data dir: its names serve their data again.
        b2 = yield self.start_node("node-b", b.data_dir)
        yield served(c.data_port, "/bravo/v2/pipeline")
        reader = yield self.replica(c, "bravo")

        def rows() -> Any:
            reader.pull()
            return reader.rows("select x from t")

        self.assertEqual((yield run_replica(rows)), [("kept",)])
        self.assertTrue(b2.pid)

    @inlineCallbacks
    def test_with_etcd_down_known_names_are_served_and_new_ones_wait(self) -> Any:
        a, b, c = yield self.start_cluster()
        status, _ = yield deferToThread(post, a.data_port, "/known/v2/pipeline")
        self.assertEqual(status, 200)
        # Every node has seen the placement before etcd goes.
        yield wait_for(lambda: all(self.placements_seen(node) == 1 for node in (b, c)),
                       "the placement to spread")
        yield self.etcd.stop()
        for node in (a, b, c):
            status, error = yield deferToThread(post, node.data_port, "/known/v2/pipeline")
            self.assertEqual(status, 200, error)
        status, error = yield deferToThread(post, b.data_port, "/newname/v2/pipeline")
        self.assertEqual((status, error.get("error")), (503, "cluster_unavailable"), error)
        yield self.etcd.start()
        yield served(b.data_port, "/newname/v2/pipeline")
        owners = yield self.owners()
        self.assertEqual(owners, {"known": "node-a", "newname": "node-b"})

    @inlineCallbacks
    def test_the_internal_listener_needs_the_cluster_token(self) -> Any:
        a, b, c = yield self.start_cluster()
        cluster_port = next(e["port"] for e in a.logs() if e.get("listener") == "cluster")
        status, error = yield deferToThread(post, cluster_port, "/alpha/v2/pipeline")
        self.assertEqual((status, error["error"]), (401, "unauthorized"))
        status, error = yield deferToThread(post, cluster_port, "/alpha/v2/pipeline",
                                            headers=b"x-turso-cluster-token: wrong\r\n")
        self.assertEqual((status, error["error"]), (401, "unauthorized"))
        status, _ = yield deferToThread(post, cluster_port, "/alpha/v2/pipeline",
                                        headers=b"x-turso-cluster-token: %s\r\n" % CLUSTER_TOKEN.encode())
        self.assertEqual(status, 200)
        # Relayed admin calls go only to this node's own admin routes.
        peer = b"x-turso-cluster-token: %s\r\n" % CLUSTER_TOKEN.encode()
        for path in ("/_cluster/v1/admin5/v1/namespaces", "/_cluster/v1/admin/healthz",
                     "/_cluster/v1/admin@evil/v1/namespaces"):
            status, error = yield deferToThread(post, cluster_port, path, headers=peer)
            self.assertEqual((status, error.get("error")), (404, "not_found"), path)
        self.assertFalse(any(CLUSTER_TOKEN in json.dumps(e) for node in (a, b, c) for e in node.logs()))

    @inlineCallbacks
    def test_node_client_through_one_node_pyturso_through_another(self) -> Any:
        """
        @tursodatabase/sync syncs through node B with the data token; a
        pyturso replica on node C reads what it pushed (the token goes
        along with the relayed request and is checked again by the owner).
        """
        sync_js = os.environ.get("TURSO_SYNC_JS", "")
        node_bin = shutil.which("node")
        if not (sync_js and node_bin):
            raise SkipTest("node or @tursodatabase/sync missing (./dev test installs it with npm)")
        a, b, c = yield self.start_cluster(TURSO_AUTH_TOKEN="node-token")
        prefix = os.path.abspath(self.mktemp())
        script = os.path.join(os.path.dirname(__file__), "node", "sync_roundtrip.mjs")
        out, err, code = yield getProcessOutputAndValue(
            node_bin, [script, b.data_url("/nodejs"), "node-token", prefix],
            env={"PATH": os.environ.get("PATH", ""), "TURSO_SYNC_JS": sync_js})
        self.assertEqual(code, 0, err)
        self.assertEqual(json.loads(out), [{"x": "node-a"}, {"x": "node-b"}])
        replica = yield self.replica(c, "nodejs", token="node-token")
        self.assertEqual((yield run_replica(replica.rows, "select x from t order by x")),
                         [("node-a",), ("node-b",)])
        self.assertEqual((yield self.owners()), {"nodejs": "node-b"})
        status, error = yield deferToThread(post, c.data_port, "/nodejs/v2/pipeline")
        self.assertEqual((status, error["error"]), (401, "unauthorized"))



class MoveTests(ClusterTestCase):

    @inlineCallbacks
    def test_a_moved_namespace_keeps_its_replicas_syncing(self) -> Any:
        """
        A namespace moves from node A to node B while a replica pushes
        through node A: every acknowledged row is there after the move, the
        replica from before it pushes and pulls on with no re-bootstrap,
        and node A's copy is in its archive.
        """
        a, b = yield self.start_cluster(2)
        writer = yield self.replica(a, "alpha")
        yield run_replica(writer.run, "create table t (k integer primary key)")
        yield run_replica(writer.push)
        ledger = PushLedger(writer)
        acknowledged = ledger.acknowledged
        pushing = run_replica(ledger.run, 10_000, 200, 0.05)
        yield wait_for(lambda: len(acknowledged) >= 10, "pushes under way")
        # Asked of node B, which does not own it: node A moves it.
        status, moved = yield get_json(b.admin_url("/v1/namespaces/alpha/move"), "POST",
                                       data=json.dumps({"to": "node-b"}).encode())
        self.assertEqual((status, moved["from"], moved["to"]), (200, "node-a", "node-b"), moved)
        count = len(acknowledged)
        yield wait_for(lambda: len(acknowledged) >= count + 10, "pushes after the move", timeout=60)
        ledger.stop.set()
        retries = yield pushing
        self.assertEqual((yield self.owners()), {"alpha": "node-b"})
        # The replica from before the move pulls through node A (relayed to B).
        yield run_replica(writer.pull)
        rows = yield run_replica(writer.rows, "select k from t order by k")
        self.assertEqual([row[0] for row in rows], acknowledged)
        fresh = yield self.replica(b, "alpha")
        rows = yield run_replica(fresh.rows, "select k from t order by k")
        self.assertEqual([row[0] for row in rows], acknowledged)
        status, on_a = yield get_json(a.admin_url("/v1/namespaces?local=true"))
        self.assertEqual(on_a["namespaces"], [])
        status, archived = yield get_json(a.admin_url("/v1/archive"))
        self.assertEqual([e["reason"] for e in archived["entries"]], ["moved to cluster node node-b"])
        status, on_b = yield get_json(b.admin_url("/v1/namespaces/alpha"))
        self.assertEqual(status, 200)
        self.assertLess(retries, 200)

    @inlineCallbacks
    def test_move_refusals_change_nothing(self) -> Any:
        a, b = yield self.start_cluster(2)
        yield deferToThread(post, a.data_port, "/alpha/v2/pipeline")
        for body, code in (({"to": "node-z"}, "node_unavailable"), ({"to": "node-a"}, "invalid_target"),
                           ({}, "invalid_target"), ({"to": 3}, "invalid_target")):
            status, error = yield get_json(a.admin_url("/v1/namespaces/alpha/move"), "POST",
                                           data=json.dumps(body).encode())
            self.assertEqual(error["error"], code, (body, error))
            self.assertIn(status, (400, 503))
        status, error = yield get_json(b.admin_url("/v1/namespaces/nothing/move"), "POST",
                                       data=json.dumps({"to": "node-a"}).encode())
        self.assertEqual((status, error["error"]), (404, "namespace_not_found"))
        self.assertEqual((yield self.owners()), {"alpha": "node-a"})

    @inlineCallbacks
    def test_a_new_node_joins_and_rebalance_evens_out(self) -> Any:
        """
        Six namespaces on node A; node D joins; `rebalance --dry-run` moves
        nothing, `rebalance` evens the counts out.  Every namespace keeps
        its rows, and each replica from before pushes and pulls after.
        """
        a, b, c = yield self.start_cluster()
        names = [f"ns{i}" for i in range(6)]
        replicas = {}
        for name in names:
            replica = yield self.replica(a, name)
            yield run_replica(replica.run, "create table t (x text)", f"insert into t values ('{name}-1')")
            yield run_replica(replica.push)
            replicas[name] = replica
        d = yield self.start_node("node-d")
        yield wait_for(lambda: "node-d" in self.live(a), "node-d to join")
        admin = ["--url", d.admin_url()]
        out = io.StringIO()
        code = yield deferToThread(cli.main, [*admin, "rebalance", "--dry-run"], out)
        self.assertEqual(code, 0, out.getvalue())
        self.assertIn("4 move(s) planned", out.getvalue())
        out = io.StringIO()
        by_bytes = [*admin, "--json", "rebalance", "--by", "bytes", "--dry-run"]
        code = yield deferToThread(cli.main, by_bytes, out)
        self.assertEqual(code, 0, out.getvalue())
        planned = json.loads(out.getvalue())
        self.assertTrue(planned["plan"] and all(move["from"] == "node-a" for move in planned["plan"]),
                        planned)
        self.assertEqual(set((yield self.owners()).values()), {"node-a"})
        out = io.StringIO()
        code = yield deferToThread(cli.main, [*admin, "rebalance"], out)
        self.assertEqual(code, 0, out.getvalue())
        owners = yield self.owners()
        nodes = ("node-a", "node-b", "node-c", "node-d")
        counts = sorted(list(owners.values()).count(node) for node in nodes)
        self.assertEqual(counts, [1, 1, 2, 2], owners)
        for name, replica in replicas.items():
            yield run_replica(replica.run, f"insert into t values ('{name}-2')")
            yield run_replica(replica.push)
            yield run_replica(replica.pull)
            rows = yield run_replica(replica.rows, "select x from t order by x")
            self.assertEqual(rows, [(f"{name}-1",), (f"{name}-2",)])
            through_d = yield self.replica(d, name)
            rows = yield run_replica(through_d.rows, "select x from t order by x")
            self.assertEqual(rows, [(f"{name}-1",), (f"{name}-2",)])
        out = io.StringIO()
        code = yield deferToThread(cli.main, [*admin, "rebalance"], out)
        self.assertEqual((code, out.getvalue()), (0, "0 move(s) planned, 0 done, 0 failed\n"))

    @inlineCallbacks
    def test_a_move_whose_switch_gets_no_answer_is_fenced_until_etcd_says(self) -> Any:
        """
        With etcd down at the switch, whether the move happened is unknown:
        node A does not serve the namespace until etcd answers (then it
        finds the switch did not happen and serves it again); node B never
        serves its copy; the same move succeeds once etcd is back.
        """
        a, b = yield self.start_cluster(2)
        replica = yield self.replica(a, "alpha")
        yield run_replica(replica.run, "create table t (x text)", "insert into t values ('kept')")
        yield run_replica(replica.push)
        yield wait_for(lambda: self.placements_seen(b) == 1, "node B to know the placement")
        yield self.etcd.stop()
        status, error = yield get_json(a.admin_url("/v1/namespaces/alpha/move"), "POST",
                                       data=json.dumps({"to": "node-b"}).encode())
        self.assertEqual((status, error["error"]), (503, "cluster_unavailable"), error)
        for node in (a, b):
            status, error = yield deferToThread(post, node.data_port, "/alpha/v2/pipeline")
            self.assertEqual((status, error["error"]), (503, "namespace_moving"), error)
        yield self.etcd.start()
        yield served(a.data_port, "/alpha/v2/pipeline")
        yield run_replica(replica.run, "insert into t values ('after')")
        yield run_replica(replica.push)
        self.assertEqual((yield self.owners()), {"alpha": "node-a"})
        moved = yield served_json(a.admin_url("/v1/namespaces/alpha/move"), {"to": "node-b"})
        self.assertEqual(moved["to"], "node-b")
        yield run_replica(replica.pull)
        rows = yield run_replica(replica.rows, "select x from t order by x")
        self.assertEqual(rows, [("after",), ("kept",)])
        self.assertEqual((yield self.owners()), {"alpha": "node-b"})
        status, archived = yield get_json(b.admin_url("/v1/archive"))
        self.assertEqual([e["reason"] for e in archived["entries"]],
                         ["an incoming move that did not complete"])


class InterruptedMoveTests(ClusterTestCase):
    """
    A move stopped by a crash at each step (a failpoint kills the node
    there as SIGKILL would) leaves exactly one owner serving every row.
    """

    @inlineCallbacks
    def two_nodes(self, failing: str, failpoint: str) -> Any:
        self.etcd = yield EtcdServer(self).start()
        a = yield self.start_node("node-a", **({"TURSO_FAILPOINTS": failpoint} if failing == "a" else {}))
        b = yield self.start_node("node-b", **({"TURSO_FAILPOINTS": failpoint} if failing == "b" else {}))
        yield wait_for(lambda: len(self.live(a)) == 2 and len(self.live(b)) == 2, "both nodes")
        replica = yield self.replica(a, "alpha")
        yield run_replica(replica.run, "create table t (x text)", "insert into t values ('before')")
        yield run_replica(replica.push)
        yield wait_for(lambda: self.placements_seen(b) == 1, "node B to know the placement")
        moving = get_json(a.admin_url("/v1/namespaces/alpha/move"), "POST",
                          data=json.dumps({"to": "node-b"}).encode())
        moving.addErrback(lambda failure: (None, {"error": failure.getErrorMessage()}))
        crashed = a if failing == "a" else b
        yield crashed.exited()
        status, answer = yield moving
        return a, b, replica, status, answer

    @inlineCallbacks
    def rows_through(self, node: Daemon, replica: Any = None) -> Any:
        reader = replica or (yield self.replica(node, "alpha"))

        def read() -> Any:
            reader.pull()
            return reader.rows("select x from t order by x")

        rows = yield run_replica(read)
        return rows

    @inlineCallbacks
    def test_target_dies_before_it_answers(self) -> Any:
        a, b, replica, status, answer = yield self.two_nodes("b", "move.target.after_install")
        self.assertEqual(status, 503, answer)
        self.assertEqual((yield self.owners()), {"alpha": "node-a"})
        yield run_replica(replica.run, "insert into t values ('during')")
        yield run_replica(replica.push)
        b2 = yield self.start_node("node-b", b.data_dir)
        status, on_b = yield get_json(b2.admin_url("/v1/namespaces?local=true"))
        self.assertEqual(on_b["namespaces"], [])
        status, archived = yield get_json(b2.admin_url("/v1/archive"))
        self.assertEqual([e["reason"] for e in archived["entries"]],
                         ["an incoming move that did not complete"])
        self.assertEqual((yield self.rows_through(b2)), [("before",), ("during",)])
        moved = yield served_json(a.admin_url("/v1/namespaces/alpha/move"), {"to": "node-b"})
        self.assertEqual(moved["to"], "node-b")
        self.assertEqual((yield self.rows_through(a, replica)), [("before",), ("during",)])

    @inlineCallbacks
    def test_source_dies_after_the_switch(self) -> Any:
        a, b, replica, status, answer = yield self.two_nodes("a", "move.source.after_switch")
        self.assertEqual((yield self.owners()), {"alpha": "node-b"})
        # Node B serves it (it saw the switch), to the replica from before the move too.
        yield served(b.data_port, "/alpha/v2/pipeline")
        reader = yield self.replica(b, "alpha")
        self.assertEqual((yield self.rows_through(b, reader)), [("before",)])
        yield run_replica(reader.run, "insert into t values ('after')")
        yield run_replica(reader.push)
        a2 = yield self.start_node("node-a", a.data_dir)
        status, on_a = yield get_json(a2.admin_url("/v1/namespaces?local=true"))
        self.assertEqual(on_a["namespaces"], [])
        status, archived = yield get_json(a2.admin_url("/v1/archive"))
        self.assertEqual([e["reason"] for e in archived["entries"]], ["moved to cluster node node-b"])
        self.assertEqual((yield self.rows_through(a2)), [("after",), ("before",)])

    @inlineCallbacks
    def test_source_dies_before_the_switch(self) -> Any:
        a, b, replica, status, answer = yield self.two_nodes("a", "move.source.before_switch")
        self.assertEqual((yield self.owners()), {"alpha": "node-a"})
        # Node A is down: node B does not serve its copy, it says the owner is down.
        status, error = yield deferToThread(post, b.data_port, "/alpha/v2/pipeline")
        self.assertEqual((status, error["error"]), (503, "owner_unavailable"))
        a2 = yield self.start_node("node-a", a.data_dir)
        self.assertEqual((yield self.rows_through(a2)), [("before",)])
        status, on_a = yield get_json(a2.admin_url("/v1/namespaces?local=true"))
        self.assertEqual([r["name"] for r in on_a["namespaces"]], ["alpha"])


# Every cluster suite again with each node's data port served by two data workers.
globals().update(with_data_workers(PlacementTests, MoveTests, InterruptedMoveTests))
