"""
The data port: C{/<namespace>/<rest>} is forwarded to that namespace's child
as C{/<rest>}.

Order of checks, so that nothing is created or touched on bad input: HTTP
framing, credentials and body cap (by the port, before the body is read;
see L{turso_twisted.dataport}), path and name (raw bytes, no decoding), then the
namespace lease, the history guard, and the child.  A request goes down
once (L{DataPlane._serve}) and its answer comes up once (L{DataPlane._respond});
what is learnt about it on the way is in one L{ProxiedRequest}.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from types import TracebackType
from typing import Any, BinaryIO, Protocol

import attrs
from twisted.internet import defer
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.error import ConnectError
from twisted.internet.interfaces import IReactorTime
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.protocols.basic import FileSender
from twisted.python.failure import Failure

from . import names
from .channel import (
    BackendChannel,
    BackendResponse,
    BackendTimeout,
    ChannelClosed,
    QueueFull,
    QueueTimeout,
    ResponseIncomplete,
)
from .cluster import OwnedElsewhere, owner_unavailable
from .dataport import PEER_TOKEN_HEADER, DataRequest
from .errors import (
    INTERNAL,
    Forbidden,
    Invalid,
    NotFound,
    Refusal,
    TimedOut,
    Unavailable,
    UpstreamFailed,
    from_os_error,
)
from .files import RunInThread
from .gate import PipelineVerdict, check_pipeline
from .leases import Lease
from .metrics import Metrics, request_kind
from .namespaces import NamespaceManager
from .policy import authorize
from .state import NamespaceRecord
from .syncproto import PIPELINE_PATH, PULL_PATH, HistoryGuard, MalformedSyncMessage, tag_outbound
from .tokens import Access, DataAuth

#: One line per proxied request (a module global: as a class attribute a
#: Logger would take the class's name).
_access_log = Logger(namespace="turso_twisted.access")

#: Answers larger than this are spooled to a file and streamed to the
#: client as it reads: a client that does not read holds a file, not memory.
SPOOL_AT = 256 * 1024

#: Pipeline bodies larger than this are checked by the gate in a thread.
GATE_INLINE_BYTES = 64 * 1024

#: How long a request waits for a dying child to be noticed before retrying.
DEATH_NOTICE_TIMEOUT = 2.0

#: Headers that describe one hop, never forwarded either way (RFC 9110 7.6.1).
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te",
    b"trailer", b"trailers", b"transfer-encoding", b"upgrade", b"proxy-connection",
})

#: Request headers we set or must not pass: tokens never reach children.
_NOT_FORWARDED = HOP_BY_HOP | {b"authorization", b"host", b"content-length", b"expect", PEER_TOKEN_HEADER}
#: Request headers a worker does not pass when it hands a request to another
#: (the credentials go along: they are checked there again).
HANDED_OVER_HEADERS_DROPPED = _NOT_FORWARDED - {b"authorization"}
#: Response headers we set ourselves.
_NOT_RETURNED = HOP_BY_HOP | {b"content-length"}


def _not_held(response: BackendResponse) -> bool:
    """A data worker's answer that it does not hold the namespace it was handed a request for."""
    return response.code == 503 and b'"namespace_moving"' in response.body[:200]


def split_target(uri: bytes) -> tuple[str, bytes]:
    """
    Split a request-target into the namespace and what the child gets.

    @raise Invalid: for anything that is not C{/<valid name>[/...]}.
    @raise NotFound: when the path names no namespace.
    """
    path, question, query = uri.partition(b"?")
    if not path.startswith(b"/"):
        raise Invalid("bad_request", "request target must be a path: /<namespace>/...")
    first, _, rest = path[1:].partition(b"/")
    if not first:
        raise NotFound("no_namespace", "no namespace in the path; use /<namespace>/...")
    try:
        name = names.validate(first)
    except names.InvalidName as error:
        raise Invalid("invalid_name", str(error)) from None
    return name, b"/" + rest + question + query


