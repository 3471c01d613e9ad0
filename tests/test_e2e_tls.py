"""
TLS end to end: the real daemon serving HTTPS with a test CA's
certificate, pyturso with a C{libsql://} URL, the Node client with an
C{https://} URL, the CLI over HTTPS, wrong schemes refused at once, and a
renewed certificate served after SIGHUP.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import ssl
import time
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SkipTest

from turso_twisted import cli

from .certs import TestCA
from .daemon import Daemon, run_replica, wait_for, with_data_workers
from .test_e2e import E2ETestCase, Replica


def served_name(port: int, ca_file: str) -> str:
    """The common name of the certificate C{port} serves (blocking; run it in a thread)."""
    context = ssl.create_default_context(cafile=ca_file)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
        subject = dict(item[0] for item in sock.getpeercert()["subject"])
        return str(subject["commonName"])


def plain_request(port: int) -> bytes:
    """A plain HTTP request to C{port}, and everything it answered until it closed."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def silent_after_close(port: int, ca_file: str) -> str:
    """A request with Connection: close, then silence (no TLS close alert): whether the server closes."""
    context = ssl.create_default_context(cafile=ca_file)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as raw, \
            context.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        try:
            while sock.recv(65536):
                pass
        except (ssl.SSLError, ConnectionError):
            pass
        except TimeoutError:
            return "still open after 30 s"
        # The server's close alert came; now it must close the socket without ours.
        with socket.socket(fileno=os.dup(sock.fileno())) as probe:
            probe.settimeout(30)
            try:
                return "closed" if probe.recv(1) == b"" else "data after close"
            except ConnectionError:
                return "closed"
            except TimeoutError:
                return "still open after 30 s"


