"""
A namespace manager over a recording reactor and a real temp data dir.
"""

from __future__ import annotations

import os
from typing import Any

import attrs
import httptools
from twisted.internet.defer import maybeDeferred
from twisted.internet.testing import StringTransport
from twisted.web.http_headers import Headers

from turso_twisted.archival import Archival
from turso_twisted.archive import Archiver
from turso_twisted.dataport import DataConnection, DataPort
from turso_twisted.hibernation import Hibernator
from turso_twisted.leases import Leases
from turso_twisted.locks import KeyedLocks
from turso_twisted.namespaces import Admission, NamespaceManager
from turso_twisted.ports import PortAllocator
from turso_twisted.process import TursodbProcess
from turso_twisted.proxy import LocalNamespaces
from turso_twisted.recovery import reconcile
from turso_twisted.state import StateStore
from turso_twisted.stats import NamespaceStats
from turso_twisted.supervisor import Supervisor
from turso_twisted.syncproto import HistoryGuard

from .fakes import ProcessReactor


def request_bytes(method: bytes, target: bytes, body: bytes = b"",
                  headers: list[tuple[bytes, bytes]] | None = None) -> bytes:
    """One HTTP/1.1 request on the wire, with C{Content-Length}."""
    lines = [b"%s %s HTTP/1.1\r\nHost: x\r\n" % (method, target)]
    lines += [b"%s: %s\r\n" % pair for pair in headers or []]
    lines.append(b"Content-Length: %d\r\n\r\n" % len(body))
    return b"".join(lines) + body


@attrs.define
class Answer:
    """One HTTP response, as a client read it."""

    code: int = 0
    headers: Headers = attrs.field(factory=Headers)
    body: bytes = b""
    complete: bool = False

    @property
    def length(self) -> int | None:
        values = self.headers.getRawHeaders(b"content-length")
        return int(values[0]) if values else None


class _AnswerReader:
    def __init__(self) -> None:
        self.answers: list[Answer] = []
        self.parser = httptools.HttpResponseParser(self)

    def on_message_begin(self) -> None:
        self.answers.append(Answer())

    def on_header(self, name: bytes, value: bytes) -> None:
        self.answers[-1].headers.addRawHeader(name, value)

    def on_headers_complete(self) -> None:
        self.answers[-1].code = self.parser.get_status_code()

    def on_body(self, data: bytes) -> None:
        self.answers[-1].body += data

    def on_message_complete(self) -> None:
        self.answers[-1].complete = True


def connect(port: DataPort) -> tuple[DataConnection, StringTransport]:
    """A client connection to C{port}, on a string transport."""
    protocol = port.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


def answers(raw: bytes) -> list[Answer]:
    """The HTTP responses in C{raw}, in order; each must be complete."""
    reader = _AnswerReader()
    reader.parser.feed_data(raw)
    assert all(answer.complete for answer in reader.answers), raw
    return reader.answers


def synchronously(function: Any, *args: Any) -> Any:
    return maybeDeferred(function, *args)


class ManagerFixture:
    """
    Children "serve" as soon as C{serve} is called for them, or at once
    with C{auto_serve}.
    """

    def __init__(self, data_dir: str, auto_serve: bool = True, max_namespaces: int = 0,
                 allow_auto_provision: bool = True, max_running: int = 0,
                 make_channel: Any = None) -> None:
        os.makedirs(data_dir, exist_ok=True)
        self.data_dir = data_dir
        self.reactor = ProcessReactor()
        self.reactor.advance(1_700_000_000)
        self.auto_serve = auto_serve
        self.serving: set[int] = set()
        self.state = StateStore.for_data_dir(data_dir, self.reactor)
        self.state.load()
        self.supervisor = Supervisor(
            reactor=self.reactor,
            tursodb_bin="/opt/tursodb",
            data_dir=data_dir,
            ports=PortAllocator(9000, 9099, is_free=lambda port: True),
            startup_timeout=5,
            child_env={},
            is_serving=lambda pid, port: self.auto_serve or pid in self.serving,
            **({"make_channel": make_channel} if make_channel else {}),
        )
        self.locks = KeyedLocks()
        self.leases = Leases(self.reactor, drain_timeout=10)
        self.guard = HistoryGuard(self.state)
        self.hibernator = Hibernator(self.reactor, self.state, self.supervisor, self.leases, self.locks,
                                     max_running=max_running)
        self.admission = Admission(self.state, max_namespaces)
        archiver = Archiver(data_dir, run_in_thread=synchronously)
        self.manager = NamespaceManager(
            clock=self.reactor,
            state=self.state,
            supervisor=self.supervisor,
            archiver=archiver,
            guard=self.guard,
            leases=self.leases,
            locks=self.locks,
            hibernator=self.hibernator,
            admission=self.admission,
            allow_auto_provision=allow_auto_provision,
        )
        self.archival = Archival(self.reactor, self.state, self.supervisor, archiver, self.guard, self.leases,
                                 self.locks, self.admission)
        self.stats = NamespaceStats(self.reactor, data_dir, self.state, self.supervisor)

    def namespaces(self) -> LocalNamespaces:
        """The data plane's view of this manager's namespaces."""
        return LocalNamespaces(self.reactor, self.manager, self.guard, self.data_dir)

    def reconcile(self) -> None:
        reconcile(self.data_dir, self.state, self.guard, self.reactor.seconds())

    def settle(self) -> None:
        """
        Let readiness polls run.
        """
        self.reactor.advance(0.05)

    def children(self, name: str) -> list[TursodbProcess]:
        return [p for p, _, _ in self.reactor.spawned if p.name == name]
