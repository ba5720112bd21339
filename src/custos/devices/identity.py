"""Device identity on the server: the stored CA, and checking a device's request signature."""

from __future__ import annotations

import secrets
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
    """Verifies device requests: Ed25519-signed, or HMAC-signed with a session key.

    A device's public key never changes; its status does (retirement). Both are cached
    for the life of the process; a status change reaches every process as a hub "status"
    event (`forget`), and `refresh_statuses` re-reads every non-active device as a safety
    net (at start, when hub events may have been missed, and at a slow interval).

    Session keys are derived from a server secret and the session token itself, so any
    process verifies them without storage; see docs/agent-protocol.md.
    """

    MAX_CACHED = 1_000_000

    def __init__(
        self, db: Database, *, skew_s: int, session_secret: bytes, session_ttl_s: int
    ) -> None:
        self.db = db
        self.skew_s = skew_s
        self.session_ttl_s = session_ttl_s
        self._secret = session_secret
        self._cache: dict[str, tuple[bytes, str]] = {}  # device id -> (public key, status)
        self._stmt = select(Device.public_key, Device.status).where(
            Device.id == bindparam("device_id")
        )
        self._inactive_stmt = select(Device.id, Device.status).where(Device.status != "active")

    async def _entry(self, device_id: str) -> tuple[bytes, str] | None:
        entry = self._cache.get(device_id)
        if entry is None:
            row = await self.db.fetch_one(self._stmt, {"device_id": device_id})
            if row is None:
                return None
            if len(self._cache) >= self.MAX_CACHED:
                self._cache.clear()
            entry = self._cache[device_id] = (bytes(row[0]), row[1])
        return entry

    async def preload(self, limit: int) -> int:
        """Fill the cache with up to `limit` devices in one streamed query (at start).

        Without it, each server process meets each device cold once: one query per device
        and process in the first check-in interval after a start, which is when a restart
        under a large fleet can least afford it. ~250 bytes per device.
        """
        if limit <= 0:
            return 0
        n = 0
        stmt = select(Device.id, Device.public_key, Device.status).limit(limit)
        async with self.db.read() as s:
            result = await s.stream(stmt.execution_options(yield_per=5000))
            async for device_id, key, status in result:
                self._cache.setdefault(device_id, (bytes(key), status))
                n += 1
        return n

    async def status(self, device_id: str) -> str | None:
        """The device's status (cached), None for an unknown device."""
        entry = await self._entry(device_id)
        return entry[1] if entry is not None else None

    def forget(self, device_ids: tuple[str, ...] | list[str]) -> None:
        """Drop cached statuses (their device changed status in some process)."""
        for d in device_ids:
            self._cache.pop(d, None)

    async def refresh_statuses(self) -> int:
        """Re-read the status of every non-active device that is cached; returns how many."""
        async with self.db.read() as s:
            rows = (await s.execute(self._inactive_stmt)).all()
        changed = 0
        for device_id, status in rows:
            entry = self._cache.get(device_id)
            if entry is not None and entry[1] != status:
                self._cache[device_id] = (entry[0], status)
                changed += 1
        return changed

    def open_session(self, device_id: str, now: float | None = None) -> tuple[str, bytes, int]:
        """A new session for an authenticated device: (token, key, expiry epoch)."""
        expires = int((time.time() if now is None else now) + self.session_ttl_s)
        token = f"{device_id}.{expires}.{secrets.token_urlsafe(9)}"
        return token, protocol.session_key(self._secret, token), expires

    async def verify(
        self,
        method: str,
        path_qs: str,
        headers: Mapping[str, str],
        body: bytes,
        *,
        check_status: bool = True,
        allow_session: bool = True,
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
        token = headers.get(protocol.H_SESSION)
        if token is not None and allow_session:
            key = self._session_key(token, device_id)
            entry = await self._entry(device_id)
            if entry is None:
                raise Unauthorized("unknown device", code="unknown_device")
            if not protocol.verify_session_mac(key, sig, method, path_qs, ts, device_id, body):
                raise Unauthorized("session signature does not verify", code="bad_session")
        else:
            entry = await self._entry(device_id)
            if entry is None:
                raise Unauthorized("unknown device", code="unknown_device")
            if not protocol.verify_signature(entry[0], sig, method, path_qs, ts, device_id, body):
                raise Unauthorized("device signature does not verify", code="bad_signature")
        if check_status:
            ensure_active(entry[1])
        return DeviceAuth(device_id=device_id, skew_s=skew)

    def _session_key(self, token: str, device_id: str) -> bytes:
        if len(token) > protocol.MAX_TOKEN_LEN:
            raise Unauthorized("malformed session token", code="bad_session")
        owner, _, rest = token.partition(".")
        expiry, _, nonce = rest.partition(".")
        if owner != device_id or not nonce:
            raise Unauthorized("the session token is not this device's", code="bad_session")
        try:
            expires = int(expiry)
        except ValueError:
            raise Unauthorized("malformed session token", code="bad_session") from None
        if expires <= time.time():
            raise Unauthorized("the session has expired", code="session_expired")
        return protocol.session_key(self._secret, token)


def ensure_active(status: str | None) -> None:
    """Refuse a retired device (its certificate is revoked)."""
    if status != "active":
        raise Unauthorized("device is retired; its certificate is revoked", code="retired")