def read_slowly(port: int, ca_file: str, body: bytes) -> tuple[int, int]:
    """
    A request with Connection: close whose answer is read slowly, from 7 s
    on, at about 640 KB/s (a 16 KB TLS record each 25 ms): what the
    kernel's buffers hold when the server is done takes longer than the
    close linger to read.  The length promised, and the bytes that came.
    """
    context = ssl.create_default_context(cafile=ca_file)
    with socket.create_connection(("127.0.0.1", port), timeout=60) as raw, \
            context.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
        sock.sendall(b"POST /alpha/v2/pipeline HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        time.sleep(7)
        answer = b""
        try:
            while chunk := sock.recv(1 << 16):
                answer += chunk
                time.sleep(0.025)
        except (ssl.SSLError, ConnectionError):
            pass
    head, _, rest = answer.partition(b"\r\n\r\n")
    length = int(next(line.split(b":", 1)[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:")))
    return length, len(rest)


def handshake(port: int) -> str:
    """A TLS handshake with C{port}: how it ended."""
    context = ssl.create_default_context()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        try:
            context.wrap_socket(raw, server_hostname="127.0.0.1")
        except (ssl.SSLError, ConnectionError) as error:
            return error.__class__.__name__
    return "handshake completed"


class TLSTests(E2ETestCase):
    def setUp(self) -> None:
        self.ca = TestCA(os.path.abspath(self.mktemp()))
        self.cert_file, self.key_file = self.ca.issue("first")

    def start(self, **env: str) -> Any:
        env = {"TURSO_TLS_CERT_FILE": self.cert_file, "TURSO_TLS_KEY_FILE": self.key_file, **env}
        return Daemon(self, **env).start()

    def trust(self) -> None:
        """This process trusts the test CA (pyturso and the CLI read SSL_CERT_FILE)."""
        before = os.environ.get("SSL_CERT_FILE")
        os.environ["SSL_CERT_FILE"] = self.ca.ca_file

        def restore() -> None:
            if before is None:
                os.environ.pop("SSL_CERT_FILE", None)
            else:
                os.environ["SSL_CERT_FILE"] = before

        self.addCleanup(restore)

    @inlineCallbacks
    def test_clients_sync_over_libsql_and_https_urls(self) -> Any:
        """
        pyturso with C{libsql://} (which it takes as HTTPS) and the Node
        client with C{https://} sync through the daemon; the CLI talks HTTPS
        to the admin port.
        """
        daemon = yield self.start(TURSO_AUTH_TOKEN="data-token", TURSO_ADMIN_TOKEN="admin-token")
        self.trust()
        url = f"libsql://127.0.0.1:{daemon.data_port}/alpha"
        paths = [os.path.join(os.path.abspath(self.mktemp()), "replica.db") for _ in range(2)]
        for path in paths:
            os.makedirs(os.path.dirname(path))
        writer = yield run_replica(Replica, paths[0], url, "data-token")
        self.addCleanup(writer.close)
        yield run_replica(writer.run, "create table t (x text)", "insert into t values ('over-tls')")
        yield run_replica(writer.push)
        reader = yield run_replica(Replica, paths[1], url, "data-token")
        self.addCleanup(reader.close)
        self.assertEqual((yield run_replica(reader.rows, "select x from t")), [("over-tls",)])

        sync_js = os.environ.get("TURSO_SYNC_JS", "")
        node = shutil.which("node")
        if sync_js and node:
            script = os.path.join(os.path.dirname(__file__), "node", "sync_roundtrip.mjs")
            out, err, code = yield getProcessOutputAndValue(
                node, [script, f"https://127.0.0.1:{daemon.data_port}/nodejs", "data-token",
                       os.path.abspath(self.mktemp())],
                env={"PATH": os.environ.get("PATH", ""), "TURSO_SYNC_JS": sync_js,
                     "NODE_EXTRA_CA_CERTS": self.ca.ca_file})
            self.assertEqual(code, 0, err)
            self.assertEqual(json.loads(out), [{"x": "node-a"}, {"x": "node-b"}])

        out = io.StringIO()
        code = yield deferToThread(cli.main, ["--url", f"https://127.0.0.1:{daemon.admin_port}",
                                              "--token", "admin-token", "--json", "list"], out)
        self.assertEqual(code, 0, out.getvalue())
        listed = sorted(entry["name"] for entry in json.loads(out.getvalue())["namespaces"])
        self.assertEqual(listed, ["alpha", "nodejs"] if sync_js and node else ["alpha"])
        if not (sync_js and node):
            raise SkipTest("node or @tursodatabase/sync missing (./dev test installs it with npm); "
                           "pyturso and the CLI passed")

    @inlineCallbacks
    def test_wrong_schemes_fail_at_once(self) -> Any:
        """
        Plain HTTP to the HTTPS data port gets a plain 400 naming the
        scheme; a TLS handshake to the plain admin port fails, and neither
        waits for a timeout.
        """
        daemon = yield self.start(TURSO_TLS_PORTS="data")
        answer = yield deferToThread(plain_request, daemon.data_port)
        head, _, body = answer.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 400 "), answer)
        self.assertEqual(json.loads(body)["error"], "tls_required")
        ended = yield deferToThread(handshake, daemon.admin_port)
        self.assertIn(ended, ("SSLError", "ConnectionResetError", "SSLEOFError"))
        # The plain admin port works as before; the data port serves the certificate.
        self.assertIn(b"200 OK", (yield deferToThread(plain_request, daemon.admin_port)))
        self.assertEqual((yield deferToThread(served_name, daemon.data_port, self.ca.ca_file)), "first")
        # A client that goes silent after its last request is closed all the
        # same (Twisted would wait for its TLS close alert).
        self.assertEqual((yield deferToThread(silent_after_close, daemon.data_port, self.ca.ca_file)),
                         "closed")
        # A plain data port refuses a handshake at once too; SIGHUP without TLS changes nothing.
        plain = yield Daemon(self).start()
        self.assertIn((yield deferToThread(handshake, plain.data_port)),
                      ("SSLError", "ConnectionResetError", "SSLEOFError"))
        plain.signal("SIGHUP")
        yield wait_for(lambda: any(e.get("msg", "").startswith("SIGHUP: nothing to read again")
                                   for e in plain.logs()), "the SIGHUP to be taken")
        self.assertIn(b"200 OK", (yield deferToThread(plain_request, plain.admin_port)))

    @inlineCallbacks
    def test_a_large_answer_read_slowly_arrives_whole(self) -> Any:
        """Closing after an answer never cuts it short, however slowly the client reads it."""
        daemon = yield self.start()
        query = json.dumps({"requests": [{"type": "execute", "stmt": {
            "sql": "select hex(zeroblob(8000000))"}}]}).encode()
        promised, came = yield deferToThread(read_slowly, daemon.data_port, self.ca.ca_file, query)
        self.assertGreater(promised, 16_000_000)
        self.assertEqual(came, promised)

    @inlineCallbacks
    def test_a_renewed_certificate_is_served_after_sighup(self) -> Any:
        daemon = yield self.start()
        self.assertEqual((yield deferToThread(served_name, daemon.data_port, self.ca.ca_file)), "first")
        self.ca.issue("renewed")
        daemon.signal("SIGHUP")
        workers = getattr(self, "data_workers", 1)
        processes = 1 + (workers if workers > 1 else 0)
        yield wait_for(lambda: len([e for e in daemon.logs() if e.get("msg", "").startswith(
            "TLS certificate reloaded")]) >= processes, "every process to read the certificate again")
        for port in (daemon.data_port, daemon.admin_port):
            for _ in range(4):  # any data worker may take the connection
                self.assertEqual((yield deferToThread(served_name, port, self.ca.ca_file)), "renewed")
        # A renewal that does not load keeps the certificate in use.
        with open(self.key_file, "w") as handle:
            handle.write("not a key")
        daemon.signal("SIGHUP")
        yield wait_for(lambda: any(e.get("msg", "").startswith("TLS certificate not reloaded")
                                   for e in daemon.logs()), "the refusal")
        self.assertEqual((yield deferToThread(served_name, daemon.data_port, self.ca.ca_file)), "renewed")


globals().update(with_data_workers(TLSTests))
