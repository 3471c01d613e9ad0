"""
The sync-protocol bits the proxy reads and rewrites.
"""

from __future__ import annotations

import os

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from turso_twisted.errors import Invalid
from turso_twisted.state import NamespaceRecord, StateStore
from turso_twisted.syncproto import (
    HistoryGuard,
    MalformedSyncMessage,
    StaleReplica,
    parse_fields,
    pushing_clients,
    serialize_fields,
    tag_outbound,
    tag_pull_response,
    untag_pull_request,
)

fields = st.lists(st.one_of(
    st.tuples(st.integers(1, 30), st.just(0), st.integers(0, 2**63)),
    st.tuples(st.integers(1, 30), st.just(2), st.binary(max_size=300)),
), max_size=8)


def pull_request(client_revision: bytes = b"", server_revision: bytes = b"") -> bytes:
    out = [(1, 0, 0)]
    if server_revision:
        out.append((2, 2, server_revision))
    if client_revision:
        out.append((3, 2, client_revision))
    return serialize_fields(out)


def pull_response(revision: bytes, pages: bytes = b"\x05page!") -> bytes:
    header = serialize_fields([(1, 2, revision), (2, 0, 7), (3, 2, b"")])
    return bytes([len(header)]) + header + pages


class ProtobufTests(SynchronousTestCase):
    @given(fields)
    def test_round_trip(self, message: list[tuple[int, int, object]]) -> None:
        self.assertEqual(parse_fields(serialize_fields(message)), message)

    def test_truncated(self) -> None:
        for bad in (b"\x1a\x05ab", b"\x08\xff", b"\x0b"):
            with self.assertRaises(MalformedSyncMessage):
                parse_fields(bad)


class RevisionTests(SynchronousTestCase):
    def test_untag_current_history(self) -> None:
        body = pull_request(b"h1-42", b"h1-50")
        self.assertEqual(parse_fields(untag_pull_request(body, "h1", "alpha")),
                         [(1, 0, 0), (2, 2, b"50"), (3, 2, b"42")])

    def test_bootstrap_passes(self) -> None:
        self.assertEqual(untag_pull_request(b"", "h1", "alpha"), b"")
        self.assertEqual(untag_pull_request(pull_request(), "h1", "alpha"), pull_request())

    def test_other_histories_are_stale(self) -> None:
        for revision in (b"0", b"42", b"h2-42", b"h1-", b"h1-4x", b"xh1-4"):
            with self.assertRaises(StaleReplica, msg=revision) as caught:
                untag_pull_request(pull_request(revision), "h1", "alpha")
            self.assertIn("'alpha'", str(caught.exception))
            self.assertIn("connect again", str(caught.exception))

    @given(st.integers(0, 2**40), st.binary(max_size=100))
    def test_tag_response_round_trips_through_the_client(self, frame: int, pages: bytes) -> None:
        tagged = tag_pull_response(pull_response(str(frame).encode(), pages), "h1")
        length = tagged[0]
        header = parse_fields(tagged[1:1 + length])
        self.assertEqual(header[0], (1, 2, b"h1-%d" % frame))
        self.assertEqual(header[1:], [(2, 0, 7), (3, 2, b"")])
        self.assertEqual(tagged[1 + length:], pages)
        # What the client sends back is what the child understands.
        echoed = untag_pull_request(pull_request(header[0][2]), "h1", "alpha")
        self.assertEqual(parse_fields(echoed)[1], (3, 2, str(frame).encode()))


class PushTests(SynchronousTestCase):
    def test_client_ids_of_a_push(self) -> None:
        select = {"type": "batch", "batch": {"steps": [{"stmt": {
            "sql": "SELECT pull_gen, change_id FROM turso_sync_last_change_id WHERE client_id = ?",
            "args": [{"type": "text", "value": "turso-sync-py-1"}]}}]}}
        update = {"type": "batch", "batch": {"steps": [
            {"stmt": {"sql": "BEGIN IMMEDIATE", "args": []}},
            {"stmt": {"sql": "INSERT INTO t VALUES (?)", "args": [{"type": "text", "value": "user data"}]}},
            {"stmt": {"sql": "UPDATE turso_sync_last_change_id SET pull_gen = ?, change_id = ? "
                             "WHERE client_id = ?",
                      "args": [{"type": "integer", "value": "0"}, {"type": "integer", "value": "5"},
                               {"type": "text", "value": "my-app-2"}]}}]}}
        self.assertEqual(pushing_clients({"requests": [select, update]}), {"turso-sync-py-1", "my-app-2"})

    def test_ordinary_sql_is_not_a_push(self) -> None:
        self.assertEqual(pushing_clients({"requests": [{"type": "execute", "stmt": {"sql": "select 1"}}]}),
                         set())
        self.assertEqual(pushing_clients(None), set())

    @given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                        lambda inner: st.lists(inner, max_size=3)
                        | st.dictionaries(st.sampled_from(["requests", "stmt", "batch", "steps", "sql",
                                                           "args", "type", "value"]), inner, max_size=4),
                        max_leaves=12))
    def test_any_json_shape_is_an_answer_not_an_error(self, document: object) -> None:
        """
        Whatever a client sends, the scan answers: a malformed push is the
        child's to refuse, never a crash of ours.
        """
        self.assertIsInstance(pushing_clients({"x": "turso_sync_last_change_id", "requests": document}), set)
        self.assertIsInstance(pushing_clients(document), set)
        self.assertEqual(pushing_clients({"requests": [{"batch": {"steps": 5}}]}), set())


class HistoryGuardTests(SynchronousTestCase):
    def test_only_a_posted_pull_is_read_as_one(self) -> None:
        state = StateStore(os.path.join(self.mktemp(), "namespaces.json"), Clock())
        record = NamespaceRecord.new("alpha", "auto", 0)
        guard = HistoryGuard(state)
        for method in (b"GET", b"OPTIONS", b"PUT"):
            self.assertEqual(guard.inbound(record, method, b"/pull-updates", b"\xff not protobuf"),
                             b"\xff not protobuf")
            self.assertEqual(tag_outbound(record.history, method, b"/pull-updates", 200, b"\xff"), b"\xff")
        with self.assertRaises(Invalid):
            guard.inbound(record, b"POST", b"/pull-updates", b"\xff not protobuf")
