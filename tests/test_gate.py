"""
The statement gate: honest SQL passes, the attacks never do, however they
are dressed.
"""

from __future__ import annotations

import json
import re

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from turso_twisted.errors import Forbidden, Invalid
from turso_twisted.gate import StatementRefused, check_pipeline, check_sql

#: What pyturso 0.8.3 and @tursodatabase/sync 0.7.2 send on a push (seen on
#: the wire), and what applications commonly run.
HONEST = [
    "BEGIN IMMEDIATE",
    "COMMIT",
    "CREATE TABLE IF NOT EXISTS turso_sync_last_change_id (client_id TEXT PRIMARY KEY, pull_gen INTEGER, "
    "change_id INTEGER)",
    "SELECT pull_gen, change_id FROM turso_sync_last_change_id WHERE client_id = ?",
    "INSERT INTO turso_sync_last_change_id(client_id, pull_gen, change_id) VALUES (?, ?, ?) "
    "ON CONFLICT(client_id) DO UPDATE SET pull_gen=excluded.pull_gen, change_id=excluded.change_id",
    'INSERT INTO "t"("id", "x") VALUES (?,?) ON CONFLICT("id") DO UPDATE SET "id" = excluded."id",'
    '"x" = excluded."x"',
    "WITH RECURSIVE c(n) AS NOT MATERIALIZED (SELECT 1) UPDATE t SET x = (SELECT n FROM c)",
    'INSERT INTO "np"("v") VALUES (?)',
    'UPDATE "t" SET "x" = ? WHERE "id" IS ?',
    'UPDATE "np" SET "v" = ? WHERE "rowid" = ?',
    'DELETE FROM "t" WHERE "id" = ?',
    "CREATE TABLE IF NOT EXISTS tp (k text PRIMARY KEY, v);",
    "CREATE UNIQUE INDEX IF NOT EXISTS cp_ab ON cp (b, a);",
    "alter table tp add column w text default 'd'",
    "DROP index tp_v",
    "DROP table cp",
    "INSERT OR REPLACE INTO t(_rowid_, x) VALUES (?, ?)",
    "select 1",
    "SELECT * FROM t WHERE x = 'VACUUM INTO ''/tmp/x''' -- load_extension('y')",
    "INSERT INTO t VALUES ('VACUUM INTO x')",
    "insert into notes (body) values ('attach database ''x'' as y; pragma journal_mode=off')",
    "WITH c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c WHERE n < 5) SELECT n FROM c",
    "WITH d AS (SELECT 1 AS i) INSERT INTO t SELECT i FROM d",
    "CREATE VIEW v AS SELECT x, upper(x) FROM t",
    "CREATE TABLE w(x TEXT DEFAULT 'without rowid', y INTEGER CHECK (y > 0)) WITHOUT ROWID",
    "CREATE TRIGGER tr AFTER INSERT ON t BEGIN INSERT INTO log VALUES ('inserted ' || new.x); "
    "UPDATE c SET n = CASE WHEN n IS NULL THEN 1 ELSE n + 1 END; END",
    "CREATE TEMP TRIGGER IF NOT EXISTS tr2 BEFORE DELETE ON t WHEN old.x <> 'END' BEGIN SELECT 1; END;",
    "SAVEPOINT s1; RELEASE s1",
    "ROLLBACK",
    "PRAGMA table_info(t)",
    "pragma TABLE_INFO('my table')",
    "PRAGMA user_version",
    "PRAGMA integrity_check",
    "EXPLAIN QUERY PLAN SELECT * FROM t WHERE x = ?",
    'SELECT "load_extension" FROM t',  # a column of that name
    "SELECT x'00ff', 1.5e3, 0x1F, :name, @p, $q, ?3 FROM t",
    "/* a comment */ select 1 /* unterminated at the end",
    "SELECT [order], `group` FROM [my table]",
    "ANALYZE",
    "SELECT :名前, @имя, $x1 FROM t",
    "PRAGMA main.table_info(t)",
    "PRAGMA foreign_keys",
    "PRAGMA journal_mode",
    "SELECT name FROM pragma_table_info('t')",
    "BEGIN; SAVEPOINT a; RELEASE a; ROLLBACK TO b; COMMIT",
    "SELECT x, row_number() OVER (PARTITION BY y ORDER BY z) FROM t",
    "INSERT INTO t VALUES (1) RETURNING id",
    "SELECT data ->> '$.a', data -> '$.b' FROM t",
    "CREATE TABLE s (a INTEGER, b TEXT GENERATED ALWAYS AS (upper(a)) VIRTUAL) STRICT",
]

