"""
Unit tests for the kept-alive connections requests are relayed over.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import cast

from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase

from turso_twisted.dataport import DataRequest
from turso_twisted.relay import PeerConnection, Peers, relayed_bytes

ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class HandoverPoolTests(SynchronousTestCase):
    """Kept-alive connections to the other workers."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.connects: list[int] = []
        self.pool = Peers(self.reactor, lambda peer, factory: self.connects.append(peer),
                          lambda peer: f"peer {peer}", keep_idle=30.0)

    def answered_connection(self) -> tuple[PeerConnection, StringTransport]:
        protocol = PeerConnection(self.pool, 1, Deferred())
        transport = StringTransport()
        protocol.makeConnection(transport)
        answers = []
        protocol.send(b"GET / HTTP/1.1\r\n\r\n").addCallback(answers.append)
        protocol.dataReceived(ANSWER)
        self.assertEqual([answer.code for answer in answers], [200])
        return protocol, transport

    def test_closed_from_this_side_before_the_peer_would(self) -> None:
        """
        An idle connection is closed after C{keep_idle} (half the peer's
        idle timeout), so a request is never sent on one the peer is
        closing.
        """
        protocol, transport = self.answered_connection()
        self.reactor.advance(29)
        self.assertFalse(transport.disconnecting)
        self.reactor.advance(1)
        self.assertTrue(transport.disconnecting)
        self.assertNotIn(protocol, self.pool._idle.get(1, []))
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_reused_connection_is_not_closed_under_its_request(self) -> None:
        protocol, transport = self.answered_connection()
        self.reactor.advance(20)
        self.pool.send(1, relayed_bytes(_request(), []))
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.reactor.advance(60)
        self.assertFalse(transport.disconnecting)
        self.assertEqual(self.connects, [])

    def test_lost_connection_leaves_no_timer(self) -> None:
        protocol, transport = self.answered_connection()
        protocol.connectionLost()
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.assertNotIn(protocol, self.pool._idle.get(1, []))


def _request() -> DataRequest:
    """What the pool reads of a request: its line, headers and body."""
    return cast(DataRequest, SimpleNamespace(method=b"GET", target=b"/ns/v2/pipeline",
                                             headers=[(b"host", b"x")], body=b""))
