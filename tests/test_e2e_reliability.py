"""
Faults end to end, with the real daemon and tursodb: a wedged child does
not wedge its namespace.
"""

from __future__ import annotations

import os
import signal
from typing import Any

from twisted.internet.defer import DeferredList, inlineCallbacks

from .daemon import Daemon, wait_for
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
