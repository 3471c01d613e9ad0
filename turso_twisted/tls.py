"""
TLS on the data and admin ports, so that clients can use C{libsql://} and
C{https://} URLs and tokens never cross the network in clear text.

The certificate (with its chain) and key are read from PEM files and read
again, without a restart, when they change (checked every few seconds, as
cert-manager and certbot replace them) or on SIGHUP; a renewal that does
not load keeps the certificate in use and says why.  A port that serves
TLS answers a plain HTTP request with a plain 400 naming the scheme to
use, and closes: neither side waits for the other.
"""

from __future__ import annotations

import json
import os
from typing import cast

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from OpenSSL import SSL, crypto
from twisted.internet.interfaces import (
    IDelayedCall,
    IOpenSSLServerConnectionCreator,
    IProtocolFactory,
    IReactorTime,
)
from twisted.internet.protocol import connectionDone
from twisted.internet.ssl import CertificateOptions
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

#: How often the files are checked for a renewal.
CHECK_INTERVAL = 10.0

#: The first byte of every TLS connection (a handshake record).
_HANDSHAKE = b"\x16"

def _refusal(code: str, message: str) -> bytes:
    """A plain HTTP 400 with the JSON error, for a connection about to be closed."""
    body = json.dumps({"error": code, "message": message}).encode()
    return (b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n%s" % (len(body), body))


_PLAIN_REFUSAL = _refusal("tls_required", "this port serves HTTPS: use an https:// (or libsql://) URL")
_TLS_REFUSAL = _refusal("tls_not_served", "this port serves plain HTTP: use an http:// URL")


class CertificateError(Exception):
    """The certificate or key files cannot be used (the message says why)."""


def load(cert_file: str, key_file: str) -> tuple[CertificateOptions, x509.Certificate]:
    """
    TLS server options from a PEM certificate file (the server's
    certificate first, then its chain) and a PEM key file; and the
    server's certificate.

    @raise CertificateError: if they cannot be read, parsed, or do not match.
    """
    try:
        with open(cert_file, "rb") as handle:
            certificates = x509.load_pem_x509_certificates(handle.read())
    except OSError as error:
        raise CertificateError(f"cannot read {cert_file}: {error.strerror}") from None
    except ValueError:
        raise CertificateError(f"{cert_file} holds no PEM certificate") from None
    try:
        with open(key_file, "rb") as handle:
            key: PrivateKeyTypes = serialization.load_pem_private_key(handle.read(), password=None)
    except OSError as error:
        raise CertificateError(f"cannot read {key_file}: {error.strerror}") from None
    except (ValueError, TypeError):
        raise CertificateError(f"{key_file} holds no unencrypted PEM private key") from None
    server, *chain = certificates
    try:
        options = CertificateOptions(
            privateKey=crypto.PKey.from_cryptography_key(key),  # type: ignore[arg-type]
            certificate=crypto.X509.from_cryptography(server),
            extraCertChain=[crypto.X509.from_cryptography(link) for link in chain],
            # Clients that offer ALPN (Python's urllib, which pyturso uses) get
            # HTTP/1.1, the one the ports speak; one offering only h2 is refused.
            acceptableProtocols=[b"http/1.1"])
        options.getContext()  # checks that the key is the certificate's
    except (SSL.Error, ValueError, TypeError) as error:
        raise CertificateError(f"{key_file} is not the key of the certificate in {cert_file} "
                               f"({error})") from None
    return options, server


def _described(server: x509.Certificate) -> dict[str, str]:
    return {"subject": server.subject.rfc4514_string(), "expires": server.not_valid_after_utc.isoformat()}


def _signature(path: str) -> tuple[int, int, int] | None:
    try:
        status = os.stat(path)
    except OSError:
        return None
    return status.st_ino, status.st_size, status.st_mtime_ns


@implementer(IOpenSSLServerConnectionCreator)
@attrs.define(eq=False)
class Certificate:
    """
    The certificate a port serves, read again when its files change or on
    L{reload}; each new connection gets the one in use then.
    """

    cert_file: str
    key_file: str
    clock: IReactorTime
    check_interval: float = CHECK_INTERVAL
    _options: CertificateOptions = attrs.field(init=False)
    _seen: tuple[object, object] = attrs.field(init=False)
    _checking: LoopingCall | None = attrs.field(init=False, default=None)
    _log = Logger()

    def __attrs_post_init__(self) -> None:
        # Unusable files at start-up end it (the caller says so): no fallback.
        self._seen = self._files()
        self._options, server = load(self.cert_file, self.key_file)
        self._log.info("serving TLS with the certificate for {subject} (valid until {expires})",
                       **_described(server))

    def getContext(self) -> SSL.Context:
        """The context of the certificate in use."""
        return self._options.getContext()

    def serverConnectionForTLS(self, protocol: object) -> SSL.Connection:
        """A new TLS connection, with the certificate in use now."""
        return SSL.Connection(self.getContext(), None)

    def start(self) -> None:
        """Check the files for a renewal every C{check_interval} seconds."""
        self._checking = LoopingCall(self._check)
        self._checking.clock = self.clock
        self._checking.start(self.check_interval, now=False)

    def stop(self) -> None:
        if self._checking is not None and self._checking.running:
            self._checking.stop()

    def reload(self, why: str = "asked to (SIGHUP)") -> bool:
        """Read the files again; whether the certificate in use changed."""
        self._seen = self._files()
        try:
            options, server = load(self.cert_file, self.key_file)
        except CertificateError as error:
            self._log.error("TLS certificate not reloaded ({why}): {error}; the one in use stays",
                            why=why, error=str(error))
            return False
        self._options = options
        self._log.info("TLS certificate reloaded ({why}): {subject}, valid until {expires}", why=why,
                       **_described(server))
        return True

    def _files(self) -> tuple[object, object]:
        return _signature(self.cert_file), _signature(self.key_file)

    def _check(self) -> None:
        seen = self._files()
        if seen != self._seen and None not in seen:
            # A renewal writes both files, perhaps not at once: a key that does
            # not match yet is tried again at the next change (or check).
            self.reload("the files changed")


class _OneScheme(ProtocolWrapper):
    """
    A connection in the port's scheme, or one in the other scheme by
    mistake (told apart by its first byte: every TLS connection begins
    with a handshake record): that one is answered at once with a plain
    400 and closed, rather than left to hang (twisted.web would wait for
    a line end in a handshake that never comes).
    """

    #: Whether the port serves TLS.
    tls = False
    _decided = False

    def dataReceived(self, data: bytes) -> None:
        if not self._decided:
            self._decided = True
            if data.startswith(_HANDSHAKE) != self.tls:
                self.transport.write(_PLAIN_REFUSAL if self.tls else _TLS_REFUSAL)  # type: ignore[union-attr]
                self.transport.loseConnection()  # type: ignore[union-attr]
                return
        self.wrappedProtocol.dataReceived(data)


class _TLSOnly(_OneScheme):
    tls = True


class _OneSchemeFactory(WrappingFactory):
    noisy = False


class _PlainOnlyFactory(_OneSchemeFactory):
    protocol = _OneScheme


class _TLSOnlyFactory(_OneSchemeFactory):
    protocol = _TLSOnly


def serving_plain(factory: IProtocolFactory) -> IProtocolFactory:
    """C{factory}'s protocol in plain HTTP, refusing TLS handshakes at once."""
    return _PlainOnlyFactory(factory)


#: How long a closing TLS connection waits for the client's own close alert.
CLOSE_LINGER = 5.0


class _BoundedClose(BufferingTLSTransport):
    """
    TLS that does not wait for ever for the client's close alert: Twisted
    closes the socket only once that comes, which a client that goes
    silent never sends (it would hold the connection open).  After
    L{CLOSE_LINGER} seconds the socket is closed as TCP closes it, once
    all that was written is sent: a client still reading a large answer
    slowly gets all of it (one that stops reading is closed by the port's
    idle timeout).
    """

    _linger: IDelayedCall | None = None

    def loseConnection(self) -> None:
        super().loseConnection()
        if self._linger is None and self.connected:
            self._linger = self._clock().callLater(CLOSE_LINGER, self._close_without_alert)

    def _clock(self) -> IReactorTime:
        return cast(_TLSFactory, self.factory).clock

    def _close_without_alert(self) -> None:
        self._linger = None
        if not self.connected or self.transport is None:
            return
        if self._appSendBuffer:
            # Still held back by the handshake: wait for it to go out.
            self._linger = self._clock().callLater(CLOSE_LINGER, self._close_without_alert)
            return
        # Our close alert is written; TCP sends what is queued, then closes.
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._linger is not None and self._linger.active():
            self._linger.cancel()
        super().connectionLost(reason)


class _TLSFactory(TLSMemoryBIOFactory):
    protocol = _BoundedClose

    def __init__(self, certificate: Certificate, factory: IProtocolFactory) -> None:
        super().__init__(certificate, False, factory, clock=certificate.clock)
        self.clock = certificate.clock


def serving_tls(factory: IProtocolFactory, certificate: Certificate) -> IProtocolFactory:
    """C{factory}'s protocol, behind TLS with C{certificate}."""
    return _TLSOnlyFactory(_TLSFactory(certificate, factory))
