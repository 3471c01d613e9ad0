"""
docs/admin-openapi.yaml and the Klein routes describe the same API.
"""

from __future__ import annotations

import os
import re

import yaml
from twisted.trial.unittest import SynchronousTestCase

from turso_twisted.admin import AdminAPI, Readiness
from turso_twisted.auth import BearerToken
from turso_twisted.backup import Backups

from .support import ManagerFixture

DOC = os.path.join(os.path.dirname(__file__), os.pardir, "docs", "admin-openapi.yaml")
METHODS = {"get", "post", "put", "delete", "patch"}


class OpenAPITests(SynchronousTestCase):
    def setUp(self) -> None:
        with open(DOC) as handle:
            self.doc = yaml.safe_load(handle)

    def documented(self) -> set[tuple[str, str]]:
        return {(path, method.upper()) for path, item in self.doc["paths"].items()
                for method in item if method in METHODS}

    def routed(self) -> set[tuple[str, str]]:
        fx = ManagerFixture(self.mktemp())
        api = AdminAPI(fx.manager, fx.archival, fx.stats, BearerToken(""), Readiness(fx.data_dir),
                       Backups(fx.reactor, fx.manager, fx.archival, fx.supervisor, fx.data_dir))
        found = set()
        for rule in api.app.url_map.iter_rules():
            path = re.sub(r"<(?:[^:>]+:)?([^>]+)>", r"{\1}", rule.rule)
            for method in rule.methods - {"HEAD", "OPTIONS"}:
                found.add((path, method))
        return found

    def test_routes_match(self) -> None:
        self.assertEqual(self.documented(), self.routed())

    def test_version_and_shape(self) -> None:
        self.assertTrue(self.doc["openapi"].startswith("3."))
        for path, item in self.doc["paths"].items():
            for method, operation in item.items():
                if method not in METHODS:
                    continue
                self.assertIn("responses", operation, (path, method))
                self.assertIn("operationId", operation, (path, method))
            if "{name}" in path:
                self.assertEqual(item["parameters"][0], {"$ref": "#/components/parameters/name"})
            if "{entry}" in path:
                self.assertEqual([p["name"] for p in item["parameters"]], ["entry"])

    def test_name_pattern_is_the_validator(self) -> None:
        from turso_twisted.names import NAME_PATTERN

        pattern = self.doc["components"]["parameters"]["name"]["schema"]["pattern"]
        self.assertEqual(pattern, "^" + NAME_PATTERN.pattern + "$")

    def test_entry_pattern_is_the_parser(self) -> None:
        from turso_twisted.archive import _ENTRY

        item = self.doc["paths"]["/v1/archive/{entry}"]
        pattern = re.compile(item["parameters"][0]["schema"]["pattern"])
        for entry in ("alpha.20261121T214513.376Z", "a-b_c.20261121T214513.376Z-2", "alpha.x", "../x",
                      "Alpha.20261121T214513.376Z", "alpha.20261121T214513.376Z.db"):
            self.assertEqual(bool(pattern.fullmatch(entry)), bool(_ENTRY.fullmatch(entry)), entry)

    def test_protected_routes_declare_401(self) -> None:
        for path, item in self.doc["paths"].items():
            for method, operation in item.items():
                if method in METHODS and operation.get("security") != []:
                    self.assertIn("401", operation["responses"], (path, method))

    def test_public_routes(self) -> None:
        public = {path for path, item in self.doc["paths"].items()
                  if any(op.get("security") == [] for m, op in item.items() if m in METHODS)}
        self.assertEqual(public, {"/healthz", "/readyz"})
