"""
Admin calls about another cluster node's names, made on that node.

Any node's admin API answers for the whole cluster: a call about a name
that another node owns goes to that node's internal listener (with the
cluster token), which makes it on its own admin port, where the admin
token is checked, and answers with what that port answered.  A relayed
call is never relayed again.

Bodies stream both ways under flow control, so a backup or a restore of
gigabytes holds one buffer in memory on each hop, not the file.
"""

from __future__ import annotations

import io
import typing
from typing import Any, BinaryIO, cast

import attrs
import treq
from treq.client import HTTPClient
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.ssl import CertificateOptions
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, ResponseDone
from twisted.web.iweb import UNKNOWN_LENGTH, IPolicyForHTTPS, IResponse
from zope.interface import implementer

from .cluster import Cluster, owner_unavailable
from .dataport import PEER_ONLY_PREFIX, PEER_TOKEN_HEADER, DataRequest
from .errors import NotFound, Refusal, Unavailable

#: Where relayed admin calls arrive on the internal listener.
PREFIX = PEER_ONLY_PREFIX + b"v1/admin"

#: Names the node that relayed a request or an admin call (one that is
#: relayed is never relayed again).
RELAYED_BY_HEADER = b"x-turso-relayed-by"

#: How long a relayed admin call may take to be answered (a delete waits
#: for requests in flight); a backup or a restore, which copies a whole
#: database before it answers, may take as long as a move's transfer.
ADMIN_TIMEOUT = 120.0
TRANSFER_TIMEOUT = 3600.0

#: The headers of an admin call that go along when it is relayed.
_CALL_HEADERS = frozenset({b"authorization", b"content-type"})
#: The headers of its answer that come back (the length is set by each hop).
_ANSWER_HEADERS = frozenset({b"content-type", b"retry-after", b"www-authenticate", b"content-disposition",
                             b"x-backup-sha256", b"x-backup-namespace-id"})


#: How long a relayed answer's body may pause (not paused by its reader) before it is given up.
BODY_IDLE_TIMEOUT = 120.0


def timeout_for(uri: bytes) -> float:
    """How long the call to C{uri} may take to be answered (those that copy a database: longer)."""
    path = uri.partition(b"?")[0]
    if path.endswith((b"/backup", b"/restore", b"/unarchive")) or b"/fork/" in path:
        return TRANSFER_TIMEOUT
    return ADMIN_TIMEOUT


class BodyStalled(Exception):
    """A relayed answer's body stopped coming (its sender hangs, or the path to it broke silently)."""


def answer_headers(response: IResponse) -> list[tuple[bytes, bytes]]:
    """The headers of C{response} that a relayed answer keeps."""
    return [(key.lower(), values[0]) for key, values in response.headers.getAllRawHeaders()
            if key.lower() in _ANSWER_HEADERS]


class Consumer(typing.Protocol):
    """Where a piped body goes: a twisted.web request, or a data port request."""

    def registerProducer(self, producer: IPushProducer, streaming: bool) -> None: ...

    def unregisterProducer(self) -> None: ...

    def write(self, data: bytes) -> None: ...


