"""
SQL as SQLite reads it, for the statement gate (L{turso_twisted.gate}):
tokens without spaces and comments, and statements split on C{;} the way
SQLite splits them (not inside a C{CREATE TRIGGER} body).
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import attrs

#: The most tokens one request's statements may have: the gate's work is
#: bounded (about half a second at worst), whatever a client sends.
MAX_TOKENS = 200_000

_TOKEN = re.compile(r"""
    (?P<space>\s+)
  | (?P<line_comment>--[^\n]*)
  | (?P<block_comment>/\*.*?(?:\*/|\Z))
  | (?P<string>'(?:[^']|'')*')
  | (?P<blob>[xX]'[^']*')
  | (?P<quoted>"(?:[^"]|"")*"|`(?:[^`]|``)*`|\[[^\]]*\])
  | (?P<number>0[xX][0-9a-fA-F]+|(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<word>(?:(?!\s)[A-Za-z_\u0080-\U0010ffff])(?:(?!\s)[A-Za-z0-9_$\u0080-\U0010ffff])*)
  | (?P<param>\?\d*|[:@$](?:(?!\s)[A-Za-z0-9_$\u0080-\U0010ffff])+)
  | (?P<semicolon>;)
  | (?P<lparen>\()
  | (?P<rparen>\))
  | (?P<operator>\|\||<<|>>|<=|>=|==|!=|<>|->>|->|[-+*/%<>=~&|,.!])
""", re.VERBOSE | re.DOTALL)


class StatementRefused(Exception):
    """
    A statement the gate does not let through; the message says which and why.
    """


@attrs.frozen
class Token:
    kind: str
    text: str

    @property
    def word(self) -> str | None:
        """
        The token as a keyword or name, lower case (quotes removed), or
        C{None} for anything else.
        """
        if self.kind == "word":
            return self.text.lower()
        if self.kind == "quoted":
            return self.text[1:-1].lower()
        return None


def tokenize(sql: str, limit: int = MAX_TOKENS) -> list[Token]:
    """
    The tokens of C{sql} without spaces and comments.  Any Unicode space
    separates words (SQLite would take a no-break space as part of a name:
    splitting there only makes the gate see more, never less).

    @raise StatementRefused: for text SQLite would not tokenise either (an
        unterminated string or quoted name, a stray character), or for more
        than C{limit} tokens.
    """
    tokens: list[Token] = []
    position = 0
    while position < len(sql):
        match = _TOKEN.match(sql, position)
        if match is None:
            raise StatementRefused(f"cannot read the SQL at {sql[position:position + 20]!r}")
        kind = match.lastgroup
        assert kind is not None
        if kind not in ("space", "line_comment", "block_comment"):
            if len(tokens) >= limit:
                raise StatementRefused(f"more than {MAX_TOKENS} tokens in one request; split it, or "
                                       "pass values as arguments")
            tokens.append(Token(kind, match.group()))
        position = match.end()
    return tokens


def split_statements(tokens: list[Token]) -> Iterator[list[Token]]:
    """
    The statements of a token list, split on C{;} as SQLite does: the
    C{;}s inside a C{CREATE TRIGGER ... BEGIN ... END} body (where C{CASE
    ... END} nests) do not end the statement.
    """
    statement: list[Token] = []
    in_body = False
    depth = 0
    for token in tokens:
        word = token.word if token.kind == "word" else None
        if token.kind == "semicolon" and not in_body:
            if statement:
                yield statement
            statement = []
            continue
        statement.append(token)
        if _is_trigger(statement):
            if word == "begin" and not in_body:
                in_body = True
            elif in_body and word == "case":
                depth += 1
            elif in_body and word == "end":
                if depth:
                    depth -= 1
                else:
                    in_body = False
    if in_body:
        raise StatementRefused("CREATE TRIGGER body without its END")
    if statement:
        yield statement


def _is_trigger(statement: list[Token]) -> bool:
    words = [t.word for t in statement[:4] if t.kind == "word"]
    return len(words) >= 2 and words[0] == "create" and (
        words[1] == "trigger" or (words[1] in ("temp", "temporary") and words[2:3] == ["trigger"]))
