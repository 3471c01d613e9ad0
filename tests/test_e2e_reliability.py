"""
Faults end to end, with the real daemon and tursodb: a wedged child does
not wedge its namespace.
"""

from __future__ import annotations

import json
import os
import signal
import socket
from typing import Any

from twisted.internet.defer import DeferredList, inlineCallbacks

from .daemon import Daemon, wait_for, with_data_workers
from .test_e2e import SELECT_1, E2ETestCase, get_json, treq


def is_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


class WedgedChildTests(E2ETestCase):
    @inlineCallbacks
    def test_a_stopped_child_is_killed_and_replaced(self) -> Any:
        """
        SIGSTOP a child: the request it holds gets 504 after
        TURSO_BACKEND_TIMEOUT, the child is killed, and the request that
        waited behind it is served by a new child.
        """
        daemon = yield Daemon(self, TURSO_BACKEND_TIMEOUT="2s").start()
        url = daemon.data_url("/alpha/v2/pipeline")
        response = yield treq.post(url, SELECT_1)
        self.assertEqual(response.code, 200)
        yield response.content()
        status, record = yield get_json(daemon.admin_url("/v1/namespaces/alpha"))
        wedged = record["pid"]
        os.kill(wedged, signal.SIGSTOP)
        self.addCleanup(lambda: is_gone(wedged) or os.kill(wedged, signal.SIGKILL))

        @inlineCallbacks
        def ask() -> Any:
            answer = yield treq.post(url, SELECT_1)
            return answer.code, (yield answer.content())

        results = yield DeferredList([ask(), ask()], consumeErrors=True)
        codes = sorted(result[1][0] for result in results)
        self.assertEqual(codes, [200, 504], results)
        yield wait_for(lambda: is_gone(wedged), "the wedged child to be killed")
        status, record = yield get_json(daemon.admin_url("/v1/namespaces/alpha"))
        self.assertNotEqual(record["pid"], wedged)
        response = yield treq.post(url, SELECT_1)
        self.assertEqual(response.code, 200)
        yield response.content()
        [killed] = [e for e in daemon.logs()
                    if "did not answer within the backend timeout" in e.get("msg", "")]
        self.assertEqual(killed["pid"], wedged)


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class SlowReaderTests(E2ETestCase):
    @inlineCallbacks
    def test_clients_that_do_not_read_hold_files_not_memory_and_a_bounded_amount(self) -> Any:
        """
        Large answers wait for slow clients in spooled files, counted
        against TURSO_MAX_HELD_BYTES; past it new requests get 503 with
        Retry-After; when the clients go, the budget is free again.
        """
        daemon = yield Daemon(self, TURSO_MAX_HELD_BYTES="40MiB").start()
        url = daemon.data_url("/big/v2/pipeline")
        setup = {"requests": [
            {"type": "execute", "stmt": {"sql": "create table t (b blob)"}},
            {"type": "execute", "stmt": {"sql": "insert into t values (randomblob(3000000))"}}]}
        response = yield treq.post(url, json.dumps(setup).encode())
        self.assertEqual(response.code, 200)
        yield response.content()
        query = json.dumps({"requests": [{"type": "execute", "stmt": {"sql": "select b from t"}}]}).encode()
        head = b"POST /big/v2/pipeline HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(query)
        raw = head + query
        before = rss_bytes(daemon.pid)
        readers = []
        for _ in range(12):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", daemon.data_port))
            sock.sendall(raw)
            readers.append(sock)
            self.addCleanup(sock.close)

        def held() -> float:
            return metric_value(daemon, "turso_answers_held_bytes")

        # Each answer is ~4 MB of JSON: twelve of them pass the 40 MiB budget.
        yield wait_for(lambda: held() > 40 * 2**20, "answers to wait for the slow clients")
        response = yield treq.post(url, query)
        body = json.loads((yield response.content()))
        self.assertEqual((response.code, body["error"]), (503, "answers_held"))
        self.assertEqual(response.headers.getRawHeaders(b"retry-after"), [b"5"])
        # The daemon reads one answer at a time per namespace: its memory
        # grows by about one answer's worth, not by what waits.
        grown = rss_bytes(daemon.pid) - before
        self.assertLess(grown, held() / 2, "the answers wait in files, not in the daemon's memory")
        for sock in readers:
            sock.close()
        yield wait_for(lambda: held() == 0, "the budget to be free once the clients went away")
        response = yield treq.post(url, query)
        answer = json.loads((yield response.content()))
        self.assertEqual(response.code, 200)
        self.assertEqual(len(answer["results"][0]["response"]["result"]["rows"]), 1)


def metric_value(daemon: Daemon, name: str) -> float:
    import urllib.request

    with urllib.request.urlopen(daemon.admin_url("/metrics"), timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return 0.0


# The same cases with the data port served by two data workers.
globals().update(with_data_workers(WedgedChildTests, SlowReaderTests))
