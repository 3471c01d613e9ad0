"""
Bearer-token checks for both ports.

On the data port the site checks every request once, when its headers are
in and before its body is read (see L{turso_twisted.sites}); on the admin
port the site checks requests with a body the same way and each route
checks the rest (the probes are open).
"""

from __future__ import annotations

import hmac

import attrs
from twisted.web.iweb import IRequest

from .errors import Unauthorized
from .tokens import FULL, OPEN, Access


@attrs.frozen
class BearerToken:
    """
    Lets a request through if C{token} is empty (auth off) or the request
    carries it as C{Authorization: Bearer <token>}; compares in constant
    time.
    """

    token: str = attrs.field(repr=False)

    def check(self, request: IRequest) -> None:
        """
        @raise Unauthorized: unless the request may pass.
        """
        if not self.token:
            return
        header = request.getHeader(b"authorization") or b""
        scheme, _, given = header.partition(b" ")
        if scheme.lower() != b"bearer" or not given:
            raise Unauthorized("unauthorized", "missing bearer token (Authorization: Bearer <token>)")
        if not hmac.compare_digest(given.strip(), self.token.encode("utf-8")):
            raise Unauthorized("unauthorized", "invalid bearer token")

    def admit(self, request: IRequest, target: bytes) -> Access:
        """The site's check (see L{turso_twisted.sites.Gatekeeper}): all or nothing."""
        self.check(request)
        return FULL if self.token else OPEN
