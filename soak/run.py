"""
Fault-injection soak: real pyturso replicas write through a real daemon
while faults are injected, then a ledger says whether anything was lost.

    ./dev soak [SECONDS] [--workers N] [--seed N] [--keep]

Workers (soak/worker.py, one process and one namespace each) push uniquely
keyed rows and note which keys were acknowledged.  Meanwhile a fault loop
goes round every kind of fault below, in a seeded order, for SECONDS (at
least one full round), and after each one waits until every worker pushes
again:

  kill_child    SIGKILL a namespace's tursodb
  stop_child    SIGSTOP one past the backend deadline (the daemon must kill it)
  kill_worker   SIGKILL a data worker (it must be started again)
  kill_daemon   SIGKILL the daemon (its children are orphaned) and start it again
  restart       SIGTERM the daemon and start it again
  crowd         touch more namespaces than TURSO_MAX_RUNNING lets run
  fork          fork a namespace being written to, check the copy
  restore       back up a namespace being written to, restore it elsewhere, check
  garbage       malformed HTTP, smuggling, refused SQL, bad admin input
  slow_clients  clients that ask for large answers and do not read, or send
                their headers a byte at a time
  disk_full     fill the data dir's file system (a size-limited tmpfs; needs
                root, skipped with the reason where it cannot be mounted)

Then the workers drain, the daemon is restarted cleanly, and the ledger is
checked: every acknowledged key present exactly once in its own namespace,
no row in a namespace that is not its own, forks and restores holding every
key acknowledged before they began and nothing else, no tursodb process the
daemon does not own, the daemon ready and serving.  The last line is

  soak: faults F, acknowledged A, lost L, duplicated D, leaked K, orphans O, anomalies N

and the exit status is 1 if any of L, D, K, O, N is not zero.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from turso_twisted.recovery import find_orphans  # noqa: E402
from turso_twisted.tokens import generate_key_pair, mint  # noqa: E402
from turso_twisted.workers import worker_pids  # noqa: E402

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
WORKER = os.path.join(ROOT, "soak", "worker.py")
#: What the daemon logs (message text) when it kills a wedged child, and when it makes room.
WEDGED = "did not answer within the backend timeout"
MADE_ROOM = "hibernated: making room"
DATA_TOKEN = "soak-data-token"
#: Workers use namespace tokens (JWTs) that open their own namespace only;
#: the soak itself uses the static token.
SIGNING_KEY, PUBLIC_KEY = generate_key_pair()
ADMIN_TOKEN = "soak-admin-token"
BACKEND_TIMEOUT = 2.0
PROGRESS_TIMEOUT = 30.0
DISK_BYTES = 512 * 1024 * 1024
KINDS = ("kill_child", "stop_child", "kill_worker", "kill_daemon", "restart", "crowd", "fork", "restore",
         "garbage", "slow_clients", "disk_full")


def namespace_token(name: str, read_only: bool = False) -> str:
    """A JWT that opens C{name} only (read-write, or read-only)."""
    return mint(SIGNING_KEY, {"iat": int(time.time()), "p": {"ro" if read_only else "rw": {"ns": [name]}}})


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def say(text: str) -> None:
    print(f"soak: {text}", flush=True)


def call(port: int, method: str, path: str, body: bytes | None = None, token: str | None = None,
         timeout: float = 30.0) -> tuple[int, bytes]:
    """One request on a new connection: (status, body)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if body is not None:
        headers["Content-Type"] = "application/json"
    try:
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def pipeline(*statements: str) -> bytes:
    # tursodb's pipeline knows execute and batch only (no close).
    requests = [{"type": "execute", "stmt": {"sql": sql}} for sql in statements]
    return json.dumps({"requests": requests}).encode()


