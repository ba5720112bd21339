"""Use cases for enrolment tokens, enrolment, devices, groups and inventory."""

from __future__ import annotations

import secrets
import shlex
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import selectinload

from custos.commands.models import CommandRun
from custos.db.base import new_id, utcnow
from custos.db.engine import Database, UnitOfWork
from custos.devices.ca import CertificateAuthority, CsrError, sha256_hex
from custos.devices.identity import DeviceAuthenticator
from custos.devices.models import (
    Device,
    EnrollmentToken,
    Group,
    InventoryChange,
    RevokedCertificate,
    device_groups,
)
from custos.devices.schemas import (
    DeviceDetail,
    DeviceOut,
    EnrollRequest,
    EnrollResponse,
    GroupCreate,
    GroupOut,
    InventoryChangeOut,
    InventoryDelta,
    TokenCreate,
    TokenCreated,
    TokenOut,
)
from custos.devices.scope import Scope, in_scope
from custos.errors import Conflict, Forbidden, Invalid, NotFound
from custos.push.hub import PushHub
from custos.reports.service import sync_installed_software
from custos.webhooks.service import emit as emit_webhook

ENROLL_TOKEN_PREFIX = "cet_"  # noqa: S105 - a marker, not a secret


def _token_state(t: EnrollmentToken, now: datetime) -> str:
    if t.revoked_at is not None:
        return "revoked"
    if t.expires_at is not None and t.expires_at <= now:
        return "expired"
    if t.max_uses is not None and t.uses >= t.max_uses:
        return "used_up"
    return "active"


def _token_out(t: EnrollmentToken, group: str | None, now: datetime) -> TokenOut:
    return TokenOut(
        id=t.id,
        prefix=t.prefix,
        state=_token_state(t, now),
        max_uses=t.max_uses,
        uses=t.uses,
        expires_at=t.expires_at,
        group=group,
        note=t.note,
        created_by=t.created_by,
        created_at=t.created_at,
        revoked_at=t.revoked_at,
    )


