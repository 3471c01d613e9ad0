"""
Errors clients see: C{{"error": "<code>", "message": "<human text>"}}.

Everything that goes wrong on purpose is an L{ApiError}; anything else is a
bug, logged with its traceback and shown to the client only as C{internal}.
"""

from __future__ import annotations

import json
from http import HTTPStatus

import attrs
from twisted.web.iweb import IRequest


@attrs.frozen
class ApiError(Exception):
    status: int
    code: str
    message: str
    retry_after: float | None = None

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


def not_found(name: str) -> ApiError:
    return ApiError(404, "namespace_not_found", f"namespace {name!r} does not exist")


def error_body(code: str, message: str) -> bytes:
    return json.dumps({"error": code, "message": message}).encode("utf-8")


def status_phrase(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b"Error"


def write_error(request: IRequest, error: ApiError) -> None:
    """
    Answer C{request} with C{error}, unless an answer has begun already.
    """
    if request.startedWriting or request.finished or getattr(request, "_disconnected", False):
        return
    request.setResponseCode(error.status, status_phrase(error.status))
    request.setHeader(b"content-type", b"application/json")
    if error.retry_after is not None:
        request.setHeader(b"retry-after", str(max(1, round(error.retry_after))).encode())
    if error.status == 401:
        request.setHeader(b"www-authenticate", b'Bearer realm="turso-server"')
    body = error_body(error.code, error.message)
    request.setHeader(b"content-length", str(len(body)).encode())
    request.write(body)
    request.finish()


INTERNAL = ApiError(500, "internal", "internal error; the server log has details")
