"""
The few bits of the sync protocol the proxy must read, so that a replica is
only ever served by the history of the database it was made from.

A namespace's files have a I{history}: a random id given when the files
are created, kept while they live (across restarts, archive and unarchive)
and replaced when they are replaced (a new incarnation of the name, a
restore, a fork).  tursodb's sync revisions are WAL frame numbers, which
mean nothing in another history, so the proxy tags every revision it hands
out as C{<history>-<frame>} and refuses any replica that presents a
revision of another history: it would otherwise pull nonsense, or nothing,
silently.

Pushes carry no revision, only the replica's client id (in the statements
on C{turso_sync_last_change_id}): the proxy notes the ids that push to a
history, and refuses ids retired from earlier histories of the name.

Only what is needed is parsed: protobuf fields 2 and 3 of a pull request,
field 1 of a pull response's first (length-delimited) message, and the
arguments of pipeline statements on the sync table.  L{HistoryGuard} is the
whole policy: what the data port checks on the way in and tags on the way
out, and which replicas a namespace's archive retires.
"""

from __future__ import annotations

from typing import Any

import attrs

from .errors import Conflict, Invalid
from .state import NamespaceRecord, StateStore

SYNC_TABLE = b"turso_sync_last_change_id"

_WIRE_VARINT, _WIRE_64, _WIRE_BYTES, _WIRE_32 = 0, 1, 2, 5


class StaleReplica(Exception):
    """
    The replica was made from another history of this namespace.
    """


class MalformedSyncMessage(ValueError):
    pass


