"""The built-in certificate authority: device certificates and the server's TLS certificate."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_VALIDITY = timedelta(days=3650)
DEVICE_CERT_VALIDITY = timedelta(days=825)
SERVER_CERT_VALIDITY = timedelta(days=397)


class CsrError(ValueError):
    """A certificate signing request that cannot be accepted."""


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the certificate's DER encoding, lowercase hex (what enrol commands pin)."""
    return cert.fingerprint(hashes.SHA256()).hex()


def normalise_fingerprint(value: str) -> str:
    """Accept 'sha256:AB:CD…', 'AB:CD…' or plain hex; return lowercase hex."""
    v = value.strip().lower()
    if v.startswith("sha256:"):
        v = v[len("sha256:") :]
    v = v.replace(":", "")
    if len(v) != 64 or any(c not in "0123456789abcdef" for c in v):
        raise ValueError("a CA fingerprint is 64 hex digits (SHA-256)")
    return v


@dataclass(frozen=True)
class IssuedDeviceCert:
    """A device certificate as issued."""

    pem: str
    serial: str
    not_after: datetime
    public_key: bytes  # raw Ed25519 public key


class CertificateAuthority:
    """Signs device and server certificates with an ECDSA P-256 key."""

    def __init__(self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        self.cert = cert
        self._key = key
        self.fingerprint = fingerprint(cert)

    @property
    def cert_pem(self) -> str:
        """The CA certificate, PEM."""
        return self.cert.public_bytes(serialization.Encoding.PEM).decode()

    @classmethod
    def create(cls, common_name: str = "Custos CA") -> CertificateAuthority:
        """A new self-signed CA."""
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        now = datetime.now(UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + CA_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        return cls(cert, key)

    def encrypted_key_pem(self, passphrase: bytes) -> str:
        """The private key, PEM, encrypted with the passphrase (what is stored at rest)."""
        return self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(passphrase),
        ).decode()

    def sign_package(self, descriptor: dict[str, Any]) -> str:
        """The CA's signature over a package descriptor (agents verify it before installing)."""
        from custos.packaging.signing import sign_descriptor

        return sign_descriptor(self._key, descriptor)

    def derive_secret(self, label: str) -> bytes:
        """A 32-byte secret for `label`, the same in every process that holds this CA.

        Derived from the CA private key (HMAC-SHA256 over its DER encoding), so it needs no
        storage of its own and changes when the CA does.
        """
        der = self._key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return hmac.new(
            der, b"custos-derived-secret-v1\n" + label.encode(), hashlib.sha256
        ).digest()

    @classmethod
    def load(cls, cert_pem: str, encrypted_key_pem: str, passphrase: bytes) -> CertificateAuthority:
        """Load a stored CA; a wrong passphrase raises ValueError."""
        key = serialization.load_pem_private_key(encrypted_key_pem.encode(), password=passphrase)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError("the stored CA key is not an EC key")
        return cls(x509.load_pem_x509_certificate(cert_pem.encode()), key)

    def _builder(
        self, subject: x509.Name, public_key: object, validity: timedelta
    ) -> tuple[x509.CertificateBuilder, datetime]:
        now = datetime.now(UTC)
        not_after = min(now + validity, self.cert.not_valid_after_utc)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.cert.subject)
            .public_key(public_key)  # type: ignore[arg-type]
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
        )
        return builder, not_after

    def issue_client_cert(
        self, public_key: ec.EllipticCurvePublicKey, device_id: str, unit: str = "custos-omadm"
    ) -> IssuedDeviceCert:
        """A TLS client certificate for a device whose key the server generated (OMA DM).

        Such clients (Windows-style DM stacks) take an EC P-256 key in a PKCS#12 file; the
        certificate's serial identifies the device as an agent's does.
        """
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.COMMON_NAME, device_id),
                x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit),
            ]
        )
        builder, not_after = self._builder(subject, public_key, DEVICE_CERT_VALIDITY)
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        cert = builder.sign(self._key, hashes.SHA256())
        return IssuedDeviceCert(
            pem=cert.public_bytes(serialization.Encoding.PEM).decode(),
            serial=format(cert.serial_number, "x"),
            not_after=not_after,
            public_key=public_key.public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
        )

    def sign_device_csr(self, csr_pem: str, device_id: str) -> IssuedDeviceCert:
        """Check the CSR (Ed25519 key, valid self-signature); issue a certificate for device_id."""
        try:
            csr = x509.load_pem_x509_csr(csr_pem.encode())
        except ValueError as exc:
            raise CsrError("the CSR is not a valid PEM certificate request") from exc
        if not csr.is_signature_valid:
            raise CsrError("the CSR's signature does not verify")
        pub = csr.public_key()
        if not isinstance(pub, ed25519.Ed25519PublicKey):
            raise CsrError("device keys must be Ed25519")
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.COMMON_NAME, device_id),
                x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "custos-device"),
            ]
        )
        builder, not_after = self._builder(subject, pub, DEVICE_CERT_VALIDITY)
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        cert = builder.sign(self._key, hashes.SHA256())
        return IssuedDeviceCert(
            pem=cert.public_bytes(serialization.Encoding.PEM).decode(),
            serial=format(cert.serial_number, "x"),
            not_after=not_after,
            public_key=pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw),
        )

    def issue_server_cert(self, hostnames: list[str]) -> tuple[str, str]:
        """A TLS server certificate for the given names/addresses: (cert PEM, key PEM)."""
        key = ec.generate_private_key(ec.SECP256R1())
        sans: list[x509.GeneralName] = []
        for h in dict.fromkeys(hostnames):
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(h)))
            except ValueError:
                sans.append(x509.DNSName(h))
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostnames[0])])
        builder, _ = self._builder(subject, key.public_key(), SERVER_CERT_VALIDITY)
        cert = (
            builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
        return cert.public_bytes(serialization.Encoding.PEM).decode(), key_pem


def load_or_create_passphrase(data_dir: Path, configured: str | None) -> bytes:
    """The CA key passphrase: the configured one, else a random one kept 0600 in the data dir."""
    if configured:
        return configured.encode()
    path = data_dir / "ca-passphrase"
    if path.exists():
        return path.read_bytes().strip()
    data_dir.mkdir(parents=True, exist_ok=True)
    # written whole to a private temporary file, then linked into place: a process starting
    # at the same time either wins the link or reads the complete file of the one that did
    tmp = data_dir / f".ca-passphrase.{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(secrets.token_urlsafe(32).encode())
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    return path.read_bytes().strip()


def sha256_hex(data: bytes) -> str:
    """Hex SHA-256, used for stored token hashes."""
    return hashlib.sha256(data).hexdigest()