class EnrollmentService:
    """Enrolment tokens, and turning a token plus a CSR into a device identity."""

    def __init__(self, db: Database, ca: CertificateAuthority, checkin_interval: int) -> None:
        self.db = db
        self.ca = ca
        self.checkin_interval = checkin_interval

    async def create_token(
        self, req: TokenCreate, created_by: str, server_url: str
    ) -> TokenCreated:
        """A new token; the secret is returned once and only its hash is kept."""
        secret = ENROLL_TOKEN_PREFIX + secrets.token_urlsafe(24)
        now = utcnow()
        async with self.db.transaction() as uow:
            group_id = None
            if req.group:
                group_id = await uow.session.scalar(select(Group.id).where(Group.name == req.group))
                if group_id is None:
                    raise NotFound(f"no group named {req.group!r}")
            tok = EnrollmentToken(
                token_hash=sha256_hex(secret.encode()),
                prefix=secret[:10],
                max_uses=req.uses,
                uses=0,
                expires_at=now + timedelta(seconds=req.expires_in_s) if req.expires_in_s else None,
                group_id=group_id,
                note=req.note,
                created_by=created_by,
                created_at=now,
            )
            uow.session.add(tok)
            await uow.session.flush()
            out = _token_out(tok, req.group, now)
        cmd = (
            f"custos agent enroll {shlex.quote(server_url)} --token {secret} "
            f"--ca-fingerprint {self.ca.fingerprint}"
        )
        return TokenCreated(
            **out.model_dump(), token=secret, ca_fingerprint=self.ca.fingerprint, enroll_command=cmd
        )

    async def list_tokens(self) -> list[TokenOut]:
        """Every token, newest first."""
        now = utcnow()
        async with self.db.read() as s:
            rows = (
                await s.execute(
                    select(EnrollmentToken, Group.name)
                    .outerjoin(Group, Group.id == EnrollmentToken.group_id)
                    .order_by(EnrollmentToken.id.desc())
                )
            ).all()
        return [_token_out(t, g, now) for t, g in rows]

    async def revoke_token(self, token_id: int) -> TokenOut:
        """Revoke a token; devices already enrolled with it stay enrolled."""
        now = utcnow()
        async with self.db.transaction() as uow:
            tok = await uow.session.get(EnrollmentToken, token_id)
            if tok is None:
                raise NotFound(f"no enrolment token {token_id}")
            if tok.revoked_at is None:
                tok.revoked_at = now
            group = await uow.session.get(Group, tok.group_id) if tok.group_id else None
            return _token_out(tok, group.name if group else None, now)

    async def enroll(self, req: EnrollRequest) -> EnrollResponse:
        """Consume one use of the token and issue a device certificate, atomically."""
        now = utcnow()
        async with self.db.transaction() as uow:
            s = uow.session
            tok = await s.scalar(
                select(EnrollmentToken).where(
                    EnrollmentToken.token_hash == sha256_hex(req.token.encode())
                )
            )
            if tok is None:
                raise Forbidden("unknown enrolment token", code="token_invalid")
            state = _token_state(tok, now)
            if state != "active":
                raise Forbidden(
                    f"enrolment token is {state.replace('_', ' ')}", code=f"token_{state}"
                )
            # the guarded increment keeps concurrent enrolments within max_uses
            res = await s.execute(
                update(EnrollmentToken)
                .where(
                    EnrollmentToken.id == tok.id,
                    or_(
                        EnrollmentToken.max_uses.is_(None),
                        EnrollmentToken.uses < EnrollmentToken.max_uses,
                    ),
                )
                .values(uses=EnrollmentToken.uses + 1)
                .execution_options(synchronize_session=False)
            )
            if res.rowcount != 1:  # type: ignore[attr-defined]
                raise Forbidden("enrolment token is used up", code="token_used_up")
            device_id = new_id()
            try:
                issued = self.ca.sign_device_csr(req.csr, device_id)
            except CsrError as exc:
                raise Invalid(str(exc), code="bad_csr") from exc
            name = (req.name or req.facts.get("os.hostname") or device_id[:12])[:255]
            device = Device(
                id=device_id,
                name=name,
                status="active",
                public_key=issued.public_key,
                cert_serial=issued.serial,
                cert_pem=issued.pem,
                cert_not_after=issued.not_after,
                facts=dict(req.facts),
                enrolled_at=now,
                enrolled_with=tok.id,
                agent_version=req.agent_version,
                inventory={},
                inventory_version=0,
            )
            s.add(device)
            if tok.group_id is not None:
                await s.flush()
                await s.execute(
                    device_groups.insert().values(device_id=device_id, group_id=tok.group_id)
                )
            await emit_webhook(
                s,
                "device.enrolled",
                {
                    "device_id": device_id,
                    "name": name,
                    "enrolled_at": now,
                    "agent_version": req.agent_version,
                    "enrollment_token_id": tok.id,
                },
            )
        return EnrollResponse(
            device_id=device_id,
            certificate=issued.pem,
            ca_certificate=self.ca.cert_pem,
            checkin_interval=self.checkin_interval,
        )


async def resolve_device(s: AsyncSession, ref: str, scope: Scope = None) -> Device:
    """A device by id, or by name when the name is unique; outside the scope it is not found."""
    dev = await s.get(Device, ref) if len(ref) == 32 else None
    if dev is None:
        rows = (await s.scalars(select(Device).where(Device.name == ref).limit(2))).all()
        if not rows:
            raise NotFound(f"no device {ref!r}")
        if len(rows) > 1:
            raise Conflict(f"several devices are named {ref!r}; use the device id")
        dev = rows[0]
    if scope is not None and not await s.scalar(
        select(device_groups.c.device_id)
        .where(device_groups.c.device_id == dev.id, device_groups.c.group_id.in_(sorted(scope)))
        .limit(1)
    ):
        raise NotFound(f"no device {ref!r}")
    return dev


async def resolve_target(s: AsyncSession, target: str, scope: Scope = None) -> list[str]:
    """Active device ids for 'group:NAME', a comma-separated list, or one device id or name."""
    if target.startswith("group:"):
        name = target[len("group:") :]
        gid = await s.scalar(select(Group.id).where(Group.name == name))
        if gid is None or (scope is not None and gid not in scope):
            raise NotFound(f"no group named {name!r}")
        ids = (
            await s.scalars(
                select(Device.id)
                .join(device_groups, device_groups.c.device_id == Device.id)
                .where(device_groups.c.group_id == gid, Device.status == "active")
            )
        ).all()
        if not ids:
            raise Invalid(f"group {name!r} has no active devices")
        return list(ids)
    ids = []
    for ref in dict.fromkeys(p.strip() for p in target.split(",") if p.strip()):
        dev = await resolve_device(s, ref, scope)
        if dev.status != "active":
            raise Conflict(f"device {ref!r} is {dev.status}")
        ids.append(dev.id)
    if not ids:
        raise Invalid("no target device given")
    return ids


