"""
Bearer-token checks for both ports.

On the data port every request is checked once, when its headers are in
and before its body is read (see L{turso_twisted.dataport}); on the admin
port the site checks requests with a body the same way (see
L{turso_twisted.sites}) and each route checks the rest (the probes are
open).
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
        self.admit(request.requestHeaders.getRawHeaders(b"authorization") or [], request.uri)

    def admit(self, authorization: list[bytes], target: bytes) -> Access:
        """
        The check on a request's C{Authorization} values: all or nothing
        (a L{turso_twisted.dataport.Gatekeeper}).

        @raise Unauthorized: unless the request may pass.
        """
        if not self.token:
            return OPEN
        if len(authorization) > 1:
            raise Unauthorized("unauthorized", "more than one Authorization header")
        scheme, _, given = (authorization[0] if authorization else b"").partition(b" ")
        if scheme.lower() != b"bearer" or not given:
            raise Unauthorized("unauthorized", "missing bearer token (Authorization: Bearer <token>)")
        if not hmac.compare_digest(given.strip(), self.token.encode("utf-8")):
            raise Unauthorized("unauthorized", "invalid bearer token")
        return FULL
