"""
The backend channel with a memory reactor: one request at a time, the
spare connection, quiet drops, and the bounded queue; and the lean
loopback connection it uses, against real sockets.
"""

from __future__ import annotations

import gc
import socket
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.error import ConnectionDone, ConnectionLost, ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from turso_twisted.channel import (
    BackendChannel,
    BackendResponse,
    BackendTimeout,
    ChannelClosed,
    QueueFull,
    QueueTimeout,
    ResponseIncomplete,
)
from turso_twisted.loopback import LoopbackConnection

OK = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"


class ChannelTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.channel = BackendChannel(self.reactor, 9000, max_queue=2, queue_timeout=10, spare_idle=5,
                                      connect=self.connect_tcp)
        self.connected = 0

    def connect_tcp(self, port: int, factory: Any) -> None:
        """Connections through the memory reactor, for the test to complete."""
        self.reactor.connectTCP("127.0.0.1", port, factory)

    def connect_next(self) -> tuple[Any, StringTransport]:
        """
        Let the oldest pending connection attempt succeed.
        """
        host, port, factory, _, _ = self.reactor.tcpClients[self.connected]
        self.connected += 1
        self.assertEqual((host, port), ("127.0.0.1", 9000))
        protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    def test_request_then_spare_carries_the_next(self) -> None:
        first = self.channel.request(b"POST", b"/v2/pipeline", [(b"X-A", b"1")], b"{}")
        protocol, transport = self.connect_next()
        self.assertEqual(transport.value(), b"POST /v2/pipeline HTTP/1.1\r\nHost: 127.0.0.1:9000\r\n"
                         b"Content-Length: 2\r\nConnection: close\r\nX-A: 1\r\n\r\n{}")
        # A spare is on its way as soon as the request is sent.
        self.assertEqual(len(self.reactor.tcpClients), 2)
        spare, spare_transport = self.connect_next()
        second = self.channel.request(b"GET", b"/x", [], b"")
        self.assertEqual(spare_transport.value(), b"", "one request at a time")
        protocol.dataReceived(OK)
        self.assertEqual(self.successResultOf(first),
                         BackendResponse(200, b"OK", [(b"Content-Type", b"text/plain"),
                                                      (b"Content-Length", b"2"), (b"Connection", b"close")],
                                         b"ok"))
        self.assertTrue(transport.disconnecting)
        self.assertTrue(spare_transport.value().startswith(b"GET /x HTTP/1.1\r\n"))
        self.assertEqual(self.channel.spare_hits, 1)
        spare.dataReceived(OK)
        self.successResultOf(second)

    def test_the_spare_is_connected_before_the_request_is_written(self) -> None:
        # The child, done with this request, must find the next connection in
        # its backlog: were it connected after, a fast child would look first,
        # find nothing and sleep 10 ms (a quarter of requests, measured).
        self.channel.request(b"GET", b"/", [], b"")
        host, port, factory, _, _ = self.reactor.tcpClients[0]
        protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
        connections_at_write: list[int] = []

        class Recording(StringTransport):
            def write(inner, data: bytes) -> None:
                connections_at_write.append(len(self.reactor.tcpClients))
                super().write(data)

        protocol.makeConnection(Recording())
        self.assertEqual(connections_at_write, [2])

    def test_closed_while_busy_drops_the_spare_once_the_child_is_done(self) -> None:
        # Else the spare waits in the child's backlog for whoever uses the
        # child next (another data worker), which then waits behind it.
        self.channel.request(b"GET", b"/", [], b"")
        protocol, _ = self.connect_next()
        spare, spare_transport = self.connect_next()
        closed = self.channel.close()
        self.assertNoResult(closed)
        self.assertEqual(spare_transport.value(), b"")
        protocol.dataReceived(OK)
        self.assertTrue(spare_transport.value().startswith(b"OPTIONS * HTTP/1.1\r\n"))
        self.assertNoResult(closed)
        spare.dataReceived(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
        self.successResultOf(closed)

    def test_quiet_spare_is_dropped_with_options(self) -> None:
        done = self.channel.request(b"GET", b"/", [], b"")
        protocol, _ = self.connect_next()
        spare, spare_transport = self.connect_next()
        protocol.dataReceived(OK)
        self.successResultOf(done)
        self.reactor.advance(4.9)
        self.assertEqual(spare_transport.value(), b"")
        self.reactor.advance(0.1)
        self.assertTrue(spare_transport.value().startswith(b"OPTIONS * HTTP/1.1\r\n"))
        spare.dataReceived(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
        self.assertTrue(spare_transport.disconnecting)
        # Idle now: no more connections are opened.
        self.reactor.advance(60)
        self.assertEqual(len(self.reactor.tcpClients), 2)

    def test_queue_is_bounded(self) -> None:
        self.channel.request(b"GET", b"/1", [], b"")
        self.channel.request(b"GET", b"/2", [], b"")
        self.channel.request(b"GET", b"/3", [], b"")
        self.failureResultOf(self.channel.request(b"GET", b"/4", [], b""), QueueFull)
        self.assertEqual(self.channel.rejected, 1)

    def test_queue_wait_has_a_deadline(self) -> None:
        self.channel.request(b"GET", b"/1", [], b"")
        waiting = self.channel.request(b"GET", b"/2", [], b"")
        self.reactor.advance(10)
        self.failureResultOf(waiting, QueueTimeout)

    def test_child_dying_mid_answer(self) -> None:
        done = self.channel.request(b"GET", b"/", [], b"")
        protocol, _ = self.connect_next()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        protocol.connectionLost(Failure(ConnectionLost()))
        self.failureResultOf(done, ResponseIncomplete)

    def test_close_fails_waiting_requests_and_drops_the_spare(self) -> None:
        first = self.channel.request(b"GET", b"/1", [], b"")
        waiting = self.channel.request(b"GET", b"/2", [], b"")
        protocol, _ = self.connect_next()
        spare, spare_transport = self.connect_next()
        protocol.dataReceived(OK)
        self.successResultOf(first)
        # /2 went out on the spare; close while it is answered.
        spare.dataReceived(OK)
        self.successResultOf(waiting)
        third, third_transport = self.connect_next()
        closed = self.channel.close()
        self.assertTrue(third_transport.value().startswith(b"OPTIONS *"))
        third.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
        self.successResultOf(closed)
        self.assertTrue(spare_transport.disconnecting)
        refused = self.channel.request(b"GET", b"/3", [], b"")
        self.failureResultOf(refused)

    def test_cancelled_waiting_request_never_reaches_the_child(self) -> None:
        first = self.channel.request(b"GET", b"/1", [], b"")
        waiting = self.channel.request(b"GET", b"/2", [], b"")
        protocol, _ = self.connect_next()
        spare, spare_transport = self.connect_next()
        waiting.cancel()
        self.failureResultOf(waiting)
        self.assertEqual(self.channel.queued, 0)
        protocol.dataReceived(OK)
        self.successResultOf(first)
        self.assertEqual(spare_transport.value(), b"", "the cancelled request was never sent")

    def test_sent_request_cancelled_is_answered_and_dropped(self) -> None:
        sent = self.channel.request(b"GET", b"/1", [], b"")
        protocol, _ = self.connect_next()
        sent.cancel()
        self.failureResultOf(sent)
        protocol.dataReceived(OK)  # no AlreadyCalledError
        follow = self.channel.request(b"GET", b"/2", [], b"")
        spare, spare_transport = self.connect_next()
        self.assertTrue(spare_transport.value().startswith(b"GET /2"))
        spare.dataReceived(OK)
        self.successResultOf(follow)

    def test_spare_that_cannot_connect_is_replaced(self) -> None:
        first = self.channel.request(b"GET", b"/1", [], b"")
        protocol, _ = self.connect_next()
        # The spare's connection attempt fails (the child went away).
        _, _, spare_factory, _, _ = self.reactor.tcpClients[1]
        spare_factory.clientConnectionFailed(None, Failure(ConnectionLost()))
        self.connected += 1
        protocol.dataReceived(OK)
        self.successResultOf(first)
        second = self.channel.request(b"GET", b"/2", [], b"")
        fresh, fresh_transport = self.connect_next()
        self.assertTrue(fresh_transport.value().startswith(b"GET /2"))
        fresh.dataReceived(OK)
        self.successResultOf(second)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_a_request_no_byte_of_which_reached_the_child_fails_as_refused(self) -> None:
        # The loopback connection reports a send that delivered nothing as a
        # refusal: the data plane may send such a request (even a write) again.
        first = self.channel.request(b"POST", b"/v2/pipeline", [], b"{}")
        protocol, _ = self.connect_next()
        protocol.connectionLost(Failure(ConnectionRefusedError()))
        self.failureResultOf(first, ConnectionRefusedError)

    def test_quiet_spare_that_never_connected_is_dropped_quietly(self) -> None:
        # Found by the soak: a spare whose connection failed was dropped as
        # if it were a connection (AttributeError, "Unhandled error in Deferred").
        done = self.channel.request(b"GET", b"/", [], b"")
        protocol, _ = self.connect_next()
        _, _, spare_factory, _, _ = self.reactor.tcpClients[1]
        spare_factory.clientConnectionFailed(None, Failure(ConnectionLost()))
        protocol.dataReceived(OK)
        self.successResultOf(done)
        self.reactor.advance(5)
        self.successResultOf(self.channel.close())
        # An unhandled failure is logged when its Deferred is collected.
        del spare_factory, self.reactor.tcpClients[:]
        gc.collect()
        self.assertEqual(self.flushLoggedErrors(), [])


class BackendDeadlineTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.wedged: list[int] = []
        self.channel = BackendChannel(self.reactor, 9000, queue_timeout=100, backend_timeout=30,
                                      on_wedged=lambda: self.wedged.append(1), connect=self.connect_tcp)
        self.connected = 0

    connect_tcp = ChannelTests.connect_tcp
    connect_next = ChannelTests.connect_next

    def test_a_child_that_does_not_answer_is_given_up_on(self) -> None:
        first = self.channel.request(b"POST", b"/v2/pipeline", [], b"{}")
        protocol, transport = self.connect_next()
        waiting = self.channel.request(b"POST", b"/v2/pipeline", [], b"{}")
        self.reactor.advance(29.9)
        self.assertNoResult(first)
        self.reactor.advance(0.2)
        self.assertIn("no answer within 30s", str(self.failureResultOf(first, BackendTimeout).value))
        self.assertEqual(self.wedged, [1], "the supervisor is told, to kill the child")
        self.assertTrue(transport.disconnected or transport.disconnecting)
        # What waited for the wedged child is retried on the next one.
        self.failureResultOf(waiting, ChannelClosed)
        self.failureResultOf(self.channel.request(b"GET", b"/", [], b""), ChannelClosed)
        self.assertEqual(self.channel.wedged, 1)

    def test_answers_in_time_keep_one_lazy_timer(self) -> None:
        for _ in range(3):
            done = self.channel.request(b"GET", b"/", [], b"")
            protocol, _ = self.connect_next()
            self.reactor.advance(20)
            protocol.dataReceived(OK)
            self.successResultOf(done)
        watchdogs = [c for c in self.reactor.getDelayedCalls() if c.func == self.channel._watch]
        self.assertLessEqual(len(watchdogs), 1)
        self.reactor.advance(100)
        self.assertEqual(self.wedged, [])

    def test_a_request_may_have_its_own_deadline(self) -> None:
        done = self.channel.request(b"POST", b"/v2/pipeline", [], b"{}", timeout=3600)
        protocol, _ = self.connect_next()
        self.reactor.advance(1000)
        self.assertNoResult(done)
        protocol.dataReceived(OK)
        self.successResultOf(done)
        self.assertEqual(self.wedged, [])


class _Recorder(Protocol):
    def __init__(self) -> None:
        self.received = b""
        self.ended: Deferred[None] = Deferred()
        self.reason: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.reason = reason
        self.ended.callback(None)


class _Server(Protocol):
    """Reads until it has C{expect} bytes, then answers and closes (as tursodb does)."""

    def __init__(self, expect: int, answer: bytes) -> None:
        self.expect, self.answer, self.got = expect, answer, b""

    def dataReceived(self, data: bytes) -> None:
        self.got += data
        if len(self.got) >= self.expect:
            assert self.transport is not None
            self.transport.write(self.answer)
            self.transport.loseConnection()


class LoopbackConnectionTests(TestCase):
    """The lean connection to a child, on real loopback sockets."""

    def listen(self, make: Any) -> int:
        from twisted.internet import reactor

        factory = Factory.forProtocol(make)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        return int(port.getHost().port)

    def connect(self, port: int) -> tuple[LoopbackConnection, _Recorder]:
        from twisted.internet import reactor

        recorder = _Recorder()
        return LoopbackConnection(reactor, port, recorder), recorder  # type: ignore[arg-type]

    @inlineCallbacks
    def test_a_request_and_its_answer(self) -> Any:
        body = b"x" * (4 << 20)  # more than a socket buffer takes at once
        servers: list[_Server] = []

        def make() -> _Server:
            servers.append(_Server(len(body), b"answer"))
            return servers[-1]

        connection, recorder = self.connect(self.listen(make))
        connection.write(body)
        yield recorder.ended
        reason = recorder.reason
        assert reason is not None
        self.assertEqual(recorder.received, b"answer")
        self.assertEqual(servers[0].got, body)
        self.assertTrue(reason.check(ConnectionDone) or reason.check(ConnectionLost))
        self.assertEqual(connection.fileno(), -1)

    @inlineCallbacks
    def test_nothing_listening_is_a_refusal(self) -> Any:
        connection, recorder = self.connect(_free_port())
        connection.write(b"GET / HTTP/1.1\r\n\r\n")
        yield recorder.ended
        reason = recorder.reason
        assert reason is not None
        self.assertTrue(reason.check(ConnectionRefusedError), reason)

    @inlineCallbacks
    def test_a_peer_that_closes_an_unused_connection_is_noticed(self) -> Any:
        class Closer(Protocol):
            def connectionMade(self) -> None:
                assert self.transport is not None
                self.transport.loseConnection()

        connection, recorder = self.connect(self.listen(Closer))
        yield recorder.ended
        reason = recorder.reason
        assert reason is not None
        # Nothing was sent on it: whatever was meant for it may go elsewhere.
        self.assertTrue(reason.check(ConnectionRefusedError), reason)

    @inlineCallbacks
    def test_a_peer_that_closes_after_reading_part_is_a_loss(self) -> Any:
        connection, recorder = self.connect(self.listen(lambda: _Server(10, b"")))
        connection.write(b"0123456789" * 100)
        yield recorder.ended
        reason = recorder.reason
        assert reason is not None
        self.assertFalse(reason.check(ConnectionRefusedError), reason)

    @inlineCallbacks
    def test_abort_drops_and_closes(self) -> Any:
        connection, recorder = self.connect(self.listen(lambda: _Server(1 << 30, b"")))
        connection.abortConnection()
        yield recorder.ended
        reason = recorder.reason
        assert reason is not None
        self.assertTrue(reason.check(ConnectionDone))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
