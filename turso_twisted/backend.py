"""
Talking to one child over HTTP: the forwarded request and the relayed body.

The request body is complete in memory or a temp file before this module is
used (a slow client never holds a serial child); the child's answer is
streamed back to the client as it arrives.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from io import BytesIO
from typing import IO, Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, ResponseDone, readBody
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IRequest, IResponse

#: Headers that describe one hop, never forwarded either way (RFC 9110 7.6.1).
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te",
    b"trailer", b"trailers", b"transfer-encoding", b"upgrade", b"proxy-connection",
})

#: Request headers we set or must not pass: tokens never reach children.
_NOT_FORWARDED = HOP_BY_HOP | {b"authorization", b"host", b"content-length", b"expect"}


def end_to_end(headers: Headers, also_drop: frozenset[bytes] = HOP_BY_HOP) -> Headers:
    """
    A copy of C{headers} without hop-by-hop ones (and those the
    C{Connection} header names) or any in C{also_drop}.
    """
    named = set()
    for value in headers.getRawHeaders(b"connection", []):
        named.update(token.strip().lower() for token in value.split(b","))
    out = Headers()
    for key, values in headers.getAllRawHeaders():
        lowered = key.lower()
        if lowered in also_drop or lowered in named:
            continue
        out.setRawHeaders(key, values)
    return out


def make_agent(reactor: Any, connect_timeout: float = 5.0) -> Agent:
    """
    An agent for children: one fresh connection per request, since tursodb
    answers every request with C{Connection: close}.
    """
    pool = HTTPConnectionPool(reactor, persistent=False)
    pool._factory.noisy = False
    return Agent(reactor, connectTimeout=connect_timeout, pool=pool)


def send(agent: Agent, port: int, request: IRequest, target: bytes,
         body: IO[bytes]) -> Deferred[IResponse]:
    """
    Send C{request} to the child on C{port} as C{target} (path and query).
    """
    body.seek(0)
    headers = end_to_end(request.requestHeaders, _NOT_FORWARDED)
    producer = FileBodyProducer(body)
    return agent.request(request.method, b"http://127.0.0.1:%d%s" % (port, target), headers, producer)


class _Relay(Protocol):
    def __init__(self, request: IRequest, done: Deferred[None]) -> None:
        self.request = request
        self.done = done

    def dataReceived(self, data: bytes) -> None:
        if not self.request.finished and not getattr(self.request, "_disconnected", False):
            self.request.write(data)

    def connectionLost(self, reason: Failure) -> None:
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(None)
        else:
            self.done.errback(reason)


def relay(response: IResponse, request: IRequest) -> Deferred[None]:
    """
    Copy C{response}'s status, end-to-end headers and body onto C{request};
    fires when the whole body has been passed on.
    """
    request.setResponseCode(response.code, response.phrase)
    for key, values in end_to_end(response.headers).getAllRawHeaders():
        request.responseHeaders.setRawHeaders(key, values)
    # Twisted's client moves Content-Length out of the headers; put it back
    # so the client gets the child's framing, not a chunked re-encoding.
    if response.length is not UNKNOWN_LENGTH:
        request.setHeader(b"content-length", b"%d" % response.length)
    done: Deferred[None] = Deferred()
    response.deliverBody(_Relay(request, done))
    return done


def relay_transformed(response: IResponse, request: IRequest,
                      transform: Callable[[bytes], bytes]) -> Deferred[None]:
    """
    Like L{relay}, but the whole body is read, passed through C{transform}
    and sent with its new length.
    """
    request.setResponseCode(response.code, response.phrase)
    for key, values in end_to_end(response.headers).getAllRawHeaders():
        request.responseHeaders.setRawHeaders(key, values)

    def send_on(body: bytes) -> None:
        body = transform(body)
        request.setHeader(b"content-length", b"%d" % len(body))
        if not request.finished and not getattr(request, "_disconnected", False):
            request.write(body)

    return readBody(response).addCallback(send_on)


class ChildSQLError(Exception):
    """
    A child refused a statement we sent it ourselves (not a client's).
    """


async def pipeline(agent: Agent, port: int, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """
    Send Hrana C{requests} (C{execute} or C{batch}) to the child on C{port}
    and return their results.

    @raise ChildSQLError: if any statement failed.
    """
    body = json.dumps({"requests": requests}).encode("utf-8")
    response = await agent.request(b"POST", b"http://127.0.0.1:%d/v2/pipeline" % port,
                                   Headers({b"content-type": [b"application/json"]}),
                                   FileBodyProducer(BytesIO(body)))
    data = await readBody(response)
    if response.code != 200:
        raise ChildSQLError(f"status {response.code}: {data[:300].decode('utf-8', 'replace')}")
    results = json.loads(data)["results"]
    out = []
    for result in results:
        if result.get("type") != "ok":
            raise ChildSQLError(result.get("error", {}).get("message", "unknown error"))
        response_body = result["response"]
        if response_body.get("type") == "batch":
            errors = [e for e in response_body["result"].get("step_errors", []) if e]
            if errors:
                raise ChildSQLError(errors[0].get("message", "unknown error"))
        out.append(response_body.get("result", {}))
    return out


def execute(sql: str, args: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"type": "execute", "stmt": {"sql": sql, "args": args or [], "want_rows": True}}
