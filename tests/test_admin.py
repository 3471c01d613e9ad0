"""
The admin API through StubTreq: routes, auth, JSON errors.
"""

from __future__ import annotations

import errno
import json
import os
from typing import Any

from treq.testing import StubTreq
from twisted.trial.unittest import SynchronousTestCase

from turso_twisted.admin import AdminAPI, Readiness
from turso_twisted.auth import BearerToken
from turso_twisted.backup import Backups
from turso_twisted.state import StateStore

from .fakes import end
from .support import ManagerFixture

TOKEN = "admin-secret"
AUTH = {b"authorization": [b"Bearer " + TOKEN.encode()]}


class AdminFixture(SynchronousTestCase):
    """
    An admin API over a namespace manager, and how to call it.
    """

    def setUp(self) -> None:
        self.fx = ManagerFixture(self.mktemp(), max_namespaces=3)
        self.readiness = Readiness(self.fx.data_dir, state_loaded=True, listening=True)
        backups = Backups(self.fx.reactor, self.fx.manager, self.fx.archival, self.fx.supervisor,
                          os.path.join(self.fx.data_dir, "_tmp"))
        self.api = AdminAPI(self.fx.manager, self.fx.archival, self.fx.stats, BearerToken(TOKEN),
                            self.readiness, backups)
        self.stub = StubTreq(self.api.resource())

    def call(self, method: str, path: str, body: Any = None, headers: Any = AUTH,
             raw: bytes | None = None) -> tuple[int, Any, Any]:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        pending = self.stub.request(method, "http://admin" + path, data=data, headers=headers)
        for _ in range(5):
            self.fx.settle()
            self.stub.flush()
        response = self.successResultOf(pending)
        content = self.successResultOf(response.content())
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"application/json"])
        return response.code, json.loads(content), response.headers

    def assertError(self, result: tuple[int, Any, Any], status: int, code: str) -> None:
        self.assertEqual(result[0], status, result[1])
        self.assertEqual(set(result[1]), {"error", "message"})
        self.assertEqual(result[1]["error"], code)
        self.assertNotIn("Traceback", result[1]["message"])



