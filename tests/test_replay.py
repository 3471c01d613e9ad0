"""
Replaying a SQLite file as the requests that rebuild it: every user table
and its rowids, whatever its SQL says; only turso's own tables skipped, by
exact name and shape.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from turso_twisted.errors import Conflict
from turso_twisted.replay import SqliteSource


def statements(path: str) -> list[dict[str, Any]]:
    source = SqliteSource(path)
    try:
        return [step["stmt"] for request in source.requests() for step in request["batch"]["steps"]]
    finally:
        source.close()


class ReplayTests(SynchronousTestCase):
    def make(self, *sql: str) -> str:
        path = self.mktemp() + ".db"
        connection = sqlite3.connect(path)
        for statement in sql:
            connection.execute(statement)
        connection.commit()
        connection.close()
        return path

    def inserts(self, steps: list[dict[str, Any]], table: str) -> list[tuple[str, list[Any]]]:
        return [(s["sql"], [a.get("value") for a in s["args"]]) for s in steps
                if s["sql"].startswith(f'INSERT INTO "{table}"')]

    def test_rowids_come_from_sqlite_not_from_the_sql_text(self) -> None:
        path = self.make(
            "CREATE TABLE w (x TEXT DEFAULT 'without rowid' /* WITHOUT ROWID */, "
            "y CHECK (y <> 'WITHOUT ROWID'))",
            "INSERT INTO w (rowid, x, y) VALUES (10, 'a', 1), (20, 'b', 2)",
            "CREATE TABLE k (id TEXT PRIMARY KEY, v) WITHOUT ROWID",
            "INSERT INTO k VALUES ('a', 1)",
            'CREATE TABLE shadow ("rowid" TEXT, v)',
            "INSERT INTO shadow (_rowid_, rowid, v) VALUES (7, 'mine', 1)",
        )
        steps = statements(path)
        self.assertEqual([args[0] for _, args in self.inserts(steps, "w")], ["10", "20"])
        [(sql, args)] = self.inserts(steps, "k")
        self.assertNotIn("rowid", sql)
        [(sql, args)] = self.inserts(steps, "shadow")
        self.assertTrue(sql.startswith('INSERT INTO "shadow" (_rowid_, "rowid", "v")'), sql)
        self.assertEqual(args, ["7", "mine", "1"])

    def test_every_user_table_is_replayed_turso_tables_are_not(self) -> None:
        path = self.make(
            "CREATE TABLE turso_sync_notes (x)", "INSERT INTO turso_sync_notes VALUES (1)",
            "CREATE TABLE turso_server_things (x)", "INSERT INTO turso_server_things VALUES (1)",
            "CREATE TABLE turso_cdc_like (x)",
            "CREATE TABLE turso_sync_last_change_id (client_id TEXT PRIMARY KEY, pull_gen INTEGER, "
            "change_id INTEGER)",
            "INSERT INTO turso_sync_last_change_id VALUES ('replica-1', 0, 5)",
            "CREATE TABLE turso_server_backup (namespace TEXT, namespace_id TEXT, history TEXT, "
            "created_at TEXT, backup_at TEXT, server_version TEXT)",
        )
        created = [s["sql"] for s in statements(path) if s["sql"].startswith("CREATE")]
        self.assertEqual(created, ["CREATE TABLE turso_sync_notes (x)",
                                   "CREATE TABLE turso_server_things (x)", "CREATE TABLE turso_cdc_like (x)"])

    def test_a_user_table_with_a_turso_name_is_refused_not_dropped(self) -> None:
        path = self.make("CREATE TABLE turso_server_backup (my_data TEXT)",
                         "INSERT INTO turso_server_backup VALUES ('precious')")
        with self.assertRaises(Conflict) as caught:
            statements(path)
        self.assertEqual(caught.exception.code, "internal_table_name")