#: Hand-written attacks: each must be refused.
ATTACKS = [
    "VACUUM INTO '/var/lib/turso/victim.db'",
    "vacuum into 'relative.db'",
    "VaCuUm",
    "/* hi */VACUUM INTO 'x.db'",
    "-- note\nVACUUM INTO 'x.db'",
    "select 1; vacuum into 'x.db'",
    ";;VACUUM INTO 'x'",
    "select 1;\n\t;VACUUM\tINTO\n'x'",
    "EXPLAIN VACUUM",
    "ATTACH DATABASE 'x.db' AS y",
    "attach 'x.db' as y",
    "DETACH y",
    "SELECT load_extension('/tmp/evil')",
    'SELECT "load_extension"(\'/tmp/evil\')',
    "SELECT [LOAD_EXTENSION]('/tmp/evil')",
    "SELECT `load_extension` ('/tmp/evil')",
    "SELECT load_extension/* x */('/tmp/evil')",
    "select main.load_extension('x')",
    "CREATE TABLE t (x DEFAULT (load_extension('evil')))",
    "CREATE TABLE t (x CHECK (load_extension('evil') IS NULL))",
    "CREATE VIEW v AS SELECT load_extension('evil')",
    "CREATE TRIGGER tr AFTER INSERT ON t BEGIN SELECT load_extension('evil'); END",
    "CREATE TRIGGER tr AFTER INSERT ON t BEGIN VACUUM INTO 'x'; END",
    "CREATE TRIGGER tr AFTER INSERT ON t BEGIN PRAGMA query_only=1; END",
    "CREATE TRIGGER tr AFTER INSERT ON t BEGIN SELECT 1;",
    "SELECT readfile('/etc/passwd')",
    "SELECT writefile('/tmp/x', 'y')",
    "PRAGMA journal_mode=experimental_mvcc",
    "PRAGMA journal_mode = delete",
    "PRAGMA query_only=1",
    "PRAGMA query_only",
    "PRAGMA user_version=7",
    "PRAGMA other.user_version",
    "SELECT * FROM pragma_database_list",
    "SELECT name FROM pragma_module_list()",
    "PRAGMA capture_data_changes_conn('full')",
    "PRAGMA wal_checkpoint(TRUNCATE)",
    "PRAGMA synchronous=OFF",
    "PRAGMA table_info(t); PRAGMA query_only=1",
    "PRAGMA database_list",
    "CREATE VIRTUAL TABLE v USING csv(filename='/etc/passwd')",
    "SELECT 'unterminated",
    'SELECT "unterminated',
    "REPLACE INTO t VALUES (1); ATTACH 'x' AS y",
    "WITH x AS (SELECT 1) VACUUM",
    "DO SOMETHING",
    "\u00a0VACUUM",
    "SELECT 1 FROM t WHERE 1 AND\u00a0load_extension('x')",
    "SELECT\u2003load_extension('x')",
]


class GateTableTests(SynchronousTestCase):
    def test_honest_sql_passes(self) -> None:
        for sql in HONEST:
            try:
                check_sql(sql)
            except StatementRefused as error:
                self.fail(f"{sql!r} refused: {error}")

    def test_attacks_are_refused(self) -> None:
        for sql in ATTACKS:
            with self.assertRaises(StatementRefused, msg=sql):
                check_sql(sql)

    def test_kinds(self) -> None:
        self.assertEqual(check_sql("select 1; pragma table_info(t)"), ["read", "read"])
        self.assertEqual(check_sql("BEGIN; INSERT INTO t VALUES (1); COMMIT"), ["begin", "write", "commit"])
        self.assertEqual(check_sql("WITH d AS (SELECT 1) DELETE FROM t"), ["write"])


def pipeline(*sql: str, kind: str = "batch") -> bytes:
    steps = [{"condition": None, "stmt": {"sql": s, "args": [], "want_rows": True}} for s in sql]
    if kind == "batch":
        batch = {"type": "batch", "batch": {"steps": steps}}
        return json.dumps({"baton": None, "requests": [batch]}).encode()
    return json.dumps({"requests": [{"type": "execute", "stmt": step["stmt"]} for step in steps]}).encode()


