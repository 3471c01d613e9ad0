"""
The supervisor's memory: C{<data dir>/_state/namespaces.json}.

Every lifecycle change is written at once and atomically (temp file, fsync,
rename, fsync of the directory); the copy it replaces is kept as
C{namespaces.json.prev} so an operator can recover from a bad write.  Access
times change on every data request, so they are bumped in memory and flushed
on a debounce instead (the design note's 60 seconds): a crash loses at most
that much of them, which only makes the GC see a slightly older access.
"""

from __future__ import annotations

import errno
import json
import os
import uuid
from collections.abc import Callable, Iterator
from typing import Any, Literal

import attrs
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from . import names
from .files import write_atomically
from .nsconfig import NamespaceConfig
from .timefmt import compact, format_duration, from_rfc3339, parse_duration, to_rfc3339

Origin = Literal["explicit", "auto"]
STATE_VERSION = 1


def new_history() -> str:
    return uuid.uuid4().hex[:16]


class StateError(Exception):
    """
    The state file cannot be used; the message names it and says why.
    """


@attrs.define
class NamespaceRecord:
    """
    What the daemon knows about one live namespace across restarts.

    C{id} is new for every incarnation of a name (create, auto-provision,
    adoption), never empty: archives and backups carry it so that data can
    always be traced to the namespace it belongs to.
    """

    name: str
    origin: Origin
    locked: bool
    created_at: float
    last_access_at: float
    ttl: float | None = None
    id: str = attrs.field(factory=lambda: uuid.uuid4().hex)
    #: The history of the current files (see L{turso_twisted.syncproto}).
    history: str = attrs.field(factory=new_history)
    #: Replicas (client ids) that pushed to this history.
    clients: set[str] = attrs.field(factory=set)
    #: Replicas of earlier histories of this name: refused.
    retired: set[str] = attrs.field(factory=set)
    #: The archive entry this namespace's files are moving to, saved
    #: before they move, so that start-up knows what a crash interrupted.
    archiving: str | None = None
    #: Set while a database built elsewhere (a fork, a restore to a new
    #: name) is moved in: the record is saved before its files exist, so
    #: start-up never meets files without a record (see
    #: L{turso_twisted.recovery}).
    installing: bool = False
    #: Set on the node a namespace is moving to (cluster mode), from when
    #: its files are in until the cluster names this node its owner: it is
    #: not served before (see L{turso_twisted.moves}).
    moving_in: bool = False
    #: Set on the node a namespace is moving from, before the cluster is
    #: told its new owner: not served until etcd says how the move ended.
    moving_to: str | None = None
    #: The namespace's own settings (C{GET}/C{POST /v1/namespaces/:name/config}).
    config: NamespaceConfig = attrs.field(factory=NamespaceConfig)

    @classmethod
    def new(cls, name: str, origin: Origin, now: float) -> NamespaceRecord:
        return cls(
            name=names.validate(name),
            origin=origin,
            locked=(origin == "explicit"),
            created_at=now,
            last_access_at=now,
        )

    def to_json(self) -> dict[str, Any]:
        out = {
            "name": self.name,
            "id": self.id,
            "origin": self.origin,
            "locked": self.locked,
            "ttl": None if self.ttl is None else format_duration(self.ttl),
            "createdAt": to_rfc3339(self.created_at),
            "lastAccessAt": to_rfc3339(self.last_access_at),
            "history": self.history,
            "clients": sorted(self.clients),
            "retiredClients": sorted(self.retired),
            "archiving": self.archiving,
            "installing": self.installing,
        }
        if self.moving_in:
            out["movingIn"] = True
        if self.moving_to is not None:
            out["movingTo"] = self.moving_to
        # Most namespaces keep the default config: 10,000 records would
        # otherwise carry 1.6 MB of nulls in every state write.
        if self.config != NamespaceConfig():
            out["config"] = self.config.to_json()
        return out

    @classmethod
    def from_json(cls, name: str, data: dict[str, Any]) -> NamespaceRecord:
        if data.get("origin") not in ("explicit", "auto"):
            raise ValueError(f"origin must be 'explicit' or 'auto', not {data.get('origin')!r}")
        if not isinstance(data.get("locked"), bool):
            raise ValueError("locked must be true or false")
        ttl = data.get("ttl")
        record_id = data.get("id")
        if not isinstance(record_id, str) or not record_id:
            raise ValueError("id must be a non-empty string")
        history = data.get("history")
        if not isinstance(history, str) or not history.isalnum():
            raise ValueError("history must be a non-empty alphanumeric string")
        return cls(
            name=names.validate(name),
            id=record_id,
            origin=data["origin"],
            locked=data["locked"],
            ttl=None if ttl is None else parse_duration(ttl),
            created_at=from_rfc3339(data["createdAt"]),
            last_access_at=from_rfc3339(data["lastAccessAt"]),
            history=history,
            clients=_strings(data.get("clients", []), "clients"),
            retired=_strings(data.get("retiredClients", []), "retiredClients"),
            archiving=_optional_string(data.get("archiving"), "archiving"),
            installing=_bool(data.get("installing", False), "installing"),
            moving_in=_bool(data.get("movingIn", False), "movingIn"),
            moving_to=_optional_string(data.get("movingTo"), "movingTo"),
            config=_config(data.get("config", {})),
        )


