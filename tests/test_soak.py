"""
A short run of the fault-injection soak (soak/run.py; ``./dev soak`` runs a
longer one): one full round of every fault against the real daemon, real
children and real pyturso replicas, and the ledger must balance.
"""

from __future__ import annotations

import os
import re
import signal
import sys
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from .daemon import tursodb_bin

SOAK = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "soak", "run.py")
SUMMARY = re.compile(r"^soak: faults (\d+), acknowledged (\d+), lost (\d+), duplicated (\d+), "
                     r"leaked (\d+), orphans (\d+), anomalies (\d+)$", re.MULTILINE)


class _Output(ProcessProtocol):
    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.ended: Deferred[int] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.chunks.append(data)

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(getattr(reason.value, "exitCode", None) or 0)


class SoakTests(TestCase):
    timeout = 600

    @inlineCallbacks
    def test_one_round_of_every_fault_loses_nothing(self) -> Any:
        tursodb_bin()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        # Seconds of faults: the soak always runs one full round whatever this is.
        output = _Output()
        process = reactor.spawnProcess(output, sys.executable,
                                       [sys.executable, SOAK, "1", "--seed", "20261123"], env=env)

        def stop() -> None:
            # Trial's timeout: SIGTERM lets the soak unmount and kill what it started.
            if not output.ended.called:
                process.signalProcess(signal.SIGTERM)

        self.addCleanup(stop)
        status = yield output.ended
        text = b"".join(output.chunks).decode("utf-8", "replace")
        found = SUMMARY.search(text)
        self.assertIsNotNone(found, text[-4000:])
        assert found is not None
        faults, acknowledged, lost, duplicated, leaked, orphans, anomalies = map(int, found.groups())
        self.assertEqual((lost, duplicated, leaked, orphans, anomalies), (0, 0, 0, 0, 0), text[-4000:])
        self.assertEqual(status, 0, text[-4000:])
        # Every kind of fault ran (the disk one only where a tmpfs can be mounted).
        kinds = 11 if "disk_full skipped" not in text else 10
        self.assertGreaterEqual(faults, kinds, text[-4000:])
        self.assertGreater(acknowledged, 0)
