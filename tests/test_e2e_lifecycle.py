"""
End to end: the GC with short durations, archive, unarchive and retention,
with real tursodb children and pyturso replicas.
"""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.internet.defer import inlineCallbacks

from .daemon import GC_ARCHIVED, GC_PURGED, Daemon, run_replica, wait_for, with_data_workers
from .test_e2e import E2ETestCase, get_json

SHORT = {"TURSO_GC_INTERVAL": "1s", "TURSO_AUTO_IDLE_DURATION": "2s"}


class LifecycleTests(E2ETestCase):
    @inlineCallbacks
    def admin(self, daemon: Daemon, method: str, path: str, body: Any = None) -> Any:
        kwargs = {} if body is None else {"data": json.dumps(body).encode()}
        return (yield get_json(daemon.admin_url(path), method, **kwargs))

    @inlineCallbacks
    def test_gc_archive_and_unarchive(self) -> Any:
        """
        An idle auto namespace is archived with its files and manifest, an
        explicit one is kept, a ttl'd unlocked one is archived; the reused
        name starts empty; unarchive brings the rows back to a replica; a
        tampered entry is refused.  (Retention is long here, so that the
        entries stay while the test looks at them; see the next test.)
        """
        daemon = yield Daemon(self, TURSO_ARCHIVE_RETENTION="1h", **SHORT).start()
        writer = yield self.replica(daemon, "idle")
        yield run_replica(writer.run, "create table t (x text)", "insert into t values ('kept')")
        yield run_replica(writer.push)
        yield self.admin(daemon, "POST", "/v1/namespaces/keep/create")
        yield self.admin(daemon, "POST", "/v1/namespaces/short/create")
        yield self.admin(daemon, "POST", "/v1/namespaces/short/unlock")
        status, body = yield self.admin(daemon, "POST", "/v1/namespaces/short/ttl", {"ttl": "1s"})
        self.assertEqual((status, body["ttl"]), (200, "1s"))

        yield wait_for(lambda: daemon.events(GC_ARCHIVED, name="idle")
                       and daemon.events(GC_ARCHIVED, name="short"), "the GC to archive both")
        [idle_event] = daemon.events(GC_ARCHIVED, name="idle")
        self.assertEqual(idle_event["reason"], "auto-created idle > 2s")
        self.assertEqual(daemon.events(GC_ARCHIVED, name="short")[0]["reason"], "ttl 1s expired")
        status, listed = yield self.admin(daemon, "GET", "/v1/namespaces")
        self.assertEqual([r["name"] for r in listed["namespaces"]], ["keep"])
        entry_dir = os.path.join(daemon.data_dir, "archive", idle_event["entry"])
        self.assertEqual(sorted(os.listdir(entry_dir)), ["idle.db", "idle.db-wal", "manifest.json"])
        self.assertFalse(os.path.exists(os.path.join(daemon.data_dir, "idle.db")))
        status, archive = yield self.admin(daemon, "GET", "/v1/archive?name=idle")
        [manifest] = archive["entries"]
        self.assertEqual((manifest["name"], manifest["origin"]), ("idle", "auto"))
        self.assertEqual({f["name"] for f in manifest["files"]}, {"idle.db", "idle.db-wal"})

        # The name used again is a new, empty namespace...
        fresh = yield self.replica(daemon, "idle")
        tables = yield run_replica(fresh.rows, "select name from sqlite_master where name = 't'")
        self.assertEqual(tables, [])
        yield run_replica(fresh.close)
        # ...which idles out too; then the first incarnation comes back.
        yield wait_for(lambda: len(daemon.events(GC_ARCHIVED, name="idle")) == 2,
                       "the GC to archive the second incarnation")
        status, restored = yield self.admin(daemon, "POST", "/v1/namespaces/idle/unarchive",
                                            {"archivedAt": manifest["archivedAt"]})
        self.assertEqual((status, restored["id"], restored["locked"]), (200, manifest["id"], True))
        reader = yield self.replica(daemon, "idle")
        self.assertEqual((yield run_replica(reader.rows, "select x from t")), [("kept",)])
        yield run_replica(writer.run, "insert into t values ('after')")
        yield run_replica(writer.push)
        yield run_replica(reader.pull)
        self.assertEqual((yield run_replica(reader.rows, "select x from t order by x")),
                         [("after",), ("kept",)])

        # A tampered entry is refused and left as it was.
        [short_entry] = (yield self.admin(daemon, "GET", "/v1/archive?name=short"))[1]["entries"]
        with open(os.path.join(daemon.data_dir, "archive", short_entry["entry"], "short.db"), "ab") as f:
            f.write(b"tampered")
        status, error = yield self.admin(daemon, "POST", "/v1/namespaces/short/unarchive")
        self.assertEqual((status, error["error"]), (422, "archive_tampered"))
        self.assertFalse(os.path.exists(os.path.join(daemon.data_dir, "short.db")))
        status, listed = yield self.admin(daemon, "GET", "/v1/namespaces")
        self.assertEqual(sorted(r["name"] for r in listed["namespaces"]), ["idle", "keep"])

    @inlineCallbacks
    def test_retention_purges(self) -> Any:
        daemon = yield Daemon(self, TURSO_ARCHIVE_RETENTION="6s", **SHORT).start()
        yield self.admin(daemon, "POST", "/v1/namespaces/gone/create")
        status, deleted = yield self.admin(daemon, "DELETE", "/v1/namespaces/gone")
        entry = deleted["archived"]["entry"]
        self.assertTrue(os.path.isdir(os.path.join(daemon.data_dir, "archive", entry)))
        yield wait_for(lambda: daemon.events(GC_PURGED, name="gone"), "the GC to purge the entry")
        self.assertEqual(daemon.events(GC_PURGED, name="gone")[0]["reason"], "archive age > 6s")
        self.assertEqual(os.listdir(os.path.join(daemon.data_dir, "archive")), [])
        status, archive = yield self.admin(daemon, "GET", "/v1/archive")
        self.assertEqual(archive["entries"], [])


