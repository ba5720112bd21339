"""Device identity on the server: the stored CA, and checking a device's request signature."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import bindparam, select
from sqlalchemy.exc import IntegrityError

from custos import protocol
from custos.db.engine import Database
from custos.devices.ca import CertificateAuthority, load_or_create_passphrase
from custos.devices.models import CertificateAuthority as CARow
from custos.devices.models import Device
from custos.errors import Unauthorized


async def load_or_create_ca(
    db: Database, data_dir: Path, passphrase: str | None
) -> CertificateAuthority:
    """The CA from the database, created on first start (safe when several processes start)."""
    secret = load_or_create_passphrase(data_dir, passphrase)
    async with db.read() as s:
        row = await s.scalar(select(CARow).order_by(CARow.id).limit(1))
    if row is None:
        ca = CertificateAuthority.create()
        try:
            async with db.transaction() as uow:
                # id=1 is the only CA row: of processes starting together, one wins
                uow.session.add(
                    CARow(
                        id=1,
                        cert_pem=ca.cert_pem,
                        encrypted_key_pem=ca.encrypted_key_pem(secret),
                        fingerprint=ca.fingerprint,
                    )
                )
            return ca
        except IntegrityError:
            async with db.read() as s:
                row = await s.scalar(select(CARow).order_by(CARow.id).limit(1))
            assert row is not None
    try:
        return CertificateAuthority.load(row.cert_pem, row.encrypted_key_pem, secret)
    except (ValueError, TypeError) as exc:
        raise RuntimeError(
            "cannot decrypt the CA key: CUSTOS_CA_PASSPHRASE (or DATA_DIR/ca-passphrase) "
            "does not match the one it was created with"
        ) from exc


@dataclass(frozen=True)
class DeviceAuth:
    """A device whose request signature verified."""

    device_id: str
    skew_s: float


class DeviceAuthenticator:
    """Verifies signed device requests.

    A device's public key never changes, so keys are cached for the life of the process.
    Its status does change (retirement), so it is read fresh: by `verify` for most requests,
    and by the check-in's own single query (which asks for it together with pending work).
    """

    MAX_CACHED_KEYS = 1_000_000

    def __init__(self, db: Database, *, skew_s: int) -> None:
        self.db = db
        self.skew_s = skew_s
        self._keys: dict[str, bytes] = {}
        self._key_stmt = select(Device.public_key).where(Device.id == bindparam("device_id"))
        self._status_stmt = select(Device.status).where(Device.id == bindparam("device_id"))

    async def _public_key(self, device_id: str) -> bytes | None:
        key = self._keys.get(device_id)
        if key is None:
            key = await self.db.scalar(self._key_stmt, {"device_id": device_id})
            if key is None:
                return None
            if len(self._keys) >= self.MAX_CACHED_KEYS:
                self._keys.clear()
            self._keys[device_id] = key
        return key

    async def verify(
        self,
        method: str,
        path_qs: str,
        headers: Mapping[str, str],
        body: bytes,
        *,
        check_status: bool = True,
    ) -> DeviceAuth:
        """The device behind a signed request, or Unauthorized with the reason.

        With check_status=False the caller must check that the device is still active.
        """
        device_id = headers.get(protocol.H_DEVICE, "")
        ts = headers.get(protocol.H_TIME, "")
        sig = headers.get(protocol.H_SIGNATURE, "")
        if not device_id or not ts or not sig:
            raise Unauthorized("device signature headers missing", code="unsigned")
        if len(device_id) != 32 or len(sig) > 128 or len(ts) > 20:
            raise Unauthorized("malformed device signature headers", code="bad_signature")
        try:
            skew = float(int(ts)) - time.time()
        except ValueError:
            raise Unauthorized("malformed device timestamp", code="bad_signature") from None
        if abs(skew) > self.skew_s:
            raise Unauthorized(
                f"device clock is {skew:+.0f}s off the server's (limit {self.skew_s}s)",
                code="clock_skew",
            )
        key = await self._public_key(device_id)
        if key is None:
            raise Unauthorized("unknown device", code="unknown_device")
        if not protocol.verify_signature(key, sig, method, path_qs, ts, device_id, body):
            raise Unauthorized("device signature does not verify", code="bad_signature")
        if check_status:
            status = await self.db.scalar(self._status_stmt, {"device_id": device_id})
            ensure_active(status)
        return DeviceAuth(device_id=device_id, skew_s=skew)


def ensure_active(status: str | None) -> None:
    """Refuse a retired device (its certificate is revoked)."""
    if status != "active":
        raise Unauthorized("device is retired; its certificate is revoked", code="retired")
