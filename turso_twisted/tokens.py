"""
Access tokens of the data port: the sqld-compatible Ed25519 JWTs and what
they open.

A token is checked once per request, when its headers are in (see
L{turso_twisted.sites}), into an L{Access}; the data plane then asks that
L{Access} whether the request's namespace may be read or written.  The
claims are read as sqld reads them (C{libsql-server/src/auth}): the
C{p} claim (C{{"rw": {"ns": [...]}, "ro": ..., "roa": ..., "rwa": ...}})
when present, else the legacy C{id} (a namespace; none means every one)
with C{a} (C{ro}, C{rw} or C{roa}; C{rw} when absent).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, Literal

import attrs
import jwt
import jwt.types
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from twisted.internet.interfaces import IReactorTime

from .errors import Unauthorized

Via = Literal["off", "static", "jwt"]

#: Why a token was refused: the label of C{turso_auth_refused_total}.
REFUSALS = ("missing", "malformed", "bad_signature", "algorithm", "expired", "not_yet_valid",
            "revoked", "wrong_token")


class TokenRefused(Unauthorized):
    """A 401 that says which of L{REFUSALS} it is, for the metric."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__("unauthorized", message)
        self.reason = reason


@attrs.frozen
class Access:
    """
    What a request's credentials open: C{None} for every namespace, else
    the names.  Write access includes read access.
    """

    read: frozenset[str] | None
    write: frozenset[str] | None
    via: Via = "jwt"
    #: The token's C{iat} (for a namespace's C{tokens_not_before}).
    issued_at: float | None = None
    #: The token's C{exp}: checked again when the request's body is in.
    expires_at: float | None = None

    def can_read(self, name: str) -> bool:
        return self.read is None or name in self.read or self.can_write(name)

    def can_write(self, name: str) -> bool:
        return self.write is None or name in self.write

    def to_json(self) -> dict[str, Any]:
        """To cross a process boundary (a data worker asks the main process on a request's behalf)."""
        return {"read": None if self.read is None else sorted(self.read),
                "write": None if self.write is None else sorted(self.write),
                "via": self.via, "issued_at": self.issued_at, "expires_at": self.expires_at}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Access:
        def names(value: Any) -> frozenset[str] | None:
            return None if value is None else frozenset(str(name) for name in value)

        return cls(names(data["read"]), names(data["write"]), via=data["via"],
                   issued_at=data.get("issued_at"), expires_at=data.get("expires_at"))


#: Auth is off: no token is configured.
OPEN = Access(None, None, via="off")
#: The static data token (C{TURSO_AUTH_TOKEN}): every namespace.
FULL = Access(None, None, via="static")


@attrs.frozen
class KeySet:
    """Ed25519 public keys, any of which may sign a token (several: rotation)."""

    keys: tuple[Ed25519PublicKey, ...]
    fingerprint: bytes

    @classmethod
    def of(cls, keys: Sequence[Ed25519PublicKey]) -> KeySet:
        raw = b"".join(key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
                       for key in keys)
        return cls(tuple(keys), hashlib.sha256(raw).digest())


_PEM_BLOCK = re.compile(r"-----BEGIN ([A-Z0-9 ]+)-----(.*?)-----END \1-----", re.DOTALL)


def load_keys(text: str) -> KeySet:
    """
    Public keys in sqld's formats: PEM (one or more C{PUBLIC KEY} blocks)
    or URL-safe base64 of the raw 32-byte key (several separated by
    white space).

    @raise ValueError: saying what is wrong, a private key above all.
    """
    text = text.strip()
    if not text:
        raise ValueError("no key given")
    if "PRIVATE KEY-----" in text:
        raise ValueError("this is a private key: give the daemon the public key only "
                         "(turso-server-admin keygen writes both)")
    keys: list[Ed25519PublicKey] = []
    if text.startswith("-----BEGIN"):
        blocks = list(_PEM_BLOCK.finditer(text))
        if not blocks:
            raise ValueError("a PEM block is not closed")
        for block in blocks:
            if block.group(1) != "PUBLIC KEY":
                raise ValueError(f"unsupported PEM block {block.group(1)!r} (expected PUBLIC KEY)")
            try:
                key = serialization.load_pem_public_key(block.group(0).encode("ascii"))
            except ValueError as error:
                raise ValueError(f"a PUBLIC KEY block cannot be read: {error}") from None
            if not isinstance(key, Ed25519PublicKey):
                raise ValueError("a PUBLIC KEY block is not an Ed25519 key")
            keys.append(key)
    else:
        for word in text.split():
            try:
                raw = base64.urlsafe_b64decode(word + "=" * (-len(word) % 4))
            except (binascii.Error, ValueError):
                raise ValueError("not a PEM key nor URL-safe base64") from None
            if len(raw) != 32:
                raise ValueError(f"a raw Ed25519 public key is 32 bytes, not {len(raw)}")
            keys.append(Ed25519PublicKey.from_public_bytes(raw))
    return KeySet.of(keys)


