"""A moved file's bytes are hashed and written off the reactor, the sender paused while the disk is behind."""

from __future__ import annotations

import hashlib
import io
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionLost
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseDone

from turso_twisted.moves import _IntoFile

from .test_adminrelay import Producer


class Threads:
    """Calls run when the test says, as a thread pool would later."""

    def __init__(self) -> None:
        self.calls: list[tuple[Deferred[Any], Any, tuple[Any, ...]]] = []

    def __call__(self, function: Any, *args: Any) -> Deferred[Any]:
        done: Deferred[Any] = Deferred()
        self.calls.append((done, function, args))
        return done

    def run_one(self) -> None:
        done, function, args = self.calls.pop(0)
        try:
            done.callback(function(*args))
        except Exception:
            done.errback(Failure())


class IntoFileTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.file, self.threads, self.sender = io.BytesIO(), Threads(), Producer()
        self.into = _IntoFile(self.file, self.threads)
        self.into.makeConnection(self.sender)  # type: ignore[arg-type]

    def test_batches_written_in_order_with_the_sender_paused_while_behind(self) -> None:
        big = b"x" * (_IntoFile.BEHIND + 1)
        self.into.dataReceived(b"first")
        self.assertEqual(len(self.threads.calls), 1)  # one write at a time
        self.into.dataReceived(big)
        self.assertTrue(self.sender.paused)
        self.into.dataReceived(b"last")
        self.threads.run_one()
        self.assertFalse(self.sender.paused)  # the waiting batch went to the thread
        self.into.connectionLost(Failure(ResponseDone()))
        self.assertNoResult(self.into.done)
        self.threads.run_one()
        self.successResultOf(self.into.done)
        body = b"first" + big + b"last"
        self.assertEqual((self.file.getvalue(), self.into.size), (body, len(body)))
        self.assertEqual(self.into.digest.hexdigest(), hashlib.sha256(body).hexdigest())

    def test_a_body_cut_off_fails_after_what_came_is_written(self) -> None:
        self.into.dataReceived(b"part")
        self.into.connectionLost(Failure(ConnectionLost()))
        self.assertNoResult(self.into.done)
        self.threads.run_one()
        self.failureResultOf(self.into.done, ConnectionLost)

    def test_a_failed_write_stops_the_sender(self) -> None:
        self.file.close()
        self.into.dataReceived(b"data")
        self.threads.run_one()
        self.failureResultOf(self.into.done, ValueError)
        self.assertTrue(self.sender.stopped)
        self.into.connectionLost(Failure(ConnectionLost()))  # nothing more happens