class PipelineTests(SynchronousTestCase):
    def test_a_push_passes(self) -> None:
        verdict = check_pipeline(pipeline(*HONEST[:10]))
        self.assertEqual(verdict.kinds, {"begin", "commit", "read", "write"})
        self.assertEqual(check_pipeline(pipeline("select 1", kind="execute")).kinds, {"read"})
        self.assertEqual(verdict.document["requests"][0]["type"], "batch", "the request, decoded once")

    def test_one_refused_statement_refuses_the_request(self) -> None:
        with self.assertRaises(Forbidden) as caught:
            check_pipeline(pipeline("select 1", "VACUUM INTO '/tmp/x'"))
        self.assertEqual(caught.exception.code, "statement_not_allowed")
        self.assertIn("VACUUM", caught.exception.message)

    def test_shapes_the_child_would_not_take_are_invalid(self) -> None:
        for body in (b"", b"{not json", b"[]", b'{"requests": {}}', b'{"requests": [1]}',
                     b'{"requests": [{"type": "sequence", "sql": "VACUUM"}]}',
                     b'{"requests": [{"type": "store_sql", "sql": "VACUUM", "sql_id": 1}]}',
                     b'{"requests": [{"type": "batch", "batch": {"steps": 5}}]}',
                     b'{"requests": [{"type": "execute", "stmt": {"sql": 5}}]}',
                     b"[" * 100_000,
                     b'{"requests": [{"type": "execute", "stmt": {"sql": "VACUUM", "sql": "select 1"}}]}',
                     b'{"requests": [{"type": "execute", "type": "batch", "stmt": {"sql": "select 1"}}]}'):
            with self.assertRaises(Invalid, msg=body[:60]):
                check_pipeline(body)

    def test_a_transaction_left_open_is_refused(self) -> None:
        """
        The child's connection is shared by every request: a transaction
        one request leaves open would take in the next client's writes and
        block backups.
        """
        for statements in (["BEGIN"], ["BEGIN", "INSERT INTO t VALUES (1)"], ["SAVEPOINT a"],
                           ["BEGIN; COMMIT; BEGIN IMMEDIATE"], ["BEGIN", "SAVEPOINT a", "RELEASE a"]):
            with self.assertRaises(Forbidden, msg=statements) as caught:
                check_pipeline(pipeline(*statements))
            self.assertIn("transaction open", caught.exception.message)
        for statements in (["BEGIN IMMEDIATE", "INSERT INTO t VALUES (1)", "COMMIT"],
                           ["BEGIN", "SAVEPOINT a", "ROLLBACK TO a", "RELEASE a", "END"],
                           ["SAVEPOINT a", "RELEASE a"], ["BEGIN", "ROLLBACK"]):
            check_pipeline(pipeline(*statements))

    def test_the_work_per_request_is_bounded(self) -> None:
        with self.assertRaises(Forbidden) as caught:
            check_pipeline(pipeline("select " + "a," * 150_000 + "1", "select " + "b," * 150_000 + "1"))
        self.assertIn("tokens", caught.exception.message)

    def test_a_statement_by_id_alone_runs_nothing(self) -> None:
        body = b'{"requests": [{"type": "execute", "stmt": {"sql_id": 1}}]}'
        self.assertEqual(check_pipeline(body).kinds, set())


# -- properties -----------------------------------------------------------------

_KEYWORDS = {"end", "begin", "case", "select", "from", "where", "values", "set", "insert", "update", "delete",
             "into", "on", "and", "or", "not", "is", "null", "table", "create", "as"}
_names = st.from_regex(r"\A[a-z_][a-z0-9_]{0,10}\Z").filter(lambda n: n not in _KEYWORDS)
_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30)


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _comment(text: str) -> str:
    return "/*" + text.replace("*/", "") + "*/"


@st.composite
def honest_statements(draw: st.DrawFn) -> str:
    table, column = draw(_names), draw(_names)
    value = _literal(draw(_text))
    return draw(st.sampled_from([
        f"INSERT INTO {table} ({column}) VALUES ({value})",
        f'UPDATE "{table}" SET "{column}" = {value} WHERE rowid = 1',
        f"SELECT {column} FROM {table} WHERE {column} = {value}",
        f"DELETE FROM [{table}] WHERE {column} IS {value}",
        f"CREATE TABLE IF NOT EXISTS {table} ({column} TEXT DEFAULT {value})",
        f"CREATE TRIGGER {table}_t AFTER INSERT ON {table} BEGIN "
        f"UPDATE {table} SET {column} = CASE WHEN {column} = {value} THEN 1 END; END",
    ]))


#: Forbidden statements, with a slot for what an attacker puts between words.
_FORBIDDEN = [
    "VACUUM{s}INTO{s}'/tmp/x.db'",
    "VACUUM",
    "ATTACH{s}DATABASE{s}'/tmp/x.db'{s}AS{s}y",
    "SELECT{s}load_extension{s}('/tmp/evil')",
    "PRAGMA{s}journal_mode{s}={s}experimental_mvcc",
    "PRAGMA{s}query_only{s}={s}1",
    "CREATE{s}VIEW{s}v{s}AS{s}SELECT{s}load_extension('/tmp/evil')",
]


@st.composite
def dressed_attacks(draw: st.DrawFn) -> str:
    template = draw(st.sampled_from(_FORBIDDEN))
    separators = st.one_of(
        st.sampled_from([" ", "\t", "\n", "\r\n", "  "]),
        _text.map(_comment),
        _text.filter(lambda t: "\n" not in t and "\r" not in t).map(lambda t: " --" + t + "\n"),
    )
    parts = template.split("{s}")
    sql = parts[0]
    for part in parts[1:]:
        sql += draw(separators) + part
    if draw(st.booleans()):
        sql = "".join(c.upper() if draw(st.booleans()) else c.lower() for c in sql)
    sql = re.sub(r"(?i)load_extension", lambda m: draw(st.sampled_from(
        [m.group(), f'"{m.group()}"', f"[{m.group()}]", f"`{m.group()}`"])), sql)
    before = draw(st.lists(honest_statements(), max_size=2))
    return "; ".join([*before, sql])


class GatePropertyTests(SynchronousTestCase):
    @given(st.lists(honest_statements(), min_size=1, max_size=4))
    def test_generated_honest_sql_passes(self, statements: list[str]) -> None:
        check_sql("; ".join(statements))

    @given(dressed_attacks())
    def test_dressed_attacks_never_pass(self, sql: str) -> None:
        with self.assertRaises(StatementRefused):
            check_sql(sql)
