"""
A small client of etcd v3's JSON gateway (C{/v3/...}), on treq so that
nothing blocks the reactor: key ranges, transactions, leases and watches,
which is what the cluster's placement needs and all it uses.

The gateway speaks etcd's protobuf messages as JSON: keys and values are
base64, 64-bit integers are strings, and fields at their zero value are
left out.  Endpoints are tried in turn; an endpoint that does not answer
within the timeout, or refuses the connection, moves the client to the
next one.  When none answers, L{EtcdUnavailable} is raised: the domain
error the cluster turns into a 503.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Sequence
from typing import Any, cast

import attrs
from treq.client import HTTPClient
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool

#: How long one call to one endpoint may take.
CALL_TIMEOUT = 5.0


class EtcdUnavailable(Exception):
    """No etcd endpoint answered."""


class EtcdError(Exception):
    """An etcd endpoint answered with an error (a bug of ours, or a compacted revision)."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str | None) -> bytes:
    return base64.b64decode(text) if text else b""


def prefix_end(prefix: bytes) -> bytes:
    """The end of the key range that holds every key starting with C{prefix}."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"


@attrs.frozen
class KeyValue:
    """One key as etcd holds it."""

    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    lease: int = 0

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> KeyValue:
        return cls(_unb64(data.get("key")), _unb64(data.get("value")), int(data.get("create_revision", 0)),
                   int(data.get("mod_revision", 0)), int(data.get("lease", 0)))


@attrs.frozen
class Event:
    """A change seen by a watch: C{kv} put, or (C{deleted}) removed."""

    kv: KeyValue
    deleted: bool


@attrs.frozen
class TxnResult:
    """Whether a transaction's comparisons held, the revision after it, and its ranges' keys."""

    succeeded: bool
    revision: int
    ranges: list[list[KeyValue]]


def created_at(key: bytes, revision: int) -> dict[str, Any]:
    """A transaction comparison: C{key} was created at C{revision} (0: it does not exist)."""
    return {"key": _b64(key), "target": "CREATE", "result": "EQUAL", "create_revision": str(revision)}


def modified_at(key: bytes, revision: int) -> dict[str, Any]:
    """A transaction comparison: C{key} was last changed at C{revision}."""
    return {"key": _b64(key), "target": "MOD", "result": "EQUAL", "mod_revision": str(revision)}


def leased_by(key: bytes, lease: int) -> dict[str, Any]:
    """A transaction comparison: C{key} exists under C{lease}."""
    return {"key": _b64(key), "target": "LEASE", "result": "EQUAL", "lease": str(lease)}


def put(key: bytes, value: bytes, lease: int = 0) -> dict[str, Any]:
    """A transaction operation: put C{value} at C{key}."""
    request: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
    if lease:
        request["lease"] = str(lease)
    return {"request_put": request}


def get(key: bytes) -> dict[str, Any]:
    """A transaction operation: read C{key}."""
    return {"request_range": {"key": _b64(key)}}


def delete(key: bytes) -> dict[str, Any]:
    """A transaction operation: remove C{key}."""
    return {"request_delete_range": {"key": _b64(key)}}


@attrs.define(eq=False)
class Etcd:
    """A connection to an etcd cluster through its JSON gateway."""

    reactor: IReactorTime
    endpoints: Sequence[str]
    timeout: float = CALL_TIMEOUT
    http: Any = None
    _current: int = 0
    _pool: HTTPConnectionPool | None = None
    _log = Logger()

    def __attrs_post_init__(self) -> None:
        if self.http is None:
            self._pool = HTTPConnectionPool(self.reactor, persistent=True)
            self._pool.maxPersistentPerHost = 4
            self.http = HTTPClient(Agent(self.reactor, pool=self._pool))

    def close(self) -> Deferred[None]:
        """Close the kept-alive connections."""
        if self._pool is None:
            return succeed(None)
        closed: Deferred[None] = self._pool.closeCachedConnections()
        return closed

    async def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST C{body} to C{/v3/<path>} on the first endpoint that answers."""
        failures = []
        # Each endpoint twice: a kept-alive connection may have died with an
        # etcd that restarted since, which the second try finds out.
        for attempt in range(2 * len(self.endpoints)):
            index = (self._current + attempt) % len(self.endpoints)
            url = self.endpoints[index].rstrip("/") + "/v3/" + path
            try:
                response = await self.http.post(url, json=body, timeout=self.timeout)
                text = await response.content()
            except (CancelledError, Exception) as error:
                failures.append(f"{self.endpoints[index]}: {error.__class__.__name__}")
                continue
            self._current = index
            try:
                answer = json.loads(text)
            except ValueError:
                raise EtcdError(f"etcd answered {path} with {response.code} and no JSON") from None
            if response.code != 200 or "error" in answer:
                raise EtcdError(f"etcd refused {path}: {answer.get('message') or answer.get('error')}",
                                answer.get("code"))
            return dict(answer)
        raise EtcdUnavailable("no etcd endpoint answered (" + "; ".join(failures) + ")")

    async def range(self, key: bytes, prefix: bool = False) -> tuple[list[KeyValue], int]:
        """The keys at C{key} (or under it, with C{prefix}), and the revision they were read at."""
        body = {"key": _b64(key)}
        if prefix:
            body["range_end"] = _b64(prefix_end(key))
        answer = await self.call("kv/range", body)
        return ([KeyValue.from_json(kv) for kv in answer.get("kvs", [])],
                int(answer["header"].get("revision", 0)))

    async def range_all(self, key: bytes, page: int = 1000) -> tuple[list[KeyValue], int]:
        """
        Every key under C{key}, read C{page} at a time at one revision (one
        answer for a large cluster would be large), and that revision.
        """
        end = _b64(prefix_end(key))
        found: list[KeyValue] = []
        start, revision = key, 0
        while True:
            body: dict[str, Any] = {"key": _b64(start), "range_end": end, "limit": str(page)}
            if revision:
                body["revision"] = str(revision)
            answer = await self.call("kv/range", body)
            revision = revision or int(answer["header"].get("revision", 0))
            kvs = [KeyValue.from_json(kv) for kv in answer.get("kvs", [])]
            found += kvs
            if not answer.get("more") or not kvs:
                return found, revision
            start = kvs[-1].key + b"\0"

    async def newest(self, key: bytes) -> tuple[int, int]:
        """How many keys there are under C{key}, and the newest change to one of them (its revision)."""
        answer = await self.call("kv/range", {"key": _b64(key), "range_end": _b64(prefix_end(key)),
                                              "limit": "1", "sort_order": "DESCEND", "sort_target": "MOD",
                                              "keys_only": True})
        kvs = answer.get("kvs", [])
        return int(answer.get("count", 0)), int(kvs[0].get("mod_revision", 0)) if kvs else 0

    async def txn(self, compare: list[dict[str, Any]], success: list[dict[str, Any]],
                  failure: list[dict[str, Any]]) -> TxnResult:
        """Run a transaction: C{success} if every comparison holds, else C{failure}."""
        answer = await self.call("kv/txn", {"compare": compare, "success": success, "failure": failure})
        ranges = [[KeyValue.from_json(kv) for kv in item["response_range"].get("kvs", [])]
                  for item in answer.get("responses", []) if "response_range" in item]
        return TxnResult(bool(answer.get("succeeded", False)), int(answer["header"].get("revision", 0)),
                         ranges)

    async def put(self, key: bytes, value: bytes, lease: int = 0) -> int:
        """Put C{value} at C{key}; the revision after it."""
        body = put(key, value, lease)["request_put"]
        answer = await self.call("kv/put", body)
        return int(answer["header"].get("revision", 0))

    async def delete(self, key: bytes) -> int:
        """Remove C{key}; how many keys went."""
        answer = await self.call("kv/deleterange", {"key": _b64(key)})
        return int(answer.get("deleted", 0))

    async def grant(self, ttl: int) -> int:
        """A new lease of C{ttl} seconds; its id."""
        answer = await self.call("lease/grant", {"TTL": str(ttl)})
        return int(answer["ID"])

    async def keep_alive(self, lease: int) -> int:
        """Renew C{lease}; its TTL now, or 0 when etcd no longer has it (it expired)."""
        answer = await self.call("lease/keepalive", {"ID": str(lease)})
        result = answer.get("result", answer)
        return max(0, int(result.get("TTL", 0)))

    async def revoke(self, lease: int) -> None:
        """End C{lease} now: its keys go with it."""
        await self.call("lease/revoke", {"ID": str(lease)})

    def watch(self, key: bytes, start_revision: int, on_events: Callable[[list[Event], int], None],
              prefix: bool = True) -> Watch:
        """
        Watch C{key} (and, with C{prefix}, the keys under it) from
        C{start_revision} on; C{on_events} gets each batch of changes and
        the revision it brings the watcher to.
        """
        watch = Watch(self, key, prefix, start_revision, on_events)
        watch.start()
        return watch


