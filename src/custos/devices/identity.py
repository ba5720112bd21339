"""Device identity on the server: the stored CA, and checking a device's request signature."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select

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
        async with db.transaction() as uow:
            # id=1 is the only CA row: a second process racing here fails on the primary key
            uow.session.add(
                CARow(
                    id=1,
                    cert_pem=ca.cert_pem,
                    encrypted_key_pem=ca.encrypted_key_pem(secret),
                    fingerprint=ca.fingerprint,
                )
            )
        return ca
    try:
        return CertificateAuthority.load(row.cert_pem, row.encrypted_key_pem, secret)
    except (ValueError, TypeError) as exc:
        raise RuntimeError(
            "cannot decrypt the CA key: CUSTOS_CA_PASSPHRASE (or DATA_DIR/ca-passphrase) "
            "does not match the one it was created with"
        ) from exc


@dataclass
class _Entry:
    public_key: bytes
    active: bool
    fetched: float


@dataclass(frozen=True)
class DeviceAuth:
    """A device whose request signature verified."""

    device_id: str
    skew_s: float


class DeviceAuthenticator:
    """Verifies signed device requests; keys are cached briefly so check-ins stay cheap.

    A retirement in this process invalidates the entry at once; other processes see it
    within `ttl` seconds (documented in docs/agent-protocol.md).
    """

    def __init__(self, db: Database, *, skew_s: int, ttl_s: float) -> None:
        self.db = db
        self.skew_s = skew_s
        self.ttl_s = ttl_s
        self._cache: dict[str, _Entry] = {}

    def invalidate(self, device_id: str) -> None:
        """Forget a device (after it was retired here)."""
        self._cache.pop(device_id, None)

    async def _lookup(self, device_id: str) -> _Entry | None:
        now = time.monotonic()
        entry = self._cache.get(device_id)
        if entry is not None and now - entry.fetched < self.ttl_s:
            return entry
        async with self.db.read() as s:
            row = (
                await s.execute(
                    select(Device.public_key, Device.status).where(Device.id == device_id)
                )
            ).first()
        if row is None:
            self._cache.pop(device_id, None)
            return None
        entry = _Entry(public_key=row[0], active=row[1] == "active", fetched=now)
        if len(self._cache) > 500_000:
            self._cache.clear()
        self._cache[device_id] = entry
        return entry

    async def verify(
        self, method: str, path_qs: str, headers: dict[str, str], body: bytes
    ) -> DeviceAuth:
        """The device behind a signed request, or Unauthorized with the reason."""
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
        entry = await self._lookup(device_id)
        if entry is None:
            raise Unauthorized("unknown device", code="unknown_device")
        if not protocol.verify_signature(
            entry.public_key, sig, method, path_qs, ts, device_id, body
        ):
            raise Unauthorized("device signature does not verify", code="bad_signature")
        if not entry.active:
            raise Unauthorized("device is retired; its certificate is revoked", code="retired")
        return DeviceAuth(device_id=device_id, skew_s=skew)
