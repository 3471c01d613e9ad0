"""
The HTTP sites both ports run on: quiet, with a cap on request bodies and
the bearer token checked before a body is read.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from io import BytesIO
from typing import Protocol

from twisted.web import http
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from .errors import Edge, Refusal, TooLarge, from_os_error, response_parts, status_phrase
from .tokens import Access


class Gatekeeper(Protocol):
    """A site's credentials check, made once a request's headers are in."""

    def admit(self, request: IRequest, target: bytes) -> Access:
        """
        What the request's credentials open (C{target}: its raw request target).

        @raise Refusal: for missing or bad credentials.
        """

#: Bodies up to this size stay in memory (as in Twisted).
_IN_MEMORY = 100_000


class CappedRequest(Request):
    """
    A request refused without its body being read: with 401 when the
    client lacks the site's token, with 413 as soon as it passes the site's
    C{max_body_bytes}.
    """

    _rejected = False
    _received = 0
    #: What the request's credentials open, once checked at its headers.
    access: Access | None = None

    @property
    def _site(self) -> CappedSite:
        site: CappedSite = self.channel.site  # type: ignore[attr-defined]  # set by Site.buildProtocol
        return site

    def gotLength(self, length: int | None) -> None:
        # Headers are complete: a body is read only for a client with the
        # site's token, and only up to the limit.
        site = self._site
        if length != 0 or site.authorize_every_request:
            try:
                # The request line is parsed but not yet handed to the request
                # (Twisted does that once the body is in): ask the channel.
                self.access = site.token.admit(self, getattr(self.channel, "_path", b"") or b"")
            except Refusal as error:
                site.refused += 1
                self._reject(error)
                return
        if length is not None and length > site.max_body_bytes:
            self._reject_too_large()
            return
        if site.scratch_dir is not None and (length is None or length > _IN_MEMORY):
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
        site = self._site
        status, headers, body = response_parts(error, site.edge)
        head = b"".join(b"%s: %s\r\n" % pair for pair in headers)
        assert self.channel.transport is not None
        self.channel.transport.write(b"HTTP/1.1 %d %s\r\n%sconnection: close\r\n\r\n%s"
                                     % (status, status_phrase(status), head, body))
        self.channel.loseConnection()
        if site.on_refused is not None:
            # The request line is parsed but not yet handed to the request
            # (Twisted does that once the body is in): ask the channel.
            method = getattr(self.channel, "_command", b"") or b"-"
            target = getattr(self.channel, "_path", b"") or b"-"
            site.on_refused(method, target, status, len(body))


class QuietSite(Site):
    """
    A site that neither logs each request in Twisted's text format nor
    announces itself.
    """

    noisy = False

    def log(self, request: http.Request) -> None:
        pass


class CappedSite(QuietSite):
    """
    A quiet site whose requests carry at most C{max_body_bytes} of body and
    the site's bearer token: every request with C{authorize_every_request},
    else every request with a body.
    """

    requestFactory = CappedRequest

    def __init__(self, resource: Resource, edge: Edge, max_body_bytes: int, token: Gatekeeper,
                 authorize_every_request: bool, limit_name: str = "TURSO_MAX_BODY_BYTES",
                 scratch_dir: str | None = None, timeout: float = 120.0,
                 on_refused: Callable[[bytes, bytes, int, int], None] | None = None) -> None:
        super().__init__(resource, timeout=timeout)
        self.edge = edge
        self.max_body_bytes = max_body_bytes
        self.token = token
        self.authorize_every_request = authorize_every_request
        self.limit_name = limit_name
        self.scratch_dir = scratch_dir
        #: Requests refused for their token.
        self.refused = 0
        #: Told of each request answered here (method, target, status, bytes sent).
        self.on_refused = on_refused
