"""
End to end: per-namespace tokens (sqld-compatible Ed25519 JWTs) and
per-namespace config, with the real daemon, real children and real sync
clients (pyturso, and @tursodatabase/sync where installed).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from typing import Any

import jwt
from twisted.internet.defer import inlineCallbacks
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SkipTest

from turso_twisted.tokens import generate_key_pair, mint

from .daemon import Daemon, run_replica, with_data_workers
from .test_e2e import E2ETestCase, bearer, get_json, treq

CLI = os.path.join(os.path.dirname(sys.executable), "turso-server-admin")


def pipeline(*statements: str) -> bytes:
    requests = [{"type": "execute", "stmt": {"sql": sql}} for sql in statements]
    return json.dumps({"requests": requests}).encode()


class TokenTests(E2ETestCase):
    def setUp(self) -> None:
        self.private, public = generate_key_pair()
        self.other_private, _ = generate_key_pair()
        self.keys_dir = os.path.abspath(self.mktemp())
        os.makedirs(self.keys_dir)
        self.public_path = os.path.join(self.keys_dir, "public.pem")
        with open(self.public_path, "wb") as handle:
            handle.write(public)

    def token(self, private: bytes | None = None, **claims: Any) -> str:
        return mint(private or self.private, {"iat": int(time.time()), **claims})

    def start(self, **env: str) -> Any:
        return Daemon(self, TURSO_JWT_KEY_FILE=self.public_path, TURSO_AUTH_TOKEN="static-token",
                      TURSO_ADMIN_TOKEN="admin-token", **env).start()

    @inlineCallbacks
    def call(self, daemon: Daemon, name: str, token: str, *statements: str) -> Any:
        response = yield treq.post(daemon.data_url(f"/{name}/v2/pipeline"), pipeline(*statements),
                                   headers=bearer(token))
        body = yield response.content()
        return response.code, json.loads(body) if body else None

    def admin(self, daemon: Daemon, path: str, method: str = "GET", body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        return get_json(daemon.admin_url(path), method, data=data, headers=bearer("admin-token"))

    @inlineCallbacks
    def count(self, daemon: Daemon, name: str) -> Any:
        status, body = yield self.call(daemon, name, "static-token", "select count(*) from t")
        self.assertEqual(status, 200, body)
        return int(body["results"][0]["response"]["result"]["rows"][0][0]["value"])

    @inlineCallbacks
    def test_a_namespace_token_opens_its_namespace_only(self) -> Any:
        daemon = yield self.start()
        alpha_rw = self.token(p={"rw": {"ns": ["alpha"]}})
        writer = yield self.replica(daemon, "alpha", token=alpha_rw)
        yield run_replica(writer.run, "create table t (x text)", "insert into t values ('a1')")
        yield run_replica(writer.push)
        self.assertTrue((yield run_replica(writer.pull)) in (True, False))

        # Another namespace: unknown -> 404 and nothing is created; known -> 403, unchanged.
        status, body = yield self.call(daemon, "beta", alpha_rw, "create table t (x text)")
        self.assertEqual((status, body["error"]), (404, "namespace_not_found"))
        status, _ = yield self.admin(daemon, "/v1/namespaces/beta")
        self.assertEqual(status, 404)
        status, _ = yield self.call(daemon, "beta", "static-token", "create table t (x text)")
        self.assertEqual(status, 200)
        status, body = yield self.call(daemon, "beta", alpha_rw, "insert into t values ('intruder')")
        self.assertEqual((status, body["error"]), (403, "forbidden"))
        status, body = yield self.call(daemon, "beta", alpha_rw, "select * from t")
        self.assertEqual((status, body["error"]), (403, "forbidden"))
        self.assertEqual((yield self.count(daemon, "beta")), 0)
        # A pyturso replica of beta with alpha's token cannot even bootstrap.
        with self.assertRaises(Exception) as caught:
            yield self.replica(daemon, "beta", token=alpha_rw)
        self.assertIn("403", str(caught.exception))

        # Legacy claims (id + a) work too; the CLI's tokens as well.
        legacy = self.token(id="alpha")
        status, _ = yield self.call(daemon, "alpha", legacy, "insert into t values ('legacy')")
        self.assertEqual(status, 200)
        key_path = os.path.join(self.keys_dir, "private.pem")
        with open(key_path, "wb") as handle:
            handle.write(self.private)
        out, err, code = yield getProcessOutputAndValue(
            CLI, ["token", "--key", key_path, "--namespace", "alpha", "--expires", "1h"], env=os.environ)
        self.assertEqual(code, 0, err)
        status, _ = yield self.call(daemon, "alpha", out.decode().strip(), "insert into t values ('cli')")
        self.assertEqual(status, 200)
        self.assertEqual((yield self.count(daemon, "alpha")), 3)
        # The token never reaches a child's log or the daemon's.
        with open(daemon.log_path, encoding="utf-8") as handle:
            self.assertNotIn(alpha_rw.split(".")[2], handle.read())

    @inlineCallbacks
    def test_read_only_tokens_read_and_write_nothing(self) -> Any:
        daemon = yield self.start()
        writer = yield self.replica(daemon, "alpha", token=self.token(id="alpha"))
        yield run_replica(writer.run, "create table t (x text)", "insert into t values ('a1')")
        yield run_replica(writer.push)
        read_only = self.token(p={"ro": {"ns": ["alpha"]}})
        reader = yield self.replica(daemon, "alpha", token=read_only)
        self.assertEqual((yield run_replica(reader.rows, "select x from t")), [("a1",)])
        yield run_replica(reader.run, "insert into t values ('from-ro')")
        with self.assertRaises(Exception) as caught:
            yield run_replica(reader.push)
        self.assertIn("403", str(caught.exception))
        status, body = yield self.call(daemon, "alpha", read_only, "insert into t values ('x')")
        self.assertEqual((status, body["error"]), (403, "forbidden"))
        status, body = yield self.call(daemon, "alpha", read_only, "select x from t")
        self.assertEqual(status, 200)
        self.assertEqual((yield self.count(daemon, "alpha")), 1)
        # Read-only access never provisions a namespace.
        status, body = yield self.call(daemon, "gamma", self.token(a="ro"), "select 1")
        self.assertEqual((status, body["error"]), (404, "namespace_not_found"))

    @inlineCallbacks
    def test_bad_tokens_get_401(self) -> Any:
        daemon = yield self.start()
        status, _ = yield self.call(daemon, "alpha", "static-token", "create table t (x text)")
        self.assertEqual(status, 200)
        expired = self.token(id="alpha", exp=int(time.time()) - 3600)
        other_key = self.token(self.other_private, id="alpha")
        hmac = jwt.encode({"id": "alpha"}, "k" * 32, algorithm="HS256")
        unsigned = jwt.encode({"id": "alpha"}, None, algorithm="none")
        for token in (expired, other_key, hmac, unsigned, "not-a-token", self.token()[:-3] + "abc"):
            status, body = yield self.call(daemon, "alpha", token, "insert into t values ('x')")
            self.assertEqual((status, body["error"]), (401, "unauthorized"), token)
        # Revocation: tokens issued before now are refused on alpha, not elsewhere.
        before = self.token(iat=int(time.time()) - 10, id="alpha")
        status, config = yield self.admin(daemon, "/v1/namespaces/alpha/tokens/revoke", "POST")
        self.assertEqual(status, 200)
        self.assertIsNotNone(config["tokens_not_before"])
        status, body = yield self.call(daemon, "alpha", before, "select 1")
        self.assertEqual((status, body["error"]), (401, "unauthorized"))
        after = mint(self.private, {"iat": int(time.time()) + 2, "id": "alpha"})
        status, _ = yield self.call(daemon, "alpha", after, "select 1")
        self.assertEqual(status, 200)
        self.assertEqual((yield self.count(daemon, "alpha")), 0)
        # The revocation holds for the name: deleting it does not let the old
        # token create it again (found by a red team).
        status, _ = yield self.admin(daemon, "/v1/namespaces/alpha", "DELETE")
        self.assertEqual(status, 200)
        status, body = yield self.call(daemon, "alpha", before, "create table t (x text)")
        self.assertEqual((status, body["error"]), (401, "unauthorized"))
        status, _ = yield self.admin(daemon, "/v1/namespaces/alpha")
        self.assertEqual(status, 404)
        # Two Authorization headers: refused.
        both = [b"Bearer static-token", b"Bearer " + after.encode()]
        response = yield treq.post(daemon.data_url("/alpha/v2/pipeline"), pipeline("select 1"),
                                   headers={b"authorization": both})
        self.assertEqual(response.code, 401)
        yield response.content()
        response = yield treq.get(daemon.admin_url("/metrics"), headers=bearer("admin-token"))
        text = yield response.text()
        self.assertIn('turso_auth_refused_total{reason="bad_signature"}', text)
        self.assertIn('turso_auth_refused_total{reason="revoked"} 2.0', text)

    @inlineCallbacks
    def test_key_rotation(self) -> Any:
        new_private, new_public = generate_key_pair()
        with open(self.public_path, "rb") as handle:
            old_public = handle.read()
        with open(self.public_path, "wb") as handle:
            handle.write(old_public + new_public)
        daemon = yield self.start()
        old_token, new_token = self.token(id="alpha"), self.token(new_private, id="alpha")
        for token in (old_token, new_token):
            status, _ = yield self.call(daemon, "alpha", token, "select 1")
            self.assertEqual(status, 200)
        daemon.signal("SIGTERM")
        yield daemon.exited()
        with open(self.public_path, "wb") as handle:
            handle.write(new_public)
        yield daemon.start()
        status, _ = yield self.call(daemon, "alpha", old_token, "select 1")
        self.assertEqual(status, 401)
        status, _ = yield self.call(daemon, "alpha", new_token, "select 1")
        self.assertEqual(status, 200)

    @inlineCallbacks
    def test_a_private_key_is_refused_at_start_up(self) -> Any:
        with open(self.public_path, "wb") as handle:
            handle.write(self.private)
        daemon = Daemon(self, TURSO_JWT_KEY_FILE=self.public_path)
        process = daemon.spawn()
        yield process.ended
        self.assertEqual(process.status, 1)
        self.assertIn("private key", daemon.stderr() + open(daemon.log_path).read())

    @inlineCallbacks
    def test_config_blocks_writes_and_caps_size_and_survives_a_restart(self) -> Any:
        daemon = yield self.start()
        token = self.token(id="alpha")
        writer = yield self.replica(daemon, "alpha", token=token)
        yield run_replica(writer.run, "create table t (x text)", "insert into t values ('a1')")
        yield run_replica(writer.push)
        status, config = yield self.admin(daemon, "/v1/namespaces/alpha/config", "POST",
                                          {"block_writes": True, "block_reason": "billing"})
        self.assertEqual((status, config["block_writes"], config["block_reason"]), (200, True, "billing"))
        yield run_replica(writer.run, "insert into t values ('blocked')")
        with self.assertRaises(Exception) as caught:
            yield run_replica(writer.push)
        self.assertIn("billing", str(caught.exception))
        status, body = yield self.call(daemon, "alpha", token, "select x from t")
        self.assertEqual(status, 200)
        status, body = yield self.call(daemon, "alpha", "static-token", "insert into t values ('s')")
        self.assertEqual((status, body["error"]), (403, "writes_blocked"))
        self.assertIn("billing", body["message"])
        # A cap below what the files hold: writes refused with the reason, reads go on.
        status, config = yield self.admin(daemon, "/v1/namespaces/alpha/config", "POST",
                                          {"block_writes": False, "block_reason": None,
                                           "max_db_size": "4KB"})
        self.assertEqual((status, config["max_db_size"]), (200, 4000))
        status, body = yield self.call(daemon, "alpha", token, "insert into t values ('big')")
        self.assertEqual((status, body["error"]), (403, "max_db_size_exceeded"))
        status, body = yield self.call(daemon, "alpha", token, "select count(*) from t")
        self.assertEqual(status, 200)
        status, body = yield self.admin(daemon, "/v1/namespaces/alpha/config", "POST", {"max_db_size": -1})
        self.assertEqual((status, body["error"]), (400, "invalid_config"))
        status, body = yield self.admin(daemon, "/v1/namespaces/alpha/config", "POST",
                                        {"jwt_key": self.private.decode()})
        self.assertEqual((status, body["error"]), (400, "invalid_config"))
        self.assertIn("private key", body["message"])
        daemon.signal("SIGTERM")
        yield daemon.exited()
        yield daemon.start()
        status, shown = yield self.admin(daemon, "/v1/namespaces/alpha")
        self.assertEqual(shown["config"]["max_db_size"], 4000)
        status, body = yield self.call(daemon, "alpha", token, "insert into t values ('big')")
        self.assertEqual(status, 403)

    @inlineCallbacks
    def test_a_namespace_key_replaces_the_server_key(self) -> Any:
        daemon = yield self.start()
        status, _ = yield self.call(daemon, "tenant", "static-token", "create table t (x text)")
        self.assertEqual(status, 200)
        own_private, own_public = generate_key_pair()
        status, _ = yield self.admin(daemon, "/v1/namespaces/tenant/config", "POST",
                                     {"jwt_key": own_public.decode()})
        self.assertEqual(status, 200)
        status, _ = yield self.call(daemon, "tenant", self.token(id="tenant"), "select 1")
        self.assertEqual(status, 401)
        status, _ = yield self.call(daemon, "tenant", self.token(own_private, id="tenant"), "select 1")
        self.assertEqual(status, 200)
        status, _ = yield self.call(daemon, "alpha", self.token(own_private), "select 1")
        self.assertEqual(status, 401)

    @inlineCallbacks
    def test_node_client_with_a_namespace_token(self) -> Any:
        sync_js = os.environ.get("TURSO_SYNC_JS", "")
        node = shutil.which("node")
        if not (sync_js and node):
            raise SkipTest("node or @tursodatabase/sync missing (./dev test installs it with npm)")
        daemon = yield self.start()
        token = self.token(p={"rw": {"ns": ["nodejs"]}})
        prefix = os.path.abspath(self.mktemp())
        script = os.path.join(os.path.dirname(__file__), "node", "sync_roundtrip.mjs")
        out, err, code = yield getProcessOutputAndValue(
            node, [script, daemon.data_url("/nodejs"), token, prefix],
            env={"PATH": os.environ.get("PATH", ""), "TURSO_SYNC_JS": sync_js})
        self.assertEqual(code, 0, err)
        self.assertEqual(json.loads(out), [{"x": "node-a"}, {"x": "node-b"}])
        out, err, code = yield getProcessOutputAndValue(
            node, [script, daemon.data_url("/other"), token, prefix + "-other"],
            env={"PATH": os.environ.get("PATH", ""), "TURSO_SYNC_JS": sync_js})
        self.assertNotEqual(code, 0)
        status, _ = yield self.admin(daemon, "/v1/namespaces/other")
        self.assertEqual(status, 404)


# The same cases with the data port served by two data workers.
globals().update(with_data_workers(TokenTests))
