"""
End to end: the real daemon, real tursodb children, real pyturso replicas.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from typing import Any

import attrs
from treq.client import HTTPClient
from twisted.internet.defer import DeferredList, inlineCallbacks
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SkipTest, TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from turso_twisted.recovery import find_orphans

from .daemon import EXITED, RUNNING, STOPPED, Daemon, raw_request, run_replica, wait_for, with_data_workers
from .test_dataport import MALFORMED

SELECT_1 = json.dumps({"requests": [{"type": "execute", "stmt": {"sql": "select 1"}}]}).encode()


def bearer(token: str) -> dict[bytes, list[bytes]]:
    return {b"authorization": [b"Bearer " + token.encode()]}


def http_client() -> HTTPClient:
    """
    A client that keeps no connections open between requests, so that no
    test leaves a pooled connection behind.
    """
    from twisted.internet import reactor

    return HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))


treq = http_client()


@inlineCallbacks
def get_json(url: str, method: str = "GET", **kwargs: Any) -> Any:
    response = yield treq.request(method, url, **kwargs)
    body = yield response.content()
    return response.code, json.loads(body) if body else None


class Replica:
    """
    A pyturso embedded replica, used from a thread.
    """

    def __init__(self, path: str, url: str, token: str | None = None) -> None:
        import turso.sync

        self.conn = turso.sync.connect(path, remote_url=url, auth_token=token)

    def run(self, *statements: str) -> None:
        for sql in statements:
            self.conn.execute(sql)
        self.conn.commit()

    def rows(self, sql: str) -> list[tuple[Any, ...]]:
        return self.conn.execute(sql).fetchall()

    def push(self) -> None:
        self.conn.push()

    def pull(self) -> bool:
        return self.conn.pull()

    def close(self) -> None:
        self.conn.close()


@attrs.define
class PushLedger:
    """
    Rows inserted and pushed one by one from a thread, each pushed again
    until it is acknowledged; C{acknowledged} is the write ledger.
    """

    writer: Replica
    acknowledged: list[int] = attrs.field(factory=list)
    stop: threading.Event = attrs.field(factory=threading.Event)
    failures: int = 0

    def run(self, keys: int, max_failures: int, backoff: float = 0.0) -> int:
        for key in range(keys):
            if self.stop.is_set():
                break
            self.writer.run(f"insert into t values ({key})")
            while True:
                try:
                    self.writer.push()
                    break
                except Exception:
                    self.failures += 1
                    if self.failures > max_failures:
                        raise
                    if backoff:
                        time.sleep(backoff)  # the client's retry policy
            self.acknowledged.append(key)
        return self.failures


class E2ETestCase(TestCase):
    timeout = 120

    def replica(self, daemon: Daemon, namespace: str, token: str | None = None) -> Any:
        path = os.path.join(os.path.abspath(self.mktemp()) + "-replica", "replica.db")
        os.makedirs(os.path.dirname(path))

        def open_replica() -> Replica:
            replica = Replica(path, daemon.data_url(f"/{namespace}"), token)
            self.addCleanup(replica.close)
            return replica

        return run_replica(open_replica)


class SyncTests(E2ETestCase):
    @inlineCallbacks
    def test_replicas_sync_and_namespaces_are_isolated(self) -> Any:
        """
        (a) A pushes to /alpha, B pulls the rows, and back; (b) /beta never
        sees alpha's data.
        """
        daemon = yield Daemon(self).start()
        a = yield self.replica(daemon, "alpha")
        yield run_replica(a.run, "create table t (x text)", "insert into t values ('from-a')")
        yield run_replica(a.push)
        b = yield self.replica(daemon, "alpha")
        self.assertEqual((yield run_replica(b.rows, "select x from t")), [("from-a",)])
        yield run_replica(b.run, "insert into t values ('from-b')")
        yield run_replica(b.push)
        yield run_replica(a.pull)
        self.assertEqual((yield run_replica(a.rows, "select x from t order by x")),
                         [("from-a",), ("from-b",)])

        beta = yield self.replica(daemon, "beta")
        tables = yield run_replica(beta.rows, "select name from sqlite_master where name = 't'")
        self.assertEqual(tables, [])
        status, listed = yield get_json(daemon.admin_url("/v1/namespaces"))
        records = {r["name"]: r for r in listed["namespaces"]}
        self.assertEqual(sorted(records), ["alpha", "beta"])
        self.assertEqual(records["alpha"]["origin"], "auto")
        self.assertFalse(records["alpha"]["locked"])
        self.assertNotEqual(records["alpha"]["port"], records["beta"]["port"])
        self.assertTrue(os.path.exists(os.path.join(daemon.data_dir, "alpha.db")))
        self.assertTrue(os.path.exists(os.path.join(daemon.data_dir, "beta.db")))
        self.assertEqual(len(daemon.events(RUNNING)), 2)
        child_lines = [e for e in daemon.logs() if e.get("logger", "").startswith("tursodb.")]
        self.assertTrue(all(e["logger"] == f"tursodb.{e['name']}" for e in child_lines))

    @inlineCallbacks
    def test_child_killed_next_sync_works_and_no_push_lost(self) -> Any:
        """
        (e) SIGKILL of a child: the next sync is served by a fresh child and
        every acknowledged push is still there.
        """
        daemon = yield Daemon(self).start()
        a = yield self.replica(daemon, "alpha")
        yield run_replica(a.run, "create table t (x integer)",
                          *[f"insert into t values ({i})" for i in range(50)])
        yield run_replica(a.push)
        status, record = yield get_json(daemon.admin_url("/v1/namespaces/alpha"))
        os.kill(record["pid"], signal.SIGKILL)
        yield wait_for(lambda: daemon.events(EXITED, name="alpha"),
                       "the daemon to notice the dead child")
        yield run_replica(a.run, "insert into t values (50)")
        yield run_replica(a.push)
        b = yield self.replica(daemon, "alpha")
        self.assertEqual((yield run_replica(b.rows, "select count(*), sum(x) from t")),
                         [(51, sum(range(51)))])
        status, after = yield get_json(daemon.admin_url("/v1/namespaces/alpha"))
        self.assertTrue(after["running"])
        self.assertNotEqual(after["pid"], record["pid"])

    @inlineCallbacks
    def test_child_killed_between_requests_is_replaced_transparently(self) -> Any:
        """
        A request racing the death of its child is retried on a fresh one
        (nothing had reached the dead child), not answered with an error.
        """
        daemon = yield Daemon(self).start()
        response = yield treq.post(daemon.data_url("/alpha/v2/pipeline"), SELECT_1)
        self.assertEqual(response.code, 200)
        yield response.content()
        status, record = yield get_json(daemon.admin_url("/v1/namespaces/alpha"))
        os.kill(record["pid"], signal.SIGKILL)
        response = yield treq.post(daemon.data_url("/alpha/v2/pipeline"), SELECT_1)
        self.assertEqual(response.code, 200)
        self.assertIn(b'"rows"', (yield response.content()))


class RobustnessTests(E2ETestCase):
    @inlineCallbacks
    def test_unauthenticated_body_is_refused_before_it_is_read(self) -> Any:
        daemon = yield Daemon(self, TURSO_AUTH_TOKEN="data-token").start()
        # Headers only: the 401 comes without the server waiting for 64 MiB.
        status, response = yield raw_request(
            daemon.data_port, b"POST /alpha/v2/pipeline HTTP/1.1\r\nHost: x\r\n"
            b"Content-Length: 67108000\r\n\r\n")
        self.assertEqual(status, 401)
        self.assertIn(b'"unauthorized"', response)
        self.assertIn(b"www-authenticate: bearer", response.lower())

    @inlineCallbacks
    def test_vanished_data_files_are_refused_not_served_empty(self) -> Any:
        daemon = yield Daemon(self).start()
        replica = yield self.replica(daemon, "gone")
        yield run_replica(replica.run, "create table t (x)", "insert into t values (1)")
        yield run_replica(replica.push)
        daemon.signal("SIGTERM")
        yield daemon.exited()
        for suffix in (".db", ".db-wal", ".db-log"):
            path = os.path.join(daemon.data_dir, "gone" + suffix)
            if os.path.exists(path):
                os.unlink(path)
        yield daemon.start()
        response = yield treq.post(daemon.data_url("/gone/v2/pipeline"), SELECT_1)
        body = json.loads((yield response.content()))
        self.assertEqual((response.code, body["error"]), (503, "namespace_data_missing"))
        self.assertFalse(os.path.exists(os.path.join(daemon.data_dir, "gone.db")))
        with self.assertRaises(Exception) as caught:
            yield self.replica(daemon, "gone")
        self.assertIn("namespace_data_missing", str(caught.exception))


class NodeClientTests(E2ETestCase):
    @inlineCallbacks
    def test_node_sync_client(self) -> Any:
        """
        @tursodatabase/sync (what the note's users run) syncs through the
        daemon too, and a pyturso replica sees what it pushed.
        """
        sync_js = os.environ.get("TURSO_SYNC_JS", "")
        node = shutil.which("node")
        if not (sync_js and node):
            raise SkipTest("node or @tursodatabase/sync missing (./dev test installs it with npm)")
        daemon = yield Daemon(self, TURSO_AUTH_TOKEN="node-token").start()
        prefix = os.path.abspath(self.mktemp())
        script = os.path.join(os.path.dirname(__file__), "node", "sync_roundtrip.mjs")
        out, err, code = yield getProcessOutputAndValue(
            node, [script, daemon.data_url("/nodejs"), "node-token", prefix],
            env={"PATH": os.environ.get("PATH", ""), "TURSO_SYNC_JS": sync_js})
        self.assertEqual(code, 0, err)
        self.assertEqual(json.loads(out), [{"x": "node-a"}, {"x": "node-b"}])
        replica = yield self.replica(daemon, "nodejs", token="node-token")
        self.assertEqual((yield run_replica(replica.rows, "select x from t order by x")),
                         [("node-a",), ("node-b",)])


class AuthTests(E2ETestCase):
    @inlineCallbacks
    def test_tokens(self) -> Any:
        """
        (c) The data port wants the data token, the admin port the admin
        token; probes need none; pyturso works with the token.
        """
        daemon = yield Daemon(self, TURSO_AUTH_TOKEN="data-token", TURSO_ADMIN_TOKEN="admin-token").start()
        url = daemon.data_url("/alpha/v2/pipeline")
        for headers in ({}, bearer("wrong"), bearer("admin-token"), {b"authorization": [b"Basic x"]}):
            response = yield treq.post(url, SELECT_1, headers=headers)
            body = json.loads((yield response.content()))
            self.assertEqual((response.code, body["error"]), (401, "unauthorized"))
            self.assertEqual(response.headers.getRawHeaders(b"www-authenticate")[0][:6], b"Bearer")
        status, listed = yield get_json(daemon.admin_url("/v1/namespaces"), headers=bearer("admin-token"))
        self.assertEqual(listed["namespaces"], [], "unauthenticated requests created nothing")
        for headers in ({}, bearer("data-token")):
            status, body = yield get_json(daemon.admin_url("/v1/namespaces"), headers=headers)
            self.assertEqual(status, 401)
        for probe in ("/healthz", "/readyz"):
            status, body = yield get_json(daemon.admin_url(probe))
            self.assertEqual(status, 200)

        replica = yield self.replica(daemon, "alpha", token="data-token")
        yield run_replica(replica.run, "create table t (x)", "insert into t values (1)")
        yield run_replica(replica.push)
        response = yield treq.post(url, SELECT_1, headers=bearer("data-token"))
        self.assertEqual(response.code, 200)
        yield response.content()
        self.assertEqual(find_orphans(daemon.data_dir), [record["pid"] for record in
                         (yield get_json(daemon.admin_url("/v1/namespaces"),
                                         headers=bearer("admin-token")))[1]["namespaces"]])
        log_text = open(daemon.log_path).read() + daemon.stderr()
        self.assertNotIn("data-token", log_text)
        self.assertNotIn("admin-token", log_text)
        self.assertEqual([e for e in daemon.logs() if e.get("msg", "").startswith("auth is off")], [])

    @inlineCallbacks
    def test_auth_off_is_warned_once(self) -> Any:
        daemon = yield Daemon(self).start()
        [warning] = [e for e in daemon.logs() if e.get("msg", "").startswith("auth is off")]
        self.assertEqual((warning["level"], warning["open_ports"]), ("WARN", ["data", "admin"]))


class ProvisioningTests(E2ETestCase):
    @inlineCallbacks
    def test_concurrent_first_requests_spawn_one_child(self) -> Any:
        """
        (d) 20 concurrent first requests to a new name: one child.
        """
        daemon = yield Daemon(self).start()
        responses = yield DeferredList(
            [treq.post(daemon.data_url("/gamma/v2/pipeline"), SELECT_1) for _ in range(20)],
            fireOnOneErrback=True)
        codes = [response.code for _, response in responses]
        yield DeferredList([response.content() for _, response in responses])
        self.assertEqual(codes, [200] * 20)
        self.assertEqual(len(daemon.events(RUNNING, name="gamma")), 1)
        self.assertEqual(len(find_orphans(daemon.data_dir)), 1)

    @inlineCallbacks
    def test_bad_names_create_nothing(self) -> Any:
        """
        (g) Invalid names get a 4xx JSON error and no file appears, in the
        data dir or outside it.
        """
        daemon = yield Daemon(self).start()
        parent = os.path.dirname(daemon.data_dir)
        before_parent = sorted(os.listdir(parent))
        targets = [b"/Alpha/v2/pipeline", b"/_state/v2/pipeline", b"/%2e%2e/v2/pipeline",
                   b"/../v2/pipeline", b"/..%2f..%2fetc/x", b"/a.b/x", b"/%C3%A9/x", b"/\xc3\xa9/x",
                   b"/" + b"a" * 64 + b"/x", b"/-x/x", b"//x", b"/a%00/x", b"http://evil/x",
                   b"/alpha%2fbeta/x", b"/ALPHA"]
        for target in targets:
            status, response = yield raw_request(
                daemon.data_port,
                b"POST " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(SELECT_1), SELECT_1))
            self.assertIn(status, (400, 404), target)
            body = response.split(b"\r\n\r\n", 1)[1]
            self.assertEqual(set(json.loads(body)), {"error", "message"}, target)
        self.assertEqual(sorted(os.listdir(daemon.data_dir)), ["_state", "_tmp"])
        self.assertEqual(sorted(os.listdir(parent)), before_parent)
        status, listed = yield get_json(daemon.admin_url("/v1/namespaces"))
        self.assertEqual(listed["namespaces"], [])

    @inlineCallbacks
    def test_malformed_and_smuggled_requests_get_400_and_close(self) -> Any:
        """
        Over loopback, each request the data port's parser refuses is
        answered 400 with a JSON error and the connection closes (the read
        below ends only at the close); what was smuggled inside reaches no
        child and creates nothing.
        """
        daemon = yield Daemon(self).start()
        smuggled = (b"POST /victim/v2/pipeline HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                    % (len(SELECT_1), SELECT_1))
        cases = dict(MALFORMED)
        cases["smuggled after content-length and chunked"] = (
            b"POST /a/v2/pipeline HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n%s" % (5 + len(smuggled), smuggled))
        for label, raw in cases.items():
            status, response = yield raw_request(daemon.data_port, raw)
            self.assertEqual(status, 400, label)
            body = response.split(b"\r\n\r\n", 1)[1]
            self.assertEqual(json.loads(body)["error"], "bad_request", label)
        self.assertEqual(sorted(os.listdir(daemon.data_dir)), ["_state", "_tmp"])
        self.assertEqual([e for e in daemon.logs() if e.get("level") == "CRITICAL"], [])

    @inlineCallbacks
    def test_body_cap_and_auto_provision_off(self) -> Any:
        daemon = yield Daemon(self, TURSO_MAX_BODY_BYTES="1KiB", TURSO_ALLOW_AUTO_PROVISION="false").start()
        big = b"x" * 2048
        status, response = yield raw_request(
            daemon.data_port, b"POST /alpha/v2/pipeline HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Content-Length: 2048\r\n\r\n" + big)
        self.assertEqual(status, 413)
        self.assertIn(b'"body_too_large"', response)
        chunked = b"".join(b"400\r\n" + b"y" * 1024 + b"\r\n" for _ in range(3)) + b"0\r\n\r\n"
        status, response = yield raw_request(
            daemon.data_port, b"POST /alpha/v2/pipeline HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + chunked)
        self.assertEqual(status, 413)
        response = yield treq.post(daemon.data_url("/alpha/v2/pipeline"), SELECT_1)
        body = json.loads((yield response.content()))
        self.assertEqual((response.code, body["error"]), (404, "namespace_not_found"))
        self.assertEqual(sorted(os.listdir(daemon.data_dir)), ["_state", "_tmp"])
        # An explicit namespace serves; headers, status and body pass through.
        status, created = yield get_json(daemon.admin_url("/v1/namespaces/alpha/create"), "POST")
        self.assertEqual(status, 201)
        response = yield treq.get(daemon.data_url("/alpha/nothing-here?x=1"))
        self.assertEqual((response.code, (yield response.content())), (404, b"Not Found"))
        self.assertEqual(response.headers.getRawHeaders(b"access-control-allow-origin"), [b"*"])
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"text/plain"])
        response = yield treq.request("OPTIONS", daemon.data_url("/alpha/v2/pipeline"))
        self.assertEqual(response.code, 204)


class RestartTests(E2ETestCase):
    @inlineCallbacks
    def test_daemon_killed_then_restarted(self) -> Any:
        """
        (f) SIGKILL of the daemon, start again: both namespaces serve their
        data, no orphan tursodb is left, no lock or port conflict.
        """
        daemon = yield Daemon(self).start()
        for name in ("alpha", "beta"):
            replica = yield self.replica(daemon, name)
            yield run_replica(replica.run, "create table t (x text)", f"insert into t values ('{name}')")
            yield run_replica(replica.push)
        status, created = yield get_json(daemon.admin_url("/v1/namespaces/gamma/create"), "POST")
        old_pids = set(find_orphans(daemon.data_dir))
        self.assertEqual(len(old_pids), 3)
        daemon.signal("SIGKILL")
        yield daemon.exited()
        yield wait_for(lambda: not find_orphans(daemon.data_dir), "children to die with the daemon")

        yield daemon.start()
        for name in ("alpha", "beta"):
            replica = yield self.replica(daemon, name)
            self.assertEqual((yield run_replica(replica.rows, "select x from t")), [(name,)])
        status, listed = yield get_json(daemon.admin_url("/v1/namespaces"))
        records = {r["name"]: r for r in listed["namespaces"]}
        self.assertEqual(sorted(records), ["alpha", "beta", "gamma"])
        self.assertEqual(records["gamma"]["origin"], "explicit")
        self.assertFalse(set(find_orphans(daemon.data_dir)) & old_pids)

    @inlineCallbacks
    def test_orphan_from_an_earlier_run_is_killed(self) -> Any:
        """
        A tursodb left on our data dir (say, by a daemon without setpriv)
        is killed at start-up so the namespace can be served.
        """
        from twisted.internet import reactor
        from twisted.internet.protocol import ProcessProtocol

        from .daemon import tursodb_bin

        daemon = Daemon(self)
        db = os.path.join(daemon.data_dir, "alpha.db")
        orphan = ProcessProtocol()
        transport = reactor.spawnProcess(orphan, tursodb_bin(), [tursodb_bin(), db, "--sync-server",
                                         "127.0.0.1:0"], env={}, childFDs={0: "w", 1: "r", 2: "r"})
        orphan_pid = transport.pid
        yield wait_for(lambda: os.path.exists(db), "the orphan to create its file")
        self.assertEqual(find_orphans(daemon.data_dir), [orphan_pid])
        yield daemon.start()
        self.assertEqual(daemon.events("killing orphaned tursodb (pid {pid}) from an earlier run")[0]["pid"],
                         orphan_pid)
        response = yield treq.post(daemon.data_url("/alpha/v2/pipeline"), SELECT_1)
        self.assertEqual(response.code, 200)
        yield response.content()
        # The orphan's files were not this daemon's: quarantined, not served.
        quarantined = [e["file"] for e in daemon.logs() if str(e.get("msg", "")).startswith("quarantined")]
        self.assertIn("alpha.db", quarantined)

    @inlineCallbacks
    def test_graceful_shutdown(self) -> Any:
        daemon = yield Daemon(self).start()
        for name in ("alpha", "beta"):
            response = yield treq.post(daemon.data_url(f"/{name}/v2/pipeline"), SELECT_1)
            yield response.content()
        with open(os.path.join(daemon.data_dir, "_state", "namespaces.json")) as handle:
            created = json.load(handle)["namespaces"]["alpha"]["lastAccessAt"]
        self.assertEqual(len(find_orphans(daemon.data_dir)), 2)
        daemon.signal("SIGTERM")
        yield daemon.exited()
        # twistd ends itself with the signal it got, after a clean shutdown.
        self.assertEqual(daemon.process.signal, signal.SIGTERM)
        self.assertEqual(len(daemon.events("stopped")), 1)
        self.assertEqual(find_orphans(daemon.data_dir), [])
        self.assertEqual(len(daemon.events(STOPPED)), 2)
        self.assertEqual(daemon.events(EXITED), [])
        with open(os.path.join(daemon.data_dir, "_state", "namespaces.json")) as handle:
            flushed = json.load(handle)["namespaces"]["alpha"]["lastAccessAt"]
        self.assertGreaterEqual(flushed, created)


class StartupErrorTests(E2ETestCase):
    @inlineCallbacks
    def assertStartupFails(self, daemon: Daemon, *fragments: str) -> Any:
        """
        Start-up fails with exit status 1 and one line naming the problem:
        on stderr before logging starts, else as a CRITICAL log line.
        """
        daemon.spawn()
        status = yield daemon.exited()
        self.assertEqual(status, 1)
        stderr = daemon.stderr()
        critical = [e["msg"] for e in daemon.logs() if e.get("level") in ("CRITICAL", "ERROR", "RAW")]
        lines = stderr.strip().splitlines() + critical
        self.assertEqual(len(lines), 1, lines)
        self.assertNotIn("Traceback", stderr + open(daemon.log_path).read())
        for fragment in fragments:
            self.assertIn(fragment, lines[0])

    def test_bad_duration(self) -> Any:
        return self.assertStartupFails(Daemon(self, TURSO_GC_INTERVAL="often"),
                                       "TURSO_GC_INTERVAL='often'")

    def test_inverted_range(self) -> Any:
        return self.assertStartupFails(
            Daemon(self, TURSO_BACKEND_PORT_START="9500", TURSO_BACKEND_PORT_END="9400"),
            "TURSO_BACKEND_PORT_START=9500", "inverted")

    def test_missing_binary(self) -> Any:
        return self.assertStartupFails(Daemon(self, TURSODB_BIN="/nonexistent/tursodb"),
                                       "TURSODB_BIN='/nonexistent/tursodb'")

    def test_corrupt_state_file(self) -> Any:
        daemon = Daemon(self)
        os.makedirs(os.path.join(daemon.data_dir, "_state"))
        state = os.path.join(daemon.data_dir, "_state", "namespaces.json")
        with open(state, "w") as handle:
            handle.write("{broken")
        return self.assertStartupFails(daemon, state)

    @inlineCallbacks
    def test_second_daemon_on_the_same_data_dir(self) -> Any:
        """
        A second daemon stops at start-up and leaves the first one's
        children alone.
        """
        first = yield Daemon(self).start()
        response = yield treq.post(first.data_url("/alpha/v2/pipeline"), SELECT_1)
        yield response.content()
        children = find_orphans(first.data_dir)
        second = Daemon(self, data_dir=first.data_dir)
        yield self.assertStartupFails(second, "another turso-server", f"pid {first.pid}")
        self.assertEqual(find_orphans(first.data_dir), children)
        response = yield treq.post(first.data_url("/alpha/v2/pipeline"), SELECT_1)
        self.assertEqual(response.code, 200)
        yield response.content()

    @inlineCallbacks
    def test_taken_listen_address(self) -> Any:
        first = yield Daemon(self).start()
        second = Daemon(self, TURSO_DATA_ADDR=f"127.0.0.1:{first.data_port}")
        yield self.assertStartupFails(second, "TURSO_DATA_ADDR=127.0.0.1:", "cannot listen")


# The same cases with the data port served by two data workers.
globals().update(with_data_workers(SyncTests, RobustnessTests, NodeClientTests, AuthTests, ProvisioningTests,
                                   RestartTests, StartupErrorTests))
