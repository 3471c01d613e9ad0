"""A test CA and server certificates for 127.0.0.1 and localhost, made with cryptography."""

from __future__ import annotations

import datetime
import ipaddress
import os

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@attrs.define
class TestCA:
    """A CA in C{directory}: C{ca.pem} to trust; L{issue} writes a server's certificate and key."""

    directory: str
    key: ec.EllipticCurvePrivateKey = attrs.field(init=False)
    certificate: x509.Certificate = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        os.makedirs(self.directory, exist_ok=True)
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        self.certificate = (
            x509.CertificateBuilder().subject_name(_name("turso-server test CA")).issuer_name(
                _name("turso-server test CA")).public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256()))
        with open(self.ca_file, "wb") as handle:
            handle.write(self.certificate.public_bytes(serialization.Encoding.PEM))

    @property
    def ca_file(self) -> str:
        return os.path.join(self.directory, "ca.pem")

    def issue(self, common_name: str = "turso-server test", prefix: str = "server") -> tuple[str, str]:
        """Write C{<prefix>.pem} (the certificate, then the CA's) and C{<prefix>-key.pem}; their paths."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        certificate = (
            x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(self.certificate.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=7))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                           critical=False)
            .sign(self.key, hashes.SHA256()))
        cert_file = os.path.join(self.directory, f"{prefix}.pem")
        key_file = os.path.join(self.directory, f"{prefix}-key.pem")
        # As a renewal does: each file replaced whole.
        for path, data in ((cert_file, certificate.public_bytes(serialization.Encoding.PEM)
                            + self.certificate.public_bytes(serialization.Encoding.PEM)),
                           (key_file, _pem(key))):
            with open(path + ".new", "wb") as handle:
                handle.write(data)
            os.replace(path + ".new", path)
        return cert_file, key_file
