"""
Requests relayed to a peer that serves them: another data worker (over a
local socket) or, in a cluster, the node that owns the namespace (over its
internal listener).  Connections are kept alive and used for one request
at a time; the answer is read whole (the peer capped what it sends).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable
from typing import Any

import attrs
import httptools
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectError
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import ClientFactory, Protocol, connectionDone
from twisted.python.failure import Failure

from .channel import BackendResponse, ResponseIncomplete
from .dataport import DataRequest

#: Request headers not passed when a request is framed again.
_REFRAMED = frozenset({b"content-length", b"transfer-encoding", b"expect"})


def request_bytes(request: DataRequest, headers: list[tuple[bytes, bytes]] | None = None,
                  method: bytes | None = None) -> bytes:
    """
    C{request} on the wire again, framed by C{Content-Length}: with the
    headers its client sent, or with C{headers}.
    """
    body = request.body
    head = [b"%s %s HTTP/1.1\r\n" % (method or request.method, request.target)]
    head += [b"%s: %s\r\n" % (name, value) for name, value in
             (request.headers if headers is None else headers) if name.lower() not in _REFRAMED]
    head.append(b"content-length: %d\r\n\r\n" % len(body))
    return b"".join(head) + body


def relayed_bytes(request: DataRequest, headers: list[tuple[bytes, bytes]]) -> bytes:
    """
    C{request} to send to a peer with C{headers}.  An answer to HEAD has a
    length and no body, which the answer's parser here cannot tell: it is
    asked with GET (the client still gets no body).
    """
    return request_bytes(request, headers, b"GET" if request.method == b"HEAD" else None)


class PeerConnection(Protocol):
    """One kept-alive connection to a peer, one request at a time."""

    def __init__(self, pool: Peers, peer: Hashable, connected: Deferred[PeerConnection]) -> None:
        self.pool, self.peer, self._connected = pool, peer, connected
        self.answer: Deferred[BackendResponse] | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._reset()
        self.lost = False
        self.sent = False
        self.expiry: IDelayedCall | None = None

    def _reset(self) -> None:
        self._headers: list[tuple[bytes, bytes]] = []
        self._body: list[bytes] = []
        self._keep_alive = True

    def connectionMade(self) -> None:
        self._connected.callback(self)

    def send(self, data: bytes) -> Deferred[BackendResponse]:
        self.answer = Deferred()
        self.sent = True
        assert self.transport is not None
        self.transport.write(data)
        return self.answer

    def dataReceived(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as error:
            self._fail(ResponseIncomplete(f"bad answer from {self.pool.describe(self.peer)}: {error}"))
            assert self.transport is not None
            self.transport.loseConnection()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._keep_alive = self._parser.should_keep_alive()

    def on_body(self, data: bytes) -> None:
        self._body.append(data)

    def on_message_complete(self) -> None:
        answer, self.answer = self.answer, None
        response = BackendResponse(self._parser.get_status_code(), b"", self._headers, b"".join(self._body))
        keep = self._keep_alive
        self._reset()
        if keep:
            self.pool.idle(self)
        else:
            assert self.transport is not None
            self.transport.loseConnection()
        if answer is not None:
            answer.callback(response)

    def _fail(self, error: Exception) -> None:
        answer, self.answer = self.answer, None
        if answer is not None and not answer.called:
            answer.errback(Failure(error))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = True
        self.pool.gone(self)
        self._fail(ResponseIncomplete(f"{self.pool.describe(self.peer)} closed the connection"))


class _PeerFactory(ClientFactory):
    noisy = False

    def __init__(self, pool: Peers, peer: Hashable) -> None:
        self.pool, self.peer = pool, peer
        self.connected: Deferred[PeerConnection] = Deferred()

    def buildProtocol(self, addr: object) -> PeerConnection:
        return PeerConnection(self.pool, self.peer, self.connected)

    def clientConnectionFailed(self, connector: object, reason: Failure) -> None:
        if not self.connected.called:
            self.connected.errback(reason)


@attrs.define(eq=False)
class Peers:
    """
    Kept-alive connections to peers.  A connection idle for C{keep_idle}
    seconds is closed from this side: that is shorter than the peer's own
    idle timeout, so a request is never sent on a connection the peer is
    closing at that moment (which would fail it with a 502).
    """

    reactor: Any
    #: Open a connection to a peer with the given factory.
    connect: Callable[[Any, ClientFactory], None]
    #: A peer's name in error messages.
    describe: Callable[[Any], str]
    keep_idle: float
    _idle: dict[Hashable, deque[PeerConnection]] = attrs.field(factory=dict)

    def send(self, peer: Hashable, data: bytes) -> Deferred[BackendResponse]:
        """Send one whole request to C{peer}; fire with its whole answer."""
        idle = self._idle.get(peer)
        if idle:
            protocol = idle.pop()
            if protocol.expiry is not None and protocol.expiry.active():
                protocol.expiry.cancel()
            protocol.expiry = None
            return protocol.send(data)

        async def connect_and_send() -> BackendResponse:
            factory = _PeerFactory(self, peer)
            self.connect(peer, factory)
            try:
                protocol = await factory.connected
            except Exception as error:
                raise ConnectError(string=f"{self.describe(peer)}: {error}") from None
            return await protocol.send(data)

        return Deferred.fromCoroutine(connect_and_send())

    def idle(self, protocol: PeerConnection) -> None:
        self._idle.setdefault(protocol.peer, deque()).append(protocol)
        protocol.expiry = self.reactor.callLater(self.keep_idle, self._expire, protocol)

    def _expire(self, protocol: PeerConnection) -> None:
        protocol.expiry = None
        self.gone(protocol)
        if protocol.transport is not None:
            protocol.transport.loseConnection()

    def gone(self, protocol: PeerConnection) -> None:
        if protocol.expiry is not None and protocol.expiry.active():
            protocol.expiry.cancel()
        protocol.expiry = None
        idle = self._idle.get(protocol.peer)
        if idle and protocol in idle:
            idle.remove(protocol)