def _read_varint(data: bytes, position: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if position >= len(data) or shift > 63:
            raise MalformedSyncMessage("truncated varint")
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, position


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def parse_fields(data: bytes) -> list[tuple[int, int, Any]]:
    """
    A protobuf message as (field number, wire type, value): C{int} for
    varints, C{bytes} otherwise.
    """
    fields: list[tuple[int, int, Any]] = []
    position = 0
    while position < len(data):
        key, position = _read_varint(data, position)
        number, wire = key >> 3, key & 7
        value: int | bytes
        if wire == _WIRE_VARINT:
            value, position = _read_varint(data, position)
        elif wire == _WIRE_BYTES:
            length, position = _read_varint(data, position)
            if position + length > len(data):
                raise MalformedSyncMessage("truncated field")
            value = data[position:position + length]
            position += length
        elif wire in (_WIRE_64, _WIRE_32):
            size = 8 if wire == _WIRE_64 else 4
            value = data[position:position + size]
            position += size
        else:
            raise MalformedSyncMessage(f"unsupported wire type {wire}")
        fields.append((number, wire, value))
    return fields


def serialize_fields(fields: list[tuple[int, int, Any]]) -> bytes:
    out = bytearray()
    for number, wire, value in fields:
        out += _varint(number << 3 | wire)
        if wire == _WIRE_VARINT:
            out += _varint(value)
        elif wire == _WIRE_BYTES:
            out += _varint(len(value)) + value
        else:
            out += value
    return bytes(out)


def tag(history: str, revision: bytes) -> bytes:
    return history.encode("ascii") + b"-" + revision


def untag_pull_request(body: bytes, history: str, name: str) -> bytes:
    """
    The pull request with its revisions turned back into tursodb's frame
    numbers.

    @raise StaleReplica: if a revision belongs to another history.
    """
    fields = parse_fields(body)
    prefix = history.encode("ascii") + b"-"
    out = []
    for number, wire, value in fields:
        if number in (2, 3) and wire == _WIRE_BYTES and value:
            if not value.startswith(prefix) or not value[len(prefix):].isdigit():
                raise StaleReplica(
                    f"this replica of namespace {name!r} was synced with other data than the "
                    "namespace now holds (it was deleted and created again, restored, or its "
                    "files were replaced); delete the local replica files and connect again")
            value = value[len(prefix):]
        out.append((number, wire, value))
    return serialize_fields(out)


def tag_pull_response(body: bytes, history: str) -> bytes:
    """
    The pull response with the revision in its header message tagged.
    """
    length, position = _read_varint(body, 0)
    header = body[position:position + length]
    if len(header) != length:
        raise MalformedSyncMessage("truncated pull-updates header")
    fields = [(n, w, tag(history, v) if n == 1 and w == _WIRE_BYTES and v else v)
              for n, w, v in parse_fields(header)]
    new_header = serialize_fields(fields)
    return _varint(len(new_header)) + new_header + body[position + length:]


def _list(value: object) -> list[Any]:
    return value if isinstance(value, list) else []


def pushing_clients(document: Any) -> set[str]:
    """
    The client ids named by statements on the sync table in a decoded
    pipeline request (what a replica's push sends); empty for anything
    else, whatever its shape.
    """
    found: set[str] = set()
    for request in _list(document.get("requests")) if isinstance(document, dict) else []:
        if not isinstance(request, dict):
            continue
        statements = [request.get("stmt")]
        batch = request.get("batch")
        if isinstance(batch, dict):
            statements += [step.get("stmt") for step in _list(batch.get("steps")) if isinstance(step, dict)]
        for statement in statements:
            if not isinstance(statement, dict) or SYNC_TABLE.decode() not in str(statement.get("sql")):
                continue
            # The sync table's statements bind pull_gen and change_id as
            # integers: their one text argument is the client id.
            for arg in _list(statement.get("args")):
                if isinstance(arg, dict) and arg.get("type") == "text" and isinstance(arg.get("value"), str):
                    found.add(arg["value"])
    return found


PULL_PATH = b"/pull-updates"
PIPELINE_PATH = b"/v2/pipeline"


def tag_outbound(history: str, method: bytes, path: bytes, status: int, body: bytes) -> bytes:
    """
    The response body a client gets: a pull's revision tagged with the
    C{history} it was served from.

    @raise MalformedSyncMessage: when the child's answer cannot be parsed.
    """
    if method == b"POST" and path == PULL_PATH and status == 200:
        return tag_pull_response(body, history)
    return body


@attrs.frozen
class CreationFacts:
    """What a request would bring to a namespace it creates: enough to refuse a stale replica."""

    #: A pull that presents a revision (a replica that has synced before).
    has_revision: bool = False
    #: The client ids a push names.
    clients: frozenset[str] = frozenset()

    @classmethod
    def of(cls, method: bytes, path: bytes, body: bytes, pipeline: Any = None) -> CreationFacts:
        """
        @raise Invalid: for a pull request that cannot be parsed.
        """
        if method != b"POST":
            return cls()
        if path == PULL_PATH:
            try:
                fields = parse_fields(body)
            except MalformedSyncMessage as error:
                raise Invalid("bad_request", f"malformed pull-updates request: {error}") from None
            return cls(has_revision=any(number in (2, 3) and wire == _WIRE_BYTES and value
                                        for number, wire, value in fields))
        if path == PIPELINE_PATH:
            return cls(clients=frozenset(pushing_clients(pipeline)))
        return cls()


def _stale_push(record: NamespaceRecord, stale: set[str]) -> Conflict:
    return Conflict("stale_replica",
                    f"this replica ({sorted(stale)[0]}) was made from other data than namespace "
                    f"{record.name!r} now holds (it was deleted and created again, restored, or "
                    "its files were replaced); delete the local replica files and connect again")


def inbound_body(record: NamespaceRecord, method: bytes, path: bytes, body: bytes,
                 pipeline: Any = None) -> tuple[bytes, set[str]]:
    """
    The request body a child gets (a pull's revisions untagged), and the
    client ids of a push that the namespace has not seen push before.

    @raise Conflict: for a replica of another history.
    @raise Invalid: for a pull request that cannot be parsed.
    """
    if method != b"POST":
        return body, set()
    if path == PULL_PATH:
        try:
            return untag_pull_request(body, record.history, record.name), set()
        except StaleReplica as error:
            raise Conflict("stale_replica", str(error)) from None
        except MalformedSyncMessage as error:
            raise Invalid("bad_request", f"malformed pull-updates request: {error}") from None
    if path == PIPELINE_PATH:
        clients = pushing_clients(pipeline)
        stale = clients & record.retired
        if stale:
            raise _stale_push(record, stale)
        return body, clients - record.clients
    return body, set()


@attrs.define(eq=False)
class HistoryGuard:
    """
    Keeps every replica on the history of the data it was made from: tags
    the revisions handed out, refuses revisions and pushes of other
    histories, and retires a history's replicas when its files go.
    """

    state: StateStore

    def inbound(self, record: NamespaceRecord, method: bytes, path: bytes, body: bytes,
                pipeline: Any = None) -> bytes:
        """
        The request body a child gets (see L{inbound_body}); a push's new
        replicas are noted and saved at once: it is what retires them
        should the files be replaced.

        @raise Conflict: for a replica of another history.
        @raise Invalid: for a pull request that cannot be parsed.
        """
        sent, new = inbound_body(record, method, path, body, pipeline)
        self.note_clients(record, new)
        return sent

    def note_clients(self, record: NamespaceRecord, client_ids: set[str]) -> None:
        """
        Remember C{client_ids} as replicas that push to C{record}'s history
        (saved now).

        @raise Conflict: for one retired from an earlier history.
        """
        stale = client_ids & record.retired
        if stale:
            raise _stale_push(record, stale)
        new = client_ids - record.clients
        if new:
            record.clients.update(new)
            try:
                self.state.save()
            except BaseException:
                record.clients.difference_update(new)
                raise

    def before_create(self, name: str, method: bytes, path: bytes, body: bytes,
                      pipeline: Any = None) -> None:
        """
        Check a request that would create C{name} (not live): see L{check_creation}.

        @raise Conflict: for a replica that has synced before.
        @raise Invalid: for a pull request that cannot be parsed.
        """
        self.check_creation(name, CreationFacts.of(method, path, body, pipeline))

    def check_creation(self, name: str, facts: CreationFacts) -> None:
        """
        A replica that has synced before (a revision to pull from, or a
        client id of an earlier history pushing) cannot be served by a new,
        empty namespace, so it is refused before anything is created.

        @raise Conflict: for such a replica.
        """
        if facts.has_revision or facts.clients & self.retired(name):
            raise Conflict("stale_replica",
                           f"this replica was made from data that namespace {name!r} no longer holds "
                           "(it was deleted or archived); delete the local replica files and connect again")

    def retire(self, name: str, client_ids: set[str]) -> None:
        """
        Remember C{client_ids} as replicas of a history of C{name} that is
        gone (saved with the caller's next state write).
        """
        if client_ids:
            self.state.tombstones[name] = self.state.tombstones.get(name, set()) | client_ids

    def retired(self, name: str) -> set[str]:
        """
        Replicas of every earlier history of C{name}: a new one refuses them.
        """
        return set(self.state.tombstones.get(name, ()))
