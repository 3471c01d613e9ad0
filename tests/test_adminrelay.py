"""The admin relay's pieces: which calls may take long, and bodies piped under flow control."""

from __future__ import annotations

from typing import Any

from twisted.internet.error import ConnectionLost
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseDone

from turso_twisted.adminrelay import ADMIN_TIMEOUT, TRANSFER_TIMEOUT, pipe, timeout_for


class Producer:
    def __init__(self) -> None:
        self.stopped = False

    def pauseProducing(self) -> None: ...

    def resumeProducing(self) -> None: ...

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
        protocol.makeConnection(Producer())


class AdminRelayTests(SynchronousTestCase):
    def test_backups_and_restores_may_take_as_long_as_a_transfer(self) -> None:
        self.assertEqual(timeout_for(b"/v1/namespaces/a/backup"), TRANSFER_TIMEOUT)
        self.assertEqual(timeout_for(b"/v1/namespaces/a/restore?source=b"), TRANSFER_TIMEOUT)
        self.assertEqual(timeout_for(b"/v1/namespaces/a/ttl"), ADMIN_TIMEOUT)
        self.assertEqual(timeout_for(b"/v1/namespaces?name=backup"), ADMIN_TIMEOUT)

    def test_a_body_is_written_on_with_the_consumer_pausing_its_source(self) -> None:
        response, consumer = Response(), Consumer()
        done = pipe(response, consumer)  # type: ignore[arg-type]
        self.assertIsInstance(consumer.producer, Producer)
        response.protocol.dataReceived(b"one")
        response.protocol.dataReceived(b"two")
        self.assertNoResult(done)
        response.protocol.connectionLost(Failure(ResponseDone()))
        self.assertIsNone(self.successResultOf(done))
        self.assertEqual((consumer.written, consumer.producer), ([b"one", b"two"], None))

    def test_a_body_broken_off_fails(self) -> None:
        response, consumer = Response(), Consumer()
        done = pipe(response, consumer)  # type: ignore[arg-type]
        response.protocol.connectionLost(Failure(ConnectionLost()))
        self.failureResultOf(done, ConnectionLost)
        self.assertIsNone(consumer.producer)
