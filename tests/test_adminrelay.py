"""The admin relay's pieces: which calls may take long, and bodies piped under flow control."""

from __future__ import annotations

from typing import Any

from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseDone

from turso_twisted.adminrelay import ADMIN_TIMEOUT, TRANSFER_TIMEOUT, BodyStalled, drop, pipe, timeout_for


class Producer:
    def __init__(self) -> None:
        self.stopped = self.paused = False

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        self.stopped = True


class Consumer:
    def __init__(self) -> None:
        self.producer: Any = None
        self.written: list[bytes] = []

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        assert streaming
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def write(self, data: bytes) -> None:
        self.written.append(data)


class Response:
    """An answer whose body is fed by hand."""

    def deliverBody(self, protocol: Any) -> None:
        self.protocol = protocol
        self.producer = Producer()
        protocol.makeConnection(self.producer)


class AdminRelayTests(SynchronousTestCase):
    def test_backups_and_restores_may_take_as_long_as_a_transfer(self) -> None:
        self.assertEqual(timeout_for(b"/v1/namespaces/a/backup"), TRANSFER_TIMEOUT)
        self.assertEqual(timeout_for(b"/v1/namespaces/a/restore?source=b"), TRANSFER_TIMEOUT)
        self.assertEqual(timeout_for(b"/v1/namespaces/a/fork/b"), TRANSFER_TIMEOUT)
        self.assertEqual(timeout_for(b"/v1/namespaces/a/ttl"), ADMIN_TIMEOUT)
        self.assertEqual(timeout_for(b"/v1/namespaces?name=backup"), ADMIN_TIMEOUT)

    def test_a_body_is_written_on_with_the_consumer_pausing_its_source(self) -> None:
        response, consumer = Response(), Consumer()
        done = pipe(response, consumer, Clock())  # type: ignore[arg-type]
        consumer.producer.pauseProducing()
        self.assertTrue(response.producer.paused)
        consumer.producer.resumeProducing()
        response.protocol.dataReceived(b"one")
        response.protocol.dataReceived(b"two")
        self.assertNoResult(done)
        response.protocol.connectionLost(Failure(ResponseDone()))
        self.assertIsNone(self.successResultOf(done))
        self.assertEqual((consumer.written, consumer.producer), ([b"one", b"two"], None))

    def test_a_body_that_stops_coming_is_given_up_but_not_while_paused(self) -> None:
        response, consumer, clock = Response(), Consumer(), Clock()
        done = pipe(response, consumer, clock, idle=10)  # type: ignore[arg-type]
        clock.advance(9)
        response.protocol.dataReceived(b"some")
        clock.advance(9)
        consumer.producer.pauseProducing()  # the reader is slow: no limit
        clock.advance(100)
        self.assertFalse(response.producer.stopped)
        consumer.producer.resumeProducing()
        clock.advance(10)
        self.assertTrue(response.producer.stopped)
        response.protocol.connectionLost(Failure(ConnectionLost()))
        self.failureResultOf(done, BodyStalled)

    def test_a_dropped_answer_is_closed_unread(self) -> None:
        response = Response()
        drop(response)  # type: ignore[arg-type]
        self.assertTrue(response.producer.stopped)

    def test_a_body_broken_off_fails(self) -> None:
        response, consumer = Response(), Consumer()
        done = pipe(response, consumer, Clock())  # type: ignore[arg-type]
        response.protocol.connectionLost(Failure(ConnectionLost()))
        self.failureResultOf(done, ConnectionLost)
        self.assertIsNone(consumer.producer)
