"""
End-to-end harness: the real daemon (C{twistd -n turso-server}) with real
C{tursodb} children, on loopback, free ports and a temp data dir.

The daemon's output goes to a file, never a pipe (an orphaned child would
hold a pipe open); readiness is read from its "listening" log lines; every
test kills what it started, by PID.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, TestCase

from turso_twisted.recovery import find_orphans
from turso_twisted.workers import worker_pids

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")


def tursodb_bin() -> str:
    path = os.environ.get("TURSODB_BIN", "")
    if not (path and os.access(path, os.X_OK)):
        raise SkipTest("TURSODB_BIN is not set to a tursodb binary; run the suite with ./dev test")
    return path


def wait_for(check: Callable[[], Any], what: str, timeout: float = 30.0,
             interval: float = 0.02) -> Deferred[Any]:
    """
    Fire with C{check()}'s first truthy result; fail after C{timeout}.
    """
    result: Deferred[Any] = Deferred()
    deadline = reactor.seconds() + timeout

    def poll() -> None:
        try:
            value = check()
        except Exception:
            loop.stop()
            result.errback(Failure())
            return
        if value:
            loop.stop()
            result.callback(value)
        elif reactor.seconds() > deadline:
            loop.stop()
            result.errback(AssertionError(f"timed out after {timeout}s waiting for {what}"))

    loop = LoopingCall(poll)
    loop.start(interval)
    return result


class _Exit(ProcessProtocol):
    def __init__(self) -> None:
        self.ended: Deferred[int | None] = Deferred()
        self.status: int | None = None
        self.signal: int | None = None

    def processEnded(self, reason: Failure) -> None:
        self.status = getattr(reason.value, "exitCode", None)
        self.signal = getattr(reason.value, "signal", None)
        self.ended.callback(self.status)

#: Log formats the end-to-end tests look for (see L{Daemon.events}).
RUNNING = "namespace {name} running on port {port} (pid {pid}, {startup_ms} ms)"
STOPPED = "namespace {name} stopped ({status})"
HIBERNATED = "namespace {name} hibernated: {reason}"
EXITED = "tursodb of namespace {name} exited unexpectedly ({status}) after {uptime} s"
GC_ARCHIVED = "gc archived namespace {name} into {entry}: {reason}"
GC_PURGED = "gc purged archive entry {entry}: {reason}"
BACKUP_TAKEN = "backup of namespace {name} taken: {bytes} bytes, sha256 {sha256}"


def matches(event: dict[str, Any], log_format: str) -> bool:
    """
    Whether C{event}'s message is C{log_format} filled in with its fields.
    """
    try:
        return bool(event.get("msg") == log_format.format(**event))
    except (KeyError, IndexError, ValueError):
        return False


class Daemon:
    """
    One C{twistd -n turso-server} under test.
    """

    def __init__(self, case: TestCase, data_dir: str | None = None, **env: str) -> None:
        self.case = case
        self.data_dir = os.path.abspath(data_dir or case.mktemp())
        os.makedirs(self.data_dir, exist_ok=True)
        self.log_path = os.path.abspath(case.mktemp()) + ".log"
        self.stderr_path = self.log_path + ".stderr"
        base = random.randrange(20000, 60000, 100)
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "TURSODB_BIN": tursodb_bin(),
            "TURSO_DATA_DIR": self.data_dir,
            "TURSO_DATA_ADDR": "127.0.0.1:0",
            "TURSO_ADMIN_ADDR": "127.0.0.1:0",
            "TURSO_BACKEND_PORT_START": str(base),
            "TURSO_BACKEND_PORT_END": str(base + 99),
            # Children confined as shipped, where ./dev test built the helper.
            "TURSO_LANDLOCK_BIN": os.environ.get("TURSO_LANDLOCK_BIN", "turso-landlock"),
            # Another checkout under test (PYTHONPATH) runs its own daemon.
            **({"PYTHONPATH": os.environ["PYTHONPATH"]} if os.environ.get("PYTHONPATH") else {}),
            # One process unless the test case asks for data workers.
            "TURSO_DATA_WORKERS": str(getattr(case, "data_workers", 1)),
            **env,
        }
        self.process: _Exit | None = None
        self.pid: int | None = None
        self.data_port = self.admin_port = 0
        case.addCleanup(self.cleanup)

    # -- lifecycle -----------------------------------------------------------

    def spawn(self, *args: str) -> _Exit:
        protocol = _Exit()
        with open(self.log_path, "ab") as out, open(self.stderr_path, "ab") as err:
            transport = reactor.spawnProcess(
                protocol, TWISTD, [TWISTD, "--nodaemon", "--pidfile=", "turso-server", *args],
                env=self.env, path=self.data_dir,
                childFDs={0: "w", 1: out.fileno(), 2: err.fileno()})
        transport.closeStdin()
        self.process = protocol
        self.pid = transport.pid
        return protocol

    @inlineCallbacks
    def start(self, *args: str) -> Any:
        """
        Start the daemon and wait until both listeners are up and it is
        ready (its data workers, if any, serve).
        """
        skip = len(self.logs())
        process = self.spawn(*args)

        def listening() -> bool:
            if process.ended.called:
                raise AssertionError(f"daemon exited at start-up:\n{self.tail()}")
            logs = self.logs()[skip:]
            ports = {e["listener"]: e["port"] for e in logs
                     if matches(e, "listening: {listener} port on {host}:{port}")}
            ready = any(e.get("msg", "").startswith("turso-server ready") for e in logs)
            if {"data", "admin"} <= set(ports) and ready:
                self.data_port, self.admin_port = ports["data"], ports["admin"]
                return True
            return False

        yield wait_for(listening, "the daemon to listen")
        return self

    def exited(self) -> Deferred[int | None]:
        assert self.process is not None
        return self.process.ended

    def signal(self, name: str) -> None:
        if self.process is not None and not self.process.ended.called:
            os.kill(self.pid, getattr(signal, name))

    def cleanup(self) -> Deferred[Any] | None:
        pending = None
        if self.process is not None and not self.process.ended.called:
            os.kill(self.pid, signal.SIGKILL)
            pending = self.process.ended
        for pid in find_orphans(self.data_dir):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return pending

    # -- logs ----------------------------------------------------------------

    def logs(self) -> list[dict[str, Any]]:
        try:
            with open(self.log_path, encoding="utf-8") as handle:
                lines = handle.read().splitlines()
        except FileNotFoundError:
            return []
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except ValueError:
                out.append({"msg": line, "level": "RAW"})
        return out

    def stderr(self) -> str:
        try:
            with open(self.stderr_path, encoding="utf-8") as handle:
                return handle.read()
        except FileNotFoundError:
            return ""

    def tail(self, lines: int = 30) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as handle:
            text = handle.read().splitlines()[-lines:]
        return "\n".join(text) + "\nstderr:\n" + self.stderr()

    def events(self, log_format: str, **fields: Any) -> list[dict[str, Any]]:
        """
        The events logged with C{log_format} (their message is it, filled
        in with their own fields) whose fields include C{fields}.
        """
        return [e for e in self.logs() if matches(e, log_format)
                and all(e.get(k) == v for k, v in fields.items())]

    # -- addresses -----------------------------------------------------------

    def data_url(self, path: str = "") -> str:
        return f"http://127.0.0.1:{self.data_port}{path}"

    def admin_url(self, path: str = "") -> str:
        return f"http://127.0.0.1:{self.admin_port}{path}"


def raw_request(port: int, request: bytes) -> Deferred[tuple[int, bytes]]:
    """
    Send bytes exactly as given (no client normalization; include
    C{Connection: close}); fire with the status and the whole response.
    """

    def exchange() -> tuple[int, bytes]:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(request)
            chunks = []
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        response = b"".join(chunks)
        return int(response.split(b" ", 2)[1]), response

    return deferToThread(exchange)


def run_replica(work: Callable[..., Any], *args: Any) -> Deferred[Any]:
    """
    Run blocking pyturso work off the reactor thread.
    """
    return deferToThread(work, *args)


def with_data_workers(*cases: type) -> dict[str, type]:
    """
    Each end-to-end case again, with the daemon's data port served by two
    data workers (C{TURSO_DATA_WORKERS=2}) instead of the main process.
    """
    return {f"{case.__name__}WithDataWorkers": type(f"{case.__name__}WithDataWorkers", (case,),
                                                    {"data_workers": 2, "__module__": case.__module__})
            for case in cases}


def data_workers(daemon: Daemon) -> list[int]:
    """The pids of the daemon's data workers."""
    assert daemon.pid is not None
    return worker_pids(daemon.pid)
