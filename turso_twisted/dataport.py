"""
The data port's HTTP/1.1 server: requests parsed by llhttp (a C parser,
through httptools) in one small protocol, rather than by twisted.web,
whose pure-Python parsing and Request machinery cost more per request
than everything else the data port does.

Checks made here, in this order, before a body is read: a request the
parser refuses (smuggling: C{Content-Length} with C{Transfer-Encoding},
two C{Content-Length}s, bad chunk sizes, CR or LF inside a header value),
a head over L{MAX_HEAD_BYTES}, an HTTP version other than 1.0 and 1.1, a
transfer coding other than C{chunked}, the credentials (the L{Gatekeeper}),
a declared body over the cap.  Each is answered at once, in its turn, and
the connection closes: after a framing error nothing further on the
connection can be trusted.  A body past the cap while it streams in is
refused the same way.

Pipelining: requests are answered one at a time in the order they came;
complete ones wait their turn, and the connection stops reading while
L{PIPELINE_DEPTH} of them wait.
"""

from __future__ import annotations

import hmac
import io
import os
import tempfile
from collections import deque
from collections.abc import Callable
from email.utils import formatdate
from typing import BinaryIO, Protocol

import httptools
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.internet.protocol import ServerFactory, connectionDone
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure

from .errors import (
    HeadersTooLarge,
    Invalid,
    Refusal,
    TooLarge,
    Unauthorized,
    from_os_error,
    response_parts,
    status_phrase,
)
from .tokens import Access

#: Bodies up to this size stay in memory; larger ones wait in a file.
IN_MEMORY = 100_000

#: The most a request line and headers may take together.
MAX_HEAD_BYTES = 64 * 1024

#: Complete requests that may wait for their turn before reading stops.
PIPELINE_DEPTH = 8

#: The header a node relaying a request to another sends the cluster's token in.
PEER_TOKEN_HEADER = b"x-turso-cluster-token"

#: On the internal listener, paths that only the cluster's token opens (no
#: namespace name starts with "_"): the nodes' own endpoints.
PEER_ONLY_PREFIX = b"/_cluster/"


class Gatekeeper(Protocol):
    """A port's credentials check, made once a request's headers are in."""

    def admit(self, authorization: list[bytes], target: bytes) -> Access:
        """
        What a request's credentials (its C{Authorization} header values)
        open, for its raw request C{target}.

        @raise Refusal: for missing or bad credentials.
        """


