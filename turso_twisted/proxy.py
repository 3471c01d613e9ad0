"""
The data port: C{/<namespace>/<rest>} is forwarded to that namespace's child
as C{/<rest>}.

Order of checks, so that nothing is created or touched on bad input: whole
body read (with a size cap), bearer token, path and name (raw bytes, no
decoding), then the namespace lease, then the child.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.internet.error import ConnectError
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import Request
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from . import names
from .auth import check_bearer
from .backend import forward, respond
from .channel import ChannelClosed, QueueFull, QueueTimeout
from .errors import INTERNAL, ApiError, write_error
from .metrics import Metrics, request_kind
from .namespaces import NamespaceManager
from .syncproto import (
    MalformedSyncMessage,
    StaleReplica,
    pushing_clients,
    tag_pull_response,
    untag_pull_request,
)

#: One line per proxied request (a module global: as a class attribute a
#: Logger would take the class's name).
_access_log = Logger(namespace="turso_twisted.access")

#: How long a request waits for a dying child to be noticed before retrying.
DEATH_NOTICE_TIMEOUT = 2.0


def split_target(uri: bytes) -> tuple[str, bytes]:
    """
    Split a request-target into the namespace and what the child gets.

    @raise ApiError: 400 for anything that is not C{/<valid name>[/...]}.
    """
    path, question, query = uri.partition(b"?")
    if not path.startswith(b"/"):
        raise ApiError(400, "bad_request", "request target must be a path: /<namespace>/...")
    first, _, rest = path[1:].partition(b"/")
    if not first:
        raise ApiError(404, "no_namespace", "no namespace in the path; use /<namespace>/...")
    try:
        name = names.validate(first)
    except names.InvalidName as error:
        raise ApiError(400, "invalid_name", str(error)) from None
    return name, b"/" + rest + question + query


class DataPlane(Resource):
    """
    The data port's only resource: every path is a namespace route.
    """

    isLeaf = True
    _log = Logger()

    def __init__(self, reactor: Any, manager: NamespaceManager, auth_token: str,
                 metrics: Metrics | None = None, access_log: bool = True) -> None:
        super().__init__()
        self.reactor = reactor
        self.manager = manager
        self.auth_token = auth_token
        self.metrics = metrics
        self.access_log = access_log
        self.rejected = 0

    def render(self, request: Request) -> Any:
        started = self.reactor.seconds()
        content = request.content
        received = content.seek(0, 2) if content is not None else 0
        request.notifyFinish().addBoth(self._finished, request, started, received)
        done = ensureDeferred(self._serve(request))
        done.addErrback(self._failed, request)
        return NOT_DONE_YET

    def _finished(self, result: object, request: Request, started: float, received: int) -> None:
        """
        Count the request and write its access-log line (never a header:
        the token stays out of the log).  A client that went away while its
        request waited in the child's queue takes it out of the queue (only
        that: a child being started for it is started all the same).
        """
        waiting = getattr(request, "turso_waiting", None)
        if isinstance(result, Failure) and waiting is not None and not waiting.called:
            waiting.cancel()
        seconds = self.reactor.seconds() - started
        path = request.path.partition(b"?")[0]
        name = getattr(request, "turso_namespace", None)
        target = getattr(request, "turso_target", b"")
        kind = request_kind(target)
        gone = getattr(request, "_disconnected", False) and not request.finished
        status = 499 if gone else request.code  # 499: the client went away first
        sent = getattr(request, "sentLength", 0)
        if self.metrics is not None:
            self.metrics.observe(kind, status, seconds, received, sent)
        if name is not None:
            self.manager.count_usage(name, received, sent)
        if self.access_log:
            _access_log.info(
                "request", namespace=name, method=request.method.decode("latin-1"),
                path=path.decode("latin-1")[:512], status=status, bytes_in=received, bytes_out=sent,
                duration_ms=round(seconds * 1000, 3),
                upstream_ms=round(getattr(request, "turso_upstream", 0.0) * 1000, 3))

    def _failed(self, failure: Failure, request: Request) -> None:
        if failure.check(CancelledError):
            return  # the client went away
        if request.startedWriting:
            if not failure.check(ApiError):
                self._log.failure("unexpected error while relaying a response", failure)
            request.loseConnection()
            return
        # Headers copied from a child's answer must not leak into an error.
        request.responseHeaders = Headers()
        if failure.check(ApiError):
            write_error(request, failure.value)
            return
        self._log.failure("unexpected error serving a data request", failure)
        write_error(request, INTERNAL)

    async def _serve(self, request: Request) -> None:
        check_bearer(request, self.auth_token)
        name, target = split_target(request.uri)
        path = target.partition(b"?")[0]
        request.turso_namespace = name
        request.turso_target = path
        is_pull = request.method == b"POST" and path == b"/pull-updates"
        for attempt in (1, 2):
            lease = await self.manager.lease(name)
            history = self.manager.state.records[name].history
            try:
                body = self._checked_body(lease.name, path, is_pull, request)
                sent_at = self.reactor.seconds()
                request.turso_waiting = forward(lease.child.channel, request, target, body)
                response = await request.turso_waiting
                request.turso_upstream = self.reactor.seconds() - sent_at
            except (ConnectError, ChannelClosed) as error:
                # Nothing reached the child, so a retry cannot duplicate a
                # write: the child is gone or going; wait until that is done.
                lease.release()
                if attempt == 2:
                    raise self._upstream_error(name, request, error) from None
                await self._death_noticed(lease.child.ended)
                continue
            except CancelledError:
                lease.release()
                return
            except (QueueFull, QueueTimeout) as error:
                lease.release()
                self.rejected += 1
                raise ApiError(503, "namespace_busy", f"namespace {name!r} is overloaded: {error}",
                               retry_after=1) from None
            except ApiError:
                lease.release()
                raise
            except Exception as error:
                lease.release()
                raise self._upstream_error(name, request, error) from None
            lease.release()
            try:
                if is_pull and response.code == 200:
                    respond(request, response, tag_pull_response(response.body, history))
                else:
                    respond(request, response)
            except MalformedSyncMessage as error:
                raise self._upstream_error(name, request, error) from None
            if not request.finished and not getattr(request, "_disconnected", False):
                request.finish()
            return

    def _checked_body(self, name: str, path: bytes, is_pull: bool, request: Request) -> bytes:
        """
        The body to send, read once: a pull's revisions untagged (refusing
        another history's), a push checked against retired replicas.
        """
        request.content.seek(0)
        body = request.content.read()
        if is_pull:
            try:
                return untag_pull_request(body, self.manager.state.records[name].history, name)
            except StaleReplica as error:
                raise ApiError(409, "stale_replica", str(error)) from None
            except MalformedSyncMessage as error:
                raise ApiError(400, "bad_request", f"malformed pull-updates request: {error}") from None
        if path == b"/v2/pipeline":
            clients = pushing_clients(body)
            if clients:
                self.manager.check_pushing_clients(name, clients)
        return body

    def _death_noticed(self, ended: Deferred[Any]) -> Deferred[None]:
        """
        Fire once C{ended} has fired, or after L{DEATH_NOTICE_TIMEOUT}.
        """
        noticed: Deferred[None] = Deferred()

        def fire(result: Any) -> Any:
            if not noticed.called:
                noticed.callback(None)
            return result

        ended.addBoth(fire)
        noticed.addTimeout(DEATH_NOTICE_TIMEOUT, self.reactor, onTimeoutCancel=lambda *_: None)
        return noticed

    def _upstream_error(self, name: str, request: Request, error: Exception) -> ApiError:
        reasons = getattr(error, "reasons", None)
        message = "; ".join(r.getErrorMessage() for r in reasons) if reasons else str(error)
        self._log.warn("upstream error", name=name, path=request.path.decode("latin-1"), err=message)
        return ApiError(502, "upstream_error",
                        f"namespace {name!r}: its tursodb child did not answer; retry the request")
