"""
Errors clients see: C{{"error": "<code>", "message": "<human text>"}}.

Lower layers raise a L{Refusal} of the kind that says what went wrong (not
found, exists, limit reached, unavailable...), with a code and a message for
the client; they never pick an HTTP status.  The edges (the data port, the
admin API, the body cap) turn a refusal into a response with L{render},
choosing the status from L{STATUS}.  Anything else that goes wrong is a bug,
logged with its traceback and shown to the client only as L{INTERNAL}.
"""

from __future__ import annotations

import errno
import json
from http import HTTPStatus
from typing import Any, Literal

from twisted.web.iweb import IRequest

#: Which port answers: the data port and the admin port differ on one kind.
Edge = Literal["data", "admin"]


class Refusal(Exception):
    """
    A request refused on purpose; C{code} and C{message} go to the client.
    """

    def __init__(self, code: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message
        self.retry_after = retry_after

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class Invalid(Refusal):
    """The request itself is malformed or names something impossible."""


class Unauthorized(Refusal):
    """No credentials, or credentials we do not accept."""


class Forbidden(Refusal):
    """Good credentials that do not allow this."""


class NotFound(Refusal):
    """What the request names does not exist."""


class NotAllowed(Refusal):
    """The route exists, the method does not."""


class Conflict(Refusal):
    """The request contradicts what exists (exists already, another namespace's data)."""


class TooLarge(Refusal):
    """The request body is over a limit."""


class HeadersTooLarge(Refusal):
    """The request line and headers are over the limit."""


class Unprocessable(Refusal):
    """The request's content is unusable (not SQLite, damaged, tampered with)."""


class LimitReached(Refusal):
    """A configured cap (TURSO_MAX_NAMESPACES) is reached."""


class Unavailable(Refusal):
    """Cannot be done now; C{retry_after} says when to try again."""


class InsufficientStorage(Refusal):
    """The data dir is out of space."""


class UpstreamFailed(Refusal):
    """A child did not answer."""


class TimedOut(Refusal):
    """A child did not answer in time."""


class Failed(Refusal):
    """The server could not do what was asked, through no fault of the client."""


#: The status of each kind of refusal.
STATUS: dict[type[Refusal], int] = {
    Invalid: 400,
    Unauthorized: 401,
    Forbidden: 403,
    NotFound: 404,
    NotAllowed: 405,
    Conflict: 409,
    TooLarge: 413,
    HeadersTooLarge: 431,
    Unprocessable: 422,
    # An admin asked for something the cap forbids; a data client that
    # auto-provisions meets it as a passing condition (see L{status_for}).
    LimitReached: 409,
    Failed: 500,
    UpstreamFailed: 502,
    TimedOut: 504,
    Unavailable: 503,
    InsufficientStorage: 507,
}

#: Where the data port answers differently.
_DATA_STATUS: dict[type[Refusal], int] = {LimitReached: 503}

#: The realm a 401 names, per port.
_REALM = {"data": b'Bearer realm="turso-server"', "admin": b'Bearer realm="turso-server-admin"'}


def refusal_to_json(error: Refusal) -> dict[str, Any]:
    """A refusal as JSON, to cross a process boundary (see L{refusal_from_json})."""
    return {"kind": type(error).__name__, "code": error.code, "message": error.message,
            "retry_after": error.retry_after}


def refusal_from_json(data: dict[str, Any]) -> Refusal:
    kinds: dict[str, type[Refusal]] = {kind.__name__: kind for kind in (*STATUS, Refusal)}
    kind = kinds.get(str(data.get("kind")), Failed)
    retry_after = data.get("retry_after")
    return kind(str(data["code"]), str(data["message"]),
                retry_after=None if retry_after is None else float(retry_after))


def out_of_space() -> InsufficientStorage:
    return InsufficientStorage("insufficient_storage",
                               "the data dir is out of space; nothing was changed", retry_after=30)


def from_os_error(error: BaseException | None) -> Refusal | None:
    """
    The refusal a failed write to the data dir means for a client (a full
    or read-only volume is the operator's to fix, not a bug), or C{None}
    for any other error.  Whatever failed was rolled back by its caller.
    """
    if not isinstance(error, OSError):
        return None
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return out_of_space()
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return Unavailable("data_dir_not_writable",
                           "the data dir is not writable; nothing was changed", retry_after=30)
    return None


def not_found(name: str) -> NotFound:
    return NotFound("namespace_not_found", f"namespace {name!r} does not exist")


def status_for(error: Refusal, edge: Edge = "admin") -> int:
    kind = type(error)
    for cls in kind.__mro__:
        if edge == "data" and cls in _DATA_STATUS:
            return _DATA_STATUS[cls]
        if cls in STATUS:
            return STATUS[cls]
    return 500


def status_phrase(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b"Error"


def error_body(code: str, message: str) -> bytes:
    return json.dumps({"error": code, "message": message}).encode("utf-8")


def response_parts(error: Refusal, edge: Edge) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """
    The status, headers and body that answer C{error} on C{edge}: the one
    place that decides what an error looks like on the wire.
    """
    status = status_for(error, edge)
    body = error_body(error.code, error.message)
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    if error.retry_after is not None:
        headers.append((b"retry-after", b"%d" % max(1, round(error.retry_after))))
    if status == 401:
        headers.append((b"www-authenticate", _REALM[edge]))
    return status, headers, body


def render(request: IRequest, error: Refusal, edge: Edge) -> bytes:
    """
    Set C{request}'s status and headers for C{error}; return the body, for
    the caller to write (or for Klein to).
    """
    status, headers, body = response_parts(error, edge)
    request.setResponseCode(status, status_phrase(status))
    for key, value in headers:
        request.setHeader(key, value)
    return body


INTERNAL = Failed("internal", "internal error; the server log has details")
