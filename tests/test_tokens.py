"""
The data port's tokens: keys in sqld's formats, claims read as sqld reads
them, EdDSA only, time from the clock, the cache.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from turso_twisted.tokens import (
    FULL,
    OPEN,
    Access,
    DataAuth,
    TokenRefused,
    TokenVerifier,
    access_from_claims,
    generate_key_pair,
    load_keys,
    mint,
)


def pair() -> tuple[bytes, bytes]:
    return generate_key_pair()


class KeyTests(SynchronousTestCase):
    def test_pem_blocks_and_raw_base64(self) -> None:
        _, one = pair()
        _, two = pair()
        self.assertEqual(len(load_keys((one + two).decode()).keys), 2)
        key = serialization.load_pem_public_key(one)
        raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        text = base64.urlsafe_b64encode(raw).decode().rstrip("=")
        self.assertEqual(load_keys(text).fingerprint, load_keys(one.decode()).fingerprint)

    def test_private_and_other_keys_are_refused(self) -> None:
        private, _ = pair()
        with self.assertRaises(ValueError) as caught:
            load_keys(private.decode())
        self.assertIn("private key", str(caught.exception))
        for text in ("", "not base64!", base64.urlsafe_b64encode(b"x" * 31).decode(),
                     "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----"):
            self.assertRaises(ValueError, load_keys, text)


class ClaimTests(SynchronousTestCase):
    def test_legacy_claims(self) -> None:
        self.assertEqual(access_from_claims({}), Access(None, None))
        ro = access_from_claims({"id": "alpha", "a": "ro"})
        self.assertTrue(ro.can_read("alpha"))
        self.assertFalse(ro.can_write("alpha"))
        self.assertFalse(ro.can_read("beta"))
        rw = access_from_claims({"id": "alpha"})
        self.assertTrue(rw.can_write("alpha"))
        self.assertFalse(rw.can_read("beta"))
        everything_ro = access_from_claims({"a": "roa"})
        self.assertTrue(everything_ro.can_read("any"))
        self.assertFalse(everything_ro.can_write("any"))
        self.assertRaises(ValueError, access_from_claims, {"a": "admin"})
        self.assertRaises(ValueError, access_from_claims, {"id": 5})

    def test_p_claim_takes_precedence(self) -> None:
        access = access_from_claims({"id": "legacy", "a": "rw", "iat": 100,
                                     "p": {"rw": {"ns": ["foo"]}, "roa": {"ns": ["bar"]}, "ro": None}})
        self.assertTrue(access.can_write("foo"))
        self.assertTrue(access.can_read("bar"))
        self.assertFalse(access.can_write("bar"))
        self.assertFalse(access.can_read("legacy"))
        self.assertEqual(access.issued_at, 100.0)
        # A p claim that names nothing opens nothing.
        self.assertFalse(access_from_claims({"p": {}}).can_read("foo"))
        self.assertRaises(ValueError, access_from_claims, {"p": {"rw": {"ns": "foo"}}})
        self.assertRaises(ValueError, access_from_claims, {"p": []})


class VerifierTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.private, public = pair()
        self.keys = load_keys(public.decode())
        self.verifier = TokenVerifier(self.clock, leeway=60)

    def token(self, **claims: Any) -> bytes:
        return mint(self.private, claims).encode()

    def refused(self, token: bytes, reason: str) -> None:
        with self.assertRaises(TokenRefused) as caught:
            self.verifier.verify(token, self.keys)
        self.assertEqual(caught.exception.reason, reason)
        self.assertEqual(caught.exception.code, "unauthorized")

    def test_good_token_and_its_cache(self) -> None:
        token = self.token(id="alpha", exp=self.clock.seconds() + 3600)
        self.assertTrue(self.verifier.verify(token, self.keys).can_write("alpha"))
        self.assertTrue(self.verifier.verify(token, self.keys).can_write("alpha"))
        self.assertEqual(self.verifier.hits, 1)
        # Expiry is checked on a cache hit too.
        self.clock.advance(3600 + 61)
        self.refused(token, "expired")

    def test_times_with_leeway(self) -> None:
        self.assertTrue(self.verifier.verify(self.token(exp=self.clock.seconds() - 30), self.keys))
        self.refused(self.token(exp=self.clock.seconds() - 61), "expired")
        self.refused(self.token(nbf=self.clock.seconds() + 120), "not_yet_valid")
        self.refused(self.token(exp="tomorrow"), "malformed")

    def test_other_key_other_algorithm_none_and_garbage(self) -> None:
        other, _ = pair()
        self.refused(mint(other, {"id": "alpha"}).encode(), "bad_signature")
        self.refused(jwt.encode({"id": "alpha"}, "s" * 32, algorithm="HS256").encode(), "algorithm")
        header = base64.urlsafe_b64encode(json.dumps({"alg": "none"}).encode()).rstrip(b"=")
        body = base64.urlsafe_b64encode(b'{"id":"alpha"}').rstrip(b"=")
        self.refused(header + b"." + body + b".", "algorithm")
        self.refused(b"a.b.c", "malformed")
        token = self.token(id="alpha")
        self.refused(token[:-4] + (b"AAAA" if not token.endswith(b"AAAA") else b"BBBB"), "bad_signature")

    def test_odd_headers_and_a_future_iat(self) -> None:
        def encode(part: bytes) -> bytes:
            return base64.urlsafe_b64encode(part).rstrip(b"=")

        def raw(header: dict[str, Any]) -> bytes:
            return encode(json.dumps(header).encode()) + b"." + encode(b"{}") + b"." + encode(b"x" * 64)

        # Found by a red team: PyJWT raises more than DecodeError on a header.
        self.refused(raw({"alg": "EdDSA", "crit": ["x"]}), "malformed")
        self.refused(raw({"alg": "EdDSA", "kid": 5}), "malformed")
        # A token minted ahead would outlive a revocation.
        self.refused(self.token(iat=self.clock.seconds() + 3600), "not_yet_valid")
        self.assertTrue(self.verifier.verify(self.token(iat=self.clock.seconds() + 30), self.keys))
        self.refused(self.token(iat="yesterday"), "malformed")

    def test_rotation(self) -> None:
        second_private, second_public = pair()
        _, first_public = pair()
        both = load_keys(first_public.decode() + second_public.decode())
        self.assertTrue(self.verifier.verify(mint(second_private, {}).encode(), both))
        self.refused(mint(second_private, {}).encode(), "bad_signature")

    def test_cache_is_bounded(self) -> None:
        verifier = TokenVerifier(self.clock, cache_size=3)
        for i in range(10):
            verifier.verify(self.token(id=f"n{i}"), self.keys)
        self.assertEqual(len(verifier._cache), 3)


class DataAuthTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.private, public = pair()
        self.namespace_private, namespace_public = pair()
        own = {"tenant": load_keys(namespace_public.decode())}
        self.auth = DataAuth("static-token", load_keys(public.decode()), TokenVerifier(self.clock),
                             namespace_keys=own.get)

    def test_static_token_and_jwts(self) -> None:
        self.assertEqual(self.auth.authenticate(b"Bearer static-token", "alpha"), FULL)
        token = mint(self.private, {"id": "alpha"}).encode()
        self.assertTrue(self.auth.authenticate(b"Bearer " + token, "alpha").can_write("alpha"))
        self.assertEqual(self.auth.accepted, {"static": 1, "jwt": 1})
        for header, reason in ((None, "missing"), (b"Basic xyz", "missing"), (b"Bearer nope", "wrong_token")):
            with self.assertRaises(TokenRefused) as caught:
                self.auth.authenticate(header, "alpha")
            self.assertEqual(caught.exception.reason, reason)

    def test_a_namespace_key_replaces_the_server_key_there(self) -> None:
        server_token = b"Bearer " + mint(self.private, {}).encode()
        own_token = b"Bearer " + mint(self.namespace_private, {"id": "tenant"}).encode()
        self.assertTrue(self.auth.authenticate(own_token, "tenant").can_write("tenant"))
        self.assertRaises(TokenRefused, self.auth.authenticate, server_token, "tenant")
        self.assertRaises(TokenRefused, self.auth.authenticate, own_token, "alpha")
        self.assertEqual(self.auth.refusals["bad_signature"], 2)

    def test_confirm_sees_expiry_and_revocation_after_the_headers(self) -> None:
        floors: dict[str, float] = {}
        auth = DataAuth("", self.auth.server_keys, TokenVerifier(self.clock), namespace_not_before=floors.get)
        self.clock.advance(1000)
        access = auth.authenticate(b"Bearer " + mint(self.private, {"iat": 1000, "exp": 1100}).encode(), "a")
        auth.confirm(access, "a")
        floors["a"] = 1001.5
        with self.assertRaises(TokenRefused) as caught:
            auth.confirm(access, "a")
        self.assertEqual(caught.exception.reason, "revoked")
        auth.confirm(access, "b")
        self.clock.advance(161)
        with self.assertRaises(TokenRefused) as caught:
            auth.confirm(access, "b")
        self.assertEqual(caught.exception.reason, "expired")
        self.assertEqual((auth.refusals["revoked"], auth.refusals["expired"]), (1, 1))

    def test_two_authorization_headers_are_refused(self) -> None:
        with self.assertRaises(TokenRefused) as caught:
            self.auth.admit([b"Bearer static-token", b"Bearer other"], b"/alpha/v2/pipeline")
        self.assertEqual(caught.exception.reason, "malformed")

    def test_nothing_configured_is_open(self) -> None:
        auth = DataAuth("", None, TokenVerifier(self.clock))
        self.assertEqual(auth.authenticate(None, "alpha"), OPEN)
