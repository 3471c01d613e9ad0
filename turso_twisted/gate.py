"""
The statement gate: what a data-port client may ask a child to run.

A child runs whatever C{/v2/pipeline} carries with the daemon's file-system
authority: C{VACUUM INTO '<path>'} writes a database anywhere the daemon
can, C{load_extension} runs code, some C{PRAGMA}s break a namespace for
good.  So every statement of every C{execute} and C{batch} step is
tokenised the way SQLite does (comments, quoting, any case and spacing,
several statements in one string, the bodies of C{CREATE TRIGGER}) and
classified; only the kinds of statement sync clients and applications use
pass, and anything the gate cannot classify is refused.  It refuses:

  - C{VACUUM} in every form, C{ATTACH} and C{DETACH};
  - a call of a function that reaches the file system or loads code
    (C{load_extension}, ...), anywhere: in a query, a C{DEFAULT}, a
    C{CHECK}, a view, a trigger body;
  - every C{PRAGMA} but a short list of read-only ones, and those only read;
  - virtual tables (their module decides what they touch);
  - a request type other than C{execute} and C{batch}, and a body that is
    not the pipeline JSON the child accepts.

Measured against pyturso 0.8.3 and C{@tursodatabase/sync} 0.7.2: a push is
C{batch} requests only, with C{BEGIN IMMEDIATE}, C{COMMIT}, DML, C{CREATE
TABLE|INDEX ... IF NOT EXISTS}, C{ALTER TABLE ... ADD COLUMN}, C{DROP
TABLE|INDEX} and the statements on C{turso_sync_last_change_id}, and no
C{PRAGMA} at all; all of it passes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from functools import lru_cache
from itertools import pairwise
from typing import Any, Literal

import attrs

from .errors import Forbidden, Invalid
from .sqltext import MAX_TOKENS, StatementRefused, Token, split_statements, tokenize

#: What a statement does: reads, writes, or controls the transaction.
Kind = Literal["read", "write", "begin", "savepoint", "commit", "release", "neutral"]

#: Functions no client may call: each reaches the file system or loads code
#: (only the first exists in tursodb 0.6.0; the others in SQLite builds).
FORBIDDEN_FUNCTIONS = frozenset({
    "load_extension", "readfile", "writefile", "edit", "fts3_tokenizer", "zipfile", "sqlar_compress",
    "sqlar_uncompress",
})

#: Read-only PRAGMAs a client may run, without a value.
READ_PRAGMAS = frozenset({
    "application_id", "data_version", "encoding", "freelist_count", "page_count", "page_size",
    "schema_version", "user_version", "table_list", "integrity_check", "quick_check",
    "foreign_key_check", "foreign_keys", "journal_mode", "cache_size", "busy_timeout", "synchronous",
})
#: Read-only PRAGMAs that take a table or index name in parentheses.
READ_PRAGMAS_OF = frozenset({
    "table_info", "table_xinfo", "index_list", "index_info", "index_xinfo", "foreign_key_list",
})

def _head(statement: list[Token], count: int) -> list[str | None]:
    return [t.word if t.kind == "word" else None for t in statement[:count]]


def _check_calls(statement: list[Token]) -> None:
    for token, following in pairwise([*statement, Token("end", "")]):
        word = token.word
        if word is None:
            continue
        if following.kind == "lparen" and word in FORBIDDEN_FUNCTIONS:
            raise StatementRefused(f"{word}() reaches the file system or loads code")
        # The table-valued PRAGMA functions: only the read-only ones.
        if word.startswith("pragma_") and word[7:] not in READ_PRAGMAS | READ_PRAGMAS_OF:
            raise StatementRefused(f"{word} is not one of the read-only PRAGMAs clients may run")


def classify(statement: list[Token]) -> Kind:
    """
    What one statement does.

    @raise StatementRefused: if it is not allowed, or not understood.
    """
    _check_calls(statement)
    head = _head(statement, 4)
    verb = head[0]
    if verb == "explain":
        rest = statement[3:] if head[1:3] == ["query", "plan"] else statement[1:]
        classify(rest)
        return "read"
    if verb in ("select", "values"):
        return "read"
    if verb == "with":
        return _classify_with(statement)
    if verb in ("insert", "replace", "update", "delete"):
        return "write"
    if verb == "begin":
        return "begin"
    if verb in ("commit", "end") or (verb == "rollback" and "to" not in head[1:4]):
        return "commit"
    if verb == "savepoint":
        return "savepoint"
    if verb == "release":
        return "release"
    if verb == "rollback":
        return "neutral"  # ROLLBACK TO: the savepoint stays
    if verb == "create":
        return _classify_create(statement, head)
    if verb == "drop" and head[1] in ("table", "index", "view", "trigger"):
        return "write"
    if verb == "alter" and head[1] == "table":
        return "write"
    if verb in ("analyze", "reindex"):
        return "write"
    if verb == "pragma":
        return _classify_pragma(statement)
    if verb == "vacuum":
        raise StatementRefused("VACUUM writes files outside the namespace (and rewrites it)")
    if verb in ("attach", "detach"):
        raise StatementRefused(f"{verb.upper()} opens other database files")
    shown = statement[0].text if statement else ""
    raise StatementRefused(f"statement starting {shown[:30]!r} is not one the gate knows")


def _classify_with(statement: list[Token]) -> Kind:
    """
    C{WITH <common table expressions> <verb> ...}: the verb is the first
    keyword outside the parentheses of the CTEs.
    """
    depth = 0
    for token in statement[1:]:
        if token.kind == "lparen":
            depth += 1
        elif token.kind == "rparen":
            depth -= 1
        elif depth == 0 and token.kind == "word":
            word = token.text.lower()
            if word in ("select", "values"):
                return "read"
            if word in ("insert", "replace", "update", "delete"):
                return "write"
            if word not in ("recursive", "as", "not", "materialized") and not _is_name(token):
                break
    raise StatementRefused("WITH must lead to SELECT, INSERT, UPDATE or DELETE")


def _is_name(token: Token) -> bool:
    return token.kind in ("word", "quoted") and token.text.lower() not in _KEYWORDS_AFTER_CTE


#: Keywords that cannot name a CTE and do not start its body.
_KEYWORDS_AFTER_CTE = frozenset({"vacuum", "attach", "detach", "pragma", "create", "drop", "alter",
                                 "begin", "commit", "rollback", "analyze", "reindex", "explain"})


def _classify_create(statement: list[Token], head: list[str | None]) -> Kind:
    words = [w for w in head[1:4] if w is not None]
    while words and words[0] in ("temp", "temporary", "unique"):
        words.pop(0)
    what = words[0] if words else None
    if what == "virtual":
        raise StatementRefused("virtual tables are not allowed (their module decides what they touch)")
    if what == "trigger":
        _check_trigger_body(statement)
        return "write"
    if what in ("table", "index", "view"):
        return "write"
    raise StatementRefused("CREATE of something other than a table, index, view or trigger")


def _check_trigger_body(statement: list[Token]) -> None:
    """
    The statements of a trigger body: SQLite allows only DML and SELECT
    there; each is classified like a statement of its own.
    """
    words = [t.word if t.kind == "word" else None for t in statement]
    start = words.index("begin") + 1
    end = len(statement) - 1 - words[::-1].index("end")
    body = statement[start:end]
    for inner in _split_body(body):
        if classify(inner) not in ("read", "write") or _head(inner, 1)[0] not in (
                "select", "values", "with", "insert", "replace", "update", "delete"):
            raise StatementRefused("a trigger body may hold only SELECT, INSERT, UPDATE and DELETE")


def _split_body(body: list[Token]) -> Iterator[list[Token]]:
    statement: list[Token] = []
    for token in body:
        if token.kind == "semicolon":
            if statement:
                yield statement
            statement = []
        else:
            statement.append(token)
    if statement:
        yield statement


def _classify_pragma(statement: list[Token]) -> Kind:
    if len(statement) > 3 and statement[1].word in ("main", "temp") and statement[2].text == ".":
        statement = [statement[0], *statement[3:]]
    names = [t for t in statement[1:] if t.kind in ("word", "quoted")]
    name = names[0].word if names else None
    rest = statement[2:]
    if name in READ_PRAGMAS and not rest:
        return "read"
    if name in READ_PRAGMAS_OF and len(rest) == 3 and rest[0].kind == "lparen" and \
            rest[1].kind in ("word", "quoted", "string") and rest[2].kind == "rparen":
        return "read"
    shown = name or (statement[1].text if len(statement) > 1 else "")
    raise StatementRefused(f"PRAGMA {shown} is not one of the read-only PRAGMAs clients may run")


def check_sql(sql: str, limit: int = MAX_TOKENS) -> list[Kind]:
    """
    The kind of each statement in C{sql}.

    @raise StatementRefused: if any is refused.
    """
    return _verdict(sql, limit)[0]


def _verdict(sql: str, limit: int) -> tuple[list[Kind], int]:
    """
    The kinds of C{sql}'s statements and how many tokens they took.
    """
    if len(sql) > _CACHED_LENGTH:
        return _check_sql(sql, limit)
    verdict = _cached_verdict(sql)
    if isinstance(verdict, str):
        raise StatementRefused(verdict)
    kinds, count = verdict
    if count > limit:
        raise StatementRefused(f"more than {MAX_TOKENS} tokens in one request; split it, or "
                               "pass values as arguments")
    return list(kinds), count


def _check_sql(sql: str, limit: int = MAX_TOKENS) -> tuple[list[Kind], int]:
    tokens = tokenize(sql, limit)
    return [classify(statement) for statement in split_statements(tokens)], len(tokens)


#: Statements up to this long have their verdict cached: clients send the
#: same parameterised statements over and over.
_CACHED_LENGTH = 2048


@lru_cache(maxsize=4096)
def _cached_verdict(sql: str) -> tuple[tuple[Kind, ...], int] | str:
    try:
        kinds, count = _check_sql(sql)
    except StatementRefused as error:
        return str(error)
    return tuple(kinds), count


@attrs.frozen
class PipelineVerdict:
    """
    What a pipeline request asks: the kinds of all its statements, and the
    request decoded once (the history guard reads its pushing clients).
    """

    kinds: frozenset[str]
    document: Any = attrs.field(eq=False, repr=False)


def _statements(document: Any) -> Iterator[str]:
    if not isinstance(document, dict) or not isinstance(document.get("requests"), list):
        raise ValueError('expected {"requests": [...]}')
    for request in document["requests"]:
        if not isinstance(request, dict):
            raise ValueError("each request must be an object")
        kind = request.get("type")
        if kind == "execute":
            steps = [request.get("stmt")]
        elif kind == "batch":
            batch = request.get("batch")
            if not isinstance(batch, dict) or not isinstance(batch.get("steps"), list):
                raise ValueError("a batch request needs batch.steps")
            steps = [step.get("stmt") if isinstance(step, dict) else None for step in batch["steps"]]
        else:
            raise ValueError(f"request type {kind!r} is not supported (only execute and batch)")
        for statement in steps:
            if not isinstance(statement, dict):
                raise ValueError("each statement must be an object")
            sql = statement.get("sql")
            if sql is None:
                continue
            if not isinstance(sql, str):
                raise ValueError("sql must be a string")
            yield sql


def check_pipeline(body: bytes) -> PipelineVerdict:
    """
    Check every statement a C{/v2/pipeline} body carries.

    @raise Invalid: if the body is not the pipeline JSON the child accepts.
    @raise Forbidden: if a statement is refused (C{statement_not_allowed}).
    """
    try:
        document = json.loads(body, object_pairs_hook=_object)
    except (ValueError, RecursionError, UnicodeDecodeError) as error:
        raise Invalid("bad_pipeline", f"not a pipeline request: {error}") from None
    return check_document(document)


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """
    A JSON object without duplicate keys: parsers differ on which of two
    C{"sql"} keys counts, so the gate and the child must never disagree.
    """
    document = dict(pairs)
    if len(document) != len(pairs):
        raise ValueError("duplicate key in a JSON object")
    return document


def check_document(document: Any) -> PipelineVerdict:
    """
    L{check_pipeline} of a decoded body (the daemon's own replays use it).
    """
    try:
        statements = list(_statements(document))
    except ValueError as error:
        raise Invalid("bad_pipeline", f"not a pipeline request: {error}") from None
    kinds: set[str] = set()
    budget = MAX_TOKENS
    # The child's one connection is shared by every request: a transaction
    # left open would swallow the next client's writes and block backups.
    depth = 0
    for sql in statements:
        try:
            found, used = _verdict(sql, budget)
        except StatementRefused as error:
            raise _refused(sql, str(error)) from None
        budget -= used
        kinds.update(found)
        for kind in found:
            if kind in ("begin", "savepoint"):
                depth += 1
            elif kind == "commit":
                depth = 0
            elif kind == "release":
                depth = max(0, depth - 1)
    if depth:
        raise Forbidden("statement_not_allowed",
                        "the request leaves a transaction open: end it with COMMIT or ROLLBACK in the same "
                        "request (the namespace's connection is shared by every request)")
    return PipelineVerdict(frozenset(kinds), document)


def _refused(sql: str, why: str) -> Forbidden:
    shown = " ".join(sql.split())
    shown = shown if len(shown) <= 120 else shown[:117] + "..."
    return Forbidden("statement_not_allowed", f"statement {shown!r} refused: {why}")