def raw_exchange(port: int, payload: bytes, timeout: float = 10.0) -> bytes:
    """Send bytes as they are; return whatever comes back before the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(payload)
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)


# -- the daemon ----------------------------------------------------------------------------


class Daemon:
    """
    One C{twistd turso-server} on fixed ports, so that replicas find it again
    after it is killed and started anew.
    """

    def __init__(self, workdir: str, data_dir: str, workers: int, seeded: random.Random) -> None:
        self.data_dir = data_dir
        #: Daemon processes started so far (slow readers check it).
        self.generation = 0
        self.data_port = free_port()
        self.admin_port = free_port()
        while self.admin_port == self.data_port:
            self.admin_port = free_port()
        base = seeded.randrange(20000, 50000, 1000)
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "TURSODB_BIN": os.environ["TURSODB_BIN"],
            "TURSO_LANDLOCK_BIN": os.environ.get("TURSO_LANDLOCK_BIN", "turso-landlock"),
            "TURSO_DATA_DIR": data_dir,
            "TURSO_DATA_ADDR": f"127.0.0.1:{self.data_port}",
            "TURSO_ADMIN_ADDR": f"127.0.0.1:{self.admin_port}",
            "TURSO_AUTH_TOKEN": DATA_TOKEN,
            "TURSO_JWT_KEY": PUBLIC_KEY.decode(),
            "TURSO_ADMIN_TOKEN": ADMIN_TOKEN,
            "TURSO_BACKEND_PORT_START": str(base),
            "TURSO_BACKEND_PORT_END": str(base + 999),
            "TURSO_BACKEND_TIMEOUT": f"{BACKEND_TIMEOUT:g}s",
            "TURSO_MAX_RUNNING": str(workers + 1),
            "TURSO_HIBERNATE_AFTER": "5s",
            "TURSO_QUEUE_TIMEOUT": "10s",
            "TURSO_SHUTDOWN_TIMEOUT": "5s",
            "TURSO_ACCESS_LOG": "false",
            # To soak another checkout with this venv: PYTHONPATH=<checkout> ./dev soak
            **({"PYTHONPATH": os.environ["PYTHONPATH"]} if os.environ.get("PYTHONPATH") else {}),
        }
        self.log_path = os.path.join(workdir, "daemon.log")
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.generation += 1
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen([TWISTD, "--nodaemon", "--pidfile=", "turso-server"],
                                            env=self.env, cwd=os.path.dirname(self.log_path),
                                            stdout=log, stderr=log)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the daemon exited at start-up ({self.process.returncode})")
            try:
                # Ready: listening, and its data workers (if any) serving.
                status, _ = self.admin("GET", "/readyz", timeout=1)
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError("the daemon was not ready within 60 s")

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> int:
        """SIGTERM; the exit status (twistd ends itself with the signal after a clean shutdown)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            return -9

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def admin(self, method: str, path: str, body: bytes | None = None,
              timeout: float = 30.0) -> tuple[int, bytes]:
        return call(self.admin_port, method, path, body, ADMIN_TOKEN, timeout)

    def data(self, method: str, path: str, body: bytes | None = None,
             timeout: float = 30.0) -> tuple[int, bytes]:
        return call(self.data_port, method, path, body, DATA_TOKEN, timeout)

    def pid_of(self, name: str) -> int | None:
        status, body = self.admin("GET", f"/v1/namespaces/{name}")
        return json.loads(body).get("pid") if status == 200 else None

    def children(self) -> set[int]:
        status, body = self.admin("GET", "/v1/namespaces")
        if status != 200:
            raise RuntimeError(f"listing namespaces answered {status}")
        return {n["pid"] for n in json.loads(body)["namespaces"] if n.get("pid")}

    def query(self, name: str, sql: str) -> list[list[Any]]:
        """
        The rows of one statement in a namespace, read over the data port
        (values as Hrana gives them); a 503 (a child restarting after a
        crash) is waited out.

        @raise ValueError: for any other answer.
        """
        deadline = time.monotonic() + 30
        while True:
            status, body = self.data("POST", f"/{name}/v2/pipeline", pipeline(sql))
            if status != 503 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        if status != 200:
            raise ValueError(f"{sql} in {name} answered {status}: {body[:200]!r}")
        result = json.loads(body)["results"][0]
        if result.get("type") != "ok":
            raise ValueError(f"{sql} in {name} failed: {str(result)[:300]}")
        return list(result["response"]["result"]["rows"])

    def rows(self, name: str) -> list[tuple[str, str]]:
        """Every (key, ns) row of a namespace's ledger table."""
        return [(row[0]["value"], row[1]["value"]) for row in self.query(name, "SELECT key, ns FROM ledger")]

    def events(self, text: str) -> list[dict[str, Any]]:
        out = []
        with open(self.log_path, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                with suppress(ValueError):
                    event = json.loads(line)
                    if text in str(event.get("msg", "")):
                        out.append(event)
        return out

    def critical(self) -> list[str]:
        out = []
        with open(self.log_path, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                try:
                    event = json.loads(line)
                except ValueError:
                    if "Traceback" in line:
                        out.append(line.strip())
                    continue
                if event.get("level") == "CRITICAL":
                    out.append(str(event.get("msg", ""))[:300])
        return out


# -- workers -------------------------------------------------------------------------------


@dataclass
class Worker:
    namespace: str
    workdir: str
    process: subprocess.Popen[bytes] | None = None
    summary: dict[str, Any] = field(default_factory=dict)

    def start(self, daemon: Daemon) -> None:
        os.makedirs(self.workdir, exist_ok=True)
        with open(os.path.join(self.workdir, "output"), "ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, WORKER, f"http://127.0.0.1:{daemon.data_port}/{self.namespace}",
                 namespace_token(self.namespace), self.namespace, self.workdir], stdout=out, stderr=out)

    def acknowledged_bytes(self) -> int:
        try:
            return os.path.getsize(os.path.join(self.workdir, "acknowledged"))
        except FileNotFoundError:
            return 0

    def keys(self, which: str) -> list[str]:
        try:
            with open(os.path.join(self.workdir, which), encoding="utf-8") as handle:
                return [line.rstrip("\n") for line in handle if line.endswith("\n")]
        except FileNotFoundError:
            return []

    def drain(self, seconds: float) -> None:
        with open(os.path.join(self.workdir, "drain.partial"), "w", encoding="utf-8") as handle:
            handle.write(str(time.time() + seconds))
        os.rename(os.path.join(self.workdir, "drain.partial"), os.path.join(self.workdir, "drain"))

    def finish(self, seconds: float) -> None:
        assert self.process is not None
        try:
            self.process.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            self.summary = {"hung": True}
            return
        with open(os.path.join(self.workdir, "output"), encoding="utf-8", errors="replace") as handle:
            for line in handle:
                with suppress(ValueError):
                    self.summary = json.loads(line)


# -- the run -------------------------------------------------------------------------------


@dataclass
class Ledger:
    acknowledged: int = 0
    lost: int = 0
    duplicated: int = 0
    leaked: int = 0
    orphans: int = 0
    anomalies: list[str] = field(default_factory=list)

    def anomaly(self, text: str) -> None:
        self.anomalies.append(text)
        say(f"ANOMALY: {text}")

    def check_copy(self, what: str, rows: list[tuple[str, str]], source: str, attempted: set[str],
                   acknowledged_before: set[str]) -> None:
        """A fork or restore: every key acknowledged before it, nothing but the source's own."""
        counts = Counter(key for key, _ in rows)
        missing = acknowledged_before - set(counts)
        doubled = [key for key, n in counts.items() if n > 1]
        foreign = [key for key, ns in rows if ns != source or key not in attempted]
        self.lost += len(missing)
        self.duplicated += len(doubled)
        self.leaked += len(foreign)
        if missing or doubled or foreign:
            self.anomaly(f"{what}: {len(missing)} missing, {len(doubled)} duplicated, "
                         f"{len(foreign)} foreign (e.g. {sorted(missing)[:3]} {doubled[:3]} {foreign[:3]})")


class Soak:
    def __init__(self, args: argparse.Namespace, workdir: str) -> None:
        self.args = args
        self.random = random.Random(args.seed)
        self.workdir = workdir
        self.ledger = Ledger()
        self.faults: Counter[str] = Counter()
        self.skipped: dict[str, str] = {}
        self.disk = os.path.join(workdir, "disk")
        os.makedirs(self.disk)
        self.tmpfs = False
        self.daemon = Daemon(workdir, os.path.join(self.disk, "data"), args.workers, self.random)
        self.workers = [Worker(f"soak-{i}", os.path.join(workdir, f"worker-{i}"))
                        for i in range(args.workers)]
        self.slow: list[tuple[socket.socket, str]] = []
        self.slow_outcomes: Counter[str] = Counter()
        self.slow_generation = 0
        #: Data workers killed so far (each cuts the connections it held).
        self.worker_kills = 0
        self.slow_worker_kills = 0
        self.copies = 0

    def _mount_tmpfs(self) -> bool:
        if os.geteuid() != 0:
            self.skipped["disk_full"] = "not root: cannot mount a size-limited tmpfs"
            return False
        # tursodb's WAL only grows: about 1 MiB a second for the whole run.
        size = max(DISK_BYTES, int(self.args.seconds + 120) * (1 << 20))
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755",
                                  "tmpfs", self.disk], capture_output=True, text=True)
        if mounted.returncode != 0:
            why = mounted.stderr.strip() or f"mount exited {mounted.returncode}"
            self.skipped["disk_full"] = f"cannot mount a tmpfs: {why}"
            return False
        return True

    # -- helpers ---------------------------------------------------------------------------

    def wait_progress(self, after: str) -> None:
        """Every worker acknowledges something new, or that is an anomaly."""
        start = {w.namespace: w.acknowledged_bytes() for w in self.workers}
        deadline = time.monotonic() + PROGRESS_TIMEOUT
        while time.monotonic() < deadline:
            stalled = [w for w in self.workers if w.acknowledged_bytes() == start[w.namespace]]
            if not stalled:
                return
            for worker in stalled:
                if worker.process is not None and worker.process.poll() is not None:
                    self.ledger.anomaly(f"worker {worker.namespace} exited during the run")
                    worker.start(self.daemon)
            time.sleep(0.05)
        self.ledger.anomaly(f"no progress within {PROGRESS_TIMEOUT:g} s after {after}: "
                            + ", ".join(w.namespace for w in self.workers
                                        if w.acknowledged_bytes() == start[w.namespace]))

    def check_counts(self, after: str, acknowledged: dict[str, int]) -> None:
        """Each namespace holds at least what was acknowledged before the fault."""
        for worker in self.workers:
            name = worker.namespace
            try:
                count = int(self.daemon.query(name, "SELECT count(*) FROM ledger")[0][0]["value"])
            except (OSError, ValueError) as error:
                self.ledger.anomaly(f"after {after}, {name} could not be counted: {error}")
                continue
            if count < acknowledged[name]:
                self.ledger.anomaly(f"after {after}, {name} holds {count} rows but "
                                    f"{acknowledged[name]} were acknowledged before it")

    def running_pid(self) -> tuple[str, int] | None:
        for name in self.random.sample([w.namespace for w in self.workers], len(self.workers)):
            pid = self.daemon.pid_of(name)
            if pid:
                return name, pid
        return None

    def restart_daemon(self, how: str) -> None:
        if how == "kill":
            self.daemon.kill()
            # Children die with the daemon (setpriv --pdeathsig): none may be
            # left for the next start-up's orphan sweep to find.
            deadline = time.monotonic() + 5
            while find_orphans(self.daemon.data_dir) and time.monotonic() < deadline:
                time.sleep(0.05)
            left = find_orphans(self.daemon.data_dir)
            if left:
                self.ledger.orphans += len(left)
                self.ledger.anomaly(f"tursodb outlived the killed daemon: {left}")
        else:
            status = self.daemon.stop()
            if status != -signal.SIGTERM:
                self.ledger.anomaly(f"SIGTERM shutdown exited {status}")
            left = find_orphans(self.daemon.data_dir)
            if left:
                self.ledger.orphans += len(left)
                self.ledger.anomaly(f"tursodb left running after a clean shutdown: {left}")
                for pid in left:
                    with suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
        try:
            self.daemon.start()
        except RuntimeError as error:
            self.ledger.anomaly(f"restart after {how}: {error}")
            raise

    def inject(self, kind: str) -> None:
        """Run one fault; count it only if it happened (a fault returns False when it could not)."""
        began = time.monotonic()
        if getattr(self, kind)() is False:
            say(f"{kind} not injected (nothing to inject it into)")
            return
        self.faults[kind] += 1
        say(f"{kind} done in {time.monotonic() - began:.1f} s")

    # -- faults ----------------------------------------------------------------------------

    def kill_child(self) -> bool:
        found = self.running_pid()
        if not found:
            return False
        say(f"SIGKILL {found[0]}'s child (pid {found[1]})")
        os.kill(found[1], signal.SIGKILL)
        return True

    def kill_worker(self) -> bool:
        """SIGKILL a data worker mid-traffic: it is started again, and no acknowledged push is lost."""
        assert self.daemon.process is not None
        workers = worker_pids(self.daemon.process.pid)
        if not workers:
            return False  # one data process (TURSO_DATA_WORKERS=1)
        victim = self.random.choice(workers)
        say(f"SIGKILL data worker (pid {victim})")
        os.kill(victim, signal.SIGKILL)
        # The connections it held (a slow reader's, say) go with it.
        self.worker_kills += 1
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            now = worker_pids(self.daemon.process.pid)
            if len(now) == len(workers) and victim not in now:
                return True
            time.sleep(0.05)
        self.ledger.anomaly(f"data worker {victim} was not started again within 30 s")
        return True

    def stop_child(self) -> bool:
        found = self.running_pid()
        if not found:
            return False
        name, pid = found
        wedged_before = len(self.daemon.events(WEDGED))
        say(f"SIGSTOP {name}'s child (pid {pid})")
        os.kill(pid, signal.SIGSTOP)
        deadline = time.monotonic() + BACKEND_TIMEOUT + 30
        try:
            # A worker's next push reaches the stopped child and misses the deadline.
            while time.monotonic() < deadline:
                if len(self.daemon.events(WEDGED)) > wedged_before:
                    return True
                time.sleep(0.05)
            self.ledger.anomaly(f"a stopped child of {name} was not killed as wedged within "
                                f"{BACKEND_TIMEOUT + 30:g} s")
            return True
        finally:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    def kill_daemon(self) -> None:
        self.restart_daemon("kill")

    def restart(self) -> None:
        self.restart_daemon("term")

    def crowd(self) -> None:
        made_room = len(self.daemon.events(MADE_ROOM))
        for number in self.random.sample(range(8), self.args.workers + 2):
            name = f"soak-crowd-{number}"
            status, body = self.daemon.data("POST", f"/{name}/v2/pipeline", pipeline("SELECT 1"))
            if status != 200:
                self.ledger.anomaly(f"touching {name} answered {status}: {body[:200]!r}")
        if len(self.daemon.events(MADE_ROOM)) == made_room:
            self.ledger.anomaly(f"touching {self.args.workers + 2} namespaces past TURSO_MAX_RUNNING "
                                "hibernated nothing")

    def _snapshot(self, name: str) -> tuple[set[str], set[str]]:
        worker = next(w for w in self.workers if w.namespace == name)
        return set(worker.keys("acknowledged")), set(worker.keys("attempted"))

    def fork(self) -> None:
        source = self.random.choice(self.workers).namespace
        target = f"soak-fork-{self.copies % 3}"
        self.copies += 1
        self.daemon.admin("DELETE", f"/v1/namespaces/{target}")
        before, _ = self._snapshot(source)
        status, body = self.daemon.admin("POST", f"/v1/namespaces/{source}/fork/{target}")
        if status != 201:
            self.ledger.anomaly(f"fork {source} -> {target} answered {status}: {body[:200]!r}")
            return
        _, attempted = self._snapshot(source)
        self.check_copy(f"fork {source} -> {target}", target, source, attempted, before)
        self.purge_archive()

    def restore(self) -> None:
        source = self.random.choice(self.workers).namespace
        before, _ = self._snapshot(source)
        status, backup = self.daemon.admin("GET", f"/v1/namespaces/{source}/backup", timeout=120)
        if status != 200:
            self.ledger.anomaly(f"backup of {source} answered {status}: {backup[:200]!r}")
            return
        status, body = self.daemon.admin("POST", f"/v1/namespaces/soak-restored/restore?source={source}",
                                         backup, timeout=120)
        if status != 200:
            self.ledger.anomaly(f"restore of {source} into soak-restored answered {status}: {body[:200]!r}")
            return
        _, attempted = self._snapshot(source)
        self.check_copy(f"restore of {source}", "soak-restored", source, attempted, before)
        self.purge_archive()

    def check_copy(self, what: str, copy: str, source: str, attempted: set[str],
                   acknowledged_before: set[str]) -> None:
        try:
            rows = self.daemon.rows(copy)
        except (OSError, ValueError) as error:
            self.ledger.anomaly(f"{what}: cannot read the copy: {error}")
            return
        self.ledger.check_copy(what, rows, source, attempted, acknowledged_before)

    def purge_archive(self) -> None:
        """Deleted forks and replaced restores go to the archive: drop them (the disk is small)."""
        status, body = self.daemon.admin("GET", "/v1/archive")
        if status != 200:
            self.ledger.anomaly(f"listing the archive answered {status}: {body[:200]!r}")
            return
        for entry in json.loads(body)["entries"]:
            status, body = self.daemon.admin("DELETE", f"/v1/archive/{entry['entry']}")
            if status != 200:
                self.ledger.anomaly(f"deleting archive entry {entry['entry']} answered {status}")

    def garbage(self) -> None:
        """
        Input every client could send; each must get a 4xx (or, for bytes
        that are not a whole request, be left waiting or closed), and the
        statements must change nothing: the gate refuses them before any
        child sees them.
        """
        name = self.random.choice(self.workers).namespace
        other = next(w.namespace for w in self.workers if w.namespace != name) if len(self.workers) > 1 \
            else "soak-other"
        planted = os.path.join(self.daemon.data_dir, "planted.db")
        auth = f"Authorization: Bearer {DATA_TOKEN}\r\n".encode()
        admin = f"Authorization: Bearer {ADMIN_TOKEN}\r\n".encode()

        def get(target: bytes, headers: bytes = auth) -> bytes:
            return b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + headers + b"\r\n"

        def post(target: str, body: bytes, headers: bytes = auth) -> bytes:
            return (f"POST {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n".encode() + headers
                    + f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                    + body)

        pipe = f"/{name}/v2/pipeline"
        # (payload, whether it is a whole request that must be answered)
        data_cases = [
            (bytes(self.random.randrange(256) for _ in range(self.random.randrange(1, 2000))), False),
            (b"GET /" + name.encode() + b"/info HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
             b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", True),
            (b"POST " + pipe.encode() + b" HTTP/1.1\r\nHost: x\r\n" + auth
             + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!", True),
            (b"POST " + pipe.encode() + b" HTTP/1.1\r\nHost: x\r\n" + auth
             + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n", True),
            (get(b"/../_state/namespaces.json"), True),
            (get(b"/" + name.encode() + b"%2f..%2f_state"), True),
            (post(pipe, pipeline(f"VACUUM INTO '{planted}'")), True),
            (post(pipe, pipeline("SELECT load_extension('/lib/x86_64-linux-gnu/libc.so.6')")), True),
            (post(pipe, pipeline("ATTACH DATABASE '/etc/passwd' AS p")), True),
            (post(pipe, pipeline("BEGIN")), True),
            (post(pipe, b'{"requests": [{"type": "execute", "stmt": {"sql": 1}}]}'), True),
            (post(pipe, b"[" * 30000), True),
            (post(pipe, pipeline("SELECT 1"), b"Authorization: Bearer wrong\r\n"), True),
            # Another tenant's token, and a read-only one, writing here: 403, nothing written.
            (post(pipe, pipeline(f"INSERT INTO ledger (key, ns, seq) VALUES ('intruder', '{other}', 0)"),
                  f"Authorization: Bearer {namespace_token(other)}\r\n".encode()), True),
            (post(pipe, pipeline("SELECT key FROM ledger"),
                  f"Authorization: Bearer {namespace_token(other)}\r\n".encode()), True),
            (post(pipe, pipeline(f"INSERT INTO ledger (key, ns, seq) VALUES ('read-only', '{name}', 0)"),
                  f"Authorization: Bearer {namespace_token(name, read_only=True)}\r\n".encode()), True),
            (post("/soak-unknown/v2/pipeline", pipeline("CREATE TABLE t (x)"),
                  f"Authorization: Bearer {namespace_token(other)}\r\n".encode()), True),
            (b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", False),
        ]
        admin_cases = [
            (post(f"/v1/namespaces/{name}/ttl", b'{"ttl": "10ns"}', admin), True),
            (post(f"/v1/namespaces/{name}/ttl", b'{"ttl": "\xef\xbc\x91h"}', admin), True),
            (post(f"/v1/namespaces/{name}/unarchive", b"[" * 30000, admin), True),
            (b"DELETE /v1//namespaces/" + name.encode() + b" HTTP/1.1\r\nHost: x\r\n" + admin
             + b"Connection: close\r\n\r\n", True),
            (b"DELETE /v1/namespaces/%2e%2e HTTP/1.1\r\nHost: x\r\n" + admin + b"Connection: close\r\n\r\n",
             True),
            (post("/v1/namespaces/%c0%ae%c0%ae/create", b"{}", admin), True),
            (post(f"/v1/namespaces/{name}/restore", b"not a database", admin), True),
            (post(f"/v1/namespaces/{name}/restore", b"x" * 10, b""), True),
        ]
        for port, cases in ((self.daemon.data_port, data_cases), (self.daemon.admin_port, admin_cases)):
            for payload, whole in cases:
                try:
                    answer = raw_exchange(port, payload, timeout=10 if whole else 2)
                except TimeoutError:
                    if whole:
                        self.ledger.anomaly(f"garbage {payload[:60]!r}: no answer within 10 s")
                    continue
                except OSError as error:
                    if whole:
                        self.ledger.anomaly(f"garbage {payload[:60]!r}: connection failed: {error}")
                    continue  # closed on us: fine for bytes that are not a request
                if not answer:
                    if whole:
                        self.ledger.anomaly(f"garbage {payload[:60]!r}: closed without an answer")
                    continue
                try:
                    status = int(answer.split(b" ", 2)[1])
                except (IndexError, ValueError):
                    self.ledger.anomaly(f"garbage {payload[:60]!r}: answer is not HTTP: {answer[:80]!r}")
                    continue
                if not 400 <= status < 500:
                    self.ledger.anomaly(f"garbage {payload[:60]!r}: answered {status}: {answer[-200:]!r}")
        if os.path.exists(planted):
            self.ledger.leaked += 1
            self.ledger.anomaly(f"a client's VACUUM INTO wrote {planted}")
        status, _ = self.daemon.admin("GET", "/v1/namespaces/soak-unknown")
        if status != 404:
            self.ledger.anomaly("another namespace's token created soak-unknown")

    def slow_clients(self) -> None:
        self.release_slow_clients()
        self.slow_generation = self.daemon.generation
        self.slow_worker_kills = self.worker_kills
        for i in range(3):
            name = self.random.choice(self.workers).namespace
            # ~10.7 MB of JSON: more than the loopback's socket buffers hold.
            sql = f"SELECT zeroblob({8_000_000 + i})"
            body = pipeline(sql)
            sock = socket.create_connection(("127.0.0.1", self.daemon.data_port), timeout=30)
            sock.sendall(f"POST /{name}/v2/pipeline HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                         f"Authorization: Bearer {DATA_TOKEN}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                         + body)
            self.slow.append((sock, sql))
        for _ in range(2):
            sock = socket.create_connection(("127.0.0.1", self.daemon.data_port), timeout=30)
            sock.sendall(b"POST /soak-0/v2/pipeline HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            self.slow.append((sock, ""))

    def release_slow_clients(self) -> None:
        """Read what the slow readers asked for: whole, unless the daemon or a data worker was killed."""
        restarted = (self.daemon.generation != self.slow_generation
                     or self.worker_kills != self.slow_worker_kills)

        def cut(outcome: str, sql: str) -> None:
            self.slow_outcomes[outcome] += 1
            if not restarted:
                self.ledger.anomaly(f"slow reader of {sql}: {outcome} with no daemon restart or worker kill")

        for sock, sql in self.slow:
            with sock:
                if not sql:
                    continue
                chunks = []
                try:
                    while True:
                        chunk = sock.recv(1 << 20)
                        if not chunk:
                            break
                        chunks.append(chunk)
                except TimeoutError:
                    self.ledger.anomaly(f"slow reader of {sql}: no byte for 30 s")
                    continue
                except OSError:
                    cut("reset", sql)
                    continue
                answer = b"".join(chunks)
                head, _, body = answer.partition(b"\r\n\r\n")
                # A reader the daemon was killed under sees the connection
                # closed, a 5xx, or a 200 cut short of its Content-Length
                # (which a client can tell); never a whole answer that is wrong.
                if not head.startswith(b"HTTP/1.1 200"):
                    if head.startswith(b"HTTP/1.1 5") or not head:
                        cut(head[9:12].decode() or "closed", sql)
                        continue
                    self.ledger.anomaly(f"slow reader of {sql}: {head[:80]!r}")
                    continue
                length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), None)
                if length is None:
                    self.ledger.anomaly(f"slow reader of {sql}: a 200 without Content-Length")
                    continue
                if len(body) < length:
                    cut("cut short", sql)
                    continue
                try:
                    value = json.loads(body)["results"][0]["response"]["result"]["rows"][0][0]
                    size = len(base64.b64decode(value["base64"] + "=="))
                except (ValueError, KeyError, IndexError, TypeError) as error:
                    self.ledger.anomaly(f"slow reader of {sql}: a 200 that is not a whole answer ({error})")
                    continue
                expected = int(sql.split("(")[1].rstrip(")"))
                if size != expected:
                    self.ledger.anomaly(f"slow reader of {sql}: {size} bytes, not {expected}")
                else:
                    self.slow_outcomes["whole"] += 1
        self.slow.clear()

    def disk_full(self) -> None:
        if not self.tmpfs:
            return
        filler = os.path.join(self.disk, "filler")
        with open(filler, "wb", buffering=0) as handle:
            # Down to the last page: a small state file must not fit in what is left.
            for block in (b"\0" * (1 << 20), b"\0" * 4096):
                with suppress(OSError):
                    while True:
                        handle.write(block)
        try:
            status, body = self.daemon.admin("POST", "/v1/namespaces/soak-nospace/create", b"{}")
            # A create may make room (it hibernates a child, whose scratch
            # dir goes) and then succeed: then the namespace must be whole.
            if status == 201 and not json.loads(body).get("running"):
                self.ledger.anomaly(f"create on a full disk answered 201 with no child: {body[:200]!r}")
            elif status not in (201, 507):
                self.ledger.anomaly(f"create on a full disk answered {status}: {body[:200]!r}")
            if status == 201:
                self.daemon.admin("DELETE", "/v1/namespaces/soak-nospace")
            status, body = self.daemon.admin("POST", f"/v1/namespaces/{self.workers[0].namespace}/fork/"
                                                     "soak-nospace-fork")
            if status != 507:
                self.ledger.anomaly(f"fork on a full disk answered {status}: {body[:200]!r}")
            if status == 201:
                self.daemon.admin("DELETE", "/v1/namespaces/soak-nospace-fork")
            # Let the workers run into the full disk for a while.
            deadline = time.monotonic() + 2
            while time.monotonic() < deadline:
                time.sleep(0.1)
        finally:
            os.remove(filler)

    # -- the whole run ---------------------------------------------------------------------

    def run(self) -> int:
        say(f"{self.args.workers} workers, {self.args.seconds:g} s of faults, seed {self.args.seed}, "
            f"work dir {self.workdir}")
        self.tmpfs = self._mount_tmpfs()
        for kind, reason in self.skipped.items():
            say(f"{kind} skipped: {reason}")
        self.daemon.start()
        for worker in self.workers:
            worker.start(self.daemon)
        self.wait_progress("start-up")
        end = time.monotonic() + self.args.seconds
        rounds = 0
        while rounds == 0 or time.monotonic() < end:
            for kind in self.random.sample(KINDS, len(KINDS)):
                if kind in self.skipped:
                    continue
                acknowledged = {w.namespace: len(w.keys("acknowledged")) for w in self.workers}
                self.inject(kind)
                if not self.daemon.alive():
                    self.ledger.anomaly(f"the daemon died after {kind}")
                    self.daemon.start()
                self.wait_progress(kind)
                self.check_counts(kind, acknowledged)
                if rounds and time.monotonic() >= end:
                    break
            rounds += 1
        self.release_slow_clients()
        return self.finish()

    def finish(self) -> int:
        for worker in self.workers:
            worker.drain(PROGRESS_TIMEOUT)
        for worker in self.workers:
            worker.finish(PROGRESS_TIMEOUT + 30)
            summary = worker.summary
            if summary.get("hung") or not summary.get("drained"):
                self.ledger.anomaly(f"worker {worker.namespace} did not drain: {summary}")
        # A clean restart: what the faults left must start again.
        self.restart_daemon("term")
        self.check_ledger()
        self.check_serving()
        status = self.daemon.stop()
        if status != -signal.SIGTERM:
            self.ledger.anomaly(f"the final SIGTERM shutdown exited {status}")
        left = find_orphans(self.daemon.data_dir)
        self.ledger.orphans += len(left)
        for problem in self.daemon.critical():
            self.ledger.anomaly(f"daemon log: {problem}")
        self.report()
        ledger = self.ledger
        return 1 if (ledger.lost or ledger.duplicated or ledger.leaked or ledger.orphans
                     or ledger.anomalies) else 0

    def check_ledger(self) -> None:
        for worker in self.workers:
            acknowledged = set(worker.keys("acknowledged"))
            attempted = set(worker.keys("attempted"))
            self.ledger.acknowledged += len(acknowledged)
            try:
                rows = self.daemon.rows(worker.namespace)
            except (OSError, ValueError) as error:
                self.ledger.anomaly(f"{worker.namespace} cannot be read at the end: {error}")
                continue
            counts = Counter(key for key, _ in rows)
            lost = acknowledged - set(counts)
            doubled = [key for key, n in counts.items() if n > 1]
            foreign = [key for key, ns in rows if ns != worker.namespace or key not in attempted]
            self.ledger.lost += len(lost)
            self.ledger.duplicated += len(doubled)
            self.ledger.leaked += len(foreign)
            say(f"{worker.namespace}: {len(acknowledged)} acknowledged, {len(counts)} present, "
                f"{len(counts) - len(acknowledged & set(counts))} in doubt (pushed, answer lost), "
                f"errors seen {worker.summary.get('errors', {})}")
            if lost or doubled or foreign:
                self.ledger.anomaly(f"{worker.namespace}: lost {sorted(lost)[:5]}, duplicated {doubled[:5]}, "
                                    f"foreign {foreign[:5]}")

    def check_serving(self) -> None:
        status, body = self.daemon.admin("GET", "/readyz")
        if status != 200:
            self.ledger.anomaly(f"not ready at the end: {body[:200]!r}")
        status, body = self.daemon.data("POST", "/soak-final/v2/pipeline", pipeline("SELECT 1"))
        if status != 200:
            self.ledger.anomaly(f"not serving at the end: {status} {body[:200]!r}")
        owned = self.daemon.children()
        strays = set(find_orphans(self.daemon.data_dir)) - owned
        if strays:
            self.ledger.orphans += len(strays)
            self.ledger.anomaly(f"tursodb processes the daemon does not own: {sorted(strays)}")

    def report(self) -> None:
        hibernated = len(self.daemon.events("hibernated: "))
        wedged = len(self.daemon.events(WEDGED))
        if wedged > self.faults["stop_child"]:
            # Only a stopped child may miss the backend deadline: another
            # one was kept waiting (behind another channel's spare, say).
            self.ledger.anomaly(f"{wedged} children killed as wedged, {self.faults['stop_child']} stopped")
        say("faults injected: " + ", ".join(f"{kind} {self.faults[kind]}" for kind in KINDS
                                            if kind not in self.skipped)
            + f"; hibernations {hibernated}, wedged children killed {wedged}, "
              f"slow readers {dict(self.slow_outcomes)}")
        for kind, reason in self.skipped.items():
            say(f"{kind} skipped: {reason}")
        ledger = self.ledger
        print(f"soak: faults {sum(self.faults.values())}, acknowledged {ledger.acknowledged}, "
              f"lost {ledger.lost}, duplicated {ledger.duplicated}, leaked {ledger.leaked}, "
              f"orphans {ledger.orphans}, anomalies {len(ledger.anomalies)}", flush=True)

    def close(self, keep: bool) -> None:
        for sock, _ in self.slow:
            sock.close()
        for worker in self.workers:
            if worker.process is not None and worker.process.poll() is None:
                worker.process.kill()
                worker.process.wait()
        if self.daemon.alive():
            self.daemon.kill()
        for pid in find_orphans(self.daemon.data_dir):
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.tmpfs:
            try:
                if keep:
                    with suppress(OSError):
                        os.remove(os.path.join(self.disk, "filler"))
                    shutil.copytree(self.daemon.data_dir, os.path.join(self.workdir, "data"), symlinks=True,
                                    ignore_dangling_symlinks=True, dirs_exist_ok=True)
            finally:
                subprocess.run(["umount", "--lazy", self.disk], check=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="./dev soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("seconds", nargs="?", type=float, default=60.0,
                        help="how long the fault loop runs (at least one full round); default 60")
    parser.add_argument("--workers", type=int, default=3, help="pyturso workers, one namespace each")
    parser.add_argument("--seed", type=int, default=None, help="fault order seed (default: random)")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs, replicas, data)")
    args = parser.parse_args(argv)
    if args.seed is None:
        args.seed = random.randrange(1 << 32)
    if "TURSODB_BIN" not in os.environ:
        parser.error("TURSODB_BIN is not set; run it as ./dev soak")
    # SIGTERM or SIGHUP (a CI timeout, kill) cleans up like Ctrl-C: workers, daemon, tmpfs.
    for number in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(number, lambda *_: sys.exit(143))
    workdir = tempfile.mkdtemp(prefix="turso-soak-")
    soak = Soak(args, workdir)
    status = 2
    try:
        status = soak.run()
    finally:
        soak.close(keep=args.keep or status != 0)
        if args.keep or status != 0:
            say(f"work dir kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
