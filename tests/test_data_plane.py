"""
The data-port resource through StubTreq, with a stand-in for the child's
HTTP side: relaying, the retry after a refused connection, and 502s.
"""

from __future__ import annotations

import json
from typing import Any

from treq.testing import StubTreq
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionLost, ConnectionRefusedError
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web._newclient import ResponseNeverReceived
from twisted.web.client import ResponseDone, ResponseFailed
from twisted.web.http_headers import Headers

from turso_twisted.proxy import DataPlane

from .fakes import end
from .support import ManagerFixture


class CannedResponse:
    def __init__(self, code: int, body: bytes, headers: dict[bytes, list[bytes]]) -> None:
        self.code = code
        self.phrase = b"OK"
        # Like Twisted's client: Content-Length moves out of the headers.
        declared = headers.pop(b"content-length", None)
        self.length = int(declared[0]) if declared else len(body)
        self.headers = Headers(headers)
        self.body = body

    def deliverBody(self, protocol: Any) -> None:
        if self.body:
            protocol.dataReceived(self.body)
        protocol.connectionLost(Failure(self.end))

    end: Exception = ResponseDone()


class BrokenResponse(CannedResponse):
    """
    The child died while sending its body.
    """

    end = ResponseFailed([Failure(ConnectionLost())])


class ScriptedAgent:
    """
    Answers each request with the next scripted outcome.
    """

    def __init__(self, *outcomes: Any) -> None:
        self.outcomes = list(outcomes)
        self.calls: list[tuple[bytes, bytes, Headers]] = []

    def request(self, method: bytes, uri: bytes, headers: Headers, producer: Any) -> Deferred[Any]:
        self.calls.append((method, uri, headers))
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, Exception):
            return fail(outcome)
        if callable(outcome):
            return outcome()
        return succeed(outcome)


class DataPlaneTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.fx = ManagerFixture(self.mktemp())
        self.plane = DataPlane(self.fx.reactor, self.fx.manager, "data-token")
        self.stub = StubTreq(self.plane)

    def post(self, path: str, token: str = "data-token") -> Any:
        pending = self.stub.post("http://data" + path, data=b'{"requests": []}',
                                 headers={b"authorization": [b"Bearer " + token.encode()],
                                          b"x-client": [b"py"], b"connection": [b"keep-alive"]})
        for _ in range(5):
            self.fx.settle()
            self.stub.flush()
        return pending

    def result(self, pending: Any) -> tuple[int, bytes, Headers]:
        response = self.successResultOf(pending)
        return response.code, self.successResultOf(response.content()), response.headers

    def test_relays_status_headers_and_body(self) -> None:
        self.plane.agent = ScriptedAgent(CannedResponse(
            200, b'{"ok": 1}', {b"content-type": [b"application/json"], b"connection": [b"close"],
                                b"access-control-allow-origin": [b"*"]}))
        code, body, headers = self.result(self.post("/alpha/v2/pipeline?x=1"))
        self.assertEqual((code, body), (200, b'{"ok": 1}'))
        self.assertEqual(headers.getRawHeaders(b"access-control-allow-origin"), [b"*"])
        self.assertEqual(headers.getRawHeaders(b"content-type"), [b"application/json"])
        method, uri, sent = self.plane.agent.calls[0]
        self.assertEqual((method, uri), (b"POST", b"http://127.0.0.1:9000/v2/pipeline?x=1"))
        self.assertEqual(sent.getRawHeaders(b"x-client"), [b"py"])
        self.assertIsNone(sent.getRawHeaders(b"authorization"))
        self.assertIsNone(sent.getRawHeaders(b"connection"))
        self.assertEqual(self.fx.manager.inflight(), 0)

    def test_refused_connection_is_retried_on_a_fresh_child(self) -> None:
        first_child: list[Any] = []

        def refuse_and_die() -> Deferred[Any]:
            child = self.fx.supervisor.running("alpha")
            first_child.append(child)
            end(child, signal=9)
            return fail(ConnectionRefusedError())

        self.plane.agent = ScriptedAgent(refuse_and_die, CannedResponse(200, b"fine", {}))
        code, body, _ = self.result(self.post("/alpha/v2/pipeline"))
        self.assertEqual((code, body), (200, b"fine"))
        self.assertEqual(len(self.fx.children("alpha")), 2)
        self.assertIsNot(self.fx.supervisor.running("alpha"), first_child[0])

    def test_child_dying_mid_request_is_a_502(self) -> None:
        self.plane.agent = ScriptedAgent(ResponseNeverReceived([Failure(ConnectionRefusedError())]))
        code, body, _ = self.result(self.post("/alpha/v2/pipeline"))
        error = json.loads(body)
        self.assertEqual((code, error["error"]), (502, "upstream_error"))
        self.assertIn("'alpha'", error["message"])
        self.assertEqual(self.fx.manager.inflight(), 0)

    def test_body_lost_before_any_byte_is_a_clean_502(self) -> None:
        self.plane.agent = ScriptedAgent(BrokenResponse(200, b"", {b"content-length": [b"100"]}))
        response = self.successResultOf(self.post("/alpha/v2/pipeline"))
        body = self.successResultOf(response.content())
        self.assertEqual((response.code, json.loads(body)["error"]), (502, "upstream_error"))
        # The child's Content-Length did not leak into the error.
        self.assertEqual(response.length, len(body))

    def test_body_lost_midway_drops_the_connection(self) -> None:
        self.plane.agent = ScriptedAgent(BrokenResponse(200, b"partial", {b"content-length": [b"100"]}))
        pending = self.post("/alpha/v2/pipeline")
        response = self.successResultOf(pending)
        self.assertEqual(response.code, 200)
        self.failureResultOf(response.content())
        self.assertEqual(self.fx.manager.inflight(), 0)

    def test_refused_twice_is_a_502(self) -> None:
        self.plane.agent = ScriptedAgent(ConnectionRefusedError(), ConnectionRefusedError())
        pending = self.post("/alpha/v2/pipeline")
        self.fx.reactor.advance(2)
        self.stub.flush()
        self.fx.settle()
        self.stub.flush()
        code, body, _ = self.result(pending)
        self.assertEqual((code, json.loads(body)["error"]), (502, "upstream_error"))

    def test_auth_comes_before_anything(self) -> None:
        self.plane.agent = ScriptedAgent()
        code, body, headers = self.result(self.post("/alpha/v2/pipeline", token="wrong"))
        self.assertEqual((code, json.loads(body)["error"]), (401, "unauthorized"))
        self.assertEqual(self.fx.state.records, {})

    def test_unexpected_error_is_a_500_without_details(self) -> None:
        self.plane.agent = ScriptedAgent(lambda: succeed(object()))
        code, body, _ = self.result(self.post("/alpha/v2/pipeline"))
        self.assertEqual((code, json.loads(body)["error"]), (500, "internal"))
        self.assertEqual(len(self.flushLoggedErrors()), 1)
        self.assertEqual(self.fx.manager.inflight(), 0)
