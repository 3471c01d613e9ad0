"""
The data port's HTTP/1.1 protocol on a string transport: keep-alive and
pipelining, refusals before a body is read, malformed and smuggled
requests, and a fuzz of what a client may send.
"""

from __future__ import annotations

import json
import os

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from turso_twisted.auth import BearerToken
from turso_twisted.dataport import IN_MEMORY, MAX_HEAD_BYTES, PIPELINE_DEPTH, DataPort, DataRequest

from .support import answers, connect, request_bytes

AUTH = [(b"Authorization", b"Bearer data-token")]

#: Requests a server must refuse whole, with 400, and then close (the
#: framing of anything after them cannot be trusted).
MALFORMED = {
    "content-length with transfer-encoding": b"POST /a/v2/pipeline HTTP/1.1\r\n"
    b"Host: x\r\n"
    b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "transfer-encoding with content-length": b"POST /a/v2/pipeline HTTP/1.1\r\n"
    b"Host: x\r\n"
    b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n",
    "two content-lengths": b"POST /a/v2/pipeline HTTP/1.1\r\n"
    b"Content-Length: 4\r\nContent-Length: 5\r\n\r\nabcde",
    "two equal content-lengths": b"POST /a/v2/pipeline HTTP/1.1\r\n"
    b"Content-Length: 4\r\n"
    b"Content-Length: 4\r\n\r\nabcd",
    "a list as content-length": b"POST /a/v2/pipeline HTTP/1.1\r\n"
    b"Content-Length: 4, 4\r\n\r\nabcd",
    "negative content-length": b"POST /a/v2/pipeline HTTP/1.1\r\n"
    b"Content-Length: -1\r\n\r\n",
    "signed content-length": b"POST /a/v2/pipeline HTTP/1.1\r\n"
    b"Content-Length: +4\r\n\r\nabcd",
    "content-length overflow": b"POST /a/v2/pipeline HTTP/1.1\r\n"
    b"Content-Length: 99999999999999999999999\r\n\r\n",
    "bad chunk size": b"POST /a/v2/pipeline HTTP/1.1\r\n"
    b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
    "chunk size overflow": b"POST /a/v2/pipeline HTTP/1.1\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
    b"ffffffffffffffffff\r\nabc\r\n",
    "gzip transfer coding": b"POST /a/v2/pipeline HTTP/1.1\r\n"
    b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    "identity transfer coding": b"POST /a/v2/pipeline HTTP/1.1\r\n"
    b"Transfer-Encoding: identity\r\n\r\nabc",
    "chunked not last": b"POST /a/v2/pipeline HTTP/1.1\r\n"
    b"Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
    "CR in a header value": b"GET /a/ HTTP/1.1\r\nX: a\rb\r\n\r\n",
    "LF in a header value": b"GET /a/ HTTP/1.1\r\nX: a\nContent-Length: 5\r\n\r\n",
    "bare LF line ends": b"GET /a/ HTTP/1.1\nHost: x\n\n",
    "obsolete line folding": b"GET /a/ HTTP/1.1\r\nX: a\r\n b\r\n\r\n",
    "space before the colon": b"GET /a/ HTTP/1.1\r\nContent-Length : 5\r\n\r\nabcde",
    "NUL in the target": b"GET /a\x00b HTTP/1.1\r\n\r\n",
    "HTTP/0.9": b"GET /a/\r\n\r\n",
    "HTTP/1.2": b"GET /a/ HTTP/1.2\r\n\r\n",
    "HTTP/2.0": b"GET /a/ HTTP/2.0\r\n\r\n",
    "unknown method": b"FROB /a/ HTTP/1.1\r\n\r\n",
    "garbage": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
}


class DataPortTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.handled: list[DataRequest] = []
        self.refused: list[DataRequest] = []
        #: Answer each request at once (else the test answers).
        self.answer_now = True
        self.port = DataPort(self.clock, self.handle, self.refused.append, BearerToken("data-token"), 1000,
                             scratch_dir=self.mktemp(), idle_timeout=60)
        os.makedirs(self.port.scratch_dir or "")

    def handle(self, request: DataRequest) -> None:
        self.handled.append(request)
        if self.answer_now:
            self.echo(request)

    def echo(self, request: DataRequest) -> None:
        request.respond(200, b"OK", [(b"content-type", b"text/plain")], request.target + b" " + request.body)

    def test_keep_alive(self) -> None:
        protocol, transport = connect(self.port)
        protocol.dataReceived(request_bytes(b"POST", b"/a/x", b"one", AUTH))
        protocol.dataReceived(request_bytes(b"POST", b"/a/y", b"two", AUTH))
        got = answers(transport.value())
        self.assertEqual([(a.code, a.body) for a in got], [(200, b"/a/x one"), (200, b"/a/y two")])
        self.assertFalse(transport.disconnecting)
        self.assertEqual(got[0].headers.getRawHeaders(b"content-length"), [b"8"])
        self.assertIsNone(got[0].headers.getRawHeaders(b"connection"))
        self.assertEqual(len(got[0].headers.getRawHeaders(b"date") or []), 1)

    def test_pipelined_requests_are_answered_in_order(self) -> None:
        self.answer_now = False
        protocol, transport = connect(self.port)
        protocol.dataReceived(request_bytes(b"POST", b"/a/1", b"", AUTH)
                              + request_bytes(b"POST", b"/b/2", b"", AUTH))
        # The second waits for the first's answer.
        self.assertEqual([r.target for r in self.handled], [b"/a/1"])
        self.echo(self.handled[0])
        self.assertEqual([r.target for r in self.handled], [b"/a/1", b"/b/2"])
        self.echo(self.handled[1])
        self.assertEqual([a.body for a in answers(transport.value())], [b"/a/1 ", b"/b/2 "])

    def test_reading_stops_while_many_requests_wait(self) -> None:
        self.answer_now = False
        protocol, transport = connect(self.port)
        protocol.dataReceived(request_bytes(b"GET", b"/a/", b"", AUTH) * (PIPELINE_DEPTH + 1))
        self.assertEqual(transport.producerState, "paused")
        for _ in range(PIPELINE_DEPTH + 1):
            self.echo(self.handled[-1])
        self.assertEqual(transport.producerState, "producing")
        self.assertEqual(len(answers(transport.value())), PIPELINE_DEPTH + 1)

    def test_connection_close_and_http_1_0(self) -> None:
        for raw in (request_bytes(b"GET", b"/a/", b"", [*AUTH, (b"Connection", b"close")]),
                    b"GET /a/ HTTP/1.0\r\nAuthorization: Bearer data-token\r\n\r\n"):
            protocol, transport = connect(self.port)
            protocol.dataReceived(raw + request_bytes(b"GET", b"/b/", b"", AUTH))
            [answer] = answers(transport.value())
            self.assertEqual(answer.headers.getRawHeaders(b"connection"), [b"close"])
            self.assertTrue(transport.disconnecting)
        self.assertEqual([r.target for r in self.handled], [b"/a/", b"/a/"])

    def test_chunked_body(self) -> None:
        protocol, transport = connect(self.port)
        protocol.dataReceived(b"POST /a/x HTTP/1.1\r\nAuthorization: Bearer data-token\r\n"
                              b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
        [answer] = answers(transport.value())
        self.assertEqual(answer.body, b"/a/x abcde")

    def test_any_split_of_the_bytes_gives_the_same_answers(self) -> None:
        raw = request_bytes(b"POST", b"/a/x", b"payload", AUTH) * 2
        protocol, transport = connect(self.port)
        for i in range(len(raw)):
            protocol.dataReceived(raw[i:i + 1])
        self.assertEqual([a.body for a in answers(transport.value())], [b"/a/x payload"] * 2)

    def test_head_answers_carry_no_body(self) -> None:
        protocol, transport = connect(self.port)
        protocol.dataReceived(b"HEAD /a/x HTTP/1.1\r\nAuthorization: Bearer data-token\r\n\r\n")
        self.assertTrue(transport.value().endswith(b"\r\n\r\n"))
        self.assertIn(b"content-length: 5\r\n", transport.value())

    def test_malformed_requests_get_400_and_close(self) -> None:
        for label, raw in MALFORMED.items():
            protocol, transport = connect(self.port)
            # With credentials: the malformed part is what is refused.
            protocol.dataReceived(raw.replace(b"\r\n", b"\r\nAuthorization: Bearer data-token\r\n", 1))
            got = answers(transport.value())
            self.assertEqual([a.code for a in got], [400], label)
            self.assertEqual(json.loads(got[0].body)["error"], "bad_request", label)
            self.assertEqual(got[0].headers.getRawHeaders(b"connection"), [b"close"], label)
            self.assertTrue(transport.disconnecting, label)
        self.assertEqual(self.handled, [])
        self.assertEqual(len(self.refused), len(MALFORMED))

    def test_a_malformed_request_after_a_good_one_waits_its_turn(self) -> None:
        self.answer_now = False
        protocol, transport = connect(self.port)
        protocol.dataReceived(request_bytes(b"GET", b"/a/", b"", AUTH) + MALFORMED["two content-lengths"]
                              + request_bytes(b"GET", b"/smuggled/", b"", AUTH))
        self.assertEqual(transport.value(), b"")
        self.echo(self.handled[0])
        self.assertEqual([a.code for a in answers(transport.value())], [200, 400])
        self.assertTrue(transport.disconnecting)
        self.assertEqual([r.target for r in self.handled], [b"/a/"])

    def test_credentials_and_declared_size_are_checked_before_the_body(self) -> None:
        cases = [(request_bytes(b"POST", b"/a/x", b"x" * 10, [(b"Authorization", b"Bearer wrong")]), 401,
                  "unauthorized"),
                 (request_bytes(b"POST", b"/a/x", b"x" * 10), 401, "unauthorized"),
                 (request_bytes(b"POST", b"/a/x", b"", AUTH + AUTH), 401, "unauthorized"),
                 (request_bytes(b"POST", b"/a/x", b"x" * 1001, AUTH)[:-1001], 413, "body_too_large")]
        for raw, status, code in cases:
            protocol, transport = connect(self.port)
            protocol.dataReceived(raw)
            [answer] = answers(transport.value())
            self.assertEqual((answer.code, json.loads(answer.body)["error"]), (status, code))
            self.assertTrue(transport.disconnecting)
        self.assertEqual((self.handled, self.port.unauthorized), ([], 3))

    def test_a_chunked_body_past_the_cap_is_refused_as_it_streams(self) -> None:
        protocol, transport = connect(self.port)
        protocol.dataReceived(b"POST /a/x HTTP/1.1\r\nAuthorization: Bearer data-token\r\n"
                              b"Transfer-Encoding: chunked\r\n\r\n")
        for _ in range(3):
            protocol.dataReceived(b"190\r\n" + b"x" * 400 + b"\r\n")
        [answer] = answers(transport.value())
        self.assertEqual(answer.code, 413)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.handled, [])

    def test_a_head_past_the_limit_is_refused(self) -> None:
        protocol, transport = connect(self.port)
        protocol.dataReceived(b"GET /a/ HTTP/1.1\r\n")
        for _ in range(MAX_HEAD_BYTES // 1000 + 1):
            protocol.dataReceived(b"X-Filler: " + b"y" * 988 + b"\r\n")
        [answer] = answers(transport.value())
        self.assertEqual((answer.code, json.loads(answer.body)["error"]), (431, "headers_too_large"))
        self.assertTrue(transport.disconnecting)

    def test_expect_continue(self) -> None:
        protocol, transport = connect(self.port)
        protocol.dataReceived(b"POST /a/x HTTP/1.1\r\nAuthorization: Bearer data-token\r\n"
                              b"Expect: 100-continue\r\nContent-Length: 2\r\n\r\n")
        self.assertEqual(transport.value(), b"HTTP/1.1 100 Continue\r\n\r\n")
        protocol.dataReceived(b"ok")
        self.assertEqual(answers(transport.value())[-1].body, b"/a/x ok")
        # Refused: no 100, the refusal.
        protocol, transport = connect(self.port)
        protocol.dataReceived(b"POST /a/x HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")
        self.assertEqual([a.code for a in answers(transport.value())], [401])

    def test_large_bodies_wait_in_the_scratch_dir(self) -> None:
        self.port.max_body_bytes = 10 * IN_MEMORY
        self.answer_now = False
        protocol, transport = connect(self.port)
        protocol.dataReceived(request_bytes(b"POST", b"/a/x", b"z" * (IN_MEMORY + 1), AUTH))
        [request] = self.handled
        self.assertEqual(request.body, b"z" * (IN_MEMORY + 1))
        self.assertIsNotNone(request._spool)
        self.echo(request)
        self.assertIsNone(request._spool)

    def test_a_client_that_leaves_is_told_to_the_handler(self) -> None:
        self.answer_now = False
        protocol, transport = connect(self.port)
        protocol.dataReceived(request_bytes(b"GET", b"/a/", b"", AUTH))
        finished = self.handled[0].notify_finish()
        protocol.connectionLost()
        self.failureResultOf(finished)
        self.assertTrue(self.handled[0].gone)
        self.echo(self.handled[0])  # an answer too late is dropped
        self.assertEqual(transport.value(), b"")

    def test_idle_connections_close(self) -> None:
        protocol, transport = connect(self.port)
        protocol.dataReceived(request_bytes(b"GET", b"/a/", b"", AUTH))
        self.clock.advance(59)
        self.assertFalse(transport.disconnecting)
        protocol.dataReceived(b"GET /a/ HTTP/1.1\r\n")  # a head that never ends
        self.clock.advance(60)
        self.assertTrue(transport.disconnecting)

    def test_no_idle_timeout_while_an_answer_is_awaited(self) -> None:
        self.answer_now = False
        protocol, transport = connect(self.port)
        protocol.dataReceived(request_bytes(b"GET", b"/a/", b"", AUTH))
        self.clock.advance(600)
        self.assertFalse(transport.disconnecting)
        self.echo(self.handled[0])
        self.clock.advance(60)
        self.assertTrue(transport.disconnecting)

    def test_a_client_that_stops_reading_an_answer_is_closed(self) -> None:
        self.answer_now = False
        protocol, transport = connect(self.port)
        protocol.dataReceived(request_bytes(b"GET", b"/a/", b"", AUTH))
        request = self.handled[0]
        request.begin(200, b"OK", [], 1000)
        self.clock.advance(30)
        request.write(b"x" * 10)  # progress puts the close off
        self.clock.advance(59)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(1)
        self.assertTrue(transport.disconnecting)


class DataPortFuzzTests(SynchronousTestCase):
    """
    Whatever a client sends, in whatever pieces: the protocol raises
    nothing, every answer is a complete response, every refusal is JSON,
    and the handler sees only requests that passed every check.
    """

    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.one_of(st.binary(max_size=64), st.sampled_from(list(MALFORMED.values())),
                              st.just(request_bytes(b"POST", b"/a/v2/pipeline", b"{}", AUTH))),
                    max_size=6), st.integers(1, 50))
    def test_any_bytes(self, pieces: list[bytes], step: int) -> None:
        handled: list[DataRequest] = []

        def handle(request: DataRequest) -> None:
            handled.append(request)
            request.respond(200, b"OK", [], b"fine")

        port = DataPort(Clock(), handle, lambda _: None, BearerToken("data-token"), 1000)
        protocol, transport = connect(port)
        raw = b"".join(pieces)
        for i in range(0, len(raw), step):
            protocol.dataReceived(raw[i:i + step])
        got = answers(transport.value())
        for answer in got:
            if answer.code != 200:
                self.assertEqual(set(json.loads(answer.body)), {"error", "message"})
        self.assertEqual(len(handled), sum(a.code == 200 for a in got))
        for request in handled:
            self.assertEqual(request.access.via, "static")