class ReplicaHistoryTests(E2ETestCase):
    @inlineCallbacks
    def test_a_stale_replica_creates_nothing(self) -> Any:
        """
        After DELETE, a replica of the deleted namespace that pushes or
        pulls is refused before anything is created: the name stays free.
        """
        daemon = yield Daemon(self).start()
        old = yield self.replica(daemon, "alpha")
        yield run_replica(old.run, "create table t (x text)", "insert into t values ('old')")
        yield run_replica(old.push)
        yield get_json(daemon.admin_url("/v1/namespaces/alpha"), "DELETE")
        yield run_replica(old.run, "insert into t values ('written offline')")
        for action in (old.push, old.pull):
            with self.assertRaises(Exception) as caught:
                yield run_replica(action)
            self.assertIn("stale_replica", str(caught.exception))
            status, listed = yield get_json(daemon.admin_url("/v1/namespaces"))
            self.assertEqual(listed["namespaces"], [], "nothing auto-provisioned")
        self.assertFalse(os.path.exists(os.path.join(daemon.data_dir, "alpha.db")))

    @inlineCallbacks
    def test_replica_of_a_deleted_namespace_cannot_touch_the_new_one(self) -> Any:
        """
        After DELETE, the name starts empty, and a replica of the old
        incarnation is refused on push and on pull with a clear error,
        instead of re-pushing archived rows into it or diverging silently;
        after unarchive it works again.
        """
        daemon = yield Daemon(self).start()
        old = yield self.replica(daemon, "alpha")
        yield run_replica(old.run, "create table t (x text)", "insert into t values ('old')")
        yield run_replica(old.push)
        status, deleted = yield get_json(daemon.admin_url("/v1/namespaces/alpha"), "DELETE")
        self.assertEqual(status, 200)

        fresh = yield self.replica(daemon, "alpha")
        self.assertEqual((yield run_replica(fresh.rows, "select name from sqlite_master where name='t'")), [])
        yield run_replica(old.run, "insert into t values ('written offline')")
        for action in (old.push, old.pull):
            with self.assertRaises(Exception) as caught:
                yield run_replica(action)
            self.assertIn("stale_replica", str(caught.exception))
            self.assertIn("connect again", str(caught.exception))
        self.assertEqual((yield run_replica(fresh.rows, "select name from sqlite_master where name='t'")), [])
        status, record = yield get_json(daemon.admin_url("/v1/namespaces/alpha"))
        self.assertEqual(record["retiredReplicas"], 1)

        # Bring the old files back: the old replica is good again.
        yield get_json(daemon.admin_url("/v1/namespaces/alpha"), "DELETE")
        choice = json.dumps({"archivedAt": deleted["archived"]["archivedAt"]}).encode()
        status, restored = yield get_json(daemon.admin_url("/v1/namespaces/alpha/unarchive"), "POST",
                                          data=choice)
        self.assertEqual(status, 200)
        yield run_replica(old.push)
        reader = yield self.replica(daemon, "alpha")
        self.assertEqual((yield run_replica(reader.rows, "select x from t order by x")),
                         [("old",), ("written offline",)])


# The same cases with the data port served by two data workers.
globals().update(with_data_workers(LifecycleTests, ReplicaHistoryTests))
