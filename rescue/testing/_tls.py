"""A throwaway self-signed certificate for TLS on 127.0.0.1 (tests and the benchmarks' ``--tls``)."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

__all__ = ["SelfSignedTLS"]


@dataclass(frozen=True)
class SelfSignedTLS:
    """A P-256 certificate for ``localhost`` and ``127.0.0.1`` and its key, as PEM files.

    Serve it with ``rescue relay --tls-cert cert_file --tls-key key_file`` (or
    :meth:`server_context`); trust it with :meth:`client_context` or :attr:`pem`.
    """

    cert_file: Path
    key_file: Path

    @classmethod
    def create(
        cls, directory: Path, *, valid_for: datetime.timedelta = datetime.timedelta(days=2)
    ) -> SelfSignedTLS:
        """Write ``cert.pem`` and ``key.pem`` (mode 0600) into ``directory`` (made if missing)."""
        directory.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
        now = datetime.datetime.now(datetime.UTC)
        san = x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        )
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + valid_for)
            .add_extension(san, critical=False)
            .sign(key, hashes.SHA256())
        )
        cert_file, key_file = directory / "cert.pem", directory / "key.pem"
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_file.touch(mode=0o600)
        key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        return cls(cert_file, key_file)

    @property
    def pem(self) -> str:
        """The certificate, PEM: what a client trusts."""
        return self.cert_file.read_text()

    def server_context(self) -> ssl.SSLContext:
        """A server context serving this certificate."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert_file, self.key_file)
        return context

    def client_context(self) -> ssl.SSLContext:
        """A client context trusting only this certificate."""
        return ssl.create_default_context(cadata=self.pem)