def _config(value: Any) -> NamespaceConfig:
    try:
        return NamespaceConfig.from_json(value)
    except ValueError as error:
        raise ValueError(f"config: {error}") from None


def _bool(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{what} must be true or false")
    return value


def _optional_string(value: Any, what: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{what} must be a string or null")
    return value


def _strings(value: Any, what: str) -> set[str]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ValueError(f"{what} must be a list of strings")
    return set(value)


@attrs.define
class StateStore:
    """
    The live namespaces, in memory, and their durable copy on disk.
    """

    path: str
    clock: IReactorTime
    flush_delay: float = 60.0
    records: dict[str, NamespaceRecord] = attrs.field(factory=dict)
    #: name -> client ids of every archived history of that name.
    tombstones: dict[str, set[str]] = attrs.field(factory=dict)
    #: name -> the latest tokens_not_before set for that name: a revocation
    #: holds for the name, through delete and re-creation.
    token_floors: dict[str, float] = attrs.field(factory=dict)
    writes: int = 0
    #: Names whose records could not be read at load (see L{_set_aside}).
    quarantined_records: list[str] = attrs.field(factory=list)
    #: Called after each write (the data workers learn what changed).
    on_save: list[Callable[[], None]] = attrs.field(factory=list)
    _pending_flush: IDelayedCall | None = attrs.field(default=None, init=False)
    _lines: dict[str, tuple[tuple[Any, ...], str]] = attrs.field(factory=dict, init=False)
    _log = Logger()

    @classmethod
    def for_data_dir(cls, data_dir: str, clock: IReactorTime, flush_delay: float = 60.0) -> StateStore:
        return cls(os.path.join(data_dir, "_state", "namespaces.json"), clock, flush_delay)

    @property
    def previous_path(self) -> str:
        return self.path + ".prev"

    def load(self) -> None:
        """
        Read the state file; a missing one means no namespaces yet.

        @raise StateError: if it exists and cannot be read or understood, or
            if it is missing while an earlier copy is still beside it.
        """
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        if not os.path.exists(self.path):
            if os.path.exists(self.previous_path):
                raise StateError(
                    f"state file {self.path} is missing but its previous copy "
                    f"{self.previous_path} exists; copy that into place to recover "
                    "(or remove it to start with no namespaces)"
                )
            self.records = {}
            self.tombstones = {}
            self.token_floors = {}
            return
        try:
            with open(self.path, "rb") as handle:
                document = json.loads(handle.read())
            if not isinstance(document, dict) or document.get("version") != STATE_VERSION:
                raise ValueError(f"expected an object with version {STATE_VERSION}")
            entries = document["namespaces"]
            if not isinstance(entries, dict):
                raise ValueError("'namespaces' must be an object")
            records = {}
            set_aside: dict[str, Any] = {}
            for name, data in entries.items():
                try:
                    if not isinstance(data, dict):
                        raise ValueError("expected an object")
                    records[name] = NamespaceRecord.from_json(name, data)
                except (ValueError, KeyError, TypeError, AttributeError, names.InvalidName) as error:
                    set_aside[name] = {"record": data, "problem": str(error)}
            raw_tombstones = document.get("tombstones", {})
            if not isinstance(raw_tombstones, dict):
                raise ValueError("'tombstones' must be an object")
            tombstones = {names.validate(name): _strings(ids, f"tombstones of {name!r}")
                          for name, ids in raw_tombstones.items()}
            raw_floors = document.get("tokensNotBefore", {})
            if not isinstance(raw_floors, dict):
                raise ValueError("'tokensNotBefore' must be an object")
            token_floors = {names.validate(name): from_rfc3339(moment) for name, moment in raw_floors.items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError, names.InvalidName) as error:
            hint = (
                f"; the previous good copy is {self.previous_path}"
                if os.path.exists(self.previous_path)
                else ""
            )
            raise StateError(f"state file {self.path} is unusable: {error}{hint}") from None
        if set_aside:
            self._set_aside(set_aside)
        self.records = records
        self.tombstones = tombstones
        self.token_floors = token_floors

    def _set_aside(self, set_aside: dict[str, Any]) -> None:
        """
        Keep records that cannot be read out of the way, in a file of their
        own beside the state, and say so loudly: one bad record never keeps
        the other namespaces down.  Its namespace is then not live (start-up
        quarantines its files); an operator can restore it from them.
        """
        path = os.path.join(os.path.dirname(self.path),
                            f"quarantined-records-{compact(self.clock.seconds())}.json")
        write_atomically(path, json.dumps(set_aside, indent=1).encode("utf-8") + b"\n")
        for name, entry in set_aside.items():
            self._log.error("namespace {name} set aside: its record in the state file is unusable "
                            "({problem}); kept in {path}", name=name, problem=entry["problem"], path=path)
        self.quarantined_records = sorted(set_aside)

    def save(self) -> None:
        """
        Write every record now (a lifecycle change happened).
        """
        if self._pending_flush is not None and self._pending_flush.active():
            self._pending_flush.cancel()
        self._pending_flush = None
        payload = self._serialize()
        write_atomically(self.path, payload, keep_previous=self.previous_path)
        self.writes += 1
        for listener in self.on_save:
            listener()

    def _serialize(self) -> bytes:
        """
        The whole state as JSON, one namespace per line: readable, and
        made with the C encoder (10,000 namespaces in well under 100 ms).
        """
        dumps = json.dumps
        cache = self._lines
        lines = []
        for name in sorted(self.records):
            record = self.records[name]
            # Only records that changed since the last write are encoded
            # again (sets only grow, or come with a new history).
            key = (record.id, record.origin, record.locked, record.ttl, record.created_at,
                   record.last_access_at, record.history, len(record.clients), len(record.retired),
                   record.archiving, record.installing, record.moving_in, record.moving_to, record.config)
            cached = cache.get(name)
            if cached is None or cached[0] != key:
                cached = cache[name] = (key, f"{dumps(name)}: {dumps(record.to_json())}")
            lines.append(cached[1])
        for gone in cache.keys() - self.records.keys():
            del cache[gone]
        tombstones = {name: sorted(ids) for name, ids in sorted(self.tombstones.items()) if ids}
        floors = {name: to_rfc3339(moment) for name, moment in sorted(self.token_floors.items())}
        body = ",\n".join(lines)
        return (f'{{"version": {STATE_VERSION},\n"namespaces": {{\n{body}\n}},\n'
                f'"tombstones": {dumps(tombstones)},\n"tokensNotBefore": {dumps(floors)}}}\n').encode()

    def tokens_not_before(self, name: str) -> float | None:
        """
        Tokens for C{name} issued before this are revoked: the later of the
        live record's C{tokens_not_before} and the last one set for the name
        (which outlives a delete).
        """
        record = self.records.get(name)
        own = None if record is None else record.config.tokens_not_before
        floor = self.token_floors.get(name)
        if own is None or floor is None:
            return own if floor is None else floor
        return max(own, floor)

    def touch(self, name: str) -> None:
        """
        Note a data request on C{name}: in memory now, on disk on the debounce.
        """
        record = self.records.get(name)
        if record is None:
            return
        record.last_access_at = self.clock.seconds()
        if self._pending_flush is None:
            self._pending_flush = self.clock.callLater(self.flush_delay, self._flush)

    def _flush(self) -> None:
        self._pending_flush = None
        try:
            self.save()
        except OSError as error:
            if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS):
                # The operator's to fix (readyz says so too), not a bug: no traceback.
                self._log.error("could not flush namespace access times: {error}; retrying later",
                                error=str(error))
            else:
                self._log.failure("could not flush namespace access times; retrying later")
            self._pending_flush = self.clock.callLater(self.flush_delay, self._flush)

    def flush_pending(self) -> None:
        """
        Write debounced access times now, if any wait (at shutdown).
        """
        if self._pending_flush is not None:
            self.save()

    def __iter__(self) -> Iterator[NamespaceRecord]:
        return iter(list(self.records.values()))
