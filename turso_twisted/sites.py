"""
The HTTP sites both ports run on: quiet, with a cap on request bodies.
"""

from __future__ import annotations

from io import BytesIO

from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from .errors import error_body


class CappedRequest(Request):
    """
    A request whose body is refused with 413 as soon as it passes the
    site's C{max_body_bytes}, without reading the rest.
    """

    _rejected = False
    _received = 0

    @property
    def _limit(self) -> int:
        return self.channel.site.max_body_bytes

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self._limit:
            self._reject()
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._rejected:
            return
        self._received += len(data)
        if self._received > self._limit:
            self._reject()
            return
        super().handleContentChunk(data)

    def process(self) -> None:
        if not self._rejected:
            super().process()

    def _reject(self) -> None:
        self._rejected = True
        self.content = BytesIO()
        self.requestHeaders.removeHeader(b"expect")
        body = error_body("body_too_large",
                          f"request body exceeds TURSO_MAX_BODY_BYTES={self._limit} bytes")
        self.channel.transport.write(
            b"HTTP/1.1 413 Payload Too Large\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body))
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

    def __init__(self, resource: Resource, max_body_bytes: int, timeout: float = 120.0) -> None:
        super().__init__(resource, timeout=timeout)
        self.max_body_bytes = max_body_bytes
