"""
Moving a namespace between cluster nodes, byte for byte, so that its
replicas keep syncing with no re-bootstrap.

The source node, holding the name's lock with its child stopped, offers
the files on its internal listener and asks the target to take them; the
target pulls each one, checks its sha256 and size, and puts files and
record in place marked C{moving_in} (not served).  Only then does the
source switch the owner in one etcd transaction (compared against the
placement it read), archive its own copy, and tell the target, which
serves from then on.  The etcd transaction is the one commit point:

  - before it, the source owns the name and still has its files; a copy
    on the target is never served and is dropped when the target sees
    that the source still owns it;
  - after it, the target owns the name and has every byte (it answered
    only once its copy was durable); a copy left on the source is
    archived when the source sees that.

Requests for the name during a move get 503 C{namespace_moving} with
C{Retry-After}; after it, any node relays them to the new owner.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Any, BinaryIO, cast
from urllib.parse import quote

import attrs
from treq.client import HTTPClient
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.protocols.basic import FileSender
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone

from . import names
from .archival import Archival
from .cluster import Cluster, Placement, owner_unavailable
from .dataport import PEER_ONLY_PREFIX, PEER_TOKEN_HEADER, DataRequest
from .errors import Conflict, Invalid, NotFound, Refusal, Unavailable, Unprocessable, refusal_from_json
from .etcd import EtcdError, EtcdUnavailable, modified_at, put
from .failpoints import failpoint
from .files import fsync_directory, sha256_and_size
from .state import NamespaceRecord, StateStore

#: Where the cluster's own endpoints live on the internal listener.
PREFIX = PEER_ONLY_PREFIX + b"v1/"

#: How long a target may take to pull a namespace's files.
TRANSFER_TIMEOUT = 3600.0

#: The refusal another node's status stands for.
_KINDS = {400: "Invalid", 401: "Unauthorized", 404: "NotFound", 409: "Conflict", 413: "TooLarge",
          422: "Unprocessable", 504: "TimedOut"}

#: How many times (a second apart) a move whose switch got no answer reads
#: the placement back before leaving the name fenced for later.
OUTCOME_READS = 10


def _json(request: DataRequest, code: int, document: dict[str, Any]) -> None:
    body = json.dumps(document).encode()
    request.respond(code, b"OK" if code == 200 else b"Error", [(b"content-type", b"application/json")], body)


class _IntoFile(Protocol):
    """
    A file's body, hashed and written off the reactor one batch at a
    time; the sender is paused while more than L{BEHIND} bytes wait.
    """

    BEHIND = 4 << 20

    def __init__(self, handle: BinaryIO, run_in_thread: Callable[..., Deferred[Any]]) -> None:
        self.handle, self.run_in_thread = handle, run_in_thread
        self.digest = hashlib.sha256()
        self.size = 0
        self.done: Deferred[None] = Deferred()
        self._waiting: list[bytes] = []
        self._waiting_bytes = 0
        self._writing = self._paused = False
        self._ended: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self._waiting.append(data)
        self._waiting_bytes += len(data)
        if self._waiting_bytes > self.BEHIND and not self._paused:
            self._paused = True
            cast(IPushProducer, self.transport).pauseProducing()
        self._next()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._ended = reason
        self._next()

    def _next(self) -> None:
        if self._writing or self.done.called:
            return
        if not self._waiting:
            if self._ended is not None:
                if self._ended.check(ResponseDone):
                    self.done.callback(None)
                else:
                    self.done.errback(self._ended)
            return
        batch = b"".join(self._waiting)
        self._waiting, self._waiting_bytes = [], 0
        if self._paused and self._ended is None:
            self._paused = False
            cast(IPushProducer, self.transport).resumeProducing()
        self._writing = True
        self.run_in_thread(self._write, batch).addCallbacks(self._written, self._failed)

    def _write(self, batch: bytes) -> None:
        # In a thread, one batch at a time.
        self.digest.update(batch)
        self.handle.write(batch)
        self.size += len(batch)

    def _written(self, _: object) -> None:
        self._writing = False
        self._next()

    def _failed(self, failure: Failure) -> None:
        self._writing = False
        if self._ended is None:
            cast(IPushProducer, self.transport).stopProducing()
        if not self.done.called:
            self.done.errback(failure)


@attrs.define(eq=False)
class Outgoing:
    """A move under way from this node: what the target may fetch."""

    record: NamespaceRecord
    files: dict[str, str]


@attrs.define(eq=False)
class Moves:
    """This node's moves, out and in, and the internal endpoints they use."""

    reactor: IReactorTime
    cluster: Cluster
    archival: Archival
    state: StateStore
    data_dir: str
    scratch_dir: str
    token: str = attrs.field(repr=False)
    outgoing: dict[str, Outgoing] = attrs.field(factory=dict)
    http: Any = None
    _log = Logger()

    def __attrs_post_init__(self) -> None:
        if self.http is None:
            pool = HTTPConnectionPool(self.reactor, persistent=False)
            self.http = HTTPClient(Agent(self.reactor, pool=pool))
        self.cluster.on_change.append(self._placement_changed)

    # -- the source's side -------------------------------------------------------

    def move(self, name: str, to: str) -> Deferred[dict[str, Any]]:
        """
        Move C{name}, which this node owns, to node C{to}; fires with what
        was moved.

        @raise Refusal: (a 4xx/5xx) if it cannot be moved now; nothing changed then.
        """

        async def move() -> dict[str, Any]:
            names.validate(name)
            record = self.state.records.get(name)
            placement = self.cluster.owner(name)
            if record is None or placement is None or placement.node != self.cluster.node \
                    or record.moving_in:
                raise NotFound("namespace_not_found", f"namespace {name!r} is not on this node")
            if record.moving_to is not None:
                raise Conflict("namespace_moving", f"a move of {name!r} to {record.moving_to!r} has not "
                               "ended yet (etcd did not say how)")
            if to == self.cluster.node:
                raise Invalid("invalid_target", f"namespace {name!r} is on node {to!r} already")
            target = self.cluster.nodes.get(to)
            if target is None:
                raise Unavailable("node_unavailable", f"node {to!r} is not a live node of the cluster",
                                  retry_after=5)
            if name in self.outgoing:
                raise Conflict("namespace_moving", f"namespace {name!r} is being moved already")
            moved: dict[str, Any] = {}
            # From now on its requests get 503 namespace_moving.
            outgoing = self.outgoing[name] = Outgoing(record, {})

            async def hand_over(record: NamespaceRecord, paths: list[str]) -> str:
                sums = await self.archival.archiver.run_in_thread(lambda: [sha256_and_size(p) for p in paths])
                files = [{"file": os.path.basename(path), "sha256": sha, "size": size}
                         for path, (sha, size) in zip(paths, sums, strict=True)]
                outgoing.files.update((os.path.basename(p), p) for p in paths)
                await self._call(target.url, f"incoming/{quote(name)}",
                                 {"source": self.cluster.url, "record": record.to_json(), "files": files})
                # Fenced before the switch, durably: should this node die at
                # any point from here, it does not serve this copy again until
                # etcd says how the move ended.
                record.moving_to = to
                self.state.save()
                failpoint("move.source.before_switch")
                switched = await self._switch(name, placement, to)
                if switched is None:
                    self._resolve_later(name)
                    raise Unavailable("cluster_unavailable", f"etcd did not say whether {name!r} moved; it "
                                      "is not served until it does", retry_after=5)
                if not switched:
                    record.moving_to = None
                    self.state.save()
                    await self._abort(to, name, placement.id)
                    raise Conflict("namespace_moving", f"the placement of {name!r} changed meanwhile; "
                                   "nothing was moved")
                failpoint("move.source.after_switch")
                moved.update(bytes=sum(size for _, size in sums), files=len(files))
                return to

            try:
                await self.archival.move_out(name, record.id, hand_over)
            finally:
                del self.outgoing[name]
            self._log.info("namespace {name} moved to node {to} ({bytes} bytes)", name=name, to=to,
                           bytes=moved["bytes"])
            # Best effort: the target also serves it once it sees the placement.
            try:
                await self._call(target.url, f"incoming/{quote(name)}/settle", {"id": record.id})
            except Refusal as refusal:
                self._log.info("the target of namespace {name} will settle it itself: {error}", name=name,
                               error=str(refusal))
            return {"name": name, "id": record.id, "from": self.cluster.node, "to": to, **moved}

        return Deferred.fromCoroutine(move())

    def move_anywhere(self, name: str, to: str) -> Deferred[dict[str, Any]]:
        """Move C{name} to C{to} from whichever node owns it (asked over its internal listener)."""
        placement = self.cluster.owner(name)
        if placement is None or placement.node == self.cluster.node:
            return self.move(name, to)
        owner = self.cluster.nodes.get(placement.node)
        if owner is None:
            return fail(owner_unavailable(name, placement.node))
        return Deferred.fromCoroutine(self._call(owner.url, f"move/{quote(name)}", {"to": to}))

    async def _switch(self, name: str, placement: Placement, to: str) -> bool | None:
        """
        Make C{to} the owner of C{name} if the placement is still the one
        read: C{True} if it is now, C{False} if not, C{None} if etcd could
        not say (a transaction whose answer was lost may have committed:
        the key is read back before anything is concluded).
        """
        key = self.cluster.namespace_key(name)
        theirs = Placement(to, placement.id, placement.epoch + 1)
        try:
            result = await self.cluster.etcd.txn([modified_at(key, placement.revision)],
                                                 [put(key, theirs.to_value())], [])
            if result.succeeded:
                self.cluster.placements[name] = attrs.evolve(theirs, created=placement.created,
                                                             revision=result.revision)
                return True
        except (EtcdUnavailable, EtcdError) as error:
            self._log.warn("switching the owner of {name} to {to}: {error}; reading back what etcd holds",
                           name=name, to=to, error=str(error))
        for _ in range(OUTCOME_READS):
            try:
                current = await self._placement_in_etcd(name)
            except (EtcdUnavailable, EtcdError):
                await deferLater(self.reactor, 1.0, lambda: None)
                continue
            return current is not None and current.node == to and current.id == placement.id
        return None

    async def _placement_in_etcd(self, name: str) -> Placement | None:
        """What etcd holds for C{name} now (a linearizable read, not the cached view)."""
        kvs, _ = await self.cluster.etcd.range(self.cluster.namespace_key(name))
        return Placement.from_kv(kvs[0]) if kvs else None

    def _resolve_later(self, name: str) -> None:
        def again(failure: Failure) -> None:
            self._log.warn("how the move of {name} ended is not known yet ({error}); asking etcd again",
                           name=name, error=failure.getErrorMessage())
            self._resolve_later(name)

        self.reactor.callLater(5.0, lambda: Deferred.fromCoroutine(self.resolve(name)).addErrback(again))

    async def resolve(self, name: str) -> None:
        """
        Settle a move this node made whose end it did not see (etcd did not
        answer, or the node died): keep serving the copy if the name is
        still this node's, else set it aside.
        """
        record = self.state.records.get(name)
        if record is None or record.moving_to is None:
            return
        current = await self._placement_in_etcd(name)
        if current is not None and current.node == self.cluster.node and current.id == record.id:
            self._log.info("the move of {name} to {to} did not happen; serving it here", name=name,
                           to=record.moving_to)
            record.moving_to = None
            self.state.save()
            return
        await self.archival.drop_moved_away(name, record.id, record.moving_to)

    async def _abort(self, to: str, name: str, namespace_id: str) -> None:
        node = self.cluster.nodes.get(to)
        if node is None:
            return
        try:
            await self._call(node.url, f"incoming/{quote(name)}/abort", {"id": namespace_id})
        except Refusal as refusal:
            self._log.warn("could not tell node {to} to drop its copy of {name}: {error} (it drops it "
                           "when it sees that this node still owns the name)", to=to, name=name,
                           error=str(refusal))

    async def _call(self, url: str, path: str, document: dict[str, Any]) -> dict[str, Any]:
        try:
            response = await self.http.post(f"{url}/_cluster/v1/{path}", json=document,
                                             headers={PEER_TOKEN_HEADER: self.token.encode()},
                                             timeout=TRANSFER_TIMEOUT)
            body = await response.content()
        except Exception as error:
            raise Unavailable("node_unavailable", f"{url}: {error.__class__.__name__}",
                              retry_after=5) from None
        try:
            answer = json.loads(body)
        except ValueError:
            raise Unavailable("node_unavailable", f"{url} answered {response.code} without JSON") from None
        if response.code != 200:
            kind = _KINDS.get(response.code, "Unavailable" if response.code >= 500 else "Conflict")
            raise refusal_from_json({"kind": kind, "code": answer.get("error", "move_failed"),
                                     "message": answer.get("message", ""), "retry_after": None})
        return dict(answer)

    # -- the target's side ---------------------------------------------------------

    async def _receive(self, name: str, document: dict[str, Any]) -> None:
        record = NamespaceRecord.from_json(name, document["record"])
        source = str(document["source"])
        staging = tempfile.mkdtemp(prefix="incoming-", dir=self.scratch_dir)
        try:
            for entry in document["files"]:
                file = str(entry["file"])
                if file not in (os.path.basename(p) for p in names.data_files(staging, name)):
                    raise Invalid("bad_request", f"{file!r} is not a file of namespace {name!r}")
                await self._fetch(source, name, file, os.path.join(staging, file), str(entry["sha256"]),
                                  int(entry["size"]))
            fsync_directory(staging)
            failpoint("move.target.before_install")
            await self.archival.move_in(record, staging)
            failpoint("move.target.after_install")
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        self._log.info("namespace {name} copied in from {source}; served once the cluster names this node",
                       name=name, source=source)

    async def _fetch(self, source: str, name: str, file: str, path: str, sha256: str, size: int) -> None:
        response = await self.http.get(f"{source}/_cluster/v1/files/{quote(name)}/{quote(file)}",
                                       headers={PEER_TOKEN_HEADER: self.token.encode()}, unbuffered=True,
                                       timeout=TRANSFER_TIMEOUT)
        if response.code != 200:
            await response.content()
            raise Unavailable("move_failed", f"{source} did not give {file} ({response.code})")
        run_in_thread = self.archival.archiver.run_in_thread
        with open(path, "xb") as handle:
            into = _IntoFile(handle, run_in_thread)
            response.deliverBody(into)
            await into.done
            handle.flush()
            await run_in_thread(os.fsync, handle.fileno())
        got, digest = into.size, into.digest.hexdigest()
        if got != size or digest != sha256:
            raise Unprocessable("move_corrupted", f"{file} of {name!r} arrived with {got} bytes, sha256 "
                                f"{digest}; expected {size} bytes, sha256 {sha256}")

    def settle(self, name: str) -> None:
        """
        Serve an incoming namespace once the cluster names this node its
        owner; until then it is being moved.

        @raise Unavailable: (C{namespace_moving}) while it is not this node's.
        """
        record = self.state.records.get(name)
        if record is None or not record.moving_in:
            return
        placement = self.cluster.owner(name)
        if placement is not None and placement.node == self.cluster.node and placement.id == record.id:
            record.moving_in = False
            self.state.save()
            self._log.info("namespace {name} moved in: served by this node", name=name)
            return
        if placement is None or placement.id != record.id:
            self._drop_stale(record)
        raise Unavailable("namespace_moving", f"namespace {name!r} is moving between nodes; retry shortly",
                          retry_after=1)

    def _drop_stale(self, record: NamespaceRecord) -> None:
        """An incoming copy whose move is over and whose name went on (deleted, or made anew): set aside."""

        def failed(failure: Failure) -> None:
            self._log.failure("could not set aside the stale incoming copy of {name}", failure,
                              name=record.name)

        self.archival.drop_incoming(record.name, record.id, "an incoming move that did not complete",
                                    ).addErrback(failed)

    def _placement_changed(self, name: str) -> None:
        record = self.state.records.get(name)
        if record is None or not record.moving_in:
            return
        try:
            self.settle(name)
        except Refusal:
            pass  # not this node's (yet): set aside if stale, else left to the owner's word

    def reconcile(self) -> Deferred[None]:
        """
        After joining: serve incoming copies the cluster names this node's,
        drop those it does not, and archive copies of names that moved away
        (a move a crash interrupted after its switch).
        """

        async def reconcile() -> None:
            for record in list(self.state.records.values()):
                if record.moving_to is not None:
                    try:
                        await self.resolve(record.name)
                    except (EtcdUnavailable, EtcdError):
                        self._resolve_later(record.name)
                    continue
                placement = self.cluster.owner(record.name)
                if placement is None or placement.id != record.id:
                    if record.moving_in:
                        # Its move is over and the name went on without it.
                        await self.archival.drop_incoming(record.name, record.id,
                                                          "an incoming move that did not complete")
                    continue
                mine = placement.node == self.cluster.node
                if record.moving_in and mine:
                    self.settle(record.name)
                elif record.moving_in:
                    # The source still owns it; fenced first, so that a switch
                    # of the source's still in flight cannot commit after this.
                    if await self.cluster.fence(record.name, placement):
                        await self.archival.drop_incoming(record.name, record.id,
                                                          "an incoming move that did not complete")
                elif not mine:
                    self._log.warn("namespace {name} moved to node {node}; archiving this node's copy",
                                   name=record.name, node=placement.node)
                    await self.archival.drop_moved_away(record.name, record.id, placement.node)

        return Deferred.fromCoroutine(reconcile())

    # -- the internal endpoints ----------------------------------------------------

    def serve(self, request: DataRequest) -> None:
        """Answer one request to C{/_cluster/v1/...} (the peer token was checked)."""
        Deferred.fromCoroutine(self._serve(request)).addErrback(self._failed, request)

    async def _serve(self, request: DataRequest) -> None:
        parts = request.target[len(PREFIX):].split(b"?")[0].split(b"/")
        if parts[0] in (b"incoming", b"move") and not self.cluster.ready:
            raise Unavailable("node_starting", "this node is joining its cluster; retry shortly",
                              retry_after=1)
        if request.method == b"GET" and len(parts) == 3 and parts[0] == b"files":
            return await self._send_file(request, parts[1].decode(), parts[2].decode())
        if request.method == b"POST" and parts[0] == b"incoming" and len(parts) in (2, 3):
            name = names.validate(parts[1])
            try:
                document = json.loads(request.body)
            except ValueError:
                raise Invalid("bad_request", "the body is not JSON") from None
            if len(parts) == 2:
                await self._receive(name, document)
            elif parts[2] == b"settle":
                self.settle(name)
            elif parts[2] == b"abort":
                await self.archival.drop_incoming(name, str(document.get("id")), "a move that was called off")
            else:
                raise NotFound("not_found", "no such cluster endpoint")
            return _json(request, 200, {"ok": True})
        if request.method == b"POST" and len(parts) == 2 and parts[0] == b"move":
            document = json.loads(request.body or b"{}")
            moved = await self.move(names.validate(parts[1]), str(document.get("to", "")))
            return _json(request, 200, moved)
        raise NotFound("not_found", "no such cluster endpoint")

    async def _send_file(self, request: DataRequest, name: str, file: str) -> None:
        outgoing = self.outgoing.get(name)
        path = None if outgoing is None else outgoing.files.get(file)
        if path is None:
            raise NotFound("not_found", f"{file!r} of {name!r} is not being moved")
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            request.begin(200, b"OK", [(b"content-type", b"application/octet-stream")], size)
            await FileSender().beginFileTransfer(handle, request)
        request.finish()

    def _failed(self, failure: Failure, request: DataRequest) -> None:
        error = failure.value
        if isinstance(error, names.InvalidName):
            error = Invalid("invalid_name", str(error))
        if not isinstance(error, Refusal):
            self._log.failure("cluster endpoint {target} failed", failure,
                              target=request.target.decode("latin-1"))
            error = Unavailable("move_failed", f"{error.__class__.__name__}: {error}")
        if request.started:
            request.abort()
        else:
            request.refuse(error)

