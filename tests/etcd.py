"""
A real etcd for the cluster tests: one member on loopback, free ports, a
temp data dir, stopped (SIGKILL) and started again on the same dir and
ports when a test asks.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase

from .daemon import _Exit, wait_for


def etcd_bin() -> str:
    """The etcd server binary (C{ETCD_BIN}, else on PATH); the test is skipped without one."""
    path = os.environ.get("ETCD_BIN") or shutil.which("etcd") or ""
    if not (path and os.access(path, os.X_OK)):
        raise SkipTest("no etcd server binary (set ETCD_BIN, or run ./dev test, which installs "
                       "Debian's etcd-server where it can)")
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class EtcdServer:
    """One etcd member under test."""

    def __init__(self, case: TestCase) -> None:
        self.binary = etcd_bin()
        self.data_dir = os.path.abspath(case.mktemp())
        self.log_path = self.data_dir + ".log"
        self.client_port, self.peer_port = free_port(), free_port()
        self.process: _Exit | None = None
        self.pid: int | None = None
        case.addCleanup(self.stop)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    @inlineCallbacks
    def start(self) -> Deferred[EtcdServer]:  # type: ignore[misc]
        """Start it and wait until it answers C{/health}."""
        peer = f"http://127.0.0.1:{self.peer_port}"
        args = [self.binary, "--name", "test", "--data-dir", self.data_dir,
                "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", f"test={peer}", "--log-level", "warn"]
        protocol = _Exit()
        with open(self.log_path, "ab") as out:
            transport = reactor.spawnProcess(protocol, self.binary, args, env={"PATH": "/usr/bin:/bin"},
                                             childFDs={0: "w", 1: out.fileno(), 2: out.fileno()})
        transport.closeStdin()
        self.process, self.pid = protocol, transport.pid

        def healthy() -> bool:
            if protocol.ended.called:
                with open(self.log_path, encoding="utf-8", errors="replace") as handle:
                    raise AssertionError("etcd exited at start-up:\n" + handle.read()[-3000:])
            return self._health()

        yield wait_for(healthy, "etcd to be healthy", interval=0.05)
        return self

    def _health(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.client_port), timeout=2) as sock:
                sock.sendall(b"GET /health HTTP/1.0\r\n\r\n")
                answer = b""
                while chunk := sock.recv(4096):
                    answer += chunk
        except OSError:
            return False
        body = answer.partition(b"\r\n\r\n")[2]
        try:
            return json.loads(body).get("health") == "true"
        except ValueError:
            return False

    def stop(self) -> Deferred[None] | None:
        """Kill it (SIGKILL: an outage, not a shutdown)."""
        if self.process is None or self.process.ended.called:
            return None
        assert self.pid is not None
        os.kill(self.pid, signal.SIGKILL)
        ended = self.process.ended
        return ended.addCallback(lambda _: None)

    def keys(self, prefix: str) -> Deferred[dict[str, dict[str, object]]]:
        """Every key under C{prefix} and its JSON value, read straight from etcd."""

        def read() -> dict[str, dict[str, object]]:
            import base64
            import urllib.request

            end = bytearray(prefix.encode())
            end[-1] += 1
            body = json.dumps({"key": base64.b64encode(prefix.encode()).decode(),
                               "range_end": base64.b64encode(bytes(end)).decode()}).encode()
            with urllib.request.urlopen(self.url + "/v3/kv/range", body, timeout=10) as response:
                answer = json.loads(response.read())
            return {base64.b64decode(kv["key"]).decode(): json.loads(base64.b64decode(kv["value"]))
                    for kv in answer.get("kvs", [])}

        return deferToThread(read)
