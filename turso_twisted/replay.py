"""
Building a database that sync clients can see: replaying a SQLite file as
SQL into a fresh tursodb child.

tursodb serves replicas from its WAL (the sync revision is a WAL frame
number and checkpointing is off), so a file copied into place is invisible
to them: a fresh replica bootstraps an empty database.  Replaying the
schema and the rows through the child's C{/v2/pipeline} writes them into
its WAL, where every replica sees them.  Rowids are kept, so a replica's
changes keep naming the same rows.

Reading the source runs in a thread; sending runs on the reactor.
"""

from __future__ import annotations

import base64
import sqlite3
from collections.abc import Iterator
from typing import Any

from .errors import Conflict

#: Tables that belong to the sync machinery, tursodb's change capture or
#: our backups, not to the user, by exact name and columns: never replayed.
#: Every other table is (SQLite's own C{sqlite_*} aside).
INTERNAL_TABLES = {
    "turso_sync_last_change_id": {"client_id", "pull_gen", "change_id"},
    "turso_cdc": {"change_id", "change_time", "change_txn_id", "change_type", "table_name", "id", "before",
                  "after", "updates"},
    "turso_cdc_version": {"table_name", "version"},
    "turso_server_backup": {"namespace", "namespace_id", "history", "created_at", "backup_at",
                            "server_version"},
}

ROWS_PER_REQUEST = 200
BYTES_PER_REQUEST = 1 << 20


def open_read_only(path: str) -> sqlite3.Connection:
    """
    Open a SQLite file without ever writing to it (no journal, no -shm).
    """
    return sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True, check_same_thread=False)


def quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def hrana_value(value: Any) -> dict[str, Any]:
    if value is None:
        return {"type": "null"}
    if isinstance(value, int):
        return {"type": "integer", "value": str(value)}
    if isinstance(value, float):
        return {"type": "float", "value": value}
    if isinstance(value, bytes):
        return {"type": "blob", "base64": base64.b64encode(value).decode("ascii")}
    return {"type": "text", "value": str(value)}


def _execute(sql: str, args: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"sql": sql, "args": args or [], "want_rows": False}


def _batch(statements: list[dict[str, Any]]) -> dict[str, Any]:
    """
    One request: the statements in a transaction of their own.
    """
    steps = [_execute("BEGIN"), *statements, _execute("COMMIT")]
    return {"type": "batch", "batch": {"steps": [{"stmt": step} for step in steps]}}


class SqliteSource:
    """
    A SQLite file, read as the requests that rebuild it.
    """

    def __init__(self, path: str) -> None:
        self.connection = open_read_only(path)

    def close(self) -> None:
        self.connection.close()

    def _objects(self) -> list[tuple[str, str, str, str]]:
        rows = self.connection.execute(
            "SELECT type, name, tbl_name, sql FROM sqlite_master WHERE sql IS NOT NULL ORDER BY rowid")
        return [row for row in rows if not row[1].startswith("sqlite_") and not self._internal(row[2])]

    def _internal(self, table: str) -> bool:
        """
        Whether C{table} is one of the internal tables (skipped).

        @raise Conflict: for a user table that has an internal table's name
            but not its columns: it cannot be replayed, nor dropped silently.
        """
        if table.startswith("sqlite_"):
            return True
        columns = INTERNAL_TABLES.get(table)
        if columns is None:
            return False
        if set(self._columns(table)) != columns:
            raise Conflict("internal_table_name",
                           f"the file has a table named {table!r} that is not turso's own: the server "
                           "keeps that name for itself; rename the table and take the backup again")
        return True

    def _columns(self, table: str) -> list[str]:
        return [row[1] for row in self.connection.execute(f"PRAGMA table_info({quote(table)})")]

    def _rowid(self, table: str, columns: list[str]) -> str | None:
        """
        The name that reaches C{table}'s rowid, asked of SQLite (not read
        from its SQL text), or C{None} for a table without one.
        """
        listed = self.connection.execute(f"PRAGMA table_list({quote(table)})").fetchone()
        if listed is None or listed[4]:  # wr: WITHOUT ROWID
            return None
        taken = {column.lower() for column in columns}
        return next((name for name in ("rowid", "_rowid_", "oid") if name not in taken), None)

    def requests(self) -> Iterator[dict[str, Any]]:
        """
        Pipeline requests in order: tables, their rows, then indexes,
        views and triggers (built once the data is in).
        """
        objects = self._objects()
        tables = [(name, sql) for kind, name, _, sql in objects if kind == "table"]
        if tables:
            yield _batch([_execute(sql) for _, sql in tables])
        for name, sql in tables:
            if sql.lstrip().upper().startswith("CREATE VIRTUAL"):
                continue
            yield from self._rows(name)
        rest = [_execute(sql) for kind, _, _, sql in objects if kind != "table"]
        if rest:
            yield _batch(rest)

    def _rows(self, table: str) -> Iterator[dict[str, Any]]:
        columns = self._columns(table)
        rowid = self._rowid(table, columns)
        selected = ([rowid] if rowid else []) + [quote(c) for c in columns]
        target = selected
        insert = (f"INSERT INTO {quote(table)} ({', '.join(target)}) "
                  f"VALUES ({', '.join('?' for _ in target)})")
        cursor = self.connection.execute(f"SELECT {', '.join(selected)} FROM {quote(table)}")
        statements: list[dict[str, Any]] = []
        size = 0
        for row in cursor:
            statements.append(_execute(insert, [hrana_value(value) for value in row]))
            size += sum(len(v) if isinstance(v, (bytes, str)) else 8 for v in row)
            if len(statements) >= ROWS_PER_REQUEST or size >= BYTES_PER_REQUEST:
                yield _batch(statements)
                statements, size = [], 0
        if statements:
            yield _batch(statements)


def next_request(requests: Iterator[dict[str, Any]]) -> dict[str, Any] | None:
    """
    The next request, or C{None} at the end (for C{deferToThread}).
    """
    return next(requests, None)