def access_from_claims(claims: dict[str, Any]) -> Access:
    """
    What verified claims open (sqld's rules).

    @raise ValueError: for claims sqld would not accept either.
    """
    issued_at = claims.get("iat")
    issued = float(issued_at) if isinstance(issued_at, (int, float)) else None
    scopes = claims.get("p")
    if scopes is not None:
        if not isinstance(scopes, dict):
            raise ValueError("the p claim must be an object")
        read: set[str] = set()
        write: set[str] = set()
        for permission, scope in scopes.items():
            if permission not in ("ro", "rw", "roa", "rwa") or scope is None:
                continue
            names = scope.get("ns") if isinstance(scope, dict) else ()
            if names is None:
                continue
            if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
                raise ValueError(f"p.{permission}.ns must be a list of namespace names")
            (write if permission in ("rw", "rwa") else read).update(names)
        return Access(frozenset(read), frozenset(write), "jwt", issued)
    permission = claims.get("a", "rw")
    if permission not in ("ro", "rw", "roa"):
        raise ValueError(f"the a claim must be ro, rw or roa, not {permission!r}")
    namespace = claims.get("id")
    if namespace is not None and not isinstance(namespace, str):
        raise ValueError("the id claim must be a namespace name")
    # sqld's rule: a token that names no namespace opens every one.
    named = None if namespace is None else frozenset({namespace})
    if permission == "rw":
        return Access(named, named, "jwt", issued)
    return Access(named, frozenset(), "jwt", issued)


@attrs.define
class TokenVerifier:
    """
    Verifies EdDSA JWTs against a L{KeySet}, with a bounded cache so that a
    keep-alive client does not pay an Ed25519 verification per request.
    Time comes from C{clock}: C{exp} and C{nbf} are checked here, with
    C{leeway} seconds of slack, not by the JOSE library's own clock.
    """

    clock: IReactorTime
    leeway: float = 60.0
    cache_size: int = 10_000
    #: (token, key set) -> (what it opens, its nbf)
    _cache: OrderedDict[tuple[bytes, bytes], tuple[Access, float | None]] = attrs.field(
        factory=OrderedDict, init=False)
    hits: int = attrs.field(default=0, init=False)

    def verify(self, token: bytes, keys: KeySet) -> Access:
        """
        @raise TokenRefused: for a malformed, badly signed, expired or not yet
            valid token.
        """
        cached = self._cache.get((token, keys.fingerprint))
        if cached is not None:
            self._cache.move_to_end((token, keys.fingerprint))
            access, not_before = cached
            self.check_times(access, not_before)
            self.hits += 1
            return access
        claims = self._decode(token, keys)
        _time_claim(claims, "iat")
        not_before = _time_claim(claims, "nbf")
        try:
            access = attrs.evolve(access_from_claims(claims), expires_at=_time_claim(claims, "exp"))
        except ValueError as error:
            raise TokenRefused("malformed", f"invalid token claims: {error}") from None
        self.check_times(access, not_before)
        self._cache[(token, keys.fingerprint)] = (access, not_before)
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return access

    def check_times(self, access: Access, not_before: float | None = None) -> None:
        """
        @raise TokenRefused: if the token has expired, or is not valid yet
            (C{nbf}, or an C{iat} in the future: a token minted ahead would
            outlive a revocation).
        """
        now = self.clock.seconds()
        if access.expires_at is not None and now > access.expires_at + self.leeway:
            raise TokenRefused("expired", "the token has expired")
        if not_before is not None and now + self.leeway < not_before:
            raise TokenRefused("not_yet_valid", "the token is not valid yet (nbf)")
        if access.issued_at is not None and now + self.leeway < access.issued_at:
            raise TokenRefused("not_yet_valid", "the token was issued in the future (iat)")

    def _decode(self, token: bytes, keys: KeySet) -> dict[str, Any]:
        try:
            header = jwt.get_unverified_header(token)
        except (jwt.InvalidTokenError, ValueError, TypeError):
            raise TokenRefused("malformed", "the bearer token is not a JWT") from None
        if header.get("alg") != "EdDSA":
            raise TokenRefused("algorithm", f"tokens must be signed with EdDSA, not {header.get('alg')!r}")
        # Times are checked against our clock (L{_check_times}); audience and
        # issuer are not part of sqld's scheme.
        options: jwt.types.Options = {"verify_exp": False, "verify_nbf": False, "verify_iat": False,
                                      "verify_aud": False, "verify_iss": False, "require": []}
        for key in keys.keys:
            try:
                claims: dict[str, Any] = jwt.decode(token, key, algorithms=["EdDSA"], options=options)
            except jwt.InvalidSignatureError:
                continue  # the next key, when keys rotate
            except (jwt.InvalidTokenError, ValueError, TypeError):
                raise TokenRefused("malformed", "invalid token") from None
            if not isinstance(claims, dict):
                raise TokenRefused("malformed", "the token's payload is not an object")
            return claims
        raise TokenRefused("bad_signature", "the token is not signed by a key this server accepts")


