"""
The one way to talk to a child: a per-namespace channel that sends one
request at a time and keeps a spare connection ready.

tursodb serves one connection at a time: it accepts, reads a whole
request, answers with C{Connection: close}, and accepts again; when no
connection is pending it sleeps 10 ms before it looks again.  A client that
connects per request therefore waits ~6-10 ms, while a connection that is
already accepted when the request is written is answered in ~0.15 ms.  So
while a namespace is busy the channel keeps one I{spare} connection open:
opened just before a request is sent, it waits in the child's backlog, is
accepted the moment the child finishes, and carries the next request with
no sleep in between.

A spare is dropped once the namespace has been quiet for C{spare_idle}
(well within tursodb's 30 s read timeout), by sending it a harmless
C{OPTIONS *} rather than closing it, which tursodb would log as an
error: an idle child sees no traffic and logs nothing.

Every user of a child must go through its channel: a connection made
beside it would wait behind the spare the child is reading.

Requests wait in a bounded queue; past its length, or past the wait
deadline, they fail with L{QueueFull} / L{QueueTimeout}.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar, cast

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectError, ConnectionLost
from twisted.internet.interfaces import IAddress, IConnector, IDelayedCall, ITCPTransport
from twisted.internet.protocol import ClientFactory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from .loopback import ConnectReactor, connect_loopback

_T = TypeVar("_T")

_DROP_REQUEST = b"OPTIONS * HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


class QueueFull(Exception):
    pass


class QueueTimeout(Exception):
    pass


class BackendTimeout(Exception):
    """
    The child did not answer a request within the backend deadline: it is
    wedged (stopped, or stuck in a query) and is being killed.
    """


class ChannelClosed(ConnectionLost):
    """
    The channel was closed (its child is stopping) before the request went out.
    """


@attrs.frozen
class BackendResponse:
    code: int
    phrase: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes


class ResponseIncomplete(ConnectionLost):
    """
    The child closed the connection before its answer was complete.
    """


class _Exchange(Protocol):
    """
    One connection to a child, for exactly one request and its response.
    """

    factory: _ExchangeFactory

    def __init__(self) -> None:
        self.response: Deferred[BackendResponse] = Deferred()
        self.lost = False
        self.sent = False
        self._buffer = bytearray()
        self._head: tuple[int, bytes, list[tuple[bytes, bytes]], int | None] | None = None

    def connectionMade(self) -> None:
        self.factory.connected.callback(self)

    def send(self, request: bytes) -> Deferred[BackendResponse]:
        self.sent = True
        assert self.transport is not None
        self.transport.write(request)
        return self.response

    def dataReceived(self, data: bytes) -> None:
        # A bytearray grows in place: a large answer is not copied per chunk.
        self._buffer += data
        if self._head is None:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            try:
                self._head = _parse_head(bytes(self._buffer[:end]))
            except ValueError as error:
                self.response.errback(Failure(ResponseIncomplete(str(error))))
                assert self.transport is not None
                self.transport.loseConnection()
                return
            del self._buffer[:end + 4]
        length = self._head[3]
        if length is not None and len(self._buffer) >= length:
            self._finish(bytes(self._buffer[:length]))
            self._buffer = bytearray()
            assert self.transport is not None
            self.transport.loseConnection()

    def _finish(self, body: bytes) -> None:
        if not self.response.called and self._head is not None:
            code, phrase, headers, _ = self._head
            self.response.callback(BackendResponse(code, phrase, headers, body))

    def abort(self) -> None:
        if self.transport is not None:
            cast(ITCPTransport, self.transport).abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = True
        if self.response.called or not self.sent:
            return  # a spare that died unused: nobody waits for it
        if reason.check(ConnectError):
            self.response.errback(reason)  # it never reached the child
        elif self._head is not None and self._head[3] is None:
            self._finish(bytes(self._buffer))  # answer delimited by the close
        else:
            self.response.errback(Failure(ResponseIncomplete(reason.getErrorMessage())))


if TYPE_CHECKING:
    # Newer Twisted types its factories by their protocol; 24.3 (which
    # setup.cfg allows) cannot subscript ClientFactory at run time.
    _ClientFactory = ClientFactory[_Exchange]
else:
    _ClientFactory = ClientFactory


class _ExchangeFactory(_ClientFactory):
    """
    Makes the one L{_Exchange} of one connection; quiet, since there is a
    connection per request.
    """

    noisy = False

    def __init__(self) -> None:
        self.connected: Deferred[_Exchange] = Deferred()

    def buildProtocol(self, addr: IAddress | None) -> _Exchange:
        exchange = _Exchange()
        exchange.factory = self
        return exchange

    def clientConnectionFailed(self, connector: IConnector, reason: Failure) -> None:
        self.connected.errback(reason)


def _parse_head(head: bytes) -> tuple[int, bytes, list[tuple[bytes, bytes]], int | None]:
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        raise ValueError(f"not an HTTP response: {lines[0][:80]!r}")
    headers = []
    length = None
    for line in lines[1:]:
        key, _, value = line.partition(b":")
        key, value = key.strip(), value.strip()
        if key.lower() == b"content-length":
            length = int(value)
        headers.append((key, value))
    code = int(parts[1])
    if code in (204, 304) or code < 200:
        length = 0
    return code, parts[2] if len(parts) > 2 else b"", headers, length


@attrs.define(eq=False)
class _Pending:
    request: bytes
    result: Deferred[BackendResponse]
    timer: IDelayedCall | None = None
    #: This request's backend deadline (None: the channel's; 0: none).
    timeout: float | None = None


@attrs.define(eq=False)
class BackendChannel:
    """
    The serial, spare-keeping connection to one child on C{port}.
    """

    reactor: ConnectReactor
    port: int
    max_queue: int = 128
    queue_timeout: float = 30.0
    #: How long a request sent to the child may go unanswered (0: no limit).
    backend_timeout: float = 30.0
    spare_idle: float = 5.0
    #: Called when the child missed the backend deadline (the supervisor kills it).
    on_wedged: Callable[[], None] | None = None
    #: How to open a connection to the child (None: a lean loopback connection).
    connect: Callable[[int, ClientFactory[_Exchange]], object] | None = None
    requests: int = 0
    spare_hits: int = 0
    rejected: int = 0
    wedged: int = 0
    _queue: deque[_Pending] = attrs.field(factory=deque)
    _busy: bool = False
    _closed: bool = False
    _spare: Deferred[_Exchange] | None = None
    #: close() calls waiting for the request with the child to be done.
    _closing: list[Deferred[None]] = attrs.field(factory=list)
    _idle_timer: IDelayedCall | None = None
    _last_done: float = 0.0
    #: The request the child is answering: its exchange, itself, its deadline.
    _in_flight: tuple[_Exchange, _Pending, float] | None = None
    #: One lazy timer that checks the deadline of whatever is in flight.
    _watchdog: IDelayedCall | None = None
    _log = Logger()

    # -- public --------------------------------------------------------------------

    def request(self, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]],
                body: bytes, timeout: float | None = None) -> Deferred[BackendResponse]:
        """
        Send one request when the child is free; fire with its response, or
        fail with L{BackendTimeout} if the child does not answer within
        C{timeout} (the channel's C{backend_timeout} if C{None}; 0: none).
        """
        if self._closed:
            return _failed(ChannelClosed("channel closed"))
        if len(self._queue) >= self.max_queue:
            self.rejected += 1
            return _failed(QueueFull(f"{len(self._queue)} requests already wait for this namespace"))
        head = [b"%s %s HTTP/1.1" % (method, target), b"Host: 127.0.0.1:%d" % self.port,
                b"Content-Length: %d" % len(body), b"Connection: close"]
        head += [b"%s: %s" % (key, value) for key, value in headers]
        pending = _Pending(b"\r\n".join(head) + b"\r\n\r\n" + body, Deferred(self._cancel), timeout=timeout)
        self._queue.append(pending)
        if self._busy and self.queue_timeout:
            # Only a request that has to wait gets a deadline.
            pending.timer = self.reactor.callLater(self.queue_timeout, self._expire, pending)
        self._next()
        return pending.result

    def close(self) -> Deferred[None]:
        """
        Refuse new requests, fail queued ones, and drop the spare quietly;
        fires when the child may be stopped without logging noise.
        """
        self._closed = True
        if self._in_flight is None:
            _cancel(self._watchdog)
            self._watchdog = None
        while self._queue:
            pending = self._queue.popleft()
            _cancel(pending.timer)
            pending.result.errback(Failure(ChannelClosed("the namespace is stopping")))
        if self._busy:
            # The spare goes once the request with the child is done.
            closed: Deferred[None] = Deferred()
            self._closing.append(closed)
            return closed
        return self.drop_spare()

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def busy(self) -> bool:
        """A request is with the child (perhaps one whose client left)."""
        return self._busy

    # -- internals -----------------------------------------------------------------

    def _cancel(self, result: Deferred[BackendResponse]) -> None:
        """
        The client went away: a request still waiting is dropped (it never
        reaches the child); one already sent is answered and discarded.
        """
        for pending in self._queue:
            if pending.result is result:
                self._queue.remove(pending)
                _cancel(pending.timer)
                break

    def _expire(self, pending: _Pending) -> None:
        if pending in self._queue and not pending.result.called:
            self._queue.remove(pending)
            self.rejected += 1
            pending.result.errback(Failure(QueueTimeout(
                f"waited {self.queue_timeout:g}s for the namespace's earlier requests")))

    def _connect(self) -> Deferred[_Exchange]:
        factory = _ExchangeFactory()
        if self.connect is None:
            connect_loopback(self.reactor, self.port, factory.buildProtocol(None))
        else:
            self.connect(self.port, factory)
        return factory.connected

    def _next(self) -> None:
        if self._busy or not self._queue:
            return
        pending = self._queue.popleft()
        _cancel(pending.timer)
        self._busy = True
        self.requests += 1
        connection, self._spare = self._spare, None
        if connection is None:
            connection = self._connect()
        else:
            self.spare_hits += 1
        connection.addCallback(self._send, pending)
        connection.addErrback(self._done, pending)

    def _send(self, exchange: _Exchange | None, pending: _Pending) -> None:
        if exchange is None or exchange.lost:
            # The spare could not connect, or died unused: nothing was sent.
            self._connect().addCallback(self._send, pending).addErrback(self._done, pending)
            return
        # The next request's connection waits in the child's backlog before
        # this request is even sent: the child, done with this one, finds it
        # there at once (a loopback connect completes inside connect()).
        if not self._closed:
            self._spare = self._connect()
            self._spare.addErrback(lambda _: None)
        answered = exchange.send(pending.request)
        limit = self.backend_timeout if pending.timeout is None else pending.timeout
        if limit:
            self._in_flight = (exchange, pending, self.reactor.seconds() + limit)
            if self._watchdog is None:
                self._watchdog = self.reactor.callLater(limit, self._watch)
        answered.addBoth(self._done, pending)

    def _watch(self) -> None:
        """
        The deadline check: one timer per channel, moved on lazily rather
        than one per request.
        """
        self._watchdog = None
        if self._in_flight is None:
            return
        exchange, pending, deadline = self._in_flight
        left = deadline - self.reactor.seconds()
        if left > 0:
            self._watchdog = self.reactor.callLater(left, self._watch)
            return
        self._in_flight = None
        self.wedged += 1
        limit = self.backend_timeout if pending.timeout is None else pending.timeout
        if not pending.result.called:
            pending.result.errback(Failure(BackendTimeout(f"no answer within {limit:g}s")))
        # Requests waiting for this child are failed as for a stopping one:
        # they are retried on the child that replaces it.
        self.close()
        exchange.abort()
        if self.on_wedged is not None:
            self.on_wedged()

    def _done(self, result: BackendResponse | Failure, pending: _Pending) -> None:
        self._busy = False
        if self._in_flight is not None and self._in_flight[1] is pending:
            self._in_flight = None
        if pending.result.called:
            pass  # cancelled by its client meanwhile: the answer is dropped
        elif isinstance(result, Failure):
            pending.result.errback(result)
        else:
            pending.result.callback(result)
        self._last_done = self.reactor.seconds()
        if self._closed:
            # Closed while this request was with the child: its spare must
            # not wait in the child's backlog for whoever comes next.
            waiting, self._closing = self._closing, []

            def dropped(_: object) -> None:
                for closed in waiting:
                    closed.callback(None)

            self.drop_spare().addBoth(dropped)
        elif self._queue:
            self._next()
        elif self._idle_timer is None:
            self._idle_timer = self.reactor.callLater(self.spare_idle, self._idle_check)

    def _idle_check(self) -> None:
        """
        One lazy timer instead of one per request: drop the spare once the
        channel has been quiet for C{spare_idle}.
        """
        self._idle_timer = None
        if self._closed or self._busy or self._queue:
            return
        quiet = self.reactor.seconds() - self._last_done
        if quiet < self.spare_idle:
            self._idle_timer = self.reactor.callLater(self.spare_idle - quiet, self._idle_check)
        else:
            self.drop_spare()

    def drop_spare(self) -> Deferred[None]:
        """
        Retire the spare connection quietly (see the module docstring);
        fires once the child is done with it, so that a connection made
        beside this channel is not kept waiting behind it.
        """
        _cancel(self._idle_timer)
        self._idle_timer = None
        spare, self._spare = self._spare, None
        if spare is None or self._busy:
            if spare is not None:
                self._spare = spare
            return succeed(None)
        done: Deferred[None] = Deferred()

        def drop(exchange: _Exchange | None) -> None:
            # None: the spare never connected (its failure was swallowed).
            if exchange is None or exchange.lost:
                done.callback(None)
                return
            exchange.send(_DROP_REQUEST).addBoth(lambda _: done.callback(None))

        spare.addCallbacks(drop, lambda _: done.callback(None))
        return done


def _failed(error: Exception) -> Deferred[_T]:
    result: Deferred[_T] = Deferred()
    result.errback(Failure(error))
    return result


def _cancel(call: IDelayedCall | None) -> None:
    if call is not None and call.active():
        call.cancel()
