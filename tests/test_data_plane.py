"""
The data plane behind the real data-port protocol (on a string transport),
with a scripted stand-in for the child's channel: relaying, the retry
after a refused connection, 502s and 503s.
"""

from __future__ import annotations

import errno
import json
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from turso_twisted import dataport
from turso_twisted.auth import BearerToken
from turso_twisted.channel import BackendResponse, BackendTimeout, QueueFull, ResponseIncomplete
from turso_twisted.dataport import DataPort
from turso_twisted.metrics import Metrics
from turso_twisted.proxy import DataPlane
from turso_twisted.state import StateStore

from .fakes import end
from .support import Answer, ManagerFixture, answers, connect, request_bytes


class ScriptedChannel:
    """
    Answers each request with the next scripted outcome.
    """

    def __init__(self, outcomes: list[Any]) -> None:
        self.outcomes = outcomes
        self.calls: list[tuple[bytes, bytes, list[tuple[bytes, bytes]], bytes]] = []

    def request(self, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]],
                body: bytes) -> Deferred[Any]:
        self.calls.append((method, target, headers, body))
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, Exception):
            return fail(outcome)
        if callable(outcome):
            return outcome()
        return succeed(outcome)

    def close(self) -> Deferred[None]:
        return succeed(None)


INSERT = b'{"requests": [{"type": "execute", "stmt": {"sql": "insert into t values (1)"}}]}'
SELECT = b'{"requests": [{"type": "execute", "stmt": {"sql": "select 1"}}]}'


class DataPlaneTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.outcomes: list[Any] = []
        self.channels: list[ScriptedChannel] = []

        def scripted(*args: Any, **kwargs: Any) -> ScriptedChannel:
            channel = ScriptedChannel(self.outcomes)
            self.channels.append(channel)
            return channel

        self.fx = ManagerFixture(self.mktemp(), make_channel=scripted)
        self.plane = DataPlane(self.fx.reactor, self.fx.namespaces(), self.fx.stats)
        self.port = DataPort(self.fx.reactor, self.plane.handle, self.plane.refused_at_headers,
                             BearerToken("data-token"), 1_000_000)

    def post(self, path: str, token: str = "data-token",
             body: bytes = b'{"requests": []}') -> StringTransport:
        protocol, transport = connect(self.port)
        protocol.dataReceived(request_bytes(
            b"POST", path.encode(), body, [(b"Authorization", b"Bearer " + token.encode()),
                                           (b"X-Client", b"py"), (b"Connection", b"keep-alive")]))
        for _ in range(5):
            self.fx.settle()
        return transport

    def result(self, pending: StringTransport) -> tuple[int, bytes, Answer]:
        [answer] = answers(pending.value())
        return answer.code, answer.body, answer

    def test_relays_status_headers_and_body(self) -> None:
        self.outcomes.append(BackendResponse(200, b"OK", [
            (b"Content-Type", b"application/json"), (b"Connection", b"close"),
            (b"Content-Length", b"9"), (b"Access-Control-Allow-Origin", b"*")], b'{"ok": 1}'))
        code, body, response = self.result(self.post("/alpha/v2/pipeline?x=1"))
        self.assertEqual((code, body), (200, b'{"ok": 1}'))
        self.assertEqual(response.headers.getRawHeaders(b"access-control-allow-origin"), [b"*"])
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"application/json"])
        self.assertEqual(response.length, 9)
        method, target, sent, payload = self.channels[0].calls[0]
        self.assertEqual((method, target, payload), (b"POST", b"/v2/pipeline?x=1", b'{"requests": []}'))
        sent_names = {key.lower() for key, _ in sent}
        self.assertIn(b"x-client", sent_names)
        self.assertFalse(sent_names & {b"authorization", b"connection", b"host", b"content-length"})
        self.assertEqual(self.fx.leases.count(), 0)

    def test_refused_connection_is_retried_on_a_fresh_child(self) -> None:
        first_child: list[Any] = []

        def refuse_and_die() -> Deferred[Any]:
            child = self.fx.supervisor.running("alpha")
            first_child.append(child)
            end(child.process, signal=9)
            return fail(ConnectionRefusedError())

        self.outcomes += [refuse_and_die, BackendResponse(200, b"OK", [], b"fine")]
        code, body, _ = self.result(self.post("/alpha/v2/pipeline"))
        self.assertEqual((code, body), (200, b"fine"))
        self.assertEqual(len(self.fx.children("alpha")), 2)
        self.assertIsNot(self.fx.supervisor.running("alpha"), first_child[0])

    def test_child_dying_mid_write_is_a_502(self) -> None:
        # The write may have been done: it is not sent again.
        self.outcomes.append(ResponseIncomplete("connection lost"))
        code, body, _ = self.result(self.post("/alpha/v2/pipeline", body=INSERT))
        error = json.loads(body)
        self.assertEqual((code, error["error"]), (502, "upstream_error"))
        self.assertIn("'alpha'", error["message"])
        self.assertEqual(self.fx.leases.count(), 0)

    def test_child_dying_mid_read_is_retried_on_a_fresh_child(self) -> None:
        # A read can be sent again: a client racing a child's death sees no error.
        def lose_and_die() -> Deferred[Any]:
            end(self.fx.supervisor.running("alpha").process, signal=9)
            return fail(ResponseIncomplete("connection lost"))

        self.outcomes += [lose_and_die, BackendResponse(200, b"OK", [], b"fine")]
        code, body, _ = self.result(self.post("/alpha/v2/pipeline", body=SELECT))
        self.assertEqual((code, body), (200, b"fine"))
        self.assertEqual(len(self.fx.children("alpha")), 2)

    def test_refused_twice_is_a_502(self) -> None:
        self.outcomes += [ConnectionRefusedError(), ConnectionRefusedError()]
        pending = self.post("/alpha/v2/pipeline")
        self.fx.reactor.advance(2)
        self.fx.settle()
        code, body, _ = self.result(pending)
        self.assertEqual((code, json.loads(body)["error"]), (502, "upstream_error"))

    def test_full_queue_is_a_503_with_retry_after(self) -> None:
        self.outcomes.append(QueueFull("128 requests already wait"))
        code, body, response = self.result(self.post("/alpha/v2/pipeline"))
        self.assertEqual((code, json.loads(body)["error"]), (503, "namespace_busy"))
        self.assertEqual(response.headers.getRawHeaders(b"retry-after"), [b"1"])
        self.assertEqual(self.plane.rejected, 1)

    def test_a_wedged_child_is_a_504(self) -> None:
        self.outcomes.append(BackendTimeout("no answer within 30s"))
        code, body, _ = self.result(self.post("/alpha/v2/pipeline"))
        error = json.loads(body)
        self.assertEqual((code, error["error"]), (504, "backend_timeout"))
        self.assertIn("TURSO_BACKEND_TIMEOUT", error["message"])
        self.assertEqual(self.fx.leases.count(), 0)

    def test_a_read_only_data_dir_is_a_503_and_creates_nothing(self) -> None:
        def failing(store: StateStore) -> None:
            raise OSError(errno.EROFS, "Read-only file system")

        self.patch(StateStore, "save", failing)
        code, body, response = self.result(self.post("/alpha/v2/pipeline"))
        self.assertEqual((code, json.loads(body)["error"]), (503, "data_dir_not_writable"))
        self.assertEqual(response.headers.getRawHeaders(b"retry-after"), [b"30"])
        self.assertEqual((self.fx.state.records, self.fx.reactor.spawned), ({}, []))
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_unexpected_error_is_a_500_without_details(self) -> None:
        self.outcomes.append(lambda: succeed(object()))
        code, body, _ = self.result(self.post("/alpha/v2/pipeline"))
        self.assertEqual((code, json.loads(body)["error"]), (500, "internal"))
        self.assertEqual(len(self.flushLoggedErrors()), 1)
        self.assertEqual(self.fx.leases.count(), 0)