def _device_out(d: Device) -> dict[str, Any]:
    return {
        "id": d.id,
        "name": d.name,
        "status": d.status,
        "os": " ".join(x for x in (d.facts.get("os.name", ""), d.facts.get("os.version", "")) if x),
        "model": d.facts.get("hw.model", ""),
        "last_seen": d.last_seen,
        "enrolled_at": d.enrolled_at,
        "agent_version": d.agent_version,
        "groups": sorted(g.name for g in d.groups),
    }


async def retire_in(uow: UnitOfWork, d: Device, push: PushHub, reason: str = "retired") -> None:
    """Retire a device inside the caller's transaction: revoke its certificate, drop its work."""
    d.status = "retired"
    d.retired_at = utcnow()
    uow.session.add(RevokedCertificate(serial=d.cert_serial, device_id=d.id, reason=reason))
    # queued work for a retired device will never run
    await uow.session.execute(
        update(CommandRun)
        .where(
            CommandRun.device_id == d.id,
            CommandRun.state.in_(("queued", "sent", "acked")),
        )
        .values(state="cancelled", finished_at=utcnow())
    )
    retired = [d.id]
    # every process drops its cached status and refuses the device from now on
    uow.after_commit(lambda: push.announce("status", retired))


class DeviceService:
    """Listing, showing, retiring and grouping devices; applying inventory deltas."""

    def __init__(self, db: Database, authenticator: DeviceAuthenticator, *, push: PushHub) -> None:
        self.db = db
        self.authenticator = authenticator
        self.push = push

    async def list_devices(
        self,
        *,
        q: str | None,
        group: str | None,
        status: str | None,
        limit: int,
        offset: int,
        scope: Scope = None,
    ) -> list[DeviceOut]:
        """Devices, filtered, in name order; two queries whatever the page size."""
        stmt = (
            select(Device)
            .options(selectinload(Device.groups))
            .where(in_scope(Device.id, scope))
            .order_by(Device.name, Device.id)
        )
        if q:
            like = f"%{q.lower()}%"
            stmt = stmt.where(or_(func.lower(Device.name).like(like), Device.id.like(like)))
        if status:
            stmt = stmt.where(Device.status == status)
        if group:
            stmt = (
                stmt.join(device_groups, device_groups.c.device_id == Device.id)
                .join(Group, Group.id == device_groups.c.group_id)
                .where(Group.name == group)
            )
        async with self.db.read() as s:
            devices = (await s.scalars(stmt.limit(limit).offset(offset))).all()
            return [DeviceOut(**_device_out(d)) for d in devices]

    async def show(self, ref: str, scope: Scope = None) -> DeviceDetail:
        """One device with inventory."""
        async with self.db.read() as s:
            d = await resolve_device(s, ref, scope)
            await s.refresh(d, ["groups"])
            return DeviceDetail(
                **_device_out(d),
                facts=d.facts,
                inventory=d.inventory,
                inventory_version=d.inventory_version,
                inventory_updated_at=d.inventory_updated_at,
                cert_serial=d.cert_serial,
                cert_not_after=d.cert_not_after,
                retired_at=d.retired_at,
                clock_skew_s=d.last_clock_skew_s,
            )

    async def history(
        self, ref: str, *, key_prefix: str | None, limit: int, scope: Scope = None
    ) -> list[InventoryChangeOut]:
        """Inventory changes of a device, newest first."""
        async with self.db.read() as s:
            d = await resolve_device(s, ref, scope)
            stmt = select(InventoryChange).where(InventoryChange.device_id == d.id)
            if key_prefix:
                stmt = stmt.where(InventoryChange.key.startswith(key_prefix, autoescape=True))
            rows = (await s.scalars(stmt.order_by(InventoryChange.id.desc()).limit(limit))).all()
            return [
                InventoryChangeOut(version=r.version, at=r.at, key=r.key, old=r.old, new=r.new)
                for r in rows
            ]

    async def retire(self, ref: str, scope: Scope = None) -> DeviceDetail:
        """Retire a device: revoke its certificate; every later request from it is refused."""
        async with self.db.transaction() as uow:
            d = await resolve_device(uow.session, ref, scope)
            if d.status != "retired":
                await retire_in(uow, d, self.push)
            device_id = d.id
        return await self.show(device_id)

    async def create_group(self, req: GroupCreate) -> GroupOut:
        """A new empty group."""
        async with self.db.transaction() as uow:
            if await uow.session.scalar(select(Group.id).where(Group.name == req.name)):
                raise Conflict(f"group {req.name!r} exists")
            g = Group(name=req.name, description=req.description)
            uow.session.add(g)
            await uow.session.flush()
            return GroupOut(id=g.id, name=g.name, description=g.description, devices=0)

    async def list_groups(self) -> list[GroupOut]:
        """Groups with their member counts, in one query."""
        async with self.db.read() as s:
            rows = (
                await s.execute(
                    select(Group, func.count(device_groups.c.device_id))
                    .outerjoin(device_groups, device_groups.c.group_id == Group.id)
                    .group_by(Group.id)
                    .order_by(Group.name)
                )
            ).all()
        return [
            GroupOut(id=g.id, name=g.name, description=g.description, devices=n) for g, n in rows
        ]

    async def add_to_group(self, name: str, refs: Sequence[str]) -> GroupOut:
        """Add devices to a group (already-members are left alone)."""
        async with self.db.transaction() as uow:
            s = uow.session
            g = await s.scalar(select(Group).where(Group.name == name))
            if g is None:
                raise NotFound(f"no group named {name!r}")
            ids = [(await resolve_device(s, r)).id for r in dict.fromkeys(refs)]
            present = set(
                (
                    await s.scalars(
                        select(device_groups.c.device_id).where(
                            device_groups.c.group_id == g.id, device_groups.c.device_id.in_(ids)
                        )
                    )
                ).all()
            )
            new = [i for i in ids if i not in present]
            if new:
                await s.execute(
                    device_groups.insert(), [{"device_id": i, "group_id": g.id} for i in new]
                )
            n = await s.scalar(
                select(func.count())
                .select_from(device_groups)
                .where(device_groups.c.group_id == g.id)
            )
            return GroupOut(id=g.id, name=g.name, description=g.description, devices=n or 0)


