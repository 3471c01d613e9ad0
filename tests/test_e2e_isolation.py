"""
Tenant isolation end to end, with the real daemon, tursodb and pyturso: a
client with the data token tries, in its own namespace, to make its child
write elsewhere; every attempt is refused with 403 and leaves no new file
anywhere, while honest sync traffic goes on.  A file planted in the data
dir before a restart is quarantined, never served.
"""

from __future__ import annotations

import json
import os
import sqlite3
from typing import Any

from twisted.internet.defer import inlineCallbacks

from .daemon import Daemon, run_replica, with_data_workers
from .test_e2e import E2ETestCase, bearer, get_json, treq

TOKEN = "data-token"

#: Each is sent as an execute, as a batch step after an honest statement,
#: and as the second statement of one string.
ATTACKS = [
    "VACUUM INTO '{data_dir}/victim.db'",
    "vacuum into 'relative.db'",
    "/* x */ VaCuUm  INTO\n'{data_dir}/victim2.db'",
    "VACUUM",
    "SELECT load_extension('{data_dir}/evil')",
    "SELECT \"load_extension\"('/tmp/evil')",
    "CREATE VIEW v AS SELECT load_extension('/tmp/evil')",
    "CREATE TABLE t2 (x DEFAULT (load_extension('/tmp/evil')))",
    "CREATE TRIGGER tr AFTER INSERT ON t BEGIN SELECT load_extension('/tmp/evil'); END",
    "ATTACH DATABASE '{data_dir}/victim.db' AS v",
    "DETACH v",
    "PRAGMA journal_mode=experimental_mvcc",
    "PRAGMA query_only=1",
    "PRAGMA database_list",
]


def snapshot(directory: str) -> set[str]:
    """
    Every path under C{directory} but the state file's dir (its writes are
    the daemon's own).
    """
    found = set()
    for top, dirs, files in os.walk(directory):
        dirs[:] = [d for d in dirs if d != "_state"]
        for name in dirs + files:
            found.add(os.path.relpath(os.path.join(top, name), directory))
    return found


class IsolationTests(E2ETestCase):
    @inlineCallbacks
    def test_attacks_through_the_front_door_are_refused_and_write_nothing(self) -> Any:
        daemon = yield Daemon(self, TURSO_AUTH_TOKEN=TOKEN).start()
        replica = yield self.replica(daemon, "tenant", token=TOKEN)
        yield run_replica(replica.run, "create table t (x text)", "insert into t values ('honest')")
        yield run_replica(replica.push)
        before = snapshot(daemon.data_dir)
        self.assertTrue(any(p.endswith("/cwd") for p in before), "each child has its own working dir")

        url = daemon.data_url("/tenant/v2/pipeline")
        for attack in ATTACKS:
            sql = attack.format(data_dir=daemon.data_dir)
            bodies = (
                {"requests": [{"type": "execute", "stmt": {"sql": sql}}]},
                {"requests": [{"type": "batch", "batch": {"steps": [
                    {"stmt": {"sql": "select 1"}}, {"stmt": {"sql": sql}}]}}]},
                {"requests": [{"type": "execute", "stmt": {"sql": f"select 'x'; {sql}"}}]},
            )
            for body in bodies:
                response = yield treq.post(url, json.dumps(body).encode(), headers=bearer(TOKEN))
                answer = json.loads((yield response.content()))
                self.assertEqual((response.code, answer["error"]), (403, "statement_not_allowed"), sql)
        for body in (b'{"requests": [{"type": "sequence", "sql": "VACUUM INTO \'x\'"}]}', b"{not json"):
            response = yield treq.post(url, body, headers=bearer(TOKEN))
            self.assertEqual(response.code, 400)
            yield response.content()
        response = yield treq.post(daemon.data_url("/tenant/v2//pipeline"), b"{}", headers=bearer(TOKEN))
        self.assertEqual(response.code, 404, "a body goes only where the gate looks")
        yield response.content()
        self.assertEqual(snapshot(daemon.data_dir), before, "no new file anywhere")
        status, listed = yield get_json(daemon.admin_url("/v1/namespaces"))
        self.assertEqual([r["name"] for r in listed["namespaces"]], ["tenant"])

        # Honest traffic is unchanged: a second replica sees the rows, and
        # its own push comes back to the first.
        other = yield self.replica(daemon, "tenant", token=TOKEN)
        self.assertEqual((yield run_replica(other.rows, "select x from t")), [("honest",)])
        yield run_replica(other.run, "insert into t values ('also honest')")
        yield run_replica(other.push)
        yield run_replica(replica.pull)
        self.assertEqual((yield run_replica(replica.rows, "select x from t order by x")),
                         [("also honest",), ("honest",)])
        confined = [e for e in daemon.logs() if e.get("confinement", "").startswith("children confined")]
        if os.environ.get("TURSO_LANDLOCK_BIN"):
            self.assertEqual(len(confined), 1, "the daemon says which confinement is in effect")

    @inlineCallbacks
    def test_a_planted_file_is_quarantined_not_served(self) -> Any:
        daemon = Daemon(self)
        planted = os.path.join(daemon.data_dir, "victim.db")
        connection = sqlite3.connect(planted)
        connection.execute("create table secrets (x text)")
        connection.execute("insert into secrets values ('planted')")
        connection.commit()
        connection.close()
        yield daemon.start()
        status, listed = yield get_json(daemon.admin_url("/v1/namespaces"))
        self.assertEqual(listed["namespaces"], [])
        [stamp] = os.listdir(os.path.join(daemon.data_dir, "_quarantine"))
        self.assertIn("victim.db", os.listdir(os.path.join(daemon.data_dir, "_quarantine", stamp)))
        [warning] = [e for e in daemon.logs() if e.get("file") == "victim.db"]
        self.assertEqual(warning["level"], "WARN")
        # The name is a new, empty namespace, not the planted data.
        body = {"requests": [{"type": "execute", "stmt": {"sql": "select x from secrets"}}]}
        response = yield treq.post(daemon.data_url("/victim/v2/pipeline"), json.dumps(body).encode())
        result = json.loads((yield response.content()))["results"][0]
        self.assertEqual(result["type"], "error")
        self.assertIn("no such table", result["error"]["message"])


# The same cases with the data port served by two data workers.
globals().update(with_data_workers(IsolationTests))