class AdminTests(AdminFixture):
    def test_probes_need_no_token(self) -> None:
        self.assertEqual(self.call("GET", "/healthz", headers={})[:2], (200, {"status": "ok"}))
        self.assertEqual(self.call("GET", "/readyz", headers={})[:2], (200, {"status": "ready"}))
        self.readiness.listening = False
        status, body, _ = self.call("GET", "/readyz", headers={})
        self.assertEqual((status, body["problems"]), (503, ["listeners not up"]))

    def test_token_required(self) -> None:
        result = self.call("GET", "/v1/namespaces", headers={})
        self.assertError(result, 401, "unauthorized")
        self.assertTrue(result[2].getRawHeaders(b"www-authenticate")[0].startswith(b"Bearer"))
        self.assertError(self.call("GET", "/v1/namespaces", headers={b"authorization": [b"Bearer nope"]}),
                         401, "unauthorized")
        self.assertError(self.call("POST", "/v1/namespaces/alpha/create", headers={}), 401, "unauthorized")
        self.assertEqual(self.fx.state.records, {})

    def test_create_show_list(self) -> None:
        status, body, _ = self.call("POST", "/v1/namespaces/alpha/create")
        self.assertEqual(status, 201)
        self.assertEqual((body["name"], body["origin"], body["locked"], body["running"]),
                         ("alpha", "explicit", True, True))
        self.assertEqual(body["port"], 9000)
        self.assertIsInstance(body["pid"], int)
        status, again, _ = self.call("POST", "/v1/namespaces/alpha/create")
        self.assertEqual((status, again["id"]), (200, body["id"]))
        status, shown, _ = self.call("GET", "/v1/namespaces/alpha")
        self.assertEqual(shown, body)
        status, listed, _ = self.call("GET", "/v1/namespaces")
        self.assertEqual(listed, {"namespaces": [body]})

    def test_invalid_names(self) -> None:
        for path in ("/v1/namespaces/Alpha/create", "/v1/namespaces/_state/create",
                     "/v1/namespaces/%2e%2e/create", "/v1/namespaces/a.b"):
            method = "POST" if path.endswith("create") else "GET"
            self.assertError(self.call(method, path), 400, "invalid_name")
        self.assertEqual(self.fx.state.records, {})

    def test_unknown_namespace_and_route_and_method(self) -> None:
        self.assertError(self.call("GET", "/v1/namespaces/ghost"), 404, "namespace_not_found")
        self.assertError(self.call("POST", "/v1/namespaces/ghost/lock"), 404, "namespace_not_found")
        self.assertError(self.call("GET", "/v2/nothing"), 404, "not_found")
        self.assertError(self.call("PUT", "/v1/namespaces/alpha/create"), 405, "method_not_allowed")

    def test_a_data_dir_that_cannot_be_written_is_a_503_or_507(self) -> None:
        """
        A read-only or full data dir: every change is refused with a JSON
        error and no traceback, and memory stays as the disk says.
        """
        self.fx.reactor.exit_on_signal = True
        self.call("POST", "/v1/namespaces/alpha/create")
        real_save = StateStore.save
        for number, status, code in ((errno.EROFS, 503, "data_dir_not_writable"),
                                     (errno.EACCES, 503, "data_dir_not_writable"),
                                     (errno.ENOSPC, 507, "insufficient_storage")):
            def failing(store: StateStore, number: int = number) -> None:
                raise OSError(number, os.strerror(number))

            self.patch(StateStore, "save", failing)
            for method, path, body in (("POST", "/v1/namespaces/beta/create", None),
                                       ("POST", "/v1/namespaces/alpha/unlock", None),
                                       ("POST", "/v1/namespaces/alpha/ttl", {"ttl": "1h"}),
                                       ("DELETE", "/v1/namespaces/alpha", None)):
                result = self.call(method, path, body)
                self.assertError(result, status, code)
                self.assertEqual(result[2].getRawHeaders(b"retry-after"), [b"30"])
            self.patch(StateStore, "save", real_save)
            self.assertEqual(sorted(self.fx.state.records), ["alpha"])
            record = self.fx.state.records["alpha"]
            self.assertEqual((record.locked, record.ttl, record.archiving), (True, None, None))
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_odd_paths_are_json_errors_that_change_nothing(self) -> None:
        self.call("POST", "/v1/namespaces/dummy2/create")
        writes = self.fx.state.writes
        for method, path, status, code in (
                ("GET", "/v1//namespaces", 404, "not_found"),
                ("GET", "/v1/namespaces//dummy2", 404, "not_found"),
                ("DELETE", "/v1//namespaces/dummy2", 404, "not_found"),
                ("POST", "/v1/namespaces/%c0%ae%c0%ae/create", 400, "invalid_name"),
                ("DELETE", "/v1/namespaces/%64ummy2", 400, "invalid_name"),
                ("POST", "/v1/namespaces/%64ummy2/lock", 400, "invalid_name")):
            self.assertError(self.call(method, path), status, code)
        self.assertEqual(self.fx.state.writes, writes)
        self.assertIn("dummy2", self.fx.state.records)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_lock_unlock(self) -> None:
        self.call("POST", "/v1/namespaces/alpha/create")
        self.assertFalse(self.call("POST", "/v1/namespaces/alpha/unlock")[1]["locked"])
        self.assertFalse(self.fx.state.records["alpha"].locked)
        self.assertTrue(self.call("POST", "/v1/namespaces/alpha/lock")[1]["locked"])

    def test_ttl(self) -> None:
        self.call("POST", "/v1/namespaces/alpha/create")
        status, body, _ = self.call("POST", "/v1/namespaces/alpha/ttl", {"ttl": "30d"})
        self.assertEqual((status, body["ttl"]), (200, "720h0m0s"))
        self.assertIn("will not fire while the namespace is locked", body["warning"])
        self.call("POST", "/v1/namespaces/alpha/unlock")
        status, body, _ = self.call("POST", "/v1/namespaces/alpha/ttl", {"ttl": "1h"})
        self.assertNotIn("warning", body)
        status, body, _ = self.call("POST", "/v1/namespaces/alpha/ttl", {"ttl": None})
        self.assertIsNone(body["ttl"])
        self.assertIsNone(self.fx.state.records["alpha"].ttl)

    def test_bad_ttl_changes_nothing(self) -> None:
        self.call("POST", "/v1/namespaces/alpha/create")
        self.call("POST", "/v1/namespaces/alpha/ttl", {"ttl": "1h"})
        writes = self.fx.state.writes
        for body, raw in (({"ttl": "soon"}, None), ({"ttl": 5}, None), ({}, None), ([1], None),
                          ({"ttl": "0s"}, None), ({"ttl": "10ns"}, None), ({"ttl": "999ms"}, None),
                          ({"ttl": "\uff11h"}, None), ({"ttl": "\u0663h"}, None), (None, b"{nope"),
                          (None, b'{"ttl": ' + b"[" * 30_000 + b"]" * 30_000 + b"}")):
            status, error, _ = self.call("POST", "/v1/namespaces/alpha/ttl", body, raw=raw)
            self.assertIn(status, (400,), (body, raw))
            self.assertIn(error["error"], ("invalid_ttl", "bad_json"))
        self.assertEqual(self.fx.state.writes, writes)
        self.assertEqual(self.fx.state.records["alpha"].ttl, 3600)

    def test_access_bumps_and_saves(self) -> None:
        self.call("POST", "/v1/namespaces/alpha/create")
        before = self.fx.state.records["alpha"].last_access_at
        self.fx.reactor.advance(100)
        status, body, _ = self.call("POST", "/v1/namespaces/alpha/access")
        self.assertEqual(status, 200)
        self.assertGreaterEqual(self.fx.state.records["alpha"].last_access_at, before + 100)

    def test_delete_archives(self) -> None:
        self.call("POST", "/v1/namespaces/alpha/create")
        pending = self.stub.request("DELETE", "http://admin/v1/namespaces/alpha", headers=AUTH)
        self.stub.flush()
        end(self.fx.children("alpha")[0], signal=15)
        self.stub.flush()
        response = self.successResultOf(pending)
        body = json.loads(self.successResultOf(response.content()))
        self.assertEqual(response.code, 200)
        self.assertEqual(body["archived"]["name"], "alpha")
        self.assertError(self.call("GET", "/v1/namespaces/alpha"), 404, "namespace_not_found")

    def test_limit_on_create_is_409(self) -> None:
        for name in ("a", "b", "c"):
            self.assertEqual(self.call("POST", f"/v1/namespaces/{name}/create")[0], 201)
        self.assertError(self.call("POST", "/v1/namespaces/d/create"), 409, "namespace_limit")
        self.assertEqual(self.call("POST", "/v1/namespaces/a/create")[0], 200)

    def test_unexpected_errors_are_hidden(self) -> None:
        def broken(api: AdminAPI, record: Any) -> Any:
            raise RuntimeError("secret internals")

        self.call("POST", "/v1/namespaces/alpha/create")
        self.patch(AdminAPI, "_describe", broken)
        result = self.call("GET", "/v1/namespaces/alpha")
        self.assertError(result, 500, "internal")
        self.assertNotIn("secret", result[1]["message"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class ArchiveRouteTests(AdminFixture):
    """
    /v1/archive and unarchive through the API (reusing the fixture above).
    """

    def archive(self, name: str) -> dict[str, Any]:
        self.fx.reactor.exit_on_signal = True
        self.call("POST", f"/v1/namespaces/{name}/create")
        status, body, _ = self.call("DELETE", f"/v1/namespaces/{name}")
        self.assertEqual(status, 200)
        return body["archived"]

    def test_list_archive(self) -> None:
        first = self.archive("alpha")
        self.fx.reactor.advance(1)
        self.archive("beta")
        status, body, _ = self.call("GET", "/v1/archive")
        self.assertEqual([e["name"] for e in body["entries"]], ["alpha", "beta"])
        status, body, _ = self.call("GET", "/v1/archive?name=alpha")
        self.assertEqual(body["entries"], [first])
        self.assertError(self.call("GET", "/v1/archive?name=../x"), 400, "invalid_name")
        self.assertError(self.call("GET", "/v1/archive", headers={}), 401, "unauthorized")

    def test_unarchive(self) -> None:
        manifest = self.archive("alpha")
        status, body, _ = self.call("POST", "/v1/namespaces/alpha/unarchive", {"locked": False})
        self.assertEqual((status, body["id"], body["locked"], body["origin"]),
                         (200, manifest["id"], False, "explicit"))
        self.assertError(self.call("POST", "/v1/namespaces/alpha/unarchive"), 409, "namespace_exists")

    def test_unarchive_bad_bodies_change_nothing(self) -> None:
        self.archive("alpha")
        for body in ({"locked": "yes"}, {"archivedAt": 5}, {"surprise": 1}):
            status, error, _ = self.call("POST", "/v1/namespaces/alpha/unarchive", body)
            self.assertEqual(status, 400, body)
        self.assertError(self.call("POST", "/v1/namespaces/ghost/unarchive"), 404, "archive_not_found")
        self.assertNotIn("alpha", self.fx.state.records)

    def test_delete_entry(self) -> None:
        manifest = self.archive("alpha")
        self.assertError(self.call("DELETE", "/v1/archive/alpha"), 400, "invalid_entry")
        # A decoded slash never reaches the handler: no route matches.
        self.assertError(self.call("DELETE", "/v1/archive/..%2F..%2Fetc"), 400, "invalid_name")
        self.assertError(self.call("DELETE", "/v1/archive/alpha.20000101T000000.000Z"), 404,
                         "archive_not_found")
        status, body, _ = self.call("DELETE", f"/v1/archive/{manifest['entry']}")
        self.assertEqual((status, body), (200, {"deleted": manifest["entry"]}))
        self.assertEqual(self.call("GET", "/v1/archive")[1], {"entries": []})