async def apply_inventory(s: AsyncSession, device: Device, delta: InventoryDelta) -> bool:
    """Apply a delta inside the caller's transaction; False when the agent must resend in full."""
    if not delta.full and delta.base != device.inventory_version:
        return False
    current = dict(device.inventory)
    if delta.full:
        new = dict(delta.set)
    else:
        new = dict(current)
        for k in delta.remove:
            new.pop(k, None)
        new.update(delta.set)
    if len(new) > 50_000:
        raise Invalid("inventory has more than 50000 keys")
    changes = [
        (k, current.get(k), new.get(k))
        for k in sorted(current.keys() | new.keys())
        if current.get(k) != new.get(k)
    ]
    if not changes and device.inventory_version > 0:
        return True
    now = utcnow()
    first_snapshot = device.inventory_version == 0 and not current
    version = device.inventory_version + 1
    device.inventory = new
    device.inventory_version = version
    device.inventory_updated_at = now
    # reports hook: installed_software follows the sw.* keys in this same transaction
    await sync_installed_software(s, device.id, changes, full=new if delta.full else None)
    # the enrolment facts follow the inventory for the keys they share
    if changes:
        if not first_snapshot:
            s.add_all(
                InventoryChange(device_id=device.id, version=version, at=now, key=k, old=o, new=v)
                for k, o, v in changes
            )
        # (the first snapshot is the starting point, not a change: no history rows for it)
        facts = dict(device.facts)
        for k, _old, v in changes:
            if k in facts or k in ("os.name", "os.version", "hw.model", "hw.manufacturer"):
                if v is None:
                    facts.pop(k, None)
                else:
                    facts[k] = v
        device.facts = facts
    return True
