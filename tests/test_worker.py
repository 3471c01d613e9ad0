"""
Unit tests for a data worker's view of the namespaces (no other process).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from turso_twisted import control
from turso_twisted.channel import BackendChannel
from turso_twisted.proxy import CreationProbe
from turso_twisted.state import NamespaceRecord
from turso_twisted.tokens import OPEN
from turso_twisted.worker import WorkerNamespaces

PROBE = CreationProbe(b"POST", b"/v2/pipeline", b"", None)


class FakeControl:
    """The main process's end of the control channel: answers when the test says."""

    def __init__(self) -> None:
        self.calls: list[tuple[type, dict[str, Any], Deferred[dict[str, Any]]]] = []

    def callRemote(self, command: type, **arguments: Any) -> Deferred[dict[str, Any]]:
        answer: Deferred[dict[str, Any]] = Deferred()
        self.calls.append((command, arguments, answer))
        return answer


class TakingTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.control = FakeControl()
        self.namespaces = WorkerNamespaces(Clock(), self.mktemp(), lambda port: BackendChannel(Clock(), port),
                                           control=self.control)  # type: ignore[arg-type]

    def test_requests_waiting_for_a_lease_take_it_once_it_is_held(self) -> None:
        """
        Requests that wait for another's lease call are woken only once the
        namespace is noted as held: one woken earlier would ask again, and
        the main process would take that for a give-back and free the lease
        the first request is using (a child stopped under it: a 502).
        """
        first = self.namespaces.admit("alpha", OPEN, True, PROBE)
        second = self.namespaces.admit("alpha", OPEN, True, PROBE)
        third = self.namespaces.admit("alpha", OPEN, True, PROBE, here=True)
        [(command, arguments, answer)] = self.control.calls
        self.assertEqual((command, arguments["name"]), (control.Lease, "alpha"))
        record = NamespaceRecord.new("alpha", "auto", 0).to_json()
        answer.callback({"outcome": {"port": 9000, "record": record, "grant": 7}})
        leases = [self.successResultOf(d) for d in (first, second, third)]
        self.assertEqual(len(self.control.calls), 1)
        self.assertEqual({id(lease.held) for lease in leases}, {id(self.namespaces.held["alpha"])})
        self.assertEqual(self.namespaces.held["alpha"].in_flight, 3)

    def test_a_refusal_wakes_the_waiting_requests(self) -> None:
        first = self.namespaces.admit("alpha", OPEN, True, PROBE)
        second = self.namespaces.admit("alpha", OPEN, True, PROBE)
        [(_, _, answer)] = self.control.calls
        answer.callback({"outcome": {"refusal": {"kind": "Unavailable", "code": "too_many_running",
                                                 "message": "busy", "retry_after": 1}}})
        self.failureResultOf(first)
        self.assertEqual(len(self.control.calls), 2)  # the second asks for itself
        self.assertNoResult(second)