def end_to_end(headers: list[tuple[bytes, bytes]], also_drop: frozenset[bytes] = HOP_BY_HOP,
               ) -> list[tuple[bytes, bytes]]:
    """
    C{headers} without hop-by-hop ones (and those the C{Connection} header
    names) or any in C{also_drop}.
    """
    named: set[bytes] = set()
    for key, value in headers:
        if key.lower() == b"connection":
            named.update(token.strip().lower() for token in value.split(b","))
    return [(key, value) for key, value in headers
            if key.lower() not in also_drop and key.lower() not in named]


def _spool(path: str, body: bytes) -> BinaryIO:
    """
    Write C{body} to a new file at C{path} and return it open for reading,
    already unlinked.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    handle = os.fdopen(fd, "w+b")
    try:
        os.unlink(path)
        handle.write(body)
        handle.seek(0)
    except BaseException:
        handle.close()
        raise
    return handle


@attrs.define(eq=False)
class AnswerBudget:
    """Answer bytes waiting for clients that read slowly: what may wait, what does, refusals."""

    limit: int = 1 << 30
    held: int = 0
    refusals: int = 0


class HeldElsewhere(Exception):
    """Another data worker holds the namespace: the request goes to it."""

    def __init__(self, worker: int) -> None:
        super().__init__(worker)
        self.worker = worker


@attrs.frozen
class CreationProbe:
    """What a request would bring to a namespace it creates (see L{HistoryGuard.before_create})."""

    method: bytes
    path: bytes
    body: bytes
    pipeline: Any


class ChildLease(Protocol):
    """Permission to talk to a namespace's running child (released on leaving a C{with})."""

    @property
    def name(self) -> str: ...

    @property
    def channel(self) -> BackendChannel: ...

    def release(self) -> None: ...

    def __enter__(self) -> ChildLease: ...

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None: ...


class Traffic(Protocol):
    """Where requests are counted per namespace."""

    def count(self, name: str, received: int, sent: int) -> None: ...


class Namespaces(Protocol):
    """
    What the data plane needs of the namespaces: in one process, the
    manager's own (L{LocalNamespaces}); in a data worker, its view of the
    main process's (L{turso_twisted.worker}).
    """

    def admit(self, name: str, access: Access, writes: bool, probe: CreationProbe,
              here: bool = False) -> Deferred[ChildLease]:
        """
        Check C{access} against C{name}'s access rules, create C{name} if it
        may be, make sure its child runs, and lease it (C{here}: the request
        was moved or handed to this data worker, which takes the namespace
        if nobody holds it).

        @raise Refusal: for a request the namespace's rules, or its state, refuse.
        """

    def record(self, lease: ChildLease) -> NamespaceRecord:
        """The leased namespace's record."""

    def inbound(self, lease: ChildLease, method: bytes, path: bytes, body: bytes,
                pipeline: Any) -> Deferred[bytes]:
        """The body the child gets (see L{HistoryGuard.inbound})."""

    def ended(self, lease: ChildLease) -> Deferred[None]:
        """Fire once the leased child has ended, or after L{DEATH_NOTICE_TIMEOUT}."""

    def moved(self, name: str) -> None:
        """The worker said to hold C{name} did not serve a request handed to it."""


