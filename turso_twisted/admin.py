"""
The admin API (Klein) on the admin port.

C{/healthz} and C{/readyz} answer without a token so that probes need no
credentials; every other route needs C{TURSO_ADMIN_TOKEN}.  The routes are
described in C{docs/admin-openapi.yaml}, which a test keeps in step with
L{AdminAPI.app}.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any, TypeVar, cast

import attrs
from klein import Klein
from klein.resource import KleinResource
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.interfaces import IPushProducer
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import UNKNOWN_LENGTH, IRequest
from twisted.web.resource import Resource
from twisted.web.server import Request
from twisted.web.static import File
from werkzeug.exceptions import HTTPException, MethodNotAllowed
from werkzeug.exceptions import NotFound as NoRoute

from . import names
from .adminrelay import RELAYED_BY_HEADER, AdminRelay, answer_headers, drop, pipe
from .archival import Archival
from .archive import parse_entry_name
from .auth import BearerToken
from .backup import Backups
from .cluster import Cluster, OwnedElsewhere
from .config import parse_bool
from .errors import (
    INTERNAL,
    Conflict,
    Invalid,
    NotAllowed,
    NotFound,
    Refusal,
    TooLarge,
    Unauthorized,
    from_os_error,
    not_found,
    render,
)
from .files import remove_database_copy
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import Metrics
from .moves import Moves
from .namespaces import NamespaceManager
from .state import NamespaceRecord
from .stats import NamespaceStats
from .timefmt import format_duration, parse_duration, to_rfc3339

_MAX_ADMIN_JSON = 64 * 1024
#: The shortest TTL: anything shorter is a mistake, not a lifetime.
MIN_TTL = 1.0
_R = TypeVar("_R")


@attrs.define
class Readiness:
    """
    What C{/readyz} checks, set by the service as it starts.
    """

    data_dir: str
    state_loaded: bool = False
    listening: bool = False
    stopping: bool = False

    def problems(self) -> list[str]:
        found = []
        if not self.state_loaded:
            found.append("state not loaded")
        if not self.listening:
            found.append("listeners not up")
        if self.stopping:
            found.append("shutting down")
        if not os.access(self.data_dir, os.W_OK | os.X_OK):
            found.append("data dir not writable")
        return found


def _json(request: IRequest, payload: Any, status: int = 200) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    return json.dumps(payload).encode("utf-8") + b"\n"


def _valid(name: str) -> str:
    try:
        return names.validate(name)
    except names.InvalidName as error:
        raise Invalid("invalid_name", str(error)) from None


def _json_body(request: IRequest) -> dict[str, Any]:
    raw = _json_body_bytes(request)
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise Invalid("bad_json", "request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise Invalid("bad_json", "request body must be a JSON object")
    return body


def _json_body_bytes(request: IRequest) -> bytes:
    """The body of an admin JSON call, as sent (at most 64 KiB)."""
    raw = request.content.read(_MAX_ADMIN_JSON + 1) if request.content else b""
    if len(raw) > _MAX_ADMIN_JSON:
        raise TooLarge("body_too_large", "admin request bodies are limited to 64 KiB")
    return bytes(raw)


def _gone(request: IRequest) -> bool:
    """Whether the client of C{request} has left."""
    return bool(getattr(request, "_disconnected", False))


@attrs.frozen
class _WhileConnected:
    """A request as a piped body's consumer: once its client has left, what comes is dropped."""

    request: Request

    @property
    def _gone(self) -> bool:
        return _gone(self.request)

    def registerProducer(self, producer: IPushProducer, streaming: bool) -> None:
        if self._gone:
            producer.stopProducing()
        else:
            self.request.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        if not self._gone:
            self.request.unregisterProducer()

    def write(self, data: bytes) -> None:
        if not self._gone:
            self.request.write(data)


def _flag(request: IRequest, name: bytes) -> bool:
    """Whether the query turns C{name} on (C{1} or C{true})."""
    return request.args.get(name, [b""])[0] in (b"1", b"true")


def _unanswered(failure: Failure) -> None:
    """A node that could not be asked (it is listed as unavailable)."""
    failure.trap(Refusal)


#: Calls made on the node asked, whoever owns the name (a move finds the owner itself).
_HERE_ONLY = frozenset({"move"})