class DataRequest:
    """
    One request on the data port, and the one way to answer it.

    Its body is complete when the handler gets it.  The answer is written
    whole with L{respond}, or begun with L{begin}, streamed (it is an
    L{twisted.internet.interfaces.IConsumer}) and ended with L{finish}.
    """

    def __init__(self, connection: DataConnection, method: bytes, target: bytes,
                 headers: list[tuple[bytes, bytes]], keep_alive: bool, access: Access,
                 refusal: Refusal | None = None) -> None:
        self.connection = connection
        self.method = method
        self.target = target
        #: As sent: names keep their case.
        self.headers = headers
        self.keep_alive = keep_alive
        #: What the credentials open (checked when the headers came in).
        self.access = access
        #: Set when the request is refused before its body is read.
        self.refusal = refusal
        self.received = 0
        self._chunks: list[bytes] = []
        self._spool: BinaryIO | None = None
        #: The status sent, and the body bytes sent.
        self.code = 0
        self.sent = 0
        #: The head is written / the answer is complete / the client left first.
        self.started = False
        self.finished = False
        self.gone = False
        #: The connection, this request with it, went to another data worker.
        self.handed_off = False
        #: Sent as HTTP/1.1 (only such connections move between workers).
        self.http11 = False
        self._watchers: list[Deferred[None]] = []

    # -- the body ------------------------------------------------------------------

    def _take(self, data: bytes, scratch_dir: str | None) -> None:
        self.received += len(data)
        if self._spool is None and scratch_dir is not None and self.received > IN_MEMORY:
            # Large bodies wait in the data dir, not in memory or the system's /tmp.
            self._spool = tempfile.TemporaryFile(dir=scratch_dir)
            for chunk in self._chunks:
                self._spool.write(chunk)
            self._chunks = []
        if self._spool is not None:
            self._spool.write(data)
        else:
            self._chunks.append(data)

    def _drop_body(self) -> None:
        self._chunks = []
        if self._spool is not None:
            self._spool.close()
            self._spool = None

    @property
    def body(self) -> bytes:
        """The whole body (read back from its file, if it waited in one)."""
        if self._spool is None:
            return b"".join(self._chunks)
        self._spool.seek(0)
        return self._spool.read()

    def body_file(self) -> BinaryIO:
        """The body as a file from its start, to stream on (a large one stays on disk)."""
        if self._spool is None:
            return io.BytesIO(b"".join(self._chunks))
        self._spool.seek(0)
        return self._spool

    # -- the answer ----------------------------------------------------------------

    def respond(self, code: int, phrase: bytes, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        """Answer with C{body} whole (C{headers} without C{Content-Length}: it is set here)."""
        head = self._head(code, phrase, headers, len(body))
        if self.method != b"HEAD":
            head += body
            self.sent = len(body)
        self.connection.write(head)
        self.finish()

    def refuse(self, error: Refusal) -> None:
        """Answer with C{error} as the data port's JSON error."""
        status, headers, body = response_parts(error, "data")
        self.respond(status, status_phrase(status),
                     [(key, value) for key, value in headers if key != b"content-length"], body)

    def begin(self, code: int, phrase: bytes, headers: list[tuple[bytes, bytes]], length: int) -> None:
        """
        Write the head of an answer of C{length} bytes, whose body follows
        by L{write}: a client that stops reading it is closed after the
        idle timeout, as an idle one is.
        """
        self.connection.write(self._head(code, phrase, headers, length))
        self.connection.setTimeout(self.connection.port.idle_timeout)

    def write(self, data: bytes) -> None:
        if not self.gone and self.method != b"HEAD":
            self.sent += len(data)
            self.connection.write(data)

    def registerProducer(self, producer: IPushProducer, streaming: bool) -> None:
        self.connection.register_producer(producer, streaming)

    def unregisterProducer(self) -> None:
        self.connection.unregister_producer()

    def finish(self) -> None:
        """The answer is complete: the connection goes on to the next request."""
        if self.finished or self.gone:
            return
        self.finished = True
        self._drop_body()
        self._notify(None)
        self.connection.answered(self)

    def abort(self) -> None:
        """Close the connection (an answer cannot be completed)."""
        self.connection.abort()

    def notify_finish(self) -> Deferred[None]:
        """Fires when the answer is complete; fails if the client left first."""
        watcher: Deferred[None] = Deferred()
        self._watchers.append(watcher)
        return watcher

    def _head(self, code: int, phrase: bytes, headers: list[tuple[bytes, bytes]], length: int) -> bytes:
        self.code, self.started = code, True
        lines = [b"HTTP/1.1 %d %s\r\n" % (code, phrase)]
        lines += [b"%s: %s\r\n" % pair for pair in headers]
        lines.append(b"content-length: %d\r\ndate: %s\r\n" % (length, self.connection.date()))
        if not self.keep_alive or self.refusal is not None:
            lines.append(b"connection: close\r\n")
        lines.append(b"\r\n")
        return b"".join(lines)

    def _left(self, reason: Failure) -> None:
        """The client went away before the answer was complete."""
        self.gone = True
        self._drop_body()
        self._notify(reason)

    def _notify(self, result: Failure | None) -> None:
        watchers, self._watchers = self._watchers, []
        for watcher in watchers:
            if result is None:
                watcher.callback(None)
            else:
                watcher.errback(result)


class DataPort(ServerFactory):
    """
    The data port's listening side: what every connection shares.
    """

    noisy = False

    def __init__(self, reactor: IReactorTime, handle: Callable[[DataRequest], None],
                 refused: Callable[[DataRequest], None], gatekeeper: Gatekeeper, max_body_bytes: int,
                 scratch_dir: str | None = None, idle_timeout: float = 120.0,
                 peer_token: bytes | None = None, limit_name: str = "TURSO_MAX_BODY_BYTES") -> None:
        self.reactor = reactor
        #: Given each complete request in its turn; answers it.
        self.handle = handle
        #: Told of each request answered here, before it reached the handler.
        self.refused = refused
        self.gatekeeper = gatekeeper
        self.max_body_bytes = max_body_bytes
        #: The setting that caps bodies, named to a client whose body is too large.
        self.limit_name = limit_name
        #: Its connections come through TLS (set by whoever wraps it).
        self.tls = False
        self.scratch_dir = scratch_dir
        self.idle_timeout = idle_timeout
        #: On a cluster's internal listener: what every request must carry in
        #: C{PEER_TOKEN_HEADER} (it comes from another node), besides the
        #: client's own credentials.
        self.peer_token = peer_token
        #: Requests refused for their credentials.
        self.unauthorized = 0
        self._date = (-1, b"")

    def buildProtocol(self, addr: object) -> DataConnection:
        return DataConnection(self)

    def date(self) -> bytes:
        """The C{Date} header's value, made once a second."""
        now = int(self.reactor.seconds())
        if self._date[0] != now:
            self._date = (now, formatdate(now, usegmt=True).encode("ascii"))
        return self._date[1]


class DataConnection(TwistedProtocol, TimeoutMixin):
    """
    One client connection: parses its requests and hands them, one at a
    time, to the port's handler.
    """

    _log = Logger()

    def __init__(self, port: DataPort) -> None:
        self.port = port
        self.callLater = port.reactor.callLater  # type: ignore[assignment]  # TimeoutMixin's clock
        self._parser = httptools.HttpRequestParser(self)
        #: Complete requests; the first is being answered.
        self._queue: deque[DataRequest] = deque()
        #: The request being read (its head or its body).
        self._reading: DataRequest | None = None
        self._target: list[bytes] = []
        self._headers: list[tuple[bytes, bytes]] = []
        self._in_head = False
        self._in_message = False
        self._head_bytes = 0
        #: The namespace of the last request served here (set by the data plane).
        self.last_namespace: str | None = None
        #: Moved here from another data worker, its first request not served yet.
        self.moved_in = False
        #: Nothing more is read: a refusal or the last request is in the queue.
        self._closing = False
        self._paused = False
        self._closed = False

    def connectionMade(self) -> None:
        self.setTimeout(self.port.idle_timeout)

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        self.resetTimeout()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # The request before the upgrade is whole; nothing after it is HTTP/1.1.
            self._closing = True
        except httptools.HttpParserError as error:
            self._refuse_framing(error)
        if self._in_head and not self._closing:
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._refuse(HeadersTooLarge("headers_too_large",
                                             f"request line and headers exceed {MAX_HEAD_BYTES} bytes"))
        if self._closing or len(self._queue) >= PIPELINE_DEPTH:
            self._pause()

    # -- parser callbacks (llhttp calls these in order, perhaps many per read) ------------

    def on_message_begin(self) -> None:
        self._in_message = True
        self._target, self._headers = [], []
        self._in_head, self._head_bytes = True, 0

    def on_url(self, part: bytes) -> None:
        self._target.append(part)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._in_head = False
        if self._closing:
            return
        parser, port = self._parser, self.port
        method = parser.get_method()
        target = b"".join(self._target)
        length: int | None = 0
        authorization: list[bytes] = []
        expect = False
        peer_token = b""
        for name, value in self._headers:
            lowered = name.lower()
            if lowered == b"content-length":
                length = int(value)  # llhttp let through only one, all digits
            elif lowered == b"transfer-encoding":
                if value.strip().lower() != b"chunked":
                    return self._refuse(Invalid("bad_request", "only the chunked transfer coding is "
                                                "accepted"), method, target)
                length = None
            elif lowered == b"authorization":
                authorization.append(value)
            elif lowered == b"expect":
                expect = value.strip().lower() == b"100-continue"
            elif lowered == PEER_TOKEN_HEADER:
                peer_token = value
        if parser.get_http_version() not in ("1.1", "1.0"):
            return self._refuse(Invalid("bad_request", "only HTTP/1.0 and HTTP/1.1 are served"),
                                method, target)
        if port.peer_token is not None and not hmac.compare_digest(peer_token, port.peer_token):
            port.unauthorized += 1
            return self._refuse(Unauthorized("unauthorized", "this is a cluster's internal listener: it "
                                             "serves the cluster's nodes only (TURSO_CLUSTER_TOKEN)"),
                                method, target)
        try:
            if port.peer_token is not None and target.startswith(PEER_ONLY_PREFIX):
                # The cluster's own endpoints: the peer token is the credential.
                access = _NOTHING
            else:
                access = port.gatekeeper.admit(authorization, target)
        except Refusal as error:
            port.unauthorized += 1
            return self._refuse(error, method, target)
        if length is not None and length > port.max_body_bytes:
            return self._refuse(_too_large(port.max_body_bytes, port.limit_name), method, target)
        self._reading = DataRequest(self, method, target, self._headers, parser.should_keep_alive(), access)
        self._reading.http11 = parser.get_http_version() == "1.1"
        if expect and not self._queue and self.transport is not None:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, data: bytes) -> None:
        request = self._reading
        if request is None or self._closing:
            return
        if request.received + len(data) > self.port.max_body_bytes:
            request._drop_body()
            self._reading = None
            self._refuse(_too_large(self.port.max_body_bytes, self.port.limit_name), request.method,
                         request.target)
            return
        try:
            request._take(data, self.port.scratch_dir)
        except OSError as error:
            request._drop_body()
            self._reading = None
            refusal = from_os_error(error)
            if refusal is None:
                raise
            self._refuse(refusal, request.method, request.target)

    def on_message_complete(self) -> None:
        self._in_message = False
        request, self._reading = self._reading, None
        if request is None or self._closing:
            return
        if not request.keep_alive:
            self._closing = True
        self._enqueue(request)

    # -- turns ----------------------------------------------------------------------------

    def _refuse_framing(self, error: httptools.HttpParserError) -> None:
        if self._reading is not None:
            self._reading._drop_body()
            self._reading = None
        reason = str(error) or type(error).__name__
        self._refuse(Invalid("bad_request", f"malformed HTTP request: {reason}"))

    def _refuse(self, error: Refusal, method: bytes = b"-", target: bytes = b"-") -> None:
        """Answer C{error} in this request's turn, then close: nothing more is read."""
        if self._closing:
            return
        self._closing = True
        self._enqueue(DataRequest(self, method, target, [], False, _NOTHING, refusal=error))

    def _enqueue(self, request: DataRequest) -> None:
        self._queue.append(request)
        if len(self._queue) == 1:
            self._start(request)

    def _start(self, request: DataRequest) -> None:
        self.setTimeout(None)
        if request.refusal is not None:
            request.refuse(request.refusal)
            self.port.refused(request)
            return
        self.port.handle(request)

    def answered(self, request: DataRequest) -> None:
        """C{request}'s answer is written: the next one's turn, or close."""
        if self._closed or not self._queue or self._queue[0] is not request:
            return
        self._queue.popleft()
        if request.refusal is not None or not request.keep_alive:
            self.abort()
            return
        if self._queue:
            self._start(self._queue[0])
        elif not self._closing:
            self.setTimeout(self.port.idle_timeout)
        if self._paused and len(self._queue) < PIPELINE_DEPTH and not self._closing:
            self._paused = False
            self.transport.resumeProducing()  # type: ignore[union-attr]

    def _pause(self) -> None:
        if not self._paused and not self._closed:
            self._paused = True
            self.transport.pauseProducing()  # type: ignore[union-attr]

    # -- moving to another data worker ------------------------------------------------------

    def detachable(self, request: DataRequest, name: str) -> bool:
        """
        Whether the connection may move, with C{request}, to the data worker
        holding C{name}: nothing else is read or owed on it, and it is a
        client of that namespace (its first request, or one more for it).
        """
        return (not self._closed and not self._closing and not self._in_message and not self._paused
                and len(self._queue) == 1 and self._queue[0] is request and request.keep_alive
                and request.http11 and not request.started and self.last_namespace in (None, name))

    def detach(self) -> int:
        """Stop reading; a duplicate of the socket, for another worker to adopt."""
        self.transport.stopReading()  # type: ignore[union-attr]
        return os.dup(self.transport.fileno())  # type: ignore[union-attr]

    def reattach(self) -> None:
        """The move failed: read again."""
        if not self._closed:
            self.transport.startReading()  # type: ignore[union-attr]

    def hand_off(self, request: DataRequest) -> None:
        """The other worker has the connection: let go of it without closing it for the client."""
        request.handed_off = True
        request._drop_body()
        request.finished = True
        self._queue.clear()
        self._closed = True
        self.setTimeout(None)
        # Another process holds the socket now: close our descriptor only.
        self.transport._shouldShutdown = False  # type: ignore[union-attr]
        self.transport.loseConnection()  # type: ignore[union-attr]
        request._notify(None)

    # -- the transport --------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if not self._closed:
            self.resetTimeout()
            self.transport.write(data)  # type: ignore[union-attr]

    def register_producer(self, producer: IPushProducer, streaming: bool) -> None:
        self.transport.registerProducer(producer, streaming)  # type: ignore[union-attr]

    def unregister_producer(self) -> None:
        if not self._closed:
            self.transport.unregisterProducer()  # type: ignore[union-attr]

    def date(self) -> bytes:
        return self.port.date()

    def abort(self) -> None:
        """Close once what is written is sent (reading stops now)."""
        if not self._closed:
            self._closed = True
            self.transport.loseConnection()  # type: ignore[union-attr]

    def timeoutConnection(self) -> None:
        # Idle between requests, a head that never ends, or an answer the
        # client stopped reading: nothing is lost by closing.
        self._log.info("closing a data-port client idle for {seconds}s", seconds=self.port.idle_timeout)
        self.transport.abortConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._closed = True
        self.setTimeout(None)
        if self._reading is not None:
            self._reading._drop_body()
            self._reading = None
        queue, self._queue = self._queue, deque()
        for request in queue:
            if not request.finished:
                request._left(reason)


def _too_large(limit: int, name: str) -> TooLarge:
    return TooLarge("body_too_large", f"request body exceeds {name}={limit} bytes")


#: What a request refused before its credentials were checked opens: nothing.
_NOTHING = Access(frozenset(), frozenset())
