"""
The control channel between the main process and its data workers: AMP
over a socket pair the main process makes for each worker (so nothing
else can reach it).

Messages follow a namespace's transitions, never each request:

  - a worker takes a namespace (L{Lease}) when it has a request for one it
    does not hold: the main process checks the access rules, creates it if
    it may, starts or wakes its child, and makes that worker its one user
    (tursodb serves one connection at a time, so two workers' channels to
    one child would queue behind each other's spare connection); or it
    names the worker that holds it, which the request is then handed to;
  - the worker gives it back (L{Release}) once it has been idle for the
    channel's spare time, or when the main process asks (L{Revoke}: before
    stopping, archiving or restoring it, or to use the child itself;
    L{GiveBackIfIdle}: to make room under C{TURSO_MAX_RUNNING});
  - the main process pushes what changes under a held namespace
    (L{Refresh}) and the credentials every worker checks at the headers
    (L{AuthTable}), and is acknowledged before an admin change returns;
  - a worker reports new replicas pushing (L{NoteClients}: saved before
    the push goes on), a wedged child (L{Wedged}), and, once a second, its
    counters and traffic (L{Report}; L{ReportNow} when C{/metrics} asks);
  - between workers, a client connection moves to the one holding its
    namespace (L{TakeConnection}, its descriptor passed beside the box).
"""

from __future__ import annotations

import json
from typing import Any

from twisted.protocols import amp


class BigBytes(amp.Argument):
    """
    Bytes of any size: AMP caps one value at 64 KiB, so they go as
    numbered chunks (a request's head and body).
    """

    CHUNK = 60_000

    def encode(self, value: Any) -> bytes:
        return bytes(value)

    def decode(self, data: bytes) -> Any:
        return data

    def toBox(self, name: bytes, strings: dict[bytes, bytes], objects: dict[str, Any],
              proto: amp.AMP) -> None:
        data = self.encode(objects[name.decode("ascii")])
        chunks = [data[i:i + self.CHUNK] for i in range(0, len(data), self.CHUNK)] or [b""]
        strings[name] = b"%d" % len(chunks)
        for index, chunk in enumerate(chunks):
            strings[b"%s.%d" % (name, index)] = chunk

    def fromBox(self, name: bytes, strings: dict[bytes, bytes], objects: dict[str, Any],
                proto: amp.AMP) -> None:
        count = int(strings[name])
        objects[name.decode("ascii")] = self.decode(
            b"".join(strings[b"%s.%d" % (name, index)] for index in range(count)))


class BigJSON(BigBytes):
    """A JSON value of any size (a namespace's record lists its replicas, which can be many)."""

    def encode(self, value: Any) -> bytes:
        return json.dumps(value, separators=(",", ":")).encode("utf-8")

    def decode(self, data: bytes) -> Any:
        return json.loads(data)


# -- worker to worker --------------------------------------------------------------------


class TakeConnection(amp.Command):
    """
    Serve this client connection (C{fd}) from now on, starting with the
    request in C{head} (read from it already): the sender saw that the
    receiver holds the request's namespace.
    """

    arguments = [(b"fd", amp.Descriptor()), (b"head", BigBytes())]
    response = [(b"taken", amp.Boolean())]


# -- worker to main ------------------------------------------------------------------


class Ready(amp.Command):
    """The worker serves the data port; it is sent the credentials table in return."""

    arguments = [(b"index", amp.Integer())]
    response = [(b"auth", BigJSON())]


class Lease(amp.Command):
    """
    Take namespace C{name} for a request with C{access} (L{Access.to_json}).
    The answer: C{{"port", "record"}} (the worker now holds it),
    C{{"owner": index}} (another worker does), or C{{"refusal"}}.
    C{dead_port}: the port of a child that just failed the worker (its
    death is waited for before a new one is started).  C{here}: the request
    was moved or handed to this worker already; a namespace nobody holds
    goes to it, not to the least busy one.
    """

    arguments = [(b"name", amp.Unicode()), (b"access", BigJSON()), (b"writes", amp.Boolean()),
                 (b"facts", BigJSON()), (b"dead_port", amp.Integer(optional=True)),
                 (b"here", amp.Boolean(optional=True))]
    response = [(b"outcome", BigJSON())]


class Release(amp.Command):
    """The worker no longer uses C{name} (last used at C{last_access})."""

    arguments = [(b"name", amp.Unicode()), (b"last_access", amp.Float()),
                 (b"grant", amp.Integer(optional=True))]
    response = []
    requiresAnswer = False


class NoteClients(amp.Command):
    """New replicas push to C{name}: saved before the push goes on; C{{"refusal"}} if stale."""

    arguments = [(b"name", amp.Unicode()), (b"clients", amp.ListOf(amp.Unicode()))]
    response = [(b"outcome", BigJSON())]


class Wedged(amp.Command):
    """The child of C{name} on C{port} missed the backend deadline."""

    arguments = [(b"name", amp.Unicode()), (b"port", amp.Integer())]
    response = []
    requiresAnswer = False


class Report(amp.Command):
    """The worker's figures (cumulative) and its traffic per namespace since the last report."""

    arguments = [(b"figures", BigJSON()), (b"usage", BigJSON())]
    response = []
    requiresAnswer = False


# -- main to worker --------------------------------------------------------------------


class Revoke(amp.Command):
    """Give C{name} back: answered once the worker's requests on it are done."""

    arguments = [(b"name", amp.Unicode())]
    response = []


class GiveBackIfIdle(amp.Command):
    """Give C{name} back now if nothing is in flight on it (to make room for another child)."""

    arguments = [(b"name", amp.Unicode())]
    response = [(b"given", amp.Boolean())]


class Refresh(amp.Command):
    """C{name}'s record changed (its config, say): the holder takes the new one."""

    arguments = [(b"name", amp.Unicode()), (b"record", BigJSON())]
    response = []


class AuthTable(amp.Command):
    """
    What the credentials check needs per namespace: C{{name: {"jwt_key",
    "not_before"}}} for the names that have either (C{None}: it has neither
    now).  With C{complete}, the whole table.
    """

    arguments = [(b"entries", BigJSON()), (b"complete", amp.Boolean())]
    response = []


class ReportNow(amp.Command):
    """What L{Report} carries, now (for C{/metrics} and a namespace's stats)."""

    arguments = []
    response = [(b"figures", BigJSON()), (b"usage", BigJSON())]


class Stop(amp.Command):
    """Stop taking connections, finish what is in flight, exit."""

    arguments = []
    response = []
    requiresAnswer = False
