"""Throwaway TLS certificates for tests, made with `cryptography`.

`make_certs(directory)` writes a CA, a server certificate it signed for
"localhost" and 127.0.0.1 (subjectAltName), and a "bad" self-signed
certificate for another name, and returns their paths plus
`client_context()`: an `ssl.SSLContext` that verifies like a real client
(system CAs, hostname check) and also trusts the test CA.

EC P-256 keys keep generation in the milliseconds.  The certificates carry the
extensions strict X.509 verification expects (key identifiers, key usage,
serverAuth), so they keep working where VERIFY_X509_STRICT is the default.

Must not: import gevent or hedwig.
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

GOOD_NAMES = ("localhost", "127.0.0.1")
BAD_NAME = "wrong.example"


@dataclass(frozen=True)
class CertSet:
    directory: Path
    ca_cert: Path
    cert: Path  # for GOOD_NAMES, signed by ca_cert
    key: Path
    bad_cert: Path  # self-signed, for BAD_NAME only
    bad_key: Path

    @property
    def good(self) -> tuple[str, str]:
        """(cert, key) for a server that verifies as "localhost" / 127.0.0.1."""
        return str(self.cert), str(self.key)

    @property
    def bad(self) -> tuple[str, str]:
        """(cert, key) for a server whose certificate verifies for nothing we use."""
        return str(self.bad_cert), str(self.bad_key)

    def client_context(self) -> ssl.SSLContext:
        """A verifying client context: the system CAs plus the test CA."""
        context = ssl.create_default_context()
        context.load_verify_locations(cafile=str(self.ca_cert))
        return context


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _sans(names: tuple[str, ...]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _leaf(subject_names: tuple[str, ...], key: ec.EllipticCurvePrivateKey,
          issuer: x509.Name, issuer_key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject_names[0]))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(_sans(subject_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False,
                                     content_commitment=False, data_encipherment=False,
                                     key_agreement=True, key_cert_sign=False, crl_sign=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            issuer_key.public_key()), critical=False)
        .sign(issuer_key, hashes.SHA256())
    )


def make_certs(directory: Path) -> CertSet:
    """Write ca.pem, server.pem/server.key and bad.pem/bad.key into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("Hedwig Test CA")
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False,
                                     content_commitment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    server_key = ec.generate_private_key(ec.SECP256R1())
    server = _leaf(GOOD_NAMES, server_key, ca_name, ca_key)

    bad_key = ec.generate_private_key(ec.SECP256R1())
    bad = _leaf((BAD_NAME,), bad_key, _name(BAD_NAME), bad_key)  # self-signed

    certs = CertSet(directory, directory / "ca.pem", directory / "server.pem",
                    directory / "server.key", directory / "bad.pem", directory / "bad.key")
    _write_cert(certs.ca_cert, ca)
    _write_cert(certs.cert, server)
    _write_key(certs.key, server_key)
    _write_cert(certs.bad_cert, bad)
    _write_key(certs.bad_key, bad_key)
    return certs