@implementer(IPushProducer)
class _Pipe(Protocol):
    """
    A response body, written on to a consumer as it comes and paused while
    the consumer is full; one that stops coming for C{idle} seconds while
    not paused is given up.
    """

    def __init__(self, consumer: Consumer, done: Deferred[None], clock: IReactorTime, idle: float) -> None:
        self.consumer, self.done, self.clock, self.idle = consumer, done, clock, idle
        self._timer: IDelayedCall | None = None
        self._stalled = False

    def connectionMade(self) -> None:
        # This stands between the consumer and the body's transport (a push producer).
        self.consumer.registerProducer(self, True)
        self._wait()

    def dataReceived(self, data: bytes) -> None:
        self._wait()
        self.consumer.write(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._stop_waiting()
        self.consumer.unregisterProducer()
        if reason.check(ResponseDone):
            self.done.callback(None)
        elif self._stalled:
            self.done.errback(BodyStalled(f"no byte came for {self.idle:g} s"))
        else:
            self.done.errback(reason)

    def pauseProducing(self) -> None:
        self._stop_waiting()
        self._producer().pauseProducing()

    def resumeProducing(self) -> None:
        self._wait()
        self._producer().resumeProducing()

    def stopProducing(self) -> None:
        self._stop_waiting()
        self._producer().stopProducing()

    def _producer(self) -> IPushProducer:
        return cast(IPushProducer, self.transport)

    def _wait(self) -> None:
        self._stop_waiting()
        self._timer = self.clock.callLater(self.idle, self._give_up)

    def _stop_waiting(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _give_up(self) -> None:
        self._timer, self._stalled = None, True
        self._producer().stopProducing()


class _Drop(Protocol):
    """A response body nobody will read: its connection is closed at once."""

    def connectionMade(self) -> None:
        cast(IPushProducer, self.transport).stopProducing()


def drop(response: IResponse) -> None:
    """Close C{response} unread (its reader left)."""
    response.deliverBody(_Drop())


def pipe(response: IResponse, consumer: Consumer, clock: IReactorTime,
         idle: float = BODY_IDLE_TIMEOUT) -> Deferred[None]:
    """
    Write C{response}'s body to C{consumer}; fires when it is all written,
    fails if it broke off, or (L{BodyStalled}) stopped coming for C{idle} seconds.
    """
    done: Deferred[None] = Deferred()
    response.deliverBody(_Pipe(consumer, done, clock, idle))
    return done


@implementer(IPolicyForHTTPS)
class _OwnAdminPort:
    """
    HTTPS to this node's own admin port, over loopback (the only HTTPS
    this client makes: peers are reached on their internal listeners): its
    certificate names the public host, not the loopback address, and it is
    this process's own.
    """

    def __init__(self) -> None:
        self._options = CertificateOptions(verify=False)

    def creatorForNetloc(self, hostname: bytes, port: int) -> CertificateOptions:
        return self._options


@attrs.define(eq=False)
class AdminRelay:
    """This node's side of relayed admin calls: sending them, and making those sent here."""

    reactor: IReactorTime
    cluster: Cluster
    token: str = attrs.field(repr=False)
    #: This node's own admin port, where calls sent here are made (set once bound).
    admin_url: str = ""
    http: Any = None
    _log = Logger()

    def __attrs_post_init__(self) -> None:
        if self.http is None:
            pool = HTTPConnectionPool(self.reactor, persistent=False)
            self.http = HTTPClient(Agent(self.reactor, contextFactory=_OwnAdminPort(), pool=pool))

    async def send(self, owner: str, method: bytes, uri: bytes, headers: dict[bytes, bytes],
                   body: BinaryIO | None = None) -> IResponse:
        """
        Make an admin call on node C{owner}; fire with its answer, whose
        body is still to be read (L{pipe} it, or read it whole).

        @raise Unavailable: (C{owner_unavailable}) if the node is not live or does not answer.
        """
        node = self.cluster.nodes.get(owner)
        if node is None:
            raise owner_unavailable(uri.decode("latin-1"), owner)
        sent = {PEER_TOKEN_HEADER: self.token.encode(), RELAYED_BY_HEADER: self.cluster.node.encode(),
                **{key: value for key, value in headers.items() if key in _CALL_HEADERS}}
        try:
            response = await self.http.request(method.decode(), f"{node.url}{PREFIX.decode()}{uri.decode()}",
                                               headers=sent, data=FileBodyProducer(body or io.BytesIO()),
                                               timeout=timeout_for(uri), unbuffered=True)
        except Exception as error:
            raise Unavailable("owner_unavailable", f"node {owner!r} did not answer: "
                              f"{error.__class__.__name__}", retry_after=5) from None
        return cast(IResponse, response)

    async def call(self, owner: str, method: bytes, uri: bytes,
                   headers: dict[bytes, bytes]) -> tuple[int, bytes]:
        """Make a small admin call on node C{owner}; fire with its status and body."""
        response = await self.send(owner, method, uri, headers)
        try:
            return response.code, await treq.content(response)
        except Exception as error:
            raise Unavailable("owner_unavailable", f"node {owner!r} broke off its answer: "
                              f"{error.__class__.__name__}", retry_after=5) from None

    # -- calls relayed here ----------------------------------------------------------

    def serve(self, request: DataRequest) -> None:
        """Make a call another node relayed here (the peer token was checked) on this node's admin port."""
        Deferred.fromCoroutine(self._serve(request)).addErrback(self._failed, request)

    async def _serve(self, request: DataRequest) -> None:
        if not self.admin_url:
            raise Unavailable("node_starting", "this node is starting", retry_after=1)
        uri = request.target[len(PREFIX):]
        if not uri.startswith(b"/v1/"):
            raise NotFound("not_found", "no such admin route")
        headers = {key.lower(): value for key, value in request.headers
                   if key.lower() in _CALL_HEADERS | {RELAYED_BY_HEADER}}
        response = await self.http.request(request.method.decode(), self.admin_url + uri.decode(),
                                           headers=headers, data=FileBodyProducer(request.body_file()),
                                           timeout=timeout_for(uri), unbuffered=True)
        kept = answer_headers(response)
        if response.length is UNKNOWN_LENGTH:
            request.respond(response.code, response.phrase or b"", kept, await treq.content(response))
            return
        request.begin(response.code, response.phrase or b"", kept, response.length)
        await pipe(response, request, self.reactor)
        request.finish()

    def _failed(self, failure: Failure, request: DataRequest) -> None:
        error = failure.value
        if not isinstance(error, Refusal):
            self._log.warn("a relayed admin call to {target} failed: {error}",
                           target=request.target.decode("latin-1"), error=f"{error.__class__.__name__}")
            error = Unavailable("admin_unavailable", "this node's admin port did not answer the relayed call",
                                retry_after=5)
        if request.started:
            request.abort()
        else:
            request.refuse(error)
