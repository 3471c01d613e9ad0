"""
Backups to object storage end to end: the real daemon, moto's S3 server,
the very command the chart's CronJob runs, retention per incarnation, and
disaster recovery (restore-all) into a fresh daemon, row for row.
"""

from __future__ import annotations

import json
import os
import re
import sys
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.utils import getProcessOutputAndValue

from .daemon import Daemon, run_replica
from .s3 import S3Server
from .test_e2e import E2ETestCase

CLI = os.path.join(os.path.dirname(sys.executable), "turso-server-admin")
BUCKET = "turso-backups"


def cronjob_command(secrets: dict[str, dict[str, str]]) -> tuple[list[str], dict[str, str]]:
    """The rendered CronJob's command and environment, its Secrets read from C{secrets}, $(VAR)s expanded."""
    from .test_deploy import render

    job = render({"auth": {"adminToken": "admin-token"}})["CronJob/buntime-turso-backup"]
    [container] = job["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    env = {}
    for item in container["env"]:
        if "value" in item:
            env[item["name"]] = item["value"]
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            env[item["name"]] = secrets[ref["name"]][ref["key"]]
    argv = [re.sub(r"\$\((\w+)\)", lambda match: env[match.group(1)], arg) for arg in container["command"]]
    return argv, env


class S3BackupTests(E2ETestCase):
    timeout = 240

    @inlineCallbacks
    def seed(self, daemon: Daemon, name: str, rows: int, tag: str) -> Any:
        replica = yield self.replica(daemon, name)
        yield run_replica(replica.run, "create table t (id integer primary key, x text)",
                          *[f"insert into t (x) values ('{tag}-{i}')" for i in range(rows)])
        yield run_replica(replica.push)

    @inlineCallbacks
    def rows(self, daemon: Daemon, name: str) -> Any:
        replica = yield self.replica(daemon, name)
        return (yield run_replica(replica.rows, "select id, x from t order by id"))

    @inlineCallbacks
    def cli(self, argv: list[str], env: dict[str, str]) -> Any:
        out, err, code = yield getProcessOutputAndValue(argv[0], argv[1:],
                                                        env={"PATH": os.environ.get("PATH", ""), **env})
        return out.decode(), err.decode(), code

    @inlineCallbacks
    def test_cronjob_backup_to_s3_then_restore_all_into_a_fresh_daemon(self) -> Any:
        s3 = yield S3Server(self).start()
        s3.client().create_bucket(Bucket=BUCKET)
        daemon = yield Daemon(self, TURSO_ADMIN_TOKEN="admin-token").start()
        for index, name in enumerate(("alpha", "beta", "gamma")):
            yield self.seed(daemon, name, 10 + 15 * index, name)
        before = {}
        for name in ("alpha", "beta", "gamma"):
            before[name] = yield self.rows(daemon, name)

        # The CronJob's own command; the admin Service's URL is this daemon's.
        argv, env = cronjob_command({
            "turso-backup-s3": {"url": s3.url, "bucket": BUCKET, "accessKey": s3.access_key,
                                "secretKey": s3.secret_key},
            "buntime-turso-tokens": {"admin-token": "admin-token"}})
        self.assertEqual(argv[:2], ["turso-server-admin", "backup-all"])
        env["TURSO_SERVER_ADMIN_URL"] = daemon.admin_url()
        out, err, code = yield self.cli([CLI, *argv[1:]], env)
        self.assertEqual(code, 0, err + out)
        self.assertIn("3 of 3 namespaces backed up", out)
        listed = s3.client().list_objects_v2(Bucket=BUCKET)["Contents"]
        self.assertEqual(len(listed), 3)
        for item in listed:
            name, namespace_id, file_name = item["Key"].split("/")
            head = s3.client().head_object(Bucket=BUCKET, Key=item["Key"])
            self.assertEqual((head["Metadata"]["namespace"], head["Metadata"]["namespace-id"]),
                             (name, namespace_id))
            self.assertRegex(head["Metadata"]["sha256"], r"^[0-9a-f]{64}$")

        # Retention counts per incarnation: gamma deleted and made anew, then
        # --keep 1 keeps the old tenant's only backup as well as the new one's.
        admin = {"TURSO_SERVER_ADMIN_URL": daemon.admin_url(), "TURSO_SERVER_ADMIN_TOKEN": "admin-token",
                 **s3.env}
        out, err, code = yield self.cli([CLI, "delete", "gamma"], admin)
        self.assertEqual(code, 0, err)
        yield self.seed(daemon, "gamma", 3, "gamma-anew")
        before["gamma"] = yield self.rows(daemon, "gamma")
        dest = [f"s3://{BUCKET}/", "--endpoint-url", s3.url]
        for _ in range(2):
            keep_one = [CLI, "--json", "backup-all", "--dest", *dest, "--keep", "1"]
            out, err, code = yield self.cli(keep_one, admin)
            self.assertEqual(code, 0, err + out)
        keys = sorted(item["Key"] for item in s3.client().list_objects_v2(Bucket=BUCKET)["Contents"])
        per_name = {name: [key for key in keys if key.split("/")[0] == name] for name in before}
        self.assertEqual({name: len(found) for name, found in per_name.items()},
                         {"alpha": 1, "beta": 1, "gamma": 2}, keys)
        self.assertEqual(len({key.split("/")[1] for key in per_name["gamma"]}), 2)

        # Disaster: the volume is lost. A fresh daemon gets everything back.
        fresh = yield Daemon(self, TURSO_ADMIN_TOKEN="admin-token").start()
        admin["TURSO_SERVER_ADMIN_URL"] = fresh.admin_url()
        out, err, code = yield self.cli([CLI, "restore-all", "--from", *dest], admin)
        self.assertEqual(code, 0, err + out)
        self.assertIn("3 restored, 0 skipped, 0 refused", out)
        for name, rows in before.items():
            self.assertEqual((yield self.rows(fresh, name)), rows, name)
        # Run again: every name is live now, so each is skipped, nothing replaced.
        out, err, code = yield self.cli([CLI, "--json", "restore-all", "--from", *dest], admin)
        self.assertEqual(code, 0, err)
        summary = json.loads(out)
        self.assertEqual([len(summary[key]) for key in ("restored", "skipped", "refused")], [0, 3, 0])
        # A single namespace back from a bucket key, with the sha256 checked on the way.
        key = per_name["alpha"][0]
        out, err, code = yield self.cli([CLI, "restore", "alpha", f"s3://{BUCKET}/{key}", "--endpoint-url",
                                         s3.url], admin)
        self.assertEqual(code, 0, err)
