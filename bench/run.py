"""
Benchmark: direct tursodb against turso-server, side by side in one run.

    ./dev bench [--quick] [--scale N] [--out FILE]

Prints a table and writes JSON (default bench/results/latest.json).  The
machine has 2 cores and the load generator (this process) competes with
the daemon and the children for them: every figure says so.

Scenarios (see docs/performance.md):
  1. sequential single client: new connection per request, and keep-alive
     (proxy only: tursodb closes every connection); SELECT 1, a 100-row
     INSERT batch, a pyturso push+pull cycle;
  2. throughput: 1, 8 and 32 concurrent clients over 1 and 8 namespaces,
     and the daemon's CPU time per request;
  3. cold paths: first request to a new namespace; wake from hibernation;
  4. scale: N auto namespaces touched in random order, 256 resident.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Any

from turso_twisted.tokens import generate_key_pair, mint
from turso_twisted.workers import worker_pids

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
TOKEN = "bench-token"
SELECT_1 = json.dumps({"requests": [{"type": "execute", "stmt": {"sql": "select 1"}}]}).encode()
CLK_TCK = os.sysconf("SC_CLK_TCK")


def insert_batch(rows: int = 100) -> bytes:
    steps = [{"stmt": {"sql": "insert into t (x) values (?)",
                       "args": [{"type": "text", "value": f"row-{i}"}]}} for i in range(rows)]
    return json.dumps({"requests": [{"type": "batch", "batch": {"steps": steps}}]}).encode()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def summary(values: list[float]) -> dict[str, float]:
    return {"p50_ms": round(statistics.median(values) * 1000, 3),
            "p99_ms": round(percentile(values, 0.99) * 1000, 3), "n": len(values)}


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def children_of(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    if int(handle.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    return found


# -- the systems under test ----------------------------------------------------------


class Direct:
    """
    Plain tursodb sync servers, one per database.
    """

    def __init__(self, tursodb: str, workdir: str) -> None:
        self.tursodb, self.workdir = tursodb, workdir
        self.processes: dict[str, tuple[subprocess.Popen[bytes], int]] = {}

    def start(self, name: str) -> int:
        port = free_port()
        process = subprocess.Popen([self.tursodb, os.path.join(self.workdir, f"{name}.db"),
                                    "--sync-server", f"127.0.0.1:{port}"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.processes[name] = (process, port)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.005)
        # The probe above left tursodb reading an empty connection: settle it.
        http_request(port, b"OPTIONS", b"*", b"")
        return port

    def url(self, name: str) -> tuple[int, bytes]:
        return self.processes[name][1], b""

    def stop(self) -> None:
        for process, _ in self.processes.values():
            process.kill()
            process.wait()


class Daemon:
    def __init__(self, tursodb: str, workdir: str, **env: str) -> None:
        self.data_port, self.admin_port = free_port(), free_port()
        os.makedirs(workdir, exist_ok=True)
        self.data_dir = os.path.join(workdir, "data")
        base = random.randrange(20000, 50000, 1000)
        environment = {"PATH": os.environ.get("PATH", ""), "TURSODB_BIN": tursodb,
                       "TURSO_DATA_DIR": self.data_dir, "TURSO_AUTH_TOKEN": TOKEN,
                       "TURSO_DATA_ADDR": f"127.0.0.1:{self.data_port}",
                       "TURSO_ADMIN_ADDR": f"127.0.0.1:{self.admin_port}",
                       "TURSO_BACKEND_PORT_START": str(base), "TURSO_BACKEND_PORT_END": str(base + 999),
                       # Children confined as shipped, where ./dev bench built the helper.
                       "TURSO_LANDLOCK_BIN": os.environ.get("TURSO_LANDLOCK_BIN", "turso-landlock"),
                       # Before/after figures: TURSO_BENCH_PYTHONPATH=<another checkout> runs
                       # that checkout's daemon under this bench.
                       **({"PYTHONPATH": os.environ["TURSO_BENCH_PYTHONPATH"]}
                          if os.environ.get("TURSO_BENCH_PYTHONPATH") else {}),
                       **env}
        self.log_path = os.path.join(workdir, "daemon.log")
        self.log = open(self.log_path, "wb")
        self.process = subprocess.Popen([TWISTD, "--nodaemon", "--pidfile=", "turso-server"],
                                        env=environment, cwd=workdir, stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/readyz", timeout=1):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("the daemon did not become ready")

    def url(self, name: str) -> tuple[int, bytes]:
        return self.data_port, b"/" + name.encode()

    def pids(self) -> list[int]:
        """The daemon and its data workers: every process of the data plane."""
        return [self.process.pid, *worker_pids(self.process.pid)]

    def admin(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}{path}", timeout=30) as response:
            return json.loads(response.read())

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


# -- clients ---------------------------------------------------------------------------


def http_request(port: int, method: bytes, target: bytes, body: bytes, sock: socket.socket | None = None,
                 token: str | None = None) -> tuple[int, bytes]:
    """
    One request; with C{sock}, on that kept-alive connection.
    """
    own = sock is None
    if own:
        sock = socket.create_connection(("127.0.0.1", port))
    auth = b"Authorization: Bearer %s\r\n" % token.encode() if token else b""
    sock.sendall(b"%s %s HTTP/1.1\r\nHost: bench\r\n%sContent-Length: %d\r\n%s\r\n%s" % (
        method, target, auth, len(body), b"Connection: close\r\n" if own else b"", body))
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed before the answer")
        data += chunk
    head, rest = data.split(b"\r\n\r\n", 1)
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    if own:
        sock.close()
    return int(head.split(b" ")[1]), rest


def sequential(port: int, prefix: bytes, body: bytes, count: int, keep_alive: bool, token: str | None,
               ) -> dict[str, float]:
    times = []
    sock = socket.create_connection(("127.0.0.1", port)) if keep_alive else None
    for _ in range(count):
        started = time.perf_counter()
        status, _ = http_request(port, b"POST", prefix + b"/v2/pipeline", body, sock, token)
        times.append(time.perf_counter() - started)
        if status != 200:
            raise RuntimeError(f"status {status}")
    if sock:
        sock.close()
    return summary(times)


def sync_cycles(url: str, token: str | None, path: str, count: int) -> dict[str, float]:
    import turso.sync

    replica = turso.sync.connect(path, remote_url=url, auth_token=token)
    replica.execute("create table if not exists s (x)")
    replica.commit()
    replica.push()
    times = []
    for i in range(count):
        started = time.perf_counter()
        replica.execute(f"insert into s values ({i})")
        replica.commit()
        replica.push()
        replica.pull()
        times.append(time.perf_counter() - started)
    replica.close()
    return summary(times)


async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> bool:
    """
    One request on an open connection; whether the answer was a 200.
    """
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    await reader.readexactly(length)
    return head.startswith(b"HTTP/1.1 200")


async def _client(port: int, target: bytes, keep_alive: bool, token: str | None, stop_at: float,
                  counts: list[int], errors: list[int]) -> None:
    auth = b"Authorization: Bearer %s\r\n" % token.encode() if token else b""
    request = b"POST %s HTTP/1.1\r\nHost: bench\r\n%sContent-Length: %d\r\n%s\r\n%s" % (
        target, auth, len(SELECT_1), b"" if keep_alive else b"Connection: close\r\n", SELECT_1)
    reader = writer = None
    while time.perf_counter() < stop_at:
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            if not await exchange(reader, writer, request):
                errors[0] += 1
            counts[0] += 1
            if not keep_alive:
                writer.close()
                writer = None
        except (OSError, asyncio.IncompleteReadError):
            errors[0] += 1
            writer = None
    if writer is not None:
        writer.close()


WRK = shutil.which("wrk")

_WRK_SCRIPT = """
local paths = {%(paths)s}
local headers = {["Content-Type"] = "application/json"%(auth)s}
local body = %(body)s
local n = 0
request = function()
  n = n + 1
  return wrk.format("POST", paths[(n %% #paths) + 1], headers, body)
end
"""


def lua_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def wrk_throughput(targets: list[tuple[int, bytes]], clients: int, seconds: float, token: str | None,
                   pids: list[int]) -> dict[str, float]:
    """
    Throughput measured by wrk (a native load generator: the Python one
    saturates before the daemon on two cores). Two wrk threads (one per
    core; with one, tursodb's accept loop sleeps 10 ms between most
    reconnections and direct figures drop twenty-fold); requests go round
    the targets' paths, which must share a port.
    """
    assert WRK is not None and len({port for port, _ in targets}) == 1
    port = targets[0][0]
    paths = ", ".join(lua_string(prefix.decode() + "/v2/pipeline") for _, prefix in targets)
    auth = f', ["Authorization"] = {lua_string("Bearer " + token)}' if token else ""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(_WRK_SCRIPT % {"paths": paths, "auth": auth, "body": lua_string(SELECT_1.decode())})
    cpu_before = sum(cpu_seconds(pid) for pid in pids)
    try:
        out = subprocess.run([WRK, "-t", str(min(2, clients)), "-c", str(clients), "-d", f"{seconds:g}s", "-s", script.name,
                              f"http://127.0.0.1:{port}/"], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(script.name)
    count = int(re.search(r"(\d+) requests in", out).group(1))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sockets = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    result = {"requests_per_s": round(float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))),
              "errors": (int(non_2xx.group(1)) if non_2xx else 0)
              + (int(sockets.group(1)) + int(sockets.group(4)) if sockets else 0)}
    if pids:
        result["cpu_us_per_request"] = round((sum(cpu_seconds(pid) for pid in pids) - cpu_before)
                                             / max(1, count) * 1e6, 1)
    return result


def throughput(targets: list[tuple[int, bytes]], clients: int, seconds: float, keep_alive: bool,
               token: str | None, pids: list[int]) -> dict[str, float]:
    counts, errors = [0], [0]
    cpu_before = sum(cpu_seconds(pid) for pid in pids)

    async def run() -> None:
        stop_at = time.perf_counter() + seconds
        await asyncio.gather(*[
            _client(targets[i % len(targets)][0], targets[i % len(targets)][1] + b"/v2/pipeline", keep_alive,
                    token, stop_at, counts, errors) for i in range(clients)])

    started = time.perf_counter()
    asyncio.run(run())
    elapsed = time.perf_counter() - started
    result = {"requests_per_s": round(counts[0] / elapsed), "errors": errors[0]}
    if pids:
        result["cpu_us_per_request"] = round((sum(cpu_seconds(pid) for pid in pids) - cpu_before)
                                             / max(1, counts[0]) * 1e6, 1)
    return result


def measure(targets: list[tuple[int, bytes]], clients: int, seconds: float, keep_alive: bool,
            token: str | None, pids: list[int]) -> dict[str, float]:
    """Throughput with wrk when the machine has it, else with the Python generator."""
    if WRK is not None:
        return wrk_throughput(targets, clients, seconds, token, pids)
    return throughput(targets, clients, seconds, keep_alive, token, pids)


_PINNED_SCRIPT = """
wrk.method = "POST"
wrk.body = %(body)s
wrk.headers["Content-Type"] = "application/json"%(auth)s
"""


def pinned_throughput(targets: list[tuple[int, bytes]], seconds: float, token: str | None,
                      pids: list[int]) -> dict[str, float]:
    """
    One keep-alive client per target, each on its own namespace (as a
    replica is): one single-connection wrk per target, run together.
    """
    assert WRK is not None
    auth = f'\nwrk.headers["Authorization"] = {lua_string("Bearer " + token)}' if token else ""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(_PINNED_SCRIPT % {"body": lua_string(SELECT_1.decode()), "auth": auth})
    cpu_before = sum(cpu_seconds(pid) for pid in pids)
    try:
        runs = [subprocess.Popen([WRK, "-t1", "-c1", "-d", f"{seconds:g}s", "-s", script.name,
                                  f"http://127.0.0.1:{port}{prefix.decode()}/v2/pipeline"],
                                 stdout=subprocess.PIPE, text=True) for port, prefix in targets]
        outputs = [run.communicate()[0] for run in runs]
    finally:
        os.unlink(script.name)
    count = sum(int(re.search(r"(\d+) requests in", out).group(1)) for out in outputs)
    errors = sum(int(m.group(1)) for out in outputs if (m := re.search(r"Non-2xx or 3xx responses: (\d+)", out)))
    return {"requests_per_s": round(count / seconds), "errors": errors,
            "cpu_us_per_request": round((sum(cpu_seconds(pid) for pid in pids) - cpu_before)
                                        / max(1, count) * 1e6, 1)}


# -- the scenarios --------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    tursodb = os.environ["TURSODB_BIN"]
    workdir = tempfile.mkdtemp(prefix="turso-bench-")
    quick = args.quick
    count = 100 if quick else 400
    seconds = 2.0 if quick else 5.0
    results: dict[str, Any] = {"machine": {"cores": os.cpu_count(), "python": sys.version.split()[0],
                                           "note": "load generator, daemon and children share these cores",
                                           "load_generator": "wrk (2 threads)" if WRK else "python asyncio"}}
    if WRK is None:
        print("bench: wrk not found: throughput uses the Python load generator, which saturates before "
              "the daemon on 2 cores (install wrk: apt-get install wrk)", file=sys.stderr)
    direct = Direct(tursodb, os.path.join(workdir, "direct"))
    os.makedirs(direct.workdir)
    # The daemon takes namespace tokens (JWTs) too, as a multi-tenant deployment would.
    private_key, public_key = generate_key_pair()
    daemon = Daemon(tursodb, os.path.join(workdir, "proxy"), TURSO_JWT_KEY=public_key.decode())
    try:
        names = [f"bench{i}" for i in range(8)]
        for name in names:
            direct.start(name)
            for system in (direct, daemon):
                port, prefix = system.url(name)
                token = TOKEN if system is daemon else None
                http_request(port, b"POST", prefix + b"/v2/pipeline", json.dumps({"requests": [
                    {"type": "execute", "stmt": {"sql": "create table if not exists t (x)"}}]}).encode(),
                    token=token)

        seq: dict[str, Any] = {}
        for label, body in (("select_1", SELECT_1), ("insert_100_rows", insert_batch())):
            d_port, d_prefix = direct.url("bench0")
            p_port, p_prefix = daemon.url("bench0")
            row = {"direct": sequential(d_port, d_prefix, body, count, False, None),
                   "proxy_new_connection": sequential(p_port, p_prefix, body, count, False, TOKEN),
                   "proxy_keep_alive": sequential(p_port, p_prefix, body, count, True, TOKEN)}
            row["ratio_new_connection"] = round(row["proxy_new_connection"]["p50_ms"] / row["direct"]["p50_ms"], 3)
            row["ratio_keep_alive"] = round(row["proxy_keep_alive"]["p50_ms"] / row["direct"]["p50_ms"], 3)
            seq[label] = row
        cycles = 20 if quick else 60
        row = {"direct": sync_cycles(f"http://127.0.0.1:{direct.url('bench1')[0]}", None,
                                     os.path.join(workdir, "r-direct.db"), cycles),
               "proxy_new_connection": sync_cycles(f"http://127.0.0.1:{daemon.data_port}/bench1", TOKEN,
                                                   os.path.join(workdir, "r-proxy.db"), cycles)}
        row["ratio_new_connection"] = round(row["proxy_new_connection"]["p50_ms"] / row["direct"]["p50_ms"], 3)
        seq["pyturso_push_pull"] = row
        results["sequential"] = seq

        tput = {}
        direct_pid = direct.processes["bench0"][0].pid
        for spread in (1, 8):
            for clients in (1, 8, 32):
                key = f"{clients}_clients_{spread}_namespaces"
                # Direct is one tursodb with one database (tursodb closes every connection).
                d = measure([direct.url("bench0")], clients, seconds, False, None, [direct_pid])
                p = measure([daemon.url(n) for n in names[:spread]], clients, seconds, True, TOKEN,
                            daemon.pids())
                tput[key] = {"direct": d, "proxy": p,
                             "ratio": round(p["requests_per_s"] / max(1, d["requests_per_s"]), 2)}
                if d.get("cpu_us_per_request") and p.get("cpu_us_per_request"):
                    tput[key]["cpu_ratio"] = round(p["cpu_us_per_request"] / d["cpu_us_per_request"], 2)
        results["throughput"] = tput

        # Namespace tokens against the static token: 8 keep-alive clients over 8
        # namespaces, alternated to even out the machine's drift.
        jwt_token = mint(private_key, {"p": {"rw": {"ns": names}}})
        port, prefix = daemon.url(names[0])
        status, _ = http_request(port, b"POST", prefix + b"/v2/pipeline", SELECT_1, token=jwt_token)
        runs: dict[str, list[dict[str, float]]] = {"static_token": [], "jwt": []}
        for _ in range(2 if status == 200 else 0):  # a daemon without namespace tokens: skipped
            for label, token in (("static_token", TOKEN), ("jwt", jwt_token)):
                runs[label].append(measure([daemon.url(n) for n in names], 8, seconds, True, token,
                                           daemon.pids()))
        auth: dict[str, Any] = {}
        for label, rows in runs.items():
            if not rows:
                continue
            assert all(row["errors"] == 0 for row in rows), rows
            auth[label] = {"requests_per_s": round(statistics.mean(r["requests_per_s"] for r in rows)),
                           "daemon_cpu_us_per_request": round(statistics.mean(
                               r["cpu_us_per_request"] for r in rows), 1)}
        if auth:
            auth["ratio_requests"] = round(auth["jwt"]["requests_per_s"] / auth["static_token"]["requests_per_s"], 3)
            auth["ratio_cpu"] = round(auth["jwt"]["daemon_cpu_us_per_request"]
                                      / auth["static_token"]["daemon_cpu_us_per_request"], 3)
            results["auth"] = auth
    finally:
        direct.stop()
        daemon.stop()

    if WRK is not None:
        results["workers"] = worker_scaling(tursodb, os.path.join(workdir, "workers"), seconds)

    bare = bare_starts(tursodb, os.path.join(workdir, "bare"), 30 if quick else 100)
    cold_dir = os.path.join(workdir, "cold")
    cold = Daemon(tursodb, cold_dir, TURSO_HIBERNATE_AFTER="1s")
    try:
        firsts = []
        for i in range(30 if quick else 100):
            started = time.perf_counter()
            status, _ = http_request(cold.data_port, b"POST", b"/cold%d/v2/pipeline" % i, SELECT_1, token=TOKEN)
            firsts.append(time.perf_counter() - started)
            assert status == 200, status
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and any(r["running"] for r in cold.admin("/v1/namespaces")["namespaces"]):
            time.sleep(0.2)
        wakes = []
        for i in range(len(firsts)):
            started = time.perf_counter()
            status, _ = http_request(cold.data_port, b"POST", b"/cold%d/v2/pipeline" % i, SELECT_1, token=TOKEN)
            wakes.append(time.perf_counter() - started)
            assert status == 200, status
        # tursodb's own start varies 5-40 ms with the children already running:
        # what the daemon adds is the first request less its child's start
        # (spawn to listening, from the daemon's "running" lines, in order).
        with open(cold.log_path, encoding="utf-8") as log:
            starts = [json.loads(line)["startup_ms"] / 1000 for line in log if '"startup_ms"' in line]
        results["cold"] = {"bare_tursodb_exec_to_first_answer": summary(bare),
                           "first_request_new_namespace": summary(firsts), "wake_from_hibernation": summary(wakes),
                           "first_request_less_child_start": summary(
                               [first - start for first, start in zip(firsts, starts[:len(firsts)], strict=True)]),
                           "wake_less_child_start": summary(
                               [wake - start for wake, start in zip(wakes, starts[len(firsts):], strict=True)])}
        base = results["cold"]["bare_tursodb_exec_to_first_answer"]["p50_ms"]
        for key in ("first_request_new_namespace", "wake_from_hibernation"):
            results["cold"][key]["ratio_to_bare"] = round(results["cold"][key]["p50_ms"] / base, 2)
    finally:
        cold.stop()

    results["scale"] = scale(tursodb, os.path.join(workdir, "scale"), args.scale)
    shutil.rmtree(workdir, ignore_errors=True)
    return results


def worker_scaling(tursodb: str, workdir: str, seconds: float) -> dict[str, Any]:
    """
    8 keep-alive clients over 8 namespaces with one data process and with
    two, alternated twice: clients that each keep to one namespace (as
    replicas do), and clients that go round all eight per request.
    """
    names = [f"w{i}" for i in range(8)]
    daemons = {count: Daemon(tursodb, os.path.join(workdir, str(count)), TURSO_DATA_WORKERS=str(count))
               for count in (1, 2)}
    runs: dict[str, list[dict[str, float]]] = {}
    try:
        for _ in range(2):
            for count, daemon in daemons.items():
                targets = [daemon.url(name) for name in names]
                runs.setdefault(f"pinned_{count}", []).append(
                    pinned_throughput(targets, seconds, TOKEN, daemon.pids()))
                runs.setdefault(f"round_robin_{count}", []).append(
                    wrk_throughput(targets, 8, seconds, TOKEN, daemon.pids()))
    finally:
        for daemon in daemons.values():
            daemon.stop()
    out: dict[str, Any] = {}
    for label, rows in runs.items():
        out[label] = {"requests_per_s": round(statistics.mean(r["requests_per_s"] for r in rows)),
                      "cpu_us_per_request": round(statistics.mean(r["cpu_us_per_request"] for r in rows), 1),
                      "errors": sum(r["errors"] for r in rows)}
    for pattern in ("pinned", "round_robin"):
        out[f"{pattern}_ratio_2_to_1"] = round(out[f"{pattern}_2"]["requests_per_s"]
                                               / max(1, out[f"{pattern}_1"]["requests_per_s"]), 2)
    return out


def bare_starts(tursodb: str, workdir: str, count: int) -> list[float]:
    """
    What a cold path costs without us: exec a bare tursodb sync server on a
    new file and send it SELECT 1 until it answers.
    """
    os.makedirs(workdir)
    times = []
    for i in range(count):
        port = free_port()
        started = time.perf_counter()
        process = subprocess.Popen([tursodb, os.path.join(workdir, f"b{i}.db"), "--sync-server",
                                    f"127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            while True:
                try:
                    status, _ = http_request(port, b"POST", b"/v2/pipeline", SELECT_1)
                except OSError:
                    time.sleep(0.0005)
                    continue
                if status == 200:
                    break
            times.append(time.perf_counter() - started)
        finally:
            process.kill()
            process.wait()
    return times


def scale(tursodb: str, workdir: str, total: int) -> dict[str, Any]:
    daemon = Daemon(tursodb, workdir, TURSO_MAX_RUNNING="256", TURSO_MAX_NAMESPACES="0")
    names = [f"s{i}" for i in range(total)]
    first = names[:]
    random.shuffle(first)
    order = first + random.sample(names, min(len(names), total // 5))
    times: list[float] = []
    errors = [0]
    peak = {"daemon_rss_kib": 0, "total_rss_kib": 0, "children": 0}

    async def worker(queue: asyncio.Queue[str]) -> None:
        reader = writer = None
        while not queue.empty():
            name = queue.get_nowait()
            request = (b"POST /%s/v2/pipeline HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer %s\r\n"
                       b"Content-Length: %d\r\n\r\n%s" % (name.encode(), TOKEN.encode(), len(SELECT_1), SELECT_1))
            started = time.perf_counter()
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection("127.0.0.1", daemon.data_port)
                if not await exchange(reader, writer, request):
                    errors[0] += 1
            except (OSError, asyncio.IncompleteReadError):
                errors[0] += 1
                writer = None
            times.append(time.perf_counter() - started)

    async def sample() -> None:
        while True:
            await asyncio.sleep(1)
            kids = children_of(daemon.process.pid)
            own = sum(rss_kib(pid) for pid in daemon.pids())
            peak["daemon_rss_kib"] = max(peak["daemon_rss_kib"], own)
            peak["total_rss_kib"] = max(peak["total_rss_kib"], own + sum(rss_kib(k) for k in kids))
            peak["children"] = max(peak["children"], len(kids))

    async def main() -> None:
        queue: asyncio.Queue[str] = asyncio.Queue()
        for name in order:
            queue.put_nowait(name)
        sampler = asyncio.ensure_future(sample())
        await asyncio.gather(*[worker(queue) for _ in range(4)])
        sampler.cancel()

    started = time.perf_counter()
    try:
        asyncio.run(main())
        elapsed = time.perf_counter() - started
        listed = daemon.admin("/v1/namespaces")["namespaces"]
        state_path = os.path.join(daemon.data_dir, "_state", "namespaces.json")
        sys.path.insert(0, ROOT)
        from twisted.internet.task import Clock

        from turso_twisted.state import StateStore

        store = StateStore(state_path + ".bench-copy", Clock())
        shutil.copy(state_path, store.path)
        store.load()
        store.save()  # the first write encodes every record
        store.records[next(iter(store.records))].last_access_at += 1
        began = time.perf_counter()
        store.save()
        write_ms = (time.perf_counter() - began) * 1000
        return {"namespaces": total, "requests": len(order), "errors": errors[0],
                "latency": summary(times), "seconds": round(elapsed, 1),
                "live": len(listed), "resident_at_end": sum(r["running"] for r in listed),
                "peak_daemon_rss_mib": round(peak["daemon_rss_kib"] / 1024, 1),
                "peak_total_rss_mib": round(peak["total_rss_kib"] / 1024, 1),
                "peak_children": peak["children"],
                "state_file_bytes": os.path.getsize(state_path),
                "state_file_write_ms": round(write_ms, 1)}
    finally:
        daemon.stop()


def table(results: dict[str, Any]) -> str:
    lines = ["turso-server benchmark (2 cores shared by load generator, daemon and children)", ""]
    lines.append("sequential, one client            direct p50/p99 ms   proxy new-conn p50/p99   "
                 "proxy keep-alive p50/p99   ratio (new-conn, keep-alive)")
    for label, row in results["sequential"].items():
        d, n = row["direct"], row["proxy_new_connection"]
        k = row.get("proxy_keep_alive")
        lines.append(f"  {label:<32} {d['p50_ms']:>7} / {d['p99_ms']:<8} {n['p50_ms']:>7} / {n['p99_ms']:<12} "
                     + (f"{k['p50_ms']:>7} / {k['p99_ms']:<14}" if k else f"{'-':>25}  ")
                     + f"{row['ratio_new_connection']}" + (f", {row['ratio_keep_alive']}" if k else ""))
    lines += ["", f"throughput, SELECT 1 ({results['machine']['load_generator']}; direct: one tursodb, one database)",
              "                                    direct req/s   proxy req/s   ratio   CPU us/req direct, proxy, ratio"]
    for label, row in results["throughput"].items():
        lines.append(f"  {label:<34} {row['direct']['requests_per_s']:>9}   {row['proxy']['requests_per_s']:>11}"
                     f"   {row['ratio']:>5}   {row['direct'].get('cpu_us_per_request', '-'):>8}, "
                     f"{row['proxy'].get('cpu_us_per_request', '-')}, {row.get('cpu_ratio', '-')}")
    auth = results.get("auth")
    lines += [] if auth is None else ["", "tokens, 8 keep-alive clients x 8 ns   req/s   daemon CPU us/req",
              f"  static token                      {auth['static_token']['requests_per_s']:>7}   "
              f"{auth['static_token']['daemon_cpu_us_per_request']:>8}",
              f"  namespace JWT                     {auth['jwt']['requests_per_s']:>7}   "
              f"{auth['jwt']['daemon_cpu_us_per_request']:>8}",
              f"  ratio JWT / static                {auth['ratio_requests']:>7}   {auth['ratio_cpu']:>8}"]
    workers = results.get("workers")
    if workers is not None:
        lines += ["", "data processes, 8 keep-alive clients x 8 ns   req/s 1 -> 2   CPU us/req 1 -> 2   ratio 2/1"]
        for pattern, label in (("pinned", "one namespace per client"), ("round_robin", "all namespaces per client")):
            one, two = workers[f"{pattern}_1"], workers[f"{pattern}_2"]
            lines.append(f"  {label:<43} {one['requests_per_s']:>5} -> {two['requests_per_s']:<6} "
                         f"{one['cpu_us_per_request']:>6} -> {two['cpu_us_per_request']:<8} "
                         f"{workers[f'{pattern}_ratio_2_to_1']}")
    cold = results["cold"]
    bare = cold["bare_tursodb_exec_to_first_answer"]
    lines += ["", "cold paths                          p50 ms   p99 ms   p50 / bare tursodb",
              f"  bare tursodb, exec to answer      {bare['p50_ms']:>7}  {bare['p99_ms']:>7}",
              f"  first request, new namespace      {cold['first_request_new_namespace']['p50_ms']:>7}  "
              f"{cold['first_request_new_namespace']['p99_ms']:>7}   {cold['first_request_new_namespace']['ratio_to_bare']}",
              f"  wake from hibernation             {cold['wake_from_hibernation']['p50_ms']:>7}  "
              f"{cold['wake_from_hibernation']['p99_ms']:>7}   {cold['wake_from_hibernation']['ratio_to_bare']}",
              "  less the child's own start (spawn to listening), what the daemon and the child's first",
              "  answer add:",
              f"    first request                   {cold['first_request_less_child_start']['p50_ms']:>7}  "
              f"{cold['first_request_less_child_start']['p99_ms']:>7}",
              f"    wake                            {cold['wake_less_child_start']['p50_ms']:>7}  "
              f"{cold['wake_less_child_start']['p99_ms']:>7}"]
    s = results["scale"]
    lines += ["", f"scale: {s['namespaces']} namespaces, {s['requests']} requests, TURSO_MAX_RUNNING=256",
              f"  errors {s['errors']}, p50 {s['latency']['p50_ms']} ms, p99 {s['latency']['p99_ms']} ms, "
              f"{s['seconds']} s",
              f"  peak daemon RSS (main + data workers) {s['peak_daemon_rss_mib']} MiB, "
              f"peak total RSS {s['peak_total_rss_mib']} MiB, "
              f"peak children {s['peak_children']}",
              f"  state file {s['state_file_bytes']} bytes, one write {s['state_file_write_ms']} ms"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer samples (a smoke run)")
    parser.add_argument("--scale", type=int, default=10000, help="namespaces in the scale scenario")
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "latest.json"))
    args = parser.parse_args()
    results = run(args)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump(results, handle, indent=1)
    print(table(results))
    print(f"\nJSON: {args.out}")


if __name__ == "__main__":
    main()