@attrs.define(eq=False)
class LocalNamespaces:
    """The namespaces of this process's own manager."""

    reactor: IReactorTime
    manager: NamespaceManager
    guard: HistoryGuard
    data_dir: str

    def admit(self, name: str, access: Access, writes: bool, probe: CreationProbe,
              here: bool = False) -> Deferred[ChildLease]:
        try:
            authorize(access, name, self.manager.get(name), writes, self.data_dir)
            if self.manager.get(name) is None:
                self.guard.before_create(name, probe.method, probe.path, probe.body, probe.pipeline)
        except Refusal as refusal:
            return fail(refusal)
        leased: Deferred[Any] = self.manager.lease(name)
        return leased

    def record(self, lease: ChildLease) -> NamespaceRecord:
        record = self.manager.get(lease.name)
        assert record is not None  # a lease is only given on a live namespace
        return record

    def inbound(self, lease: ChildLease, method: bytes, path: bytes, body: bytes,
                pipeline: Any) -> Deferred[bytes]:
        try:
            return succeed(self.guard.inbound(self.record(lease), method, path, body, pipeline))
        except Refusal as refusal:
            return fail(refusal)

    def moved(self, name: str) -> None:
        pass  # one process: nothing is handed over

    def ended(self, lease: ChildLease) -> Deferred[None]:
        assert isinstance(lease, Lease)
        ended: Deferred[Any] = lease.child.whenEnded()
        return ended.addTimeout(DEATH_NOTICE_TIMEOUT, self.reactor, onTimeoutCancel=lambda *_: None)


@attrs.define(eq=False)
class ProxiedRequest:
    """
    What the data port learns about one request on its way down and up.
    """

    started: float
    received: int
    namespace: str | None = None
    path: bytes = b""
    #: Its turn in the child's channel, while it waits or is answered.
    waiting: Deferred[BackendResponse] | None = None
    upstream_seconds: float = 0.0


