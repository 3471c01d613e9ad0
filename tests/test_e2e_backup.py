"""
End to end: hot backups, verified restores that replicas cannot misread,
and forks, with real tursodb children and pyturso replicas.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sqlite3
import threading
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread

from .daemon import BACKUP_TAKEN, Daemon, run_replica, wait_for, with_data_workers
from .test_e2e import E2ETestCase, get_json, treq

COUNT = "select count(*) from t"


class BackupTestCase(E2ETestCase):
    @inlineCallbacks
    def seeded(self, daemon: Daemon, name: str, rows: int) -> Any:
        replica = yield self.replica(daemon, name)
        yield run_replica(replica.run, "create table t (id integer primary key, x text)",
                          *[f"insert into t (x) values ('{name}-{i}')" for i in range(rows)])
        yield run_replica(replica.push)
        return replica

    @inlineCallbacks
    def download(self, daemon: Daemon, name: str) -> Any:
        response = yield treq.get(daemon.admin_url(f"/v1/namespaces/{name}/backup"))
        body = yield response.content()
        return response, body

    def save(self, body: bytes) -> str:
        path = os.path.abspath(self.mktemp()) + ".db"
        with open(path, "wb") as handle:
            handle.write(body)
        return path

    @inlineCallbacks
    def restore(self, daemon: Daemon, name: str, body: bytes, query: str = "") -> Any:
        return (yield get_json(daemon.admin_url(f"/v1/namespaces/{name}/restore{query}"), "POST",
                               data=body))

    def scratch(self, daemon: Daemon) -> list[str]:
        return os.listdir(os.path.join(daemon.data_dir, "_tmp"))


class BackupTests(BackupTestCase):
    @inlineCallbacks
    def test_backup_carries_identity_and_checksum(self) -> Any:
        daemon = yield Daemon(self).start()
        yield self.seeded(daemon, "alpha", 25)
        response, body = yield self.download(daemon, "alpha")
        self.assertEqual(response.code, 200)
        headers = response.headers
        self.assertEqual(headers.getRawHeaders(b"content-type"), [b"application/vnd.sqlite3"])
        digest = hashlib.sha256(body).hexdigest().encode()
        self.assertEqual(headers.getRawHeaders(b"x-backup-sha256"), [digest])
        self.assertRegex(headers.getRawHeaders(b"content-disposition")[0].decode(),
                         r'^attachment; filename="alpha\.\d{8}T\d{6}\.\d{3}Z\.db"$')
        status, record = yield get_json(daemon.admin_url("/v1/namespaces/alpha"))
        with sqlite3.connect(self.save(body)) as copy:
            self.assertEqual(copy.execute(COUNT).fetchone(), (25,))
            identity = copy.execute("select namespace, namespace_id, history, server_version "
                                    "from turso_server_backup").fetchall()
        self.assertEqual(identity, [("alpha", record["id"], record["history"], "turso-server 0.1.0")])
        yield wait_for(lambda: not [f for f in self.scratch(daemon) if f.startswith("backup-")],
                       "the temp copy to go")
        status, error = yield get_json(daemon.admin_url("/v1/namespaces/ghost/backup"))
        self.assertEqual((status, error["error"]), (404, "namespace_not_found"))

    @inlineCallbacks
    def test_backups_are_consistent_while_a_replica_pushes(self) -> Any:
        """
        Every backup holds whole pushed transactions (batches of 10 rows).
        """
        daemon = yield Daemon(self).start()
        writer = yield self.seeded(daemon, "busy", 10)
        stop = threading.Event()

        def keep_pushing() -> int:
            batches = 0
            while not stop.is_set() and batches < 200:
                writer.run(*[f"insert into t (x) values ('b{batches}-{i}')" for i in range(10)])
                writer.push()
                batches += 1
            return batches

        pushing = deferToThread(keep_pushing)
        counts = []
        for _ in range(6):
            response, body = yield self.download(daemon, "busy")
            self.assertEqual(response.code, 200)
            with sqlite3.connect(self.save(body)) as copy:
                counts.append(copy.execute(COUNT).fetchone()[0])
        stop.set()
        batches = yield pushing
        self.assertGreater(batches, 0)
        self.assertEqual([c % 10 for c in counts], [0] * len(counts), counts)
        self.assertEqual(counts, sorted(counts))

    @inlineCallbacks
    def test_aborted_download_leaves_no_temp_file(self) -> Any:
        daemon = yield Daemon(self).start()
        replica = yield self.replica(daemon, "big")
        yield run_replica(replica.run, "create table t (b blob)",
                          *["insert into t values (randomblob(1000000))" for _ in range(12)])
        yield run_replica(replica.push)

        def start_and_abandon() -> bytes:
            with socket.create_connection(("127.0.0.1", daemon.admin_port)) as sock:
                sock.sendall(b"GET /v1/namespaces/big/backup HTTP/1.1\r\nHost: x\r\n\r\n")
                return sock.recv(4096)

        first = yield deferToThread(start_and_abandon)
        self.assertTrue(first.startswith(b"HTTP/1.1 200"))
        yield wait_for(lambda: not self.scratch(daemon) or all(
            not f.startswith("backup-") for f in self.scratch(daemon)), "the temp copy to go")


class RestoreTests(BackupTestCase):
    @inlineCallbacks
    def test_restore_and_every_kind_of_replica(self) -> Any:
        """
        (1) a replica made after the restore sees exactly the backup; (2) a
        replica synced before it and (3) one with unpushed writes are
        refused with a clear error; the server never holds duplicates.
        """
        daemon = yield Daemon(self).start()
        synced = yield self.seeded(daemon, "alpha", 10)
        response, backup = yield self.download(daemon, "alpha")
        yield run_replica(synced.run, *[f"insert into t (x) values ('after-{i}')" for i in range(5)])
        yield run_replica(synced.push)
        offline = yield self.replica(daemon, "alpha")
        yield run_replica(offline.run, "insert into t (x) values ('offline')")
        reader = yield self.replica(daemon, "alpha")
        status, before = yield get_json(daemon.admin_url("/v1/namespaces/alpha"))

        status, record = yield self.restore(daemon, "alpha", backup)
        self.assertEqual(status, 200, record)
        self.assertEqual((record["id"], record["origin"]), (before["id"], before["origin"]))
        self.assertNotEqual(record["history"], before["history"])

        fresh = yield self.replica(daemon, "alpha")
        rows = yield run_replica(fresh.rows, "select x from t order by id")
        self.assertEqual(rows, [(f"alpha-{i}",) for i in range(10)])
        for action in (synced.pull, synced.push, reader.pull, offline.pull):
            with self.assertRaises(Exception) as caught:
                yield run_replica(action)
            self.assertIn("stale_replica", str(caught.exception))
            self.assertIn("delete the local replica files and connect again", str(caught.exception))
        yield run_replica(fresh.run, "insert into t (x) values ('new')")
        yield run_replica(fresh.push)
        check = yield self.replica(daemon, "alpha")
        self.assertEqual((yield run_replica(check.rows, COUNT)), [(11,)])
        status, archive = yield get_json(daemon.admin_url("/v1/archive?name=alpha"))
        [entry] = archive["entries"]
        self.assertTrue(entry["reason"].startswith("replaced by a restore from backup of 'alpha'"))

    @inlineCallbacks
    def test_refusals_change_nothing(self) -> Any:
        daemon = yield Daemon(self).start()
        yield self.seeded(daemon, "alpha", 3)
        yield self.seeded(daemon, "beta", 4)
        response, beta_backup = yield self.download(daemon, "beta")
        status, before = yield get_json(daemon.admin_url("/v1/namespaces/alpha"))
        plain = self.save(b"")
        os.unlink(plain)
        with sqlite3.connect(plain) as connection:
            connection.execute("create table t (x)")
            connection.execute("insert into t values (1)")
        with open(plain, "rb") as handle:
            foreign = handle.read()
        cases = [
            (beta_backup, "", 409, "backup_of_another_namespace"),
            (b"garbage" * 100, "", 422, "not_sqlite"),
            (beta_backup[: len(beta_backup) // 2], "?source=beta", 422, None),
            (foreign, "", 422, "backup_without_identity"),
            (beta_backup, "?source=gamma", 409, "backup_of_another_namespace"),
        ]
        for body, query, expected, code in cases:
            status, error = yield self.restore(daemon, "alpha", body, query)
            self.assertEqual(status, expected, (query, error))
            if code:
                self.assertEqual(error["error"], code)
            self.assertEqual(set(error), {"error", "message"})
        status, after = yield get_json(daemon.admin_url("/v1/namespaces/alpha"))
        self.assertEqual(after["history"], before["history"])
        reader = yield self.replica(daemon, "alpha")
        self.assertEqual((yield run_replica(reader.rows, COUNT)), [(3,)])
        status, archive = yield get_json(daemon.admin_url("/v1/archive"))
        self.assertEqual(archive["entries"], [])
        yield wait_for(lambda: self.scratch(daemon) == [] or all(
            f.startswith("tursodb-") for f in self.scratch(daemon)), "uploads to be cleaned up")

        # On purpose, both are accepted.
        status, record = yield self.restore(daemon, "alpha", beta_backup, "?source=beta")
        self.assertEqual(status, 200, record)
        status, record = yield self.restore(daemon, "gamma", foreign, "?allow_foreign=true")
        self.assertEqual((status, record["origin"], record["locked"]), (200, "explicit", True))
        reader = yield self.replica(daemon, "alpha")
        self.assertEqual((yield run_replica(reader.rows, COUNT)), [(4,)])


class IncarnationTests(BackupTestCase):
    @inlineCallbacks
    def test_backup_of_an_earlier_incarnation_needs_a_flag(self) -> Any:
        daemon = yield Daemon(self).start()
        yield self.seeded(daemon, "alpha", 3)
        response, old_backup = yield self.download(daemon, "alpha")
        yield get_json(daemon.admin_url("/v1/namespaces/alpha"), "DELETE")
        yield self.seeded(daemon, "alpha", 1)
        status, error = yield self.restore(daemon, "alpha", old_backup)
        self.assertEqual((status, error["error"]), (409, "backup_of_another_incarnation"))
        reader = yield self.replica(daemon, "alpha")
        self.assertEqual((yield run_replica(reader.rows, COUNT)), [(1,)])
        status, record = yield self.restore(daemon, "alpha", old_backup, "?allow_other_incarnation=true")
        self.assertEqual(status, 200, record)

    @inlineCallbacks
    def test_client_gone_before_the_copy_is_made(self) -> Any:
        daemon = yield Daemon(self).start()
        replica = yield self.replica(daemon, "big")
        yield run_replica(replica.run, "create table t (b blob)",
                          *["insert into t values (randomblob(1000000))" for _ in range(30)])
        yield run_replica(replica.push)

        def ask_and_leave() -> None:
            with socket.create_connection(("127.0.0.1", daemon.admin_port)) as sock:
                sock.sendall(b"GET /v1/namespaces/big/backup HTTP/1.1\r\nHost: x\r\n\r\n")

        for _ in range(3):
            yield deferToThread(ask_and_leave)
        yield wait_for(lambda: len(daemon.events(BACKUP_TAKEN, name="big")) == 3, "the copies to finish")
        yield wait_for(lambda: not [f for f in self.scratch(daemon) if f.startswith("backup-")],
                       "every abandoned copy to go")
        response, body = yield self.download(daemon, "big")
        self.assertEqual(response.code, 200, "the namespace's backup turn was given back")


class ForkTests(BackupTestCase):
    @inlineCallbacks
    def test_fork_is_an_isolated_copy(self) -> Any:
        daemon = yield Daemon(self).start()
        source = yield self.seeded(daemon, "alpha", 7)
        status, record = yield get_json(daemon.admin_url("/v1/namespaces/alpha/fork/copy"), "POST")
        self.assertEqual((status, record["name"], record["origin"], record["locked"]),
                         (201, "copy", "explicit", True))
        status, alpha = yield get_json(daemon.admin_url("/v1/namespaces/alpha"))
        self.assertNotEqual((record["id"], record["history"]), (alpha["id"], alpha["history"]))
        copy = yield self.replica(daemon, "copy")
        self.assertEqual((yield run_replica(copy.rows, COUNT)), [(7,)])
        yield run_replica(copy.run, "insert into t (x) values ('only in copy')")
        yield run_replica(copy.push)
        yield run_replica(source.run, "insert into t (x) values ('only in alpha')")
        yield run_replica(source.push)
        yield run_replica(source.pull)
        yield run_replica(copy.pull)
        self.assertEqual((yield run_replica(source.rows, "select x from t where x like 'only%'")),
                         [("only in alpha",)])
        self.assertEqual((yield run_replica(copy.rows, "select x from t where x like 'only%'")),
                         [("only in copy",)])
        status, error = yield get_json(daemon.admin_url("/v1/namespaces/alpha/fork/copy"), "POST")
        self.assertEqual((status, error["error"]), (409, "namespace_exists"))
        status, error = yield get_json(daemon.admin_url("/v1/namespaces/ghost/fork/other"), "POST")
        self.assertEqual(status, 404)
        json.dumps(error)


# The same cases with the data port served by two data workers.
globals().update(with_data_workers(BackupTests, RestoreTests, IncarnationTests, ForkTests))
