"""
Bearer-token checks for both ports.
"""

from __future__ import annotations

import hmac

from twisted.web.iweb import IRequest

from .errors import ApiError


def check_bearer(request: IRequest, token: str) -> None:
    """
    Let the request through if C{token} is empty (auth off) or the request
    carries it as C{Authorization: Bearer <token>}; compare in constant time.

    @raise ApiError: 401 otherwise.
    """
    if not token:
        return
    header = request.getHeader(b"authorization") or b""
    scheme, _, given = header.partition(b" ")
    if scheme.lower() != b"bearer" or not given:
        raise ApiError(401, "unauthorized", "missing bearer token (Authorization: Bearer <token>)")
    if not hmac.compare_digest(given.strip(), token.encode("utf-8")):
        raise ApiError(401, "unauthorized", "invalid bearer token")
