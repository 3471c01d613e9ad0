"""
The admin port's HTTP site: quiet, with a cap on request bodies and the
bearer token checked before a body is read.  (The data port has its own
protocol: L{turso_twisted.dataport}.)
"""

from __future__ import annotations

import tempfile
from io import BytesIO

from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from .auth import BearerToken
from .dataport import IN_MEMORY
from .errors import Refusal, TooLarge, from_os_error, response_parts, status_phrase


class CappedRequest(Request):
    """
    A request with a body refused without its body being read: with 401
    when the client lacks the site's token, with 413 as soon as it passes
    the site's C{max_body_bytes}.
    """

    _rejected = False
    _received = 0

    @property
    def _site(self) -> CappedSite:
        site: CappedSite = self.channel.site  # type: ignore[attr-defined]  # set by Site.buildProtocol
        return site

    def gotLength(self, length: int | None) -> None:
        # Headers are complete: a body is read only for a client with the
        # site's token, and only up to the limit.
        site = self._site
        if length != 0:
            try:
                site.token.check(self)
            except Refusal as error:
                self._reject(error)
                return
        if length is not None and length > site.max_body_bytes:
            self._reject_too_large()
            return
        if site.scratch_dir is not None and (length is None or length > IN_MEMORY):
            # Large bodies wait in the data dir, not in the system's /tmp.
            try:
                self.content = tempfile.TemporaryFile(dir=site.scratch_dir)
            except OSError as error:
                self._reject_unwritable(error)
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._rejected:
            return
        self._received += len(data)
        if self._received > self._site.max_body_bytes:
            self._reject_too_large()
            return
        try:
            super().handleContentChunk(data)
        except OSError as error:
            self._reject_unwritable(error)

    def _reject_unwritable(self, error: OSError) -> None:
        """A body that cannot be kept (the data dir is full or read-only): 507 or 503."""
        refusal = from_os_error(error)
        if refusal is None:
            raise error
        content = getattr(self, "content", None)
        if content is not None:
            content.close()
        self._reject(refusal)

    def process(self) -> None:
        if not self._rejected:
            super().process()

    def _reject_too_large(self) -> None:
        site = self._site
        self._reject(TooLarge("body_too_large",
                              f"request body exceeds {site.limit_name}={site.max_body_bytes} bytes"))

    def _reject(self, error: Refusal) -> None:
        """
        Answer at once and close, without reading the rest of the body.
        """
        self._rejected = True
        self.content = BytesIO()
        self.requestHeaders.removeHeader(b"expect")
        status, headers, body = response_parts(error, "admin")
        head = b"".join(b"%s: %s\r\n" % pair for pair in headers)
        assert self.channel.transport is not None
        self.channel.transport.write(b"HTTP/1.1 %d %s\r\n%sconnection: close\r\n\r\n%s"
                                     % (status, status_phrase(status), head, body))
        self.channel.loseConnection()


class CappedSite(Site):
    """
    A site whose requests carry at most C{max_body_bytes} of body, and the
    site's bearer token if they carry any; it neither logs each request in
    Twisted's text format nor announces itself.
    """

    requestFactory = CappedRequest
    noisy = False

    def __init__(self, resource: Resource, max_body_bytes: int, token: BearerToken,
                 limit_name: str, scratch_dir: str | None = None) -> None:
        super().__init__(resource, timeout=120.0)
        self.max_body_bytes = max_body_bytes
        self.token = token
        self.limit_name = limit_name
        self.scratch_dir = scratch_dir

    def log(self, request: http.Request) -> None:
        pass