class DataPortAuthTests(SynchronousTestCase):
    """
    The data port checks the credentials of every request once, before its
    body is read and before the data plane sees it.
    """

    def setUp(self) -> None:
        self.fx = ManagerFixture(self.mktemp())
        self.metrics = Metrics()
        plane = DataPlane(self.fx.reactor, self.fx.namespaces(), self.fx.stats, self.metrics)
        self.port = DataPort(self.fx.reactor, plane.handle, plane.refused_at_headers,
                             BearerToken("data-token"), 1000)

    def exchange(self, raw: bytes) -> bytes:
        protocol, transport = connect(self.port)
        protocol.dataReceived(raw)
        return transport.value()

    def test_auth_comes_before_anything(self) -> None:
        for raw in (b"POST /alpha/v2/pipeline HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer wrong\r\n"
                    b"Content-Length: 5\r\n\r\n",
                    b"GET /alpha/ HTTP/1.1\r\nHost: x\r\n\r\n"):
            [answer] = answers(self.exchange(raw))
            self.assertEqual(answer.code, 401)
            self.assertEqual(answer.headers.getRawHeaders(b"www-authenticate"),
                             [b'Bearer realm="turso-server"'])
            self.assertEqual(json.loads(answer.body)["error"], "unauthorized")
        self.assertEqual(self.fx.state.records, {})
        self.assertEqual(self.port.unauthorized, 2)
        # Counted and logged like any other answer.
        self.assertEqual(self.metrics.figures.requests, {"other 4xx": 2})


class _FullDisk:
    """A spool file on a volume that has just run out of space."""

    closed = False

    def write(self, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    def close(self) -> None:
        self.closed = True


class FullDiskBodyTests(SynchronousTestCase):
    """
    A large body waits in the data dir's scratch; when that volume is full
    the client gets 507 at once (found by the soak: the write failed inside
    twisted.web and the connection closed with no answer).
    """

    def setUp(self) -> None:
        self.fx = ManagerFixture(self.mktemp())
        plane = DataPlane(self.fx.reactor, self.fx.namespaces(), self.fx.stats, Metrics())
        self.port = DataPort(self.fx.reactor, plane.handle, plane.refused_at_headers,
                             BearerToken("data-token"), 10_000_000, scratch_dir=self.fx.data_dir)
        self.spool = _FullDisk()
        self.patch(dataport.tempfile, "TemporaryFile", lambda **_: self.spool)

    def test_a_body_the_volume_cannot_hold_gets_507(self) -> None:
        protocol, transport = connect(self.port)
        head = (b"POST /alpha/v2/pipeline HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer data-token\r\n"
                b"Content-Length: 200000\r\n\r\n")
        protocol.dataReceived(head + b"x" * 150_000)
        [answer] = answers(transport.value())
        self.assertEqual(answer.code, 507)
        self.assertEqual(json.loads(answer.body)["error"], "insufficient_storage")
        self.assertTrue(self.spool.closed)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.fx.state.records, {})
        self.assertEqual(self.flushLoggedErrors(), [])