class _RawPath(Resource):
    """
    The admin routes, behind a check of the raw path: names are checked on
    the raw bytes, as on the data port, and no name or archive entry holds a
    "%", so nothing percent-decoded ever becomes one (nor reaches Klein's
    decoding).
    """

    isLeaf = True

    def __init__(self, routes: KleinResource) -> None:
        super().__init__()
        self.routes = routes

    def render(self, request: IRequest) -> bytes | int:
        if b"%" in request.uri.partition(b"?")[0]:
            return render(request, Invalid("invalid_name", "percent-encoded paths are not accepted: "
                                           "namespace names are plain a-z, 0-9, '_' and '-'"), "admin")
        # Klein renders NOT_DONE_YET and finishes the request itself.
        return cast("bytes | int", self.routes.render(request))


@attrs.define(eq=False)
class AdminAPI:
    manager: NamespaceManager
    archival: Archival
    stats_view: NamespaceStats
    token: BearerToken
    readiness: Readiness
    backups: Backups
    metrics: Metrics | None = None
    metrics_public: bool = False
    #: With data workers: fetch their latest figures and traffic first.
    gather: Callable[[], Deferred[None]] | None = None
    #: This node's cluster (C{None}: a single node), its moves, and its
    #: way to make admin calls on the other nodes.
    cluster: Cluster | None = None
    moves: Moves | None = None
    relay: AdminRelay | None = None
    app: Klein = attrs.field(factory=Klein, init=False)
    _log = Logger()

    def __attrs_post_init__(self) -> None:
        app = self.app
        # "//" is no path of ours: not found, never a redirect.
        app.url_map.merge_slashes = False
        route = app.route

        route("/healthz", methods=["GET"])(self.healthz)
        route("/readyz", methods=["GET"])(self.readyz)
        route("/metrics", methods=["GET"])(self.prometheus)
        route("/v1/namespaces/<name>/stats", methods=["GET"])(self._admin(self.stats))
        route("/v1/namespaces", methods=["GET"])(self._admin(self.list_namespaces))
        route("/v1/namespaces/<name>", methods=["GET"])(self._admin(self.show))
        route("/v1/namespaces/<name>", methods=["DELETE"])(self._admin(self.delete))
        route("/v1/namespaces/<name>/create", methods=["POST"])(self._admin(self.create))
        route("/v1/namespaces/<name>/lock", methods=["POST"])(self._admin(self.lock))
        route("/v1/namespaces/<name>/unlock", methods=["POST"])(self._admin(self.unlock))
        route("/v1/namespaces/<name>/ttl", methods=["POST"])(self._admin(self.ttl))
        route("/v1/namespaces/<name>/access", methods=["POST"])(self._admin(self.access))
        route("/v1/namespaces/<name>/config", methods=["GET"])(self._admin(self.get_config))
        route("/v1/namespaces/<name>/config", methods=["POST"])(self._admin(self.set_config))
        route("/v1/namespaces/<name>/tokens/revoke", methods=["POST"])(self._admin(self.revoke_tokens))
        route("/v1/namespaces/<name>/unarchive", methods=["POST"])(self._admin(self.unarchive))
        route("/v1/namespaces/<name>/backup", methods=["GET"])(self._admin(self.backup))
        route("/v1/namespaces/<name>/restore", methods=["POST"])(self._admin(self.restore))
        route("/v1/namespaces/<name>/fork/<target>", methods=["POST"])(self._admin(self.fork))
        route("/v1/archive", methods=["GET"])(self._admin(self.list_archive))
        route("/v1/archive/<entry>", methods=["DELETE"])(self._admin(self.delete_archive_entry))
        route("/v1/cluster", methods=["GET"])(self._admin(self.show_cluster))
        route("/v1/namespaces/<name>/move", methods=["POST"])(self._admin(self.move))

        app.handle_errors(Refusal)(self._refusal)
        app.handle_errors(OwnedElsewhere)(self._owned_elsewhere)
        app.handle_errors(NoRoute)(self._route_not_found)
        app.handle_errors(MethodNotAllowed)(self._method_not_allowed)
        app.handle_errors(HTTPException)(self._bad_request)
        app.handle_errors(Exception)(self._unexpected)

    def resource(self) -> Resource:
        return _RawPath(self.app.resource())

    # -- plumbing ------------------------------------------------------------

    def _admin(self, handler: Callable[..., _R]) -> Callable[..., _R]:
        def guarded(request: IRequest, **kwargs: str) -> _R:
            self.token.check(request)
            owner = self._owner_elsewhere(request, kwargs.get("name"), handler.__name__)
            if owner is not None:
                return cast(_R, Deferred.fromCoroutine(self._relay(request, owner)))
            return handler(request, **kwargs)

        guarded.__name__ = handler.__name__
        guarded.__doc__ = handler.__doc__
        return guarded

    def _owner_elsewhere(self, request: IRequest, name: str | None, handler: str) -> str | None:
        """
        In a cluster, the node a call about C{name} must be made on, when
        that is another node (a relayed call is never relayed again).
        """
        if self.cluster is None or self.relay is None or name is None or handler in _HERE_ONLY:
            return None
        placement = self.cluster.owner(name)
        relayed = request.getHeader(RELAYED_BY_HEADER) is not None
        if placement is None and handler == "create" and not relayed and self.manager.get(name) is None:
            # A new name goes where the cluster's placement policy says (one
            # held here with no placement yet is claimed here).
            target = self.cluster.choose()
            return None if target == self.cluster.node else target
        if placement is None or placement.node == self.cluster.node:
            return None
        if relayed:
            raise OwnedElsewhere(placement.node, "")
        return placement.node

    async def _relay(self, request: IRequest, owner: str) -> None:
        """
        Make the call on node C{owner} and answer with what it answered;
        bodies stream (a backup or a restore may be gigabytes).  A client
        that leaves calls the relayed call off.
        """
        relay = self.relay
        assert relay is not None
        headers = {key.lower(): values[0] for key, values in request.requestHeaders.getAllRawHeaders()}
        body = request.content
        if body is not None:
            body.seek(0)
        sending = Deferred.fromCoroutine(relay.send(owner, request.method, request.uri, headers, body))
        cast(Request, request).notifyFinish().addErrback(lambda _: sending.cancel())
        try:
            response = await sending
        except Refusal:
            if _gone(request):
                return
            raise
        if _gone(request):
            drop(response)
            return
        request.setResponseCode(response.code)
        for key, value in answer_headers(response):
            request.setHeader(key, value)
        if response.length is not UNKNOWN_LENGTH:
            request.setHeader(b"content-length", b"%d" % response.length)
        try:
            await pipe(response, _WhileConnected(cast(Request, request)), relay.reactor)
        except Exception as error:
            if _gone(request):
                self._log.info("a client left during a relayed admin answer from node {node}", node=owner)
                return
            # The head is sent: the client can only be told by a cut-off answer.
            self._log.warn("node {node} broke off a relayed admin answer: {error}", node=owner,
                           error=error.__class__.__name__)
            transport = getattr(request, "transport", None)
            if transport is not None:
                transport.abortConnection()

    def _refusal(self, request: IRequest, failure: Failure) -> bytes:
        # handle_errors(Refusal) sends only Refusals here.
        return render(request, cast(Refusal, failure.value), "admin")

    def _owned_elsewhere(self, request: IRequest, failure: Failure) -> bytes:
        owner = cast(OwnedElsewhere, failure.value)
        return render(request, Conflict("namespace_elsewhere",
                                        f"that name is placed on cluster node {owner.node!r} now (another "
                                        "call placed or moved it meanwhile); retry, and the call goes there"),
                      "admin")

    def _route_not_found(self, request: IRequest, failure: Failure) -> bytes:
        return render(request, NotFound("not_found", "no such admin route"), "admin")

    def _method_not_allowed(self, request: IRequest, failure: Failure) -> bytes:
        allowed = getattr(failure.value, "valid_methods", None) or []
        request.setHeader(b"allow", ", ".join(allowed).encode())
        return render(request, NotAllowed("method_not_allowed",
                                          f"method {request.method.decode()} not allowed here"), "admin")

    def _bad_request(self, request: IRequest, failure: Failure) -> bytes:
        return render(request, Invalid("bad_request", "the request cannot be routed (a malformed path?)"),
                      "admin")

    def _unexpected(self, request: IRequest, failure: Failure) -> bytes:
        refusal = from_os_error(failure.value)
        if refusal is not None:
            self._log.warn("admin request refused: {error}", error=str(failure.value))
            return render(request, refusal, "admin")
        self._log.failure("unexpected error in the admin API", failure)
        return render(request, INTERNAL, "admin")

    def _describe(self, record: NamespaceRecord) -> dict[str, Any]:
        return self.stats_view.describe(record)

    # -- the cluster -----------------------------------------------------------

    def show_cluster(self, request: IRequest) -> bytes:
        """
        The cluster's nodes, whether each is live, and how many names each
        owns (with C{?placements=true}, also which node owns each name).
        """
        if self.cluster is None:
            raise NotFound("not_clustered", "this daemon is a single node (TURSO_CLUSTER_ETCD is not set)")
        view = self.cluster.describe()
        if _flag(request, b"placements"):
            view["placements"] = {name: placement.node
                                  for name, placement in sorted(self.cluster.placements.items())}
        return _json(request, view)

    async def move(self, request: IRequest, name: str) -> bytes:
        """Move a namespace to another node (C{{"to": "<node>"}}), from whichever node owns it."""
        name = _valid(name)
        body = _json_body(request)
        if self.moves is None:
            raise NotFound("not_clustered", "this daemon is a single node (TURSO_CLUSTER_ETCD is not set)")
        to = body.get("to")
        if not isinstance(to, str) or not to:
            raise Invalid("invalid_target", 'body must be {"to": "<node name>"}')
        return _json(request, await self.moves.move_anywhere(name, to))

    # -- probes --------------------------------------------------------------

    def healthz(self, request: IRequest) -> bytes:
        """Alive: the reactor answers."""
        return _json(request, {"status": "ok"})

    def readyz(self, request: IRequest) -> bytes:
        """Ready: state loaded, listeners up, data dir writable."""
        problems = self.readiness.problems()
        if problems:
            return _json(request, {"status": "not ready", "problems": problems}, 503)
        return _json(request, {"status": "ready"})

    def prometheus(self, request: IRequest) -> Deferred[bytes]:
        """Prometheus metrics (the admin token unless TURSO_METRICS_PUBLIC)."""
        if not self.metrics_public:
            self.token.check(request)
        metrics = self.metrics
        if metrics is None:
            raise NotFound("not_found", "metrics are not enabled")

        def render(_: object) -> bytes:
            request.setHeader(b"content-type", METRICS_CONTENT_TYPE)
            return metrics.render()

        return self._gathered().addCallback(render)

    def _gathered(self) -> Deferred[None]:
        return succeed(None) if self.gather is None else self.gather()

    # -- namespaces ------------------------------------------------------------

    async def list_namespaces(self, request: IRequest) -> bytes:
        """
        Every live namespace; in a cluster, those of every node, each with
        its node (C{?local=true}: this node's only).  A node that is down
        lists its names as C{"available": false}.  C{?bytes=true} adds the
        bytes of each one's files (C{bytesOnDisk}).
        """
        records = sorted(self.manager, key=lambda record: record.name)
        listed = [self._describe(record) for record in records if not record.moving_in]
        with_bytes = _flag(request, b"bytes")
        if with_bytes:
            data_dir = self.stats_view.data_dir
            sizes = await deferToThread(lambda: [sum(names.data_file_sizes(data_dir, entry["name"]).values())
                                                 for entry in listed])
            for entry, size in zip(listed, sizes, strict=True):
                entry["bytesOnDisk"] = size
        cluster = self.cluster
        if cluster is None or self.moves is None:
            return _json(request, {"namespaces": listed})
        for entry in listed:
            entry["node"] = cluster.node
        if not _flag(request, b"local") and self.relay is not None:
            headers = {key.lower(): values[0] for key, values in request.requestHeaders.getAllRawHeaders()}
            others = sorted(set(cluster.nodes) - {cluster.node})
            uri = b"/v1/namespaces?local=true" + (b"&bytes=true" if with_bytes else b"")
            # Asked all at once: a slow node costs its own time, not the sum.
            answers = await gatherResults([
                Deferred.fromCoroutine(self.relay.call(node, b"GET", uri, headers)).addErrback(_unanswered)
                for node in others])
            answered = {cluster.node}
            for node, answer in zip(others, answers, strict=True):
                if answer is None:
                    continue
                code, body = answer
                if code == 401:
                    raise Unauthorized("unauthorized", "the other nodes refuse this admin token")
                if code == 200:
                    listed += json.loads(body)["namespaces"]
                    answered.add(node)
            known = {entry["name"] for entry in listed}
            listed += [{"name": name, "node": placement.node, "available": False}
                       for name, placement in cluster.placements.items()
                       if name not in known and placement.node not in answered]
        return _json(request, {"namespaces": sorted(listed, key=lambda entry: entry["name"])})

    def stats(self, request: IRequest, name: str) -> Deferred[bytes]:
        """Files, traffic since start, and the child of one namespace."""
        valid = _valid(name)
        return self._gathered().addCallback(lambda _: _json(request, self.stats_view.stats(valid)))

    def show(self, request: IRequest, name: str) -> bytes:
        """One namespace."""
        record = self.manager.get(_valid(name))
        if record is None:
            raise not_found(name)
        return _json(request, self._describe(record))

    async def create(self, request: IRequest, name: str) -> bytes:
        """Create an explicit namespace (idempotent)."""
        record, created = await self.manager.create(_valid(name))
        return _json(request, self._describe(record), 201 if created else 200)

    async def delete(self, request: IRequest, name: str) -> bytes:
        """Stop the namespace and move its files to the archive."""
        manifest = await self.archival.delete(_valid(name))
        return _json(request, {"archived": manifest})

    async def lock(self, request: IRequest, name: str) -> bytes:
        """Exempt the namespace from every GC rule."""
        record = await self.manager.update(_valid(name), lambda r: setattr(r, "locked", True))
        return _json(request, self._describe(record))

    async def unlock(self, request: IRequest, name: str) -> bytes:
        """Make the namespace subject to the GC rules again."""
        record = await self.manager.update(_valid(name), lambda r: setattr(r, "locked", False))
        return _json(request, self._describe(record))

    async def ttl(self, request: IRequest, name: str) -> bytes:
        """Set (C{{"ttl": "30d"}}) or clear (C{{"ttl": null}}) the TTL."""
        name = _valid(name)
        body = _json_body(request)
        if "ttl" not in body:
            raise Invalid("invalid_ttl", 'body must be {"ttl": "<duration>"} or {"ttl": null}')
        value = body["ttl"]
        if value is None:
            seconds = None
        elif isinstance(value, str):
            try:
                seconds = parse_duration(value)
            except ValueError as error:
                raise Invalid("invalid_ttl", str(error)) from None
            if seconds < MIN_TTL:
                raise Invalid("invalid_ttl", f"ttl must be at least {format_duration(MIN_TTL)} "
                              "(null clears it)")
        else:
            raise Invalid("invalid_ttl", "ttl must be a duration string such as \"30d\", or null")
        record = await self.manager.update(name, lambda r: setattr(r, "ttl", seconds))
        out = self._describe(record)
        if seconds is not None and record.locked:
            out["warning"] = (f"ttl {format_duration(seconds)} is set but will not fire while the "
                              "namespace is locked; unlock it to let the GC archive it")
        return _json(request, out)

    async def access(self, request: IRequest, name: str) -> bytes:
        """Record an access now, as a data request would, and save it."""
        record = await self.manager.record_access(_valid(name))
        return _json(request, self._describe(record))

    # -- config ----------------------------------------------------------------

    def get_config(self, request: IRequest, name: str) -> bytes:
        """The namespace's own settings."""
        record = self.manager.get(_valid(name))
        if record is None:
            raise not_found(name)
        return _json(request, record.config.to_json())

    async def set_config(self, request: IRequest, name: str) -> bytes:
        """Change some of the namespace's settings (fields left out stay; null resets one)."""
        name = _valid(name)
        changes = _json_body(request)
        if not changes:
            raise Invalid("invalid_config", "body must be an object of config fields to change")
        try:
            record = await self.manager.configure(name, changes)
        except ValueError as error:
            raise Invalid("invalid_config", str(error)) from None
        self._log.info("config of namespace {name} changed: {fields}", name=name,
                       fields=", ".join(sorted(changes)))
        return _json(request, record.config.to_json())

    async def revoke_tokens(self, request: IRequest, name: str) -> bytes:
        """Refuse every token of this namespace issued until now (its C{tokens_not_before})."""
        now = to_rfc3339(self.manager.clock.seconds())
        record = await self.manager.configure(_valid(name), {"tokens_not_before": now})
        self._log.info("tokens of namespace {name} issued before {moment} revoked", name=name, moment=now)
        return _json(request, record.config.to_json())

    # -- archive ---------------------------------------------------------------

    async def list_archive(self, request: IRequest) -> bytes:
        """Archive entries with their manifests, oldest first."""
        raw = request.args.get(b"name", [None])[0]
        name = None if raw is None else _valid(raw.decode("utf-8", "replace"))
        entries = await self.archival.entries(name)
        return _json(request, {"entries": [entry.to_json() for entry in entries]})

    async def unarchive(self, request: IRequest, name: str) -> bytes:
        """Bring back the newest (or a chosen) archive entry of a name."""
        name = _valid(name)
        body = _json_body(request)
        archived_at = body.get("archivedAt")
        locked = body.get("locked", True)
        if archived_at is not None and not isinstance(archived_at, str):
            raise Invalid("invalid_archived_at", "archivedAt must be an RFC 3339 timestamp string")
        if not isinstance(locked, bool):
            raise Invalid("invalid_locked", "locked must be true or false")
        unknown = set(body) - {"archivedAt", "locked"}
        if unknown:
            raise Invalid("bad_request", f"unknown fields: {', '.join(sorted(unknown))}")
        record = await self.archival.unarchive(name, archived_at, locked)
        return _json(request, self._describe(record))

    async def delete_archive_entry(self, request: IRequest, entry: str) -> bytes:
        """Delete one archive entry for good."""
        try:
            name, _ = parse_entry_name(entry)
        except ValueError as error:
            raise Invalid("invalid_entry", str(error)) from None
        found = [e for e in await self.archival.entries(name) if e.entry == entry]
        if not found:
            raise NotFound("archive_not_found", f"archive entry {entry} does not exist")
        await self.archival.remove_archive_entry(found[0])
        self._log.info("archive entry {entry} removed: {reason}", name=name, entry=entry,
                       reason="deleted via admin API")
        return _json(request, {"deleted": entry})

    # -- backup, restore, fork ----------------------------------------------------

    async def backup(self, request: Request, name: str) -> bytes | File:
        """A consistent copy of the namespace as a SQLite file, with its identity inside."""
        taken = await self.backups.take(_valid(name))
        # The temp copy goes when the download ends, however it ends.
        if request.finished or getattr(request, "_disconnected", False):
            remove_database_copy(taken.path)
            return b""
        request.notifyFinish().addBoth(lambda _: remove_database_copy(taken.path))
        # The whole file, always: the checksum header describes all of it.
        for header in (b"range", b"if-range", b"if-modified-since"):
            request.requestHeaders.removeHeader(header)
        request.setHeader(b"content-disposition", f'attachment; filename="{taken.filename}"'.encode())
        request.setHeader(b"x-backup-sha256", taken.sha256.encode())
        request.setHeader(b"x-backup-namespace-id", taken.namespace_id.encode())
        return File(taken.path, defaultType="application/vnd.sqlite3")

    async def restore(self, request: IRequest, name: str) -> bytes:
        """Replace the namespace's data with the SQLite file in the body, after checking it."""
        name = _valid(name)
        raw_source = request.args.get(b"source", [None])[0]
        source = None if raw_source is None else _valid(raw_source.decode("utf-8", "replace"))
        flags = {}
        for flag in ("allow_foreign", "allow_other_incarnation"):
            raw = request.args.get(flag.encode(), [b"false"])[0].decode("utf-8", "replace")
            try:
                flags[flag] = parse_bool(raw)
            except ValueError:
                raise Invalid("bad_request", f"{flag} must be true or false") from None
        record = await self.backups.restore(name, request.content, source, **flags)
        return _json(request, self._describe(record))

    async def fork(self, request: IRequest, name: str, target: str) -> bytes:
        """Make a new explicit namespace from a consistent copy of this one."""
        record = await self.backups.fork(_valid(name), _valid(target))
        return _json(request, self._describe(record), 201)
