"""The built-in CA: device certificates, server certificates, encrypted key at rest."""

from __future__ import annotations

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from custos.devices.ca import (
    CertificateAuthority,
    CsrError,
    load_or_create_passphrase,
    normalise_fingerprint,
)


def _csr(key) -> str:
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "whatever")]))
        .sign(
            key,
            None
            if isinstance(key, ed25519.Ed25519PrivateKey)
            else __import__("cryptography.hazmat.primitives.hashes", fromlist=["SHA256"]).SHA256(),
        )
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def test_device_certificate_is_bound_to_csr_key_and_device_id():
    ca = CertificateAuthority.create()
    key = ed25519.Ed25519PrivateKey.generate()
    issued = ca.sign_device_csr(_csr(key), "a" * 32)
    cert = x509.load_pem_x509_certificate(issued.pem.encode())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "a" * 32
    assert issued.public_key == key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    cert.verify_directly_issued_by(ca.cert)
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.CLIENT_AUTH in eku
    assert issued.serial == format(cert.serial_number, "x")


def test_bad_csrs_are_refused():
    ca = CertificateAuthority.create()
    with pytest.raises(CsrError, match="not a valid PEM"):
        ca.sign_device_csr("garbage", "a" * 32)
    with pytest.raises(CsrError, match="Ed25519"):
        ca.sign_device_csr(_csr(ec.generate_private_key(ec.SECP256R1())), "a" * 32)


def test_key_is_encrypted_at_rest_and_needs_the_passphrase():
    ca = CertificateAuthority.create()
    stored = ca.encrypted_key_pem(b"right")
    assert "ENCRYPTED PRIVATE KEY" in stored
    again = CertificateAuthority.load(ca.cert_pem, stored, b"right")
    assert again.fingerprint == ca.fingerprint
    with pytest.raises(ValueError):
        CertificateAuthority.load(ca.cert_pem, stored, b"wrong")


def test_server_certificate_names(tmp_path):
    ca = CertificateAuthority.create()
    cert_pem, key_pem = ca.issue_server_cert(["localhost", "127.0.0.1", "mdm.example.org"])
    cert = x509.load_pem_x509_certificate(cert_pem.encode())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "mdm.example.org"}
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    cert.verify_directly_issued_by(ca.cert)
    assert "PRIVATE KEY" in key_pem


def test_passphrase_file_is_private_and_stable(tmp_path):
    first = load_or_create_passphrase(tmp_path, None)
    assert load_or_create_passphrase(tmp_path, None) == first
    assert (tmp_path / "ca-passphrase").stat().st_mode & 0o777 == 0o600
    assert load_or_create_passphrase(tmp_path, "given") == b"given"


@pytest.mark.parametrize(
    "raw",
    ["sha256:" + "AB" * 32, ":".join(["ab"] * 32), "ab" * 32],
)
def test_fingerprint_forms(raw):
    assert normalise_fingerprint(raw) == "ab" * 32


def test_fingerprint_rejects_junk():
    with pytest.raises(ValueError):
        normalise_fingerprint("abc")