def _time_claim(claims: dict[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TokenRefused("malformed", f"the {name} claim must be a number of seconds")
    return float(value)


@attrs.define
class DataAuth:
    """
    The data port's credentials check: the static token (every namespace),
    or a JWT signed by the namespace's own key when it has one (sqld's
    per-namespace key) or else by one of the server's keys.  Neither
    configured: auth is off.
    """

    static_token: str = attrs.field(repr=False)
    server_keys: KeySet | None
    verifier: TokenVerifier
    #: The namespace's own key set, if it has one.
    namespace_keys: Callable[[str], KeySet | None] = lambda _: None
    #: The namespace's C{tokens_not_before}, if it has one: earlier tokens are revoked there.
    namespace_not_before: Callable[[str], float | None] = lambda _: None
    #: The namespace a raw request target names, if any.
    namespace_of: Callable[[bytes], str | None] = lambda _: None
    refusals: dict[str, int] = attrs.field(factory=lambda: dict.fromkeys(REFUSALS, 0))
    accepted: dict[str, int] = attrs.field(factory=lambda: {"static": 0, "jwt": 0})

    def authenticate(self, header: bytes | None, namespace: str | None) -> Access:
        """
        @raise TokenRefused: for a missing or bad token.
        """
        try:
            access = self._authenticate(header, namespace)
        except TokenRefused as refusal:
            self.refusals[refusal.reason] += 1
            raise
        if access.via != "off":
            self.accepted[access.via] += 1
        return access

    def _authenticate(self, header: bytes | None, namespace: str | None) -> Access:
        keys = (self.namespace_keys(namespace) if namespace else None) or self.server_keys
        if not self.static_token and keys is None:
            return OPEN
        scheme, _, given = (header or b"").partition(b" ")
        given = given.strip()
        if scheme.lower() != b"bearer" or not given:
            raise TokenRefused("missing", "missing bearer token (Authorization: Bearer <token>)")
        if self.static_token and hmac.compare_digest(given, self.static_token.encode("utf-8")):
            return FULL
        if keys is None or given.count(b".") != 2:
            raise TokenRefused("wrong_token", "invalid bearer token")
        access = self.verifier.verify(given, keys)
        self._check_revocation(access, namespace)
        return access

    def admit(self, authorization: list[bytes], target: bytes) -> Access:
        """The data port's check (see L{turso_twisted.dataport.Gatekeeper})."""
        if len(authorization) > 1:
            self.refusals["malformed"] += 1
            raise TokenRefused("malformed", "more than one Authorization header")
        return self.authenticate(authorization[0] if authorization else None, self.namespace_of(target))

    def confirm(self, access: Access, namespace: str) -> None:
        """
        Check again, once the request's body is in, what can change while
        it arrives: the token's expiry and the namespace's revocation.

        @raise TokenRefused: if it no longer holds.
        """
        if access.via != "jwt":
            return
        try:
            self.verifier.check_times(access)
            self._check_revocation(access, namespace)
        except TokenRefused as refusal:
            self.refusals[refusal.reason] += 1
            raise

    def _check_revocation(self, access: Access, namespace: str | None) -> None:
        not_before = self.namespace_not_before(namespace) if namespace else None
        if not_before is not None and (access.issued_at is None or access.issued_at < not_before):
            raise TokenRefused("revoked", f"tokens of namespace {namespace!r} issued before its "
                                          "tokens_not_before are revoked")


def generate_key_pair() -> tuple[bytes, bytes]:
    """A new Ed25519 pair as PEM: (private PKCS#8, public SubjectPublicKeyInfo)."""
    private = Ed25519PrivateKey.generate()
    return (
        private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()),
        private.public_key().public_bytes(serialization.Encoding.PEM,
                                          serialization.PublicFormat.SubjectPublicKeyInfo),
    )


def mint(private_pem: bytes, claims: dict[str, Any]) -> str:
    """
    A token signed with C{private_pem} (the CLI's C{token} command; the
    daemon never holds a private key).

    @raise ValueError: if the key is not an Ed25519 private key.
    """
    key = serialization.load_pem_private_key(private_pem, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError("not an Ed25519 private key")
    return jwt.encode(claims, key, algorithm="EdDSA")
