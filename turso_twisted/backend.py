"""
Requests to a child and answers back: what crosses the proxy, and the SQL
the daemon sends on its own.

The request body is complete in memory or a temp file before this module is
used (a slow client never holds a serial child).  Everything goes through
the child's L{BackendChannel}.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred
from twisted.web.http_headers import Headers
from twisted.web.iweb import IRequest

from .channel import BackendChannel, BackendResponse

#: Headers that describe one hop, never forwarded either way (RFC 9110 7.6.1).
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te",
    b"trailer", b"trailers", b"transfer-encoding", b"upgrade", b"proxy-connection",
})

#: Request headers we set or must not pass: tokens never reach children.
_NOT_FORWARDED = HOP_BY_HOP | {b"authorization", b"host", b"content-length", b"expect"}
#: Response headers we set ourselves.
_NOT_RETURNED = HOP_BY_HOP | {b"content-length"}


def end_to_end(headers: list[tuple[bytes, bytes]], also_drop: frozenset[bytes] = HOP_BY_HOP,
               ) -> list[tuple[bytes, bytes]]:
    """
    C{headers} without hop-by-hop ones (and those the C{Connection} header
    names) or any in C{also_drop}.
    """
    named = set()
    for key, value in headers:
        if key.lower() == b"connection":
            named.update(token.strip().lower() for token in value.split(b","))
    return [(key, value) for key, value in headers
            if key.lower() not in also_drop and key.lower() not in named]


def _pairs(headers: Headers) -> list[tuple[bytes, bytes]]:
    return [(key, value) for key, values in headers.getAllRawHeaders() for value in values]


def forward(channel: BackendChannel, request: IRequest, target: bytes,
            body: bytes) -> Deferred[BackendResponse]:
    """
    Send C{request} to the child as C{target} (path and query) with C{body}.
    """
    headers = end_to_end(_pairs(request.requestHeaders), _NOT_FORWARDED)
    return channel.request(request.method, target, headers, body)


def respond(request: IRequest, response: BackendResponse, body: bytes | None = None) -> None:
    """
    Give the client the child's status, end-to-end headers and body (or
    C{body}, when the proxy rewrote it).
    """
    body = response.body if body is None else body
    request.setResponseCode(response.code, response.phrase)
    for key, value in end_to_end(response.headers, _NOT_RETURNED):
        request.responseHeaders.addRawHeader(key, value)
    request.setHeader(b"content-length", b"%d" % len(body))
    if not request.finished and not getattr(request, "_disconnected", False):
        request.write(body)


class ChildSQLError(Exception):
    """
    A child refused a statement we sent it ourselves (not a client's).
    """


async def pipeline(channel: BackendChannel, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """
    Send Hrana C{requests} (C{execute} or C{batch}) to the child and return
    their results.

    @raise ChildSQLError: if any statement failed.
    """
    body = json.dumps({"requests": requests}).encode("utf-8")
    response = await channel.request(b"POST", b"/v2/pipeline",
                                     [(b"Content-Type", b"application/json")], body)
    if response.code != 200:
        raise ChildSQLError(f"status {response.code}: {response.body[:300].decode('utf-8', 'replace')}")
    out = []
    for result in json.loads(response.body)["results"]:
        if result.get("type") != "ok":
            raise ChildSQLError(result.get("error", {}).get("message", "unknown error"))
        answer = result["response"]
        if answer.get("type") == "batch":
            errors = [e for e in answer["result"].get("step_errors", []) if e]
            if errors:
                raise ChildSQLError(errors[0].get("message", "unknown error"))
        out.append(answer.get("result", {}))
    return out


def execute(sql: str, args: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"type": "execute", "stmt": {"sql": sql, "args": args or [], "want_rows": True}}
