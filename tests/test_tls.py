"""The TLS certificate: loaded with a clear error, read again when its files change."""

from __future__ import annotations

import os

from OpenSSL import SSL
from twisted.internet.task import Clock
from twisted.logger import LogLevel, globalLogPublisher
from twisted.test.proto_helpers import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from turso_twisted.dataport import DataPort
from turso_twisted.tls import Certificate, CertificateError, load, serving_plain, serving_tls

from .certs import TestCA


class CertificateTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.ca = TestCA(os.path.abspath(self.mktemp()))
        self.cert_file, self.key_file = self.ca.issue("first")
        self.events: list[dict[str, object]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def subject(self, certificate: Certificate) -> str:
        served = SSL.Connection(certificate.getContext(), None).get_certificate()
        assert served is not None
        return str(served.get_subject().CN)

    def test_errors_say_what_is_wrong(self) -> None:
        _, other_key = self.ca.issue("other", prefix="other")
        for cert_file, key_file, fragment in (
                ("/nonexistent.pem", self.key_file, "cannot read /nonexistent.pem"),
                (self.key_file, self.key_file, "holds no PEM certificate"),
                (self.cert_file, self.cert_file, "holds no unencrypted PEM private key"),
                (self.cert_file, other_key, "is not the key of the certificate")):
            with self.assertRaises(CertificateError) as raised:
                load(cert_file, key_file)
            self.assertIn(fragment, str(raised.exception))

    def test_read_again_when_the_files_change(self) -> None:
        clock = Clock()
        certificate = Certificate(self.cert_file, self.key_file, clock)
        certificate.start()
        self.addCleanup(certificate.stop)
        self.assertEqual(self.subject(certificate), "first")
        clock.advance(10)
        self.assertFalse([e for e in self.events if "reloaded" in str(e.get("log_format"))])
        self.ca.issue("renewed")
        clock.advance(10)
        self.assertEqual(self.subject(certificate), "renewed")
        # A renewal that does not load: the certificate in use stays, and the error says why.
        with open(self.key_file, "w") as handle:
            handle.write("garbage")
        clock.advance(10)
        self.assertEqual(self.subject(certificate), "renewed")
        refused = [e for e in self.events if e.get("log_level") == LogLevel.error]
        self.assertEqual(len(refused), 1)
        self.assertIn("holds no unencrypted PEM private key", str(refused[0]["error"]))

    def test_a_plain_request_to_a_tls_port_is_answered_in_plain_text(self) -> None:
        certificate = Certificate(self.cert_file, self.key_file, Clock())
        port = DataPort(Clock(), lambda request: None, lambda request: None, None,  # type: ignore[arg-type]
                        1024)
        protocol = serving_tls(port, certificate).buildProtocol(None)  # type: ignore[arg-type]
        assert protocol is not None
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 400 Bad Request\r\n"))
        self.assertIn(b'"tls_required"', transport.value())
        self.assertTrue(transport.disconnecting)

    def test_a_handshake_to_a_plain_port_is_answered_at_once(self) -> None:
        port = DataPort(Clock(), lambda request: None, lambda request: None, None,  # type: ignore[arg-type]
                        1024)
        protocol = serving_plain(port).buildProtocol(None)  # type: ignore[arg-type]
        assert protocol is not None
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(b"\x16\x03\x01\x02\x00")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 400 Bad Request\r\n"))
        self.assertIn(b'"tls_not_served"', transport.value())
        self.assertTrue(transport.disconnecting)
