"""
Data workers end to end: a client's connection is served by the worker
holding its namespace, and a worker that dies loses no acknowledged push.
"""

from __future__ import annotations

import json
import os
import signal
import socket
from typing import Any
from urllib.request import urlopen

from twisted.internet.defer import DeferredList, inlineCallbacks
from twisted.internet.threads import deferToThread

from .daemon import Daemon, data_workers, run_replica, wait_for
from .test_e2e import SELECT_1, E2ETestCase, PushLedger


class DataWorkerTests(E2ETestCase):
    """With data workers, one that dies is started again and loses no acknowledged push."""

    data_workers = 2

    @inlineCallbacks
    def test_a_killed_worker_loses_no_acknowledged_push(self) -> Any:
        daemon = yield Daemon(self).start()
        workers = yield wait_for(lambda: len(data_workers(daemon)) == 2 and data_workers(daemon),
                                 "two data workers")
        writer = yield self.replica(daemon, "alpha")
        yield run_replica(writer.run, "create table t (k integer primary key)")
        yield run_replica(writer.push)
        ledger = PushLedger(writer)
        acknowledged = ledger.acknowledged
        pushing = run_replica(ledger.run, 200, 50)
        yield wait_for(lambda: len(acknowledged) >= 20, "pushes under way")
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        yield wait_for(lambda: len(acknowledged) >= 60, "pushes after the workers died", timeout=60)
        ledger.stop.set()
        yield pushing
        restarted = yield wait_for(lambda: len(data_workers(daemon)) == 2 and data_workers(daemon),
                                   "the workers to be started again")
        self.assertFalse(set(restarted) & set(workers))
        reader = yield self.replica(daemon, "alpha")
        yield run_replica(reader.pull)
        rows = yield run_replica(reader.rows, "select k from t order by k")
        self.assertEqual({row[0] for row in rows} & set(acknowledged), set(acknowledged))
        self.assertEqual([e for e in daemon.logs() if e.get("level") == "CRITICAL"], [])

    @inlineCallbacks
    def test_a_namespace_is_served_by_one_worker(self) -> Any:
        """
        Keep-alive clients of one namespace, whichever worker accepted them,
        are served by the worker that holds it: every access-log line of
        the namespace names that worker.
        """
        daemon = yield Daemon(self).start()
        yield wait_for(lambda: len(data_workers(daemon)) == 2, "two data workers")
        request = (b"POST /alpha/v2/pipeline HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                   % (len(SELECT_1), SELECT_1))

        def client() -> list[int]:
            codes = []
            with socket.create_connection(("127.0.0.1", daemon.data_port), timeout=30) as sock:
                reader = sock.makefile("rb")
                for _ in range(3):
                    sock.sendall(request)
                    status = reader.readline()
                    length = 0
                    while (line := reader.readline()) not in (b"\r\n", b""):
                        if line.lower().startswith(b"content-length:"):
                            length = int(line.split(b":")[1])
                    reader.read(length)
                    codes.append(int(status.split()[1]))
            return codes

        results = yield DeferredList([deferToThread(client) for _ in range(8)], consumeErrors=True)
        self.assertEqual([result for ok, result in results], [[200, 200, 200]] * 8)
        lines = yield wait_for(lambda: len(served := [e for e in daemon.logs()
                                                      if e.get("logger") == "turso_twisted.access"
                                                      and e.get("namespace") == "alpha"]) == 24 and served,
                               "24 access-log lines")
        self.assertEqual(len({line["worker"] for line in lines}), 1, lines)

    @inlineCallbacks
    def test_namespaces_given_back_and_hibernated_wake_on_any_worker(self) -> Any:
        """
        Namespaces served by either worker, given back when idle and
        hibernated, wake on whichever worker the next connection reaches
        (a worker's note of who held a namespace is stale by then).
        """
        daemon = yield Daemon(self, TURSO_HIBERNATE_AFTER="1s").start()
        names = [f"n{i}" for i in range(6)]

        def one(name: str) -> int:
            with socket.create_connection(("127.0.0.1", daemon.data_port), timeout=30) as sock:
                sock.sendall(b"POST /%s/v2/pipeline HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (name.encode(), len(SELECT_1), SELECT_1))
                return int(sock.makefile("rb").readline().split()[1])

        for _ in range(3):
            codes = []
            for name in names:
                codes.append((yield deferToThread(one, name)))
            self.assertEqual(codes, [200] * len(names))
            yield wait_for(lambda: not any(record["running"] for record in
                                           json.loads(urlopen(daemon.admin_url("/v1/namespaces")).read())
                                           ["namespaces"]), "every namespace to hibernate", timeout=60)
