"""
The HTTP sites both ports run on: quiet, with a cap on request bodies.
"""

from __future__ import annotations

import tempfile
from io import BytesIO

from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from .auth import check_bearer
from .errors import ApiError, error_body

#: Bodies up to this size stay in memory (as in Twisted).
_IN_MEMORY = 100_000


class CappedRequest(Request):
    """
    A request whose body is refused without being read: with 401 when the
    client lacks the site's token, with 413 as soon as it passes the site's
    C{max_body_bytes}.
    """

    _rejected = False
    _received = 0

    @property
    def _limit(self) -> int:
        return self.channel.site.max_body_bytes

    def gotLength(self, length: int | None) -> None:
        # Headers are complete: a body is read only for a client with the
        # site's token, and only up to the limit.
        if length != 0 and not self._authorized():
            self._reject(401, b"Unauthorized", "unauthorized", "missing or invalid bearer token")
            return
        if length is not None and length > self._limit:
            self._reject_too_large()
            return
        scratch = self.channel.site.scratch_dir
        if scratch is not None and (length is None or length > _IN_MEMORY):
            # Large bodies wait in the data dir, not in the system's /tmp.
            self.content = tempfile.TemporaryFile(dir=scratch)
            return
        super().gotLength(length)

    def _authorized(self) -> bool:
        try:
            check_bearer(self, self.channel.site.body_token)
        except ApiError:
            return False
        return True

    def handleContentChunk(self, data: bytes) -> None:
        if self._rejected:
            return
        self._received += len(data)
        if self._received > self._limit:
            self._reject_too_large()
            return
        super().handleContentChunk(data)

    def process(self) -> None:
        if not self._rejected:
            super().process()

    def _reject_too_large(self) -> None:
        self._reject(413, b"Payload Too Large", "body_too_large",
                     f"request body exceeds {self.channel.site.limit_name}={self._limit} bytes")

    def _reject(self, status: int, phrase: bytes, code: str, message: str) -> None:
        """
        Answer at once and close, without reading the rest of the body.
        """
        self._rejected = True
        self.content = BytesIO()
        self.requestHeaders.removeHeader(b"expect")
        body = error_body(code, message)
        extra = b'www-authenticate: Bearer realm="turso-server"\r\n' if status == 401 else b""
        self.channel.transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\n%s"
            b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (status, phrase, extra, len(body), body))
        self.channel.loseConnection()


class QuietSite(Site):
    """
    A site that neither logs each request in Twisted's text format nor
    announces itself.
    """

    noisy = False

    def log(self, request: Request) -> None:
        pass


class CappedSite(QuietSite):
    """
    A quiet site whose requests carry at most C{max_body_bytes} of body.
    """

    requestFactory = CappedRequest

    def __init__(self, resource: Resource, max_body_bytes: int, body_token: str = "",
                 limit_name: str = "TURSO_MAX_BODY_BYTES", scratch_dir: str | None = None,
                 timeout: float = 120.0) -> None:
        super().__init__(resource, timeout=timeout)
        self.max_body_bytes = max_body_bytes
        self.scratch_dir = scratch_dir
        #: Requests with a body must carry this bearer token (if set).
        self.body_token = body_token
        self.limit_name = limit_name