class DataPlane:
    """
    What the data port does with a request: every path is a namespace route.
    """

    _log = Logger()

    def __init__(self, reactor: IReactorTime, namespaces: Namespaces, stats: Traffic | None,
                 metrics: Metrics | None = None, access_log: bool = True,
                 run_in_thread: RunInThread = deferToThread, scratch_dir: str | None = None,
                 budget: AnswerBudget | None = None, auth: DataAuth | None = None,
                 forward: Callable[[int, DataRequest], Deferred[BackendResponse]] | None = None,
                 migrate: Callable[[int, DataRequest], Deferred[bool]] | None = None,
                 takes_over: bool = False,
                 relay: Callable[[OwnedElsewhere, DataRequest], Deferred[BackendResponse]] | None = None,
                 ) -> None:
        self.reactor = reactor
        self.namespaces = namespaces
        #: Where traffic is counted per namespace (None: not here).
        self.stats = stats
        self.metrics = metrics
        self.access_log = access_log
        self.run_in_thread = run_in_thread
        #: Where large answers wait for slow clients (None: in memory).
        self.scratch_dir = scratch_dir
        #: The budget of answer bytes held for clients (shared by the planes of a process).
        self.budget = budget or AnswerBudget()
        self.rejected = 0
        #: The data port's credentials check, made again once a body is in.
        self.auth = auth
        #: Requests refused by a namespace's access rules, by error code.
        self.forbidden: dict[str, int] = {}
        #: How a data worker hands a request to the worker holding its namespace,
        #: and a whole connection (fires with whether it could).
        self.forward = forward
        self.migrate = migrate
        #: How a cluster node sends a request to the node that owns its namespace.
        self.relay = relay
        #: Requests relayed to other nodes.
        self.relayed = 0
        #: Serves requests other data workers handed over (they go no further).
        self.takes_over = takes_over
        #: Client connections moved to, and requests handed over to, other workers.
        self.moved = 0
        self.handed = 0
        #: Requests being served, and who waits for there to be none.
        self.in_flight = 0
        self._idle: list[Deferred[None]] = []

    def handle(self, request: DataRequest) -> None:
        """Serve C{request}, complete with its body, and answer it."""
        info = ProxiedRequest(self.reactor.seconds(), request.received)
        self.in_flight += 1
        request.notify_finish().addBoth(self._finished, request, info)
        done = Deferred.fromCoroutine(self._serve(request, info))
        done.addErrback(self._failed, request)

    # -- down ------------------------------------------------------------------

    async def _serve(self, request: DataRequest, info: ProxiedRequest) -> None:
        name, target = split_target(request.target)
        info.namespace, info.path = name, target.partition(b"?")[0]
        body = request.body
        verdict = await self._check_route(info.path, body)
        pipeline = None if verdict is None else verdict.document
        if self.auth is not None:
            # The body took its time: expiry and revocation are checked again.
            self.auth.confirm(request.access, name)
        writes = verdict is not None and "write" in verdict.kinds
        probe = CreationProbe(request.method, info.path, body, pipeline)
        # Moved or handed here already: no further.
        here = self.takes_over or request.connection.moved_in
        request.connection.moved_in = False
        for attempt in (1, 2):
            try:
                lease = await self.namespaces.admit(name, request.access, writes, probe, here)
            except Forbidden as refusal:
                self.forbidden[refusal.code] = self.forbidden.get(refusal.code, 0) + 1
                raise
            except OwnedElsewhere as owner:
                await self._relay(owner, request, info, name, writes)
                return
            except HeldElsewhere as elsewhere:
                if (self.migrate is not None and request.connection.detachable(request, name)
                        and await self.migrate(elsewhere.worker, request)):
                    self.moved += 1
                    return  # that worker serves the connection now, this request first
                self.handed += 1
                if not await self._hand_over(elsewhere.worker, request, info, name, writes, attempt):
                    continue
                return
            if self.budget.held > self.budget.limit:
                lease.release()
                self.budget.refusals += 1
                raise Unavailable("answers_held",
                                  "too many answers wait for clients that are not reading them "
                                  "(TURSO_MAX_HELD_BYTES); retry shortly", retry_after=5)
            with lease:
                try:
                    history, response = await self._exchange(lease, request, info, target, body, pipeline)
                except (ConnectError, ChannelClosed, ResponseIncomplete) as error:
                    # Nothing reached the child (or only a read did), so a retry
                    # cannot duplicate a write: the child is gone or going; wait
                    # until that is done.
                    # A read can be sent again whatever the dead child saw of it.
                    if attempt == 2 or (isinstance(error, ResponseIncomplete) and writes):
                        raise self._upstream_error(name, request, error) from None
                    response = None
                except CancelledError:
                    return  # the client went away
            if response is None:
                await self.namespaces.ended(lease)
                continue
            self._respond(request, info, history, response)
            return

    async def _hand_over(self, worker: int, request: DataRequest, info: ProxiedRequest, name: str,
                         writes: bool, attempt: int) -> bool:
        """
        Serve a request through the data worker that holds its namespace;
        C{False} when it should be tried again (that worker went away
        before it had the request).
        """
        if self.forward is None:
            raise Unavailable("namespace_moving", f"namespace {name!r} is changing hands between data "
                              "workers; retry shortly", retry_after=1)
        began = self.reactor.seconds()
        try:
            info.waiting = self.forward(worker, request)
            response = await info.waiting
        except (ConnectError, ResponseIncomplete) as error:
            self.namespaces.moved(name)
            if attempt == 2 or (isinstance(error, ResponseIncomplete) and writes):
                raise self._upstream_error(name, request, error) from None
            return False
        except CancelledError:
            return True  # the client went away
        if attempt == 1 and _not_held(response):
            # That worker gave it back meanwhile: ask again who holds it.
            self.namespaces.moved(name)
            return False
        info.upstream_seconds = self.reactor.seconds() - began
        self._respond(request, info, None, response)
        return True

    async def _relay(self, owner: OwnedElsewhere, request: DataRequest, info: ProxiedRequest, name: str,
                     writes: bool) -> None:
        """
        Serve a request through the cluster node that owns its namespace
        (one hop: that node serves it, or refuses it, but never sends it on).
        """
        if self.relay is None:
            raise owner_unavailable(name, owner.node)
        self.relayed += 1
        began = self.reactor.seconds()
        try:
            info.waiting = self.relay(owner, request)
            response = await info.waiting
        except ConnectError:
            raise owner_unavailable(name, owner.node) from None
        except ResponseIncomplete as error:
            raise self._upstream_error(name, request, error) from None
        except defer.TimeoutError:
            raise TimedOut("owner_timeout", f"namespace {name!r}: node {owner.node!r}, which serves it, did "
                           "not answer in time") from None
        except CancelledError:
            return  # the client went away
        info.upstream_seconds = self.reactor.seconds() - began
        self._respond(request, info, None, response)

    async def _exchange(self, lease: ChildLease, request: DataRequest, info: ProxiedRequest, target: bytes,
                        body: bytes, pipeline: Any) -> tuple[str, BackendResponse]:
        """
        Send the request to the leased child; return the history it was
        served from and the child's answer.
        """
        history = self.namespaces.record(lease).history
        began = self.reactor.seconds()
        try:
            sent = await self.namespaces.inbound(lease, request.method, info.path, body, pipeline)
            headers = end_to_end(request.headers, _NOT_FORWARDED)
            info.waiting = lease.channel.request(request.method, target, headers, sent)
            response = await info.waiting
        except BackendTimeout as error:
            raise TimedOut("backend_timeout",
                           f"namespace {lease.name!r}: its tursodb child gave {error}; it was restarted "
                           "(a long query needs a larger TURSO_BACKEND_TIMEOUT)") from None
        except (QueueFull, QueueTimeout) as error:
            self.rejected += 1
            raise Unavailable("namespace_busy", f"namespace {lease.name!r} is overloaded: {error}",
                              retry_after=1) from None
        except (ConnectError, ChannelClosed, ResponseIncomplete, CancelledError, Refusal):
            raise
        except Exception as error:
            raise self._upstream_error(lease.name, request, error) from None
        info.upstream_seconds = self.reactor.seconds() - began
        return history, response

    async def _check_route(self, path: bytes, body: bytes) -> PipelineVerdict | None:
        """
        What a child may be sent: a request without a body (it can carry no
        SQL: a CORS preflight, say), a pull, or a pipeline whose every
        statement the gate lets through, checked before any namespace is
        touched.  Returns the gate's verdict on a pipeline (or C{None}).

        @raise Forbidden: for a statement the gate refuses.
        @raise Invalid: for a pipeline body the child would not accept.
        @raise NotFound: for a body sent to any other path.
        """
        if not body:
            return None
        if path == PIPELINE_PATH:
            if len(body) > GATE_INLINE_BYTES:
                # A large body is checked off the reactor: other tenants'
                # requests go on meanwhile (the gate's work is bounded too).
                verdict = await self.run_in_thread(check_pipeline, body)
            else:
                verdict = check_pipeline(body)
            return verdict
        if path != PULL_PATH:
            raise NotFound("no_such_route", "only /v2/pipeline and /pull-updates take a request body")
        return None

    # -- up --------------------------------------------------------------------

    def _respond(self, request: DataRequest, info: ProxiedRequest, history: str | None,
                 response: BackendResponse) -> None:
        """
        Give the client the child's status, end-to-end headers and body (a
        pull's revision tagged with its history; C{None}: the answer came
        from another data worker, which tagged it).
        """
        assert info.namespace is not None
        body = response.body
        if history is not None:
            try:
                body = tag_outbound(history, request.method, info.path, response.code, body)
            except MalformedSyncMessage as error:
                raise self._upstream_error(info.namespace, request, error) from None
        if request.gone or request.finished:
            return
        headers = end_to_end(response.headers, _NOT_RETURNED)
        if len(body) <= SPOOL_AT or self.scratch_dir is None:
            request.respond(response.code, response.phrase, headers, body)
            return
        request.begin(response.code, response.phrase, headers, len(body))
        self._send_spooled(request, info, body).addErrback(self._failed, request)

    def _send_spooled(self, request: DataRequest, info: ProxiedRequest, body: bytes) -> Deferred[None]:
        """
        Stream a large answer from a file, as fast as the client reads it:
        the file waits in the scratch dir (unlinked: it goes when closed),
        counted against the budget of bytes held for clients until sent.
        """
        size = len(body)
        self.budget.held += size
        path = os.path.join(self.scratch_dir or "", f"answer-{uuid.uuid4().hex}")
        # The answer's bytes are kept by nothing once they are in the file:
        # not the request's turn, not this closure.
        info.waiting = None
        pending = [body]
        del body

        async def send() -> None:
            try:
                handle = await self.run_in_thread(_spool, path, pending.pop())
            except BaseException:
                self.budget.held -= size
                raise
            try:
                await FileSender().beginFileTransfer(handle, request)
            except Exception:
                return  # the client went away; its connection is gone
            finally:
                handle.close()
                self.budget.held -= size
            request.finish()

        return Deferred.fromCoroutine(send())

    def _failed(self, failure: Failure, request: DataRequest) -> None:
        if failure.check(CancelledError):
            return  # the client went away
        if request.started:
            if not failure.check(Refusal):
                self._log.failure("unexpected error while relaying a response", failure)
            request.abort()
            return
        error = failure.value
        if not isinstance(error, Refusal):
            refusal = from_os_error(error)
            if refusal is None:
                self._log.failure("unexpected error serving a data request", failure)
                error = INTERNAL
            else:
                self._log.warn("data request refused: {error}", error=str(error))
                error = refusal
        if request.gone or request.finished:
            return
        request.refuse(error)

    def _finished(self, result: object, request: DataRequest, info: ProxiedRequest) -> None:
        """
        Count the request and write its access-log line (never a header:
        the token stays out of the log).  A client that went away while its
        request waited in the child's queue takes it out of the queue (only
        that: a child being started for it is started all the same).
        """
        if isinstance(result, Failure) and info.waiting is not None and not info.waiting.called:
            info.waiting.cancel()
        self.in_flight -= 1
        if request.handed_off:
            # Counted and logged by the worker it went to.
            self._wake_idle()
            return
        if info.namespace is not None:
            request.connection.last_namespace = info.namespace
        status = 499 if request.gone else request.code  # 499: the client left
        self._account(request.method, request.target, info, status, request.sent)
        self._wake_idle()

    def _wake_idle(self) -> None:
        if not self.in_flight:
            idle, self._idle = self._idle, []
            for waiter in idle:
                waiter.callback(None)

    def idle(self) -> Deferred[None]:
        """Fires once no request is being served."""
        waiter: Deferred[None] = Deferred()
        if self.in_flight:
            self._idle.append(waiter)
        else:
            waiter.callback(None)
        return waiter

    def refused_at_headers(self, request: DataRequest) -> None:
        """
        Count and log a request the port answered before it got here (bad
        framing, a missing token, a body over the cap), as any other.
        """
        self._account(request.method, request.target, ProxiedRequest(self.reactor.seconds(), 0),
                      request.code, request.sent)

    def _account(self, method: bytes, target: bytes, info: ProxiedRequest, status: int, sent: int) -> None:
        seconds = self.reactor.seconds() - info.started
        if self.metrics is not None:
            self.metrics.observe(request_kind(info.path), status, seconds, info.received, sent)
        if info.namespace is not None and self.stats is not None:
            self.stats.count(info.namespace, info.received, sent)
        if self.access_log:
            _access_log.info(
                "{method} {path} {status}", namespace=info.namespace,
                method=method.decode("latin-1"),
                path=target.partition(b"?")[0].decode("latin-1")[:512], status=status,
                bytes_in=info.received, bytes_out=sent, duration_ms=round(seconds * 1000, 3),
                upstream_ms=round(info.upstream_seconds * 1000, 3))

    def _upstream_error(self, name: str, request: DataRequest, error: Exception) -> UpstreamFailed:
        reasons = getattr(error, "reasons", None)
        message = "; ".join(r.getErrorMessage() for r in reasons) if reasons else str(error)
        self._log.warn("upstream error from namespace {name}: {err}", name=name,
                       path=request.target.partition(b"?")[0].decode("latin-1")[:512], err=message)
        return UpstreamFailed("upstream_error",
                              f"namespace {name!r}: its tursodb child did not answer; retry the request")
