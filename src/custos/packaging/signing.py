"""Package descriptor signatures: the server signs with its CA key, agents verify with the CA.

The signature covers the canonical JSON of the descriptor (sorted keys, no spaces, UTF-8), which
holds the artifact's SHA-256 and size, so one check binds metadata, manifest and bytes. The
signed message is the descriptor prefixed with a context label, so that a signature made here can
never be passed off as one over anything else the CA key signs (certificates, CRLs).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Mapping
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

_CONTEXT = b"custos-package-descriptor-v1\n"
MAX_DESCRIPTOR_BYTES = 1024 * 1024
MAX_SIGNATURE_CHARS = 512  # an ECDSA P-521 DER signature is under 140 bytes


class SignatureError(ValueError):
    """A descriptor whose signature is missing, malformed or does not verify."""


def _check_floats(value: Any) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("NaN and infinity have no canonical JSON form")
    if isinstance(value, Mapping):
        for v in value.values():
            _check_floats(v)
    elif isinstance(value, list | tuple):
        for v in value:
            _check_floats(v)


def descriptor_bytes(d: Mapping[str, Any]) -> bytes:
    """Canonical JSON of a descriptor: sorted keys, no spaces, UTF-8, no NaN."""
    _check_floats(d)
    data = json.dumps(
        d, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")
    if len(data) > MAX_DESCRIPTOR_BYTES:
        raise ValueError(f"a descriptor is at most {MAX_DESCRIPTOR_BYTES} bytes")
    return data


def sign_descriptor(private_key: ec.EllipticCurvePrivateKey, descriptor: Mapping[str, Any]) -> str:
    """Base64 ECDSA-SHA256 (DER) signature over the canonical descriptor."""
    signature = private_key.sign(_CONTEXT + descriptor_bytes(descriptor), ec.ECDSA(hashes.SHA256()))
    return base64.b64encode(signature).decode("ascii")


def verify_descriptor(
    ca_cert_pem: str | bytes, descriptor: Mapping[str, Any], signature: str
) -> None:
    """Return if `signature` is the CA's over `descriptor`; raise SignatureError otherwise."""
    pem = ca_cert_pem.encode() if isinstance(ca_cert_pem, str) else ca_cert_pem
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError:
        raise SignatureError("the pinned CA certificate cannot be read") from None
    public_key = cert.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise SignatureError("the CA certificate does not hold an EC key")
    if not isinstance(signature, str) or not 0 < len(signature) <= MAX_SIGNATURE_CHARS:
        raise SignatureError("the signature is missing or too long")
    try:
        raw = base64.b64decode(signature, validate=True)
    except (binascii.Error, ValueError):
        raise SignatureError("the signature is not base64") from None
    try:
        message = _CONTEXT + descriptor_bytes(descriptor)
    except (TypeError, ValueError) as exc:
        raise SignatureError(f"the descriptor cannot be canonicalised: {exc}") from None
    try:
        public_key.verify(raw, message, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise SignatureError("the package signature does not verify") from None