class _Stream(Protocol):
    """A watch's response body: newline-ended JSON messages."""

    def __init__(self, watch: Watch) -> None:
        self.watch = watch
        self.done: Deferred[None] = Deferred()
        self._buffer = b""
        self.error: Exception | None = None

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        try:
            for line in lines:
                if line.strip():
                    self.watch._message(json.loads(line))
        except Exception as error:
            self.error = error
            self.stop()

    def stop(self) -> None:
        """Close the stream (its transport is the response's producer)."""
        producer = cast(IPushProducer, self.transport)
        if producer is not None:
            producer.stopProducing()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._buffer.strip() and self.error is None:
            try:
                self.watch._message(json.loads(self._buffer))
            except Exception as error:
                self.error = error
        self.done.callback(None)


@attrs.define(eq=False)
class Watch:
    """
    One watch, over a streamed gateway response.  When the stream ends, it
    is opened again from the next revision, on whichever endpoint answers;
    C{on_lost} is told when it cannot be (etcd down, or the revision it
    needs was compacted away: L{Compacted}) and C{on_restored} once it runs
    again.
    """

    etcd: Etcd
    key: bytes
    prefix: bool
    next_revision: int
    on_events: Callable[[list[Event], int], None]
    on_lost: Callable[[Exception], None] = lambda error: None
    on_restored: Callable[[], None] = lambda: None
    retry_delay: float = 1.0
    _stream: _Stream | None = None
    _stopped: bool = False
    _retry: IDelayedCall | None = None

    def start(self) -> None:
        self._retry = None
        Deferred.fromCoroutine(self._run()).addErrback(self._broken)

    def stop(self) -> None:
        self._stopped = True
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        if self._stream is not None:
            self._stream.stop()

    async def _run(self) -> None:
        if self._stopped:
            return
        body: dict[str, Any] = {"key": _b64(self.key), "start_revision": str(self.next_revision)}
        if self.prefix:
            body["range_end"] = _b64(prefix_end(self.key))
        etcd = self.etcd
        failures = []
        for attempt in range(len(etcd.endpoints)):
            index = (etcd._current + attempt) % len(etcd.endpoints)
            url = etcd.endpoints[index].rstrip("/") + "/v3/watch"
            try:
                response = await etcd.http.post(url, json={"create_request": body}, unbuffered=True,
                                                timeout=etcd.timeout)
            except (CancelledError, Exception) as error:
                failures.append(f"{etcd.endpoints[index]}: {error.__class__.__name__}")
                continue
            if response.code != 200:
                failures.append(f"{etcd.endpoints[index]}: HTTP {response.code}")
                continue
            self._stream = _Stream(self)
            response.deliverBody(self._stream)
            self.on_restored()
            await self._stream.done
            broken, self._stream = self._stream.error, None
            if broken is not None:
                raise broken
            raise EtcdUnavailable(f"the watch on {etcd.endpoints[index]} ended")
        raise EtcdUnavailable("no etcd endpoint took the watch (" + "; ".join(failures) + ")")

    def _message(self, message: dict[str, Any]) -> None:
        if "error" in message:
            raise EtcdError(f"watch refused: {message['error'].get('message')}")
        result = message.get("result", {})
        if result.get("canceled"):
            compacted = int(result.get("compact_revision", 0))
            if compacted:
                raise Compacted(compacted)
            raise EtcdError(f"watch cancelled: {result.get('cancel_reason', '')}")
        events = [Event(KeyValue.from_json(event["kv"]), event.get("type") == "DELETE")
                  for event in result.get("events", [])]
        revision = int(result.get("header", {}).get("revision", 0))
        if events:
            # Taken first, then counted as seen: a batch that breaks is seen again.
            self.on_events(events, revision)
            self.next_revision = max(self.next_revision, max(e.kv.mod_revision for e in events) + 1)

    @property
    def seen(self) -> int:
        """The revision this watch has delivered every change up to."""
        return self.next_revision - 1

    def reopen(self) -> None:
        """Close the stream (a half-open one delivers nothing): it is opened again from L{seen} on."""
        if self._stream is not None:
            self._stream.stop()

    def _broken(self, failure: Failure) -> None:
        if self._stopped:
            return
        error = failure.value
        self.on_lost(error if isinstance(error, Exception) else Exception(str(error)))
        self._retry = self.etcd.reactor.callLater(self.retry_delay, self.start)


class Compacted(EtcdError):
    """A watch's start revision was compacted away: read everything again."""

    def __init__(self, revision: int) -> None:
        super().__init__(f"revision compacted (now {revision})")
        self.revision = revision
