"""The OMA DM server: accounts, the session state machine, node operations, package #0.

One HTTP request is one SyncML message. Its session's state (message ids, authentication,
the commands awaiting a Status, partial results, large-object chunks, the last answer for a
retransmission) lives in `omadm_sessions`, read and written in the request's transaction, so
any server process can continue a session and a dropped connection loses nothing.

Node operations are ordinary command runs (kind `omadm`) queued through CommandService: they
appear in the command history, are delivered once and closed by the device's Statuses.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import hashlib
import hmac
import json
import logging
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol
from xml.etree.ElementTree import Element

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm.attributes import flag_modified

from custos.commands.schemas import DeliveredCommand, RunResult
from custos.commands.service import CommandService
from custos.db.base import utcnow
from custos.db.engine import Database, UnitOfWork
from custos.devices.ca import CertificateAuthority
from custos.devices.models import Device, Group, device_groups
from custos.devices.schemas import InventoryDelta
from custos.devices.scope import Scope, in_scope
from custos.devices.service import apply_inventory, resolve_device
from custos.errors import Conflict, Forbidden, Invalid, NotFound
from custos.omadm import auth, codec, diagmon, dmacc, notification
from custos.omadm import message as m
from custos.omadm.models import OmadmAccount, OmadmSession
from custos.omadm.schemas import (
    AccountCreate,
    AccountCreated,
    AccountOut,
    NodeOp,
    OpsQueued,
    OpsRequest,
    UserAlert,
)
from custos.settings import Settings

log = logging.getLogger(__name__)

# SyncML status codes used here
OK, ACCEPTED, AUTH_ACCEPTED, CHUNK_ACCEPTED = 200, 202, 212, 213
BAD_REQUEST, INVALID_CRED, FORBIDDEN, NOT_FOUND = 400, 401, 403, 404
NOT_SUPPORTED, MISSING_CRED, TOO_LARGE, SIZE_MISMATCH = 406, 407, 413, 424
NOT_EXECUTED, COMMAND_FAILED = 215, 500

ALERT_SERVER_INITIATED, ALERT_CLIENT_INITIATED = "1200", "1201"
ALERT_NEXT_MESSAGE, ALERT_SESSION_ABORT, ALERT_GENERIC = "1222", "1223", "1226"

# read at the start of a session when the inventory is due (a leaf Get each: 404 is fine)
DEVDETAIL_NODES = (
    "./DevDetail/DevTyp",
    "./DevDetail/OEM",
    "./DevDetail/FwV",
    "./DevDetail/SwV",
    "./DevDetail/HwV",
    "./DevDetail/LrgObj",
    "./DevDetail/Ext/Microsoft/OSPlatform",
    "./DevDetail/Ext/Microsoft/DNSComputerName",
)
# nodes whose values also fill the inventory keys native agents use
INVENTORY_KEYS = {
    "./DevInfo/Man": "hw.manufacturer",
    "./DevInfo/Mod": "hw.model",
    "./DevInfo/Lang": "os.lang",
    "./DevInfo/DmV": "omadm.dm_version",
    "./DevDetail/SwV": "os.version",
    "./DevDetail/FwV": "hw.firmware",
    "./DevDetail/HwV": "hw.version",
    "./DevDetail/OEM": "hw.oem",
    "./DevDetail/DevTyp": "hw.type",
    "./DevDetail/Ext/Microsoft/OSPlatform": "os.name",
    "./DevDetail/Ext/Microsoft/DNSComputerName": "os.hostname",
}
MAX_INVENTORY_VALUE = 4096
MAX_FAILURES = 10  # from one address, before that address waits LOCK_S
MAX_ACCOUNT_FAILURES = 100  # from anywhere, before the account waits LOCK_S
MAX_TRACKED_ADDRESSES = 100_000
LOCK_S = 300
MAX_RUNS_PER_MESSAGE = 20
DOWNLOAD_TTL_S = 7 * 86400
RUN_OUTPUT_LIMIT = 64 * 1024
# the stored-answer type of an answer kept sealed (it carried new DM secrets)
SEALED = "sealed;"
# a message's decoded text may be this many times its size limit, and no more
TEXT_PER_MESSAGE_BYTE = 4
# large objects a client may have in flight at once (MoreData), together within
# omadm_max_obj_size; URIs longer than this are not joined
MAX_CHUNKED_OBJECTS = 8
MAX_CHUNK_KEY = 1000
# a client's MaxMsgSize below this is raised to it: no useful message is smaller
MIN_CLIENT_MSG_SIZE = 2048


@dataclass
class Peer:
    """What the transport knows about the client."""

    client_cert_der: bytes | None = None
    hmac: str | None = None
    url: str = ""
    # the `s` query parameter: the session token of the RespURI this server handed out
    session_token: str = ""
    # the client's address (X-Forwarded-For only from trusted proxies)
    address: str = ""


@dataclass
class Reply:
    status: int
    body: bytes
    content_type: str
    headers: dict[str, str] = field(default_factory=dict)


def _digits(text: str) -> bool:
    """ASCII digits only (str.isdigit() also accepts '²', which int() refuses)."""
    return bool(text) and text.isascii() and text.isdigit()


def _account_out(a: OmadmAccount, name: str) -> AccountOut:
    return AccountOut(
        device_id=a.device_id,
        name=name,
        dev_id=a.dev_id,
        auth=a.auth,
        server_id=a.server_id,
        client_name=a.client_name,
        last_session_at=a.last_session_at,
        inventory_at=a.inventory_at,
        notified_at=a.notified_at,
        locked_until=a.locked_until if account_locked(a, utcnow()) else None,
    )


def account_locked(a: OmadmAccount, now: Any) -> bool:
    """Whether the whole account is locked out (locked_until is otherwise the end of the
    window in which failures are counted)."""
    return (
        a.failures >= MAX_ACCOUNT_FAILURES and a.locked_until is not None and a.locked_until > now
    )


def _plain(status: int, text: str) -> Reply:
    return Reply(status, (text + "\n").encode(), "text/plain; charset=utf-8")


# DMAcc leaves that hold credentials (DM 1.2 AppAuth, DM 1.1 ClientPW/ServerPW)
SECRET_LEAVES = frozenset({"aauthsecret", "aauthdata", "clientpw", "serverpw", "clientnonce",
                           "servernonce"})  # fmt: skip
# DM account leaves whose values are kept: names, addresses and kinds, never credentials
ACCOUNT_PLAIN_LEAVES = frozenset(
    {"serverid", "name", "appid", "addr", "addrtype", "portnbr", "prefconref", "toconref",
     "conref", "aauthlevel", "aauthtype", "aauthname", "authpref", "prefauthtype", "username",
     "servername", "ext", "appaddr", "port", "appauth"}
)  # fmt: skip
_ACCOUNT_TREE = re.compile(r"(^|/)DMAcc(/|\?|$)", re.IGNORECASE)


def _secret_value(asked: str, uri: str, fmt: str | None) -> bool:
    """Whether a value read from the device may hold a DM account secret: a credential leaf
    anywhere, or anything under the account subtree (DMAcc) that is not a plain
    leaf or a bare list of child names. Judged on what we asked for as well as on the Source
    the device names, so `?list=` forms and interior Gets are covered."""
    for u in (asked, uri):
        if u and u.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1].lower() in SECRET_LEAVES:
            return True
    if not any(u and _ACCOUNT_TREE.search(u) for u in (asked, uri)):
        return False
    if "?" in asked or "?" in uri:
        return True
    if fmt == "node":
        return False  # an interior node's value is the names of its children
    return uri.rstrip("/").rsplit("/", 1)[-1].lower() not in ACCOUNT_PLAIN_LEAVES


def _hidden(value: str) -> str:
    return f"(secret, {len(value)} characters, not kept)"


class Who(Protocol):
    """The admin asking (accounts.Principal): a name and permissions, each with a scope."""

    @property
    def username(self) -> str: ...

    def can(self, perm: str) -> bool: ...

    def device_scope(self, perm: str) -> Scope: ...


# node subtrees that node operations reach only with more than commands.run: lock and wipe
# (LAWMO, Windows' RemoteWipe/RemoteLock) as the lost-device actions need, and the DM account
# (DMAcc), whose address and server secret would move the device to another server and whose
# values hold its secrets; Windows' DMClient (server addresses, no secrets) only for writes
# (pattern, reads too, permissions, what it guards)
GUARDED: tuple[tuple[re.Pattern[str], bool, tuple[str, ...], str], ...] = (
    (
        re.compile(r"(^|/)(LAWMO|RemoteWipe|RemoteLock)(/|\?|$)", re.IGNORECASE),
        True,
        ("devices.lock", "devices.wipe"),
        "lock and wipe nodes (LAWMO, RemoteWipe, RemoteLock)",
    ),
    (
        _ACCOUNT_TREE,
        True,
        ("devices.manage",),
        "DM account nodes (DMAcc)",
    ),
    (
        re.compile(r"(^|/)DMClient(/|\?|$)", re.IGNORECASE),
        False,
        ("devices.manage",),
        "changes to DM client nodes (DMClient)",
    ),
)


def guarded_needs(ops: list[NodeOp]) -> list[tuple[tuple[str, ...], str]]:
    """The extra permissions these operations need: (permissions, what they guard)."""
    out = []
    for pattern, reads, perms, what in GUARDED:
        for op in ops:
            # a Copy reads its source and writes its target
            uris = [(op.target, op.verb != "Get"), (op.source or "", False)]
            if any(u and (reads or write) and pattern.search(u) for u, write in uris):
                out.append((perms, what))
                break
    return out


# a run the device refused with 401/407 (it did not accept this server's credentials) is
# sent once more; only runs this small are kept for that, and only this many per session
RESEND_LIMIT = 16 * 1024
MAX_RESENT = 50


def inventory_key(uri: str) -> str:
    """The raw inventory key of a node: `./DevDetail/SwV` → `dm/DevDetail/SwV`."""
    return "dm" + uri[1:] if uri.startswith("./") else "dm/" + uri


class _Out:
    """A response message being built: command ids, elements and their size."""

    def __init__(self, limit: int) -> None:
        self.next_id = 1
        self.elements: list[Element] = []
        self.size = 900  # header (with Cred and Meta), Final and the encoding's overhead
        self.limit = limit
        self.management = 0

    def cmd_id(self) -> str:
        n = self.next_id
        self.next_id += 1
        return str(n)

    def add(self, cmd: m.Command, *, management: bool = False) -> bool:
        el = m.command_element(cmd)
        size = len(codec.to_xml(el))
        if management and self.management and self.size + size > self.limit:
            return False
        self.elements.append(el)
        self.size += size
        if management:
            self.management += 1
        return True


class OmadmService:
    def __init__(
        self,
        db: Database,
        ca: CertificateAuthority,
        commands: CommandService,
        settings: Settings,
        secret: bytes,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        push: object = None,
        software: Any = None,
        work: Any = None,
        seen: Callable[[str, str], None] | None = None,
    ) -> None:
        # records that a device was heard from (the check-in's batched last-seen writes)
        self.seen = seen
        # the pending-work index: a session of a device with nothing queued asks no query
        self.work = work
        self.db = db
        self.push = push
        self.software = software
        self._failed: dict[tuple[int, str], tuple[int, float]] = {}
        self._download_key = hmac.new(secret, b"omadm-downloads", hashlib.sha256).digest()
        self.ca = ca
        self.commands = commands
        self.settings = settings
        self._aead = AESGCM(secret)
        self._transport = transport

    # ------------------------------------------------------------ failed logins by address
    # (in this process's memory: per process, like the console's login limiter)

    def address_locked(self, account_id: int, address: str) -> bool:
        entry = self._failed.get((account_id, address))
        return entry is not None and entry[0] >= MAX_FAILURES and entry[1] > time.monotonic()

    def address_failed(self, account_id: int, address: str) -> None:
        now = time.monotonic()
        if len(self._failed) >= MAX_TRACKED_ADDRESSES:
            self._failed = {k: v for k, v in self._failed.items() if v[1] > now}
            if len(self._failed) >= MAX_TRACKED_ADDRESSES:
                self._failed.clear()
        count, until = self._failed.get((account_id, address), (0, 0.0))
        if until <= now:
            count = 0  # failures more than LOCK_S apart do not add up
        self._failed[(account_id, address)] = (count + 1, now + LOCK_S)

    def address_ok(self, account_id: int, address: str) -> None:
        self._failed.pop((account_id, address), None)

    # ------------------------------------------------------------ secrets at rest

    def _seal(self, text: str) -> str:
        nonce = secrets.token_bytes(12)
        return base64.b64encode(nonce + self._aead.encrypt(nonce, text.encode(), b"omadm")).decode()

    def _unseal(self, sealed: str) -> str:
        raw = base64.b64decode(sealed)
        return self._aead.decrypt(raw[:12], raw[12:], b"omadm").decode()

    def _seal_bytes(self, data: bytes) -> bytes:
        nonce = secrets.token_bytes(12)
        return nonce + self._aead.encrypt(nonce, data, b"omadm-response")

    def _unseal_bytes(self, sealed: bytes) -> bytes:
        return self._aead.decrypt(sealed[:12], sealed[12:], b"omadm-response")

    # ------------------------------------------------------------ accounts

    async def enroll(self, req: AccountCreate, created_by: str) -> AccountCreated:
        """A new OMA DM device: a device row, a client certificate and a DM account."""
        if req.notify_url:
            from custos.webhooks.service import check_url

            check_url(req.notify_url)
        client_name = req.client_name or req.dev_id
        if req.auth == "hmac" and any(c in client_name for c in '", '):
            raise Invalid(
                "an HMAC client name may not contain quotes, commas or spaces: give --client-name",
                code="bad_client_name",
            )
        client_password = req.client_password or secrets.token_urlsafe(18)
        server_password = req.server_password or secrets.token_urlsafe(18)
        key = ec.generate_private_key(ec.SECP256R1())
        now = utcnow()
        async with self.db.transaction() as uow:
            s = uow.session
            existing = (
                await s.execute(
                    select(OmadmAccount, Device.status)
                    .join(Device, Device.id == OmadmAccount.device_id)
                    .where(OmadmAccount.dev_id == req.dev_id)
                )
            ).first()
            if existing is not None and existing[1] != "retired":
                raise Conflict(f"an OMA DM device with DevId {req.dev_id!r} exists")
            if existing is not None:
                # a retired device's DM account gives way; the old device row keeps its history
                await s.delete(existing[0])
                await s.flush()
            from custos.db.base import new_id

            device_id = new_id()
            issued = self.ca.issue_client_cert(key.public_key(), device_id)
            name = (req.name or req.dev_id)[:255]
            s.add(
                Device(
                    id=device_id,
                    name=name,
                    status="active",
                    public_key=issued.public_key,
                    cert_serial=issued.serial,
                    cert_pem=issued.pem,
                    cert_not_after=issued.not_after,
                    facts={"omadm.dev_id": req.dev_id},
                    enrolled_at=now,
                    agent_version="omadm",
                    inventory={},
                    inventory_version=0,
                )
            )
            account = OmadmAccount(
                device_id=device_id,
                dev_id=req.dev_id,
                auth=req.auth,
                client_name=client_name,
                client_ha1_sealed=self._seal(auth.ha1(client_name, client_password)),
                server_id=self.settings.omadm_server_id,
                server_password_sealed=self._seal(server_password),
                client_nonce=auth.new_nonce(),
                server_nonce=auth.new_nonce(),
                notify_url=req.notify_url,
                created_at=now,
            )
            s.add(account)
            await s.flush()
            if req.group:
                gid = await s.scalar(select(Group.id).where(Group.name == req.group))
                if gid is None:
                    raise NotFound(f"no group named {req.group!r}")
                await s.execute(device_groups.insert().values(device_id=device_id, group_id=gid))
            from custos.webhooks.service import emit

            await emit(
                s,
                "device.enrolled",
                {
                    "device_id": device_id,
                    "name": name,
                    "enrolled_at": now,
                    "agent_version": "omadm",
                },
            )
            client_nonce, server_nonce = account.client_nonce, account.server_nonce
        log.info("omadm device %s enrolled by %s (%s auth)", req.dev_id, created_by, req.auth)
        return AccountCreated(
            device_id=device_id,
            dev_id=req.dev_id,
            name=name,
            auth=req.auth,
            server_id=self.settings.omadm_server_id,
            # absolute when the server knows how devices reach it; else the path, which the
            # CLI and console complete with the address the administrator used
            server_url=(
                self.settings.public_url.rstrip("/") + self.settings.omadm_path
                if self.settings.public_url
                else self.settings.omadm_path
            ),
            client_name=client_name,
            client_password=client_password,
            server_password=server_password,
            client_nonce=client_nonce,
            server_nonce=server_nonce,
            certificate=issued.pem,
            private_key=key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ).decode(),
            ca_certificate=self.ca.cert_pem,
        )

    async def list_accounts(self, scope: Scope = None) -> list[AccountOut]:
        async with self.db.read() as s:
            stmt = select(OmadmAccount, Device.name).join(
                Device, Device.id == OmadmAccount.device_id
            )
            stmt = stmt.where(in_scope(Device.id, scope))
            rows = (await s.execute(stmt.order_by(Device.name))).all()
        return [_account_out(a, name) for a, name in rows]

    async def account(self, device_id: str) -> AccountOut | None:
        """One device's DM account, None for a device not managed over OMA DM (the caller
        has checked the device is in scope: the console's device page)."""
        async with self.db.read() as s:
            row = (
                await s.execute(
                    select(OmadmAccount, Device.name)
                    .join(Device, Device.id == OmadmAccount.device_id)
                    .where(OmadmAccount.device_id == device_id)
                )
            ).first()
        return _account_out(row[0], row[1]) if row is not None else None

    # ------------------------------------------------------------ node operations

    async def queue_ops(self, ref: str, req: OpsRequest, who: Who) -> OpsQueued:
        """Queue node operations for a device's next session, then wake it with package #0.

        `who` needs commands.run on the device, and more for guarded subtrees (lock and wipe
        nodes, the DM account): checked here, so the API and the console apply the same rule.
        """
        for perms, what in guarded_needs(req.ops):
            missing = [p for p in perms if not who.can(p)]
            if missing:
                raise Forbidden(f"{what} need the {' and '.join(perms)} permission(s)")
            for perm in perms:
                await self.device_id(ref, who.device_scope(perm))
        created_by, scope = who.username, who.device_scope("commands.run")
        payload: dict[str, Any] = {"ops": [op.model_dump(exclude_none=True) for op in req.ops]}
        if req.atomic:
            payload["atomic"] = True
        if req.sequence:
            payload["sequence"] = True
        return await self._queue(ref, payload, req.notify, created_by, scope)

    async def queue_alert(
        self, ref: str, req: UserAlert, created_by: str, scope: Scope = None
    ) -> OpsQueued:
        """Ask the device's user something (Alerts 1100-1104); the answer is the run's result."""
        return await self._queue(ref, {"ops": [req.op()]}, req.notify, created_by, scope)

    async def rotate_credentials(
        self, ref: str, notify: bool, created_by: str, scope: Scope = None
    ) -> OpsQueued:
        """Queue a rotation of the device's DM account secrets over the protocol (DMAcc):
        new ones take effect once the device has answered 200 to all their Replaces."""
        async with self.db.read() as s:
            device = await resolve_device(s, ref, scope)
            method = await s.scalar(
                select(OmadmAccount.auth).where(OmadmAccount.device_id == device.id)
            )
        if method == "cert":
            raise Invalid(
                f"device {device.name} authenticates with its certificate: it has no DM "
                "secrets to rotate",
                code="cert_account",
            )
        payload = {"ops": [], dmacc.PAYLOAD_KEY: dmacc.PAYLOAD_VALUE}
        return await self._queue(ref, payload, notify, created_by, scope)

    async def _queue(
        self, ref: str, payload: dict[str, Any], notify: bool, created_by: str, scope: Scope
    ) -> OpsQueued:
        async with self.db.transaction() as uow:
            s = uow.session
            device = await resolve_device(s, ref, scope)
            if device.status != "active":
                raise Invalid(f"device {device.name} is {device.status}")
            account = await s.scalar(
                select(OmadmAccount).where(OmadmAccount.device_id == device.id)
            )
            if account is None:
                raise Invalid(f"device {device.name} is not an OMA DM device", code="not_omadm")
            command_id = await self.commands.queue(
                uow,
                kind="omadm",
                payload=payload,
                target=f"device:{device.id}",
                device_ids=[device.id],
                created_by=created_by,
            )
            from custos.commands.models import CommandRun

            run_id = await s.scalar(
                select(CommandRun.id).where(CommandRun.command_id == command_id)
            )
            device_id = device.id
        verbs = ",".join(sorted({str(op.get("verb")) for op in payload["ops"]})) or "DMAcc rotation"
        log.info("omadm %s queued for %s by %s", verbs, device_id, created_by)
        notified, detail = False, "not requested"
        if notify:
            notified, detail = await self.notify(device_id)
        return OpsQueued(
            command_id=command_id,
            run_id=str(run_id),
            device_id=device_id,
            notified=notified,
            notify_detail=detail,
        )

    async def device_id(self, ref: str, scope: Scope = None) -> str:
        """The id of an OMA DM device by id or name (not found outside the scope)."""
        async with self.db.read() as s:
            device = await resolve_device(s, ref, scope)
            if not await s.scalar(
                select(OmadmAccount.id).where(OmadmAccount.device_id == device.id)
            ):
                raise Invalid(f"device {device.name} is not an OMA DM device", code="not_omadm")
            return device.id

    # ------------------------------------------------------------ SCOMO downloads

    def _download_mac(self, device_id: str, package_id: str, expires: int) -> str:
        msg = f"omadm-download|{device_id}|{package_id}|{expires}".encode()
        return hmac.new(self._download_key, msg, hashlib.sha256).hexdigest()[:40]

    def download_url(self, base_url: str, device_id: str, package_id: str) -> str:
        """A URL that lets this one device fetch this one package for a week (no other auth:
        SCOMO clients download with a plain GET)."""
        expires = int(utcnow().timestamp()) + DOWNLOAD_TTL_S
        mac = self._download_mac(device_id, package_id, expires)
        token = f"{device_id}.{package_id}.{expires}.{mac}"
        root = base_url.split(self.settings.omadm_path, 1)[0] if base_url else ""
        return f"{root}{self.settings.omadm_path}/pkg/{token}"

    async def download(self, token: str) -> tuple[Path, str]:
        """The file behind a download token: (path, filename); NotFound for anything wrong."""
        parts = token.split(".")
        if len(parts) != 4 or not _digits(parts[2]) or len(token) > 200:
            raise NotFound("no such download")
        device_id, package_id, expires_s, mac = parts
        expires = int(expires_s)
        good = hmac.compare_digest(mac, self._download_mac(device_id, package_id, expires))
        if not good or expires < utcnow().timestamp():
            raise NotFound("no such download (or the link expired)")
        from custos.software.models import Package

        async with self.db.read() as s:
            pkg = await s.get(Package, package_id)
            device = await s.get(Device, device_id)
        if pkg is None or device is None or device.status != "active":
            raise NotFound("no such download")
        if self.software is None:
            raise NotFound("no such download")
        await self.software.check_plan_access(device_id, pkg.sha256)
        path = self.settings.data_dir / "tmp" / "omadm-downloads" / pkg.sha256
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{pkg.sha256}.{secrets.token_hex(4)}.part")
            await asyncio.to_thread(self.software.store.materialize, pkg.sha256, tmp)
            tmp.replace(path)
        return path, pkg.filename

    async def software_report(self, s: AsyncSession, device_id: str, rep: Any) -> None:
        if self.software is not None:
            await self.software.report_in(s, device_id, rep)

    # ------------------------------------------------------------ package #0

    async def package0(self, device_id: str, ui_mode: int = notification.UI_BACKGROUND) -> bytes:
        """A fresh package #0 for the device, recording its session id."""
        async with self.db.transaction() as uow:
            account = await uow.session.scalar(
                select(OmadmAccount).where(OmadmAccount.device_id == device_id).with_for_update()
            )
            if account is None:
                raise NotFound("not an OMA DM device")
            session_id = secrets.randbelow(0xFFFF) + 1
            sealed, nonce = account.server_password_sealed, account.server_nonce
            if account.rotation_taken and account.rotation_server_password_sealed:
                # the device said it took new DMAcc secrets: it checks the digest with them
                sealed = account.rotation_server_password_sealed
                nonce = account.rotation_server_nonce or nonce
            server_ha1 = auth.ha1(account.server_id, self._unseal(sealed))
            data = notification.build(
                notification.Notification(
                    server_id=account.server_id, session_id=session_id, ui_mode=ui_mode
                ),
                server_ha1,
                auth.unb64(nonce),
            )
            account.notified_session = session_id
            account.notified_at = utcnow()
        return data

    async def notify(self, device_id: str) -> tuple[bool, str]:
        """Send package #0 to the device's hook (or the server default); (sent, detail)."""
        async with self.db.read() as s:
            account = await s.scalar(
                select(OmadmAccount).where(OmadmAccount.device_id == device_id)
            )
        if account is None:
            return False, "not an OMA DM device"
        url = account.notify_url or self.settings.omadm_notify_url
        mqtt = self._mqtt()
        if not url and mqtt is None:
            return False, "no notification hook: the device sees the work at its next session"
        data = await self.package0(device_id)
        if mqtt is not None:
            topic = f"omadm/{device_id}"
            try:
                await mqtt.publish_once(topic, data)
            except Exception as exc:  # aiomqtt.MqttError, OSError, a timeout
                log.warning("package #0 for %s over MQTT: %s", device_id, type(exc).__name__)
                if not url:
                    return False, f"MQTT broker unreachable: {type(exc).__name__}"
            else:
                if not url:
                    return True, f"package #0 published to {mqtt.prefix}/{topic}"
        try:
            async with httpx.AsyncClient(
                timeout=10, transport=self._transport, follow_redirects=False
            ) as client:
                resp = await client.post(
                    url,
                    content=data,
                    headers={
                        "content-type": codec.NOTIFICATION_TYPE,
                        "x-custos-device": device_id,
                        "x-omadm-devid": account.dev_id,
                    },
                )
        except httpx.HTTPError as exc:
            log.warning("package #0 for %s: %s", device_id, type(exc).__name__)
            return False, f"notification hook unreachable: {type(exc).__name__}"
        if resp.status_code >= 300:
            return False, f"notification hook answered HTTP {resp.status_code}"
        return True, f"package #0 delivered ({len(data)} bytes)"

    def _mqtt(self) -> Any:
        """The MQTT push backend when that is the push channel, else None."""
        from custos.push.mqtt import MqttPush

        return self.push if isinstance(self.push, MqttPush) else None

    # ------------------------------------------------------------ the endpoint

    async def handle(self, body: bytes, content_type: str | None, peer: Peer) -> Reply:
        """Answer one SyncML message."""
        try:
            # decoded text is bounded by the message size (WBXML string tables repeat text)
            text_limit = TEXT_PER_MESSAGE_BYTE * self.settings.omadm_max_msg_size
            root, kind = codec.decode(body, content_type, max_text=text_limit)
            msg = m.parse(root)
        except (codec.CodecError, m.MessageError) as exc:
            return _plain(400, f"not a SyncML DM message: {exc}")
        try:
            msg_no = int(msg.header.msg_id)
        except ValueError:
            return _plain(400, "MsgID is not a number")
        if not 0 < msg_no < 2**31:
            return _plain(400, "MsgID must be a positive number below 2^31")
        try:
            async with self.db.transaction() as uow:
                session = _Session(self, uow, msg, msg_no, body, kind, peer)
                reply = await session.run()
        except IntegrityError:
            # the same session's message arrived twice at once (SQLite has no row locks)
            return _plain(409, "this session is being continued by another request: retry")
        return reply

    async def prune_sessions(self) -> int:
        """Forget sessions idle for longer than the TTL (a periodic job)."""
        cutoff = utcnow() - timedelta(seconds=self.settings.omadm_session_ttl_s)
        async with self.db.transaction() as uow:
            res = await uow.session.execute(
                delete(OmadmSession).where(OmadmSession.updated_at < cutoff)
            )
        return int(res.rowcount or 0)  # type: ignore[attr-defined]


class _Session:
    """One message of one session, inside the request's transaction."""

    def __init__(
        self,
        svc: OmadmService,
        uow: UnitOfWork,
        msg: m.Message,
        msg_no: int,
        body: bytes,
        kind: str,
        peer: Peer,
    ) -> None:
        self.svc = svc
        self.uow = uow
        self.s: AsyncSession = uow.session
        self.msg = msg
        self.msg_no = msg_no
        self.body = body
        self.body_sha = hashlib.sha256(body).hexdigest()  # retransmissions, SessionID reuse
        self.kind = kind
        self.peer = peer
        self.now = utcnow()
        self.account: OmadmAccount | None = None
        self.new_row = False
        self.keep_row = False
        self.replaced: OmadmSession | None = None
        self.inventory_retry = False
        self.accepted = False
        self.device: Device | None = None
        self.row: OmadmSession | None = None
        self.state: dict[str, Any] = {}
        self.inventory: dict[str, str] = {}
        self.results: list[RunResult] = []
        # runs whose Exec was accepted (202) and Generic Alerts that finish such runs
        self.waiting: dict[str, dict[str, Any]] = {}
        self.alerts: list[tuple[str, str, str | None, str | None]] = []
        self.software_done: list[tuple[dict[str, Any], RunResult]] = []
        # DMAcc rotation runs left waiting for the device's next sign-in (run id, result)
        self.rotation_parked: list[tuple[str, dict[str, Any]]] = []
        # this reply's header Status names the client's next nonce; the client's header
        # Status named this server's; this reply carries new DM secrets (DMAcc rotation)
        self.nonce_sent = False
        self.server_nonce_given = False
        self.sensitive = False
        # the client's limits as this message states them; the session's stored ones are
        # applied once its state is read (_client_limits)
        self.out = _Out(self._msg_limit(msg.header.meta.max_msg_size if msg.header.meta else None))
        self.client_obj_limit: int | None = None

    def _msg_limit(self, client: int | None) -> int:
        """The size of the messages sent: the client's MaxMsgSize (at least 2048, at most
        4 MiB), or this server's own when the client named none."""
        if not client:
            return min(self.svc.settings.omadm_max_msg_size, 4 * 1024 * 1024)
        return max(MIN_CLIENT_MSG_SIZE, min(client, 4 * 1024 * 1024))

    def _client_limits(self) -> None:
        """MaxMsgSize and MaxObjSize hold for the whole session: a message without Meta
        keeps what an earlier one said (kept in the session's state)."""
        meta = self.msg.header.meta
        if meta is not None and meta.max_msg_size:
            self.state["client_max_msg"] = self._msg_limit(meta.max_msg_size)
        if meta is not None and meta.max_obj_size:
            self.state["client_max_obj"] = int(meta.max_obj_size)
        if self.state.get("client_max_msg"):
            self.out.limit = int(self.state["client_max_msg"])
        self.client_obj_limit = self.state.get("client_max_obj") or None

    # -------------------------------------------------------------- main

    async def run(self) -> Reply:
        h = self.msg.header
        settings = self.svc.settings
        self.account = await self.s.scalar(
            select(OmadmAccount).where(OmadmAccount.dev_id == h.source).with_for_update()
        )
        if self.account is None:
            # nothing is written for an unknown device
            return self._header_only(INVALID_CRED, chal_type=auth.AUTH_BASIC)
        account = self.account
        self.device = await self.s.get(Device, account.device_id)
        if self.device is None or self.device.status != "active":
            return self._header_only(FORBIDDEN)
        if account_locked(account, self.now):
            return self._header_only(INVALID_CRED)
        if self.svc.address_locked(account.id, self.peer.address):
            return self._header_only(INVALID_CRED)
        await self._load_row()
        row = self.row
        assert row is not None
        sha = self.body_sha
        token = str((row.state or {}).get("resp_token", ""))
        same_channel = (
            not token
            or self.msg_no == 1
            or hmac.compare_digest(self.peer.session_token.encode(), token.encode())
        )
        if row.auth_method == "cert":
            # a stored answer goes only to the certificate it was made for
            same_channel = self.peer.client_cert_der is not None and self._cert_matches()
        if (
            self.msg_no == row.client_msg_id
            and sha == row.last_request_sha
            and row.last_response
            and same_channel
        ):
            headers = {"x-syncml-hmac": row.last_response_hmac} if row.last_response_hmac else {}
            stored, stored_type = row.last_response, row.last_response_type
            if stored_type.startswith(SEALED):
                stored, stored_type = self.svc._unseal_bytes(stored), stored_type[len(SEALED) :]
            return Reply(200, stored, stored_type, headers)
        if self.msg_no <= row.client_msg_id:
            return self._header_only(BAD_REQUEST)
        original_ids = (row.client_msg_id, row.server_msg_id)
        row.client_msg_id = self.msg_no
        row.server_msg_id += 1
        # a deep copy: the nested dicts would otherwise be the loaded value itself, and a
        # change made only inside them would compare equal to it and never be written
        self.state = copy.deepcopy(row.state or {})
        status, chal = self._authenticate()
        self.accepted = status in (OK, AUTH_ACCEPTED)
        if not self.accepted:
            # a message that did not authenticate stores nothing of the session: a new one is
            # not kept, and an existing one (an intruder, or the client at the wrong URL)
            # stays exactly as its owner left it
            if not self.new_row:
                row.client_msg_id, row.server_msg_id = original_ids
            self.state = copy.deepcopy(row.state or {})
            self.keep_row = True
        elif self.replaced is not None:
            await self.s.delete(self.replaced)
            await self.s.flush()
            self.replaced = None
        if self.accepted:
            self._client_limits()
        hdr_status = m.Command(
            name="Status",
            cmd_id=self.out.cmd_id(),
            msg_ref=h.msg_id,
            cmd_ref="0",
            cmd="SyncHdr",
            target_ref=h.target or None,
            source_ref=h.source,
            data=str(status),
            chal=chal,
        )
        self.out.add(hdr_status)
        if status in (OK, AUTH_ACCEPTED):
            await self._process()
            # DiagMon Generic Alerts become diagnostics reports, with or without a run
            await diagmon.store_alerts(self.s, account.device_id, self.msg.commands, settings)
            await self._asynchronous_results()
            if self.results:
                # closed before new work is taken, or a run just answered would be sent again
                await self.svc.commands.record_results(self.s, account.device_id, self.results)
                self.results = []
            if self.rotation_parked:
                await self._rotation_park()  # (so too a rotation left waiting)
            if self.msg.final and not self.state.get("ended"):
                await self._send_management()
        else:
            # the commands were not looked at: each gets the header's code, and the client
            # sends again those (libdmclient resends only commands answered 401/407)
            for cmd in self.msg.commands:
                if cmd.name != "Status":
                    self._status(cmd, status)
        final = self.msg.final or status not in (OK, AUTH_ACCEPTED)
        if not self.msg.final and status in (OK, AUTH_ACCEPTED):
            self.out.add(m.Command(name="Alert", cmd_id=self.out.cmd_id(), data=ALERT_NEXT_MESSAGE))
        if self.out.management == 0 and self.msg.final and status in (OK, AUTH_ACCEPTED):
            # a package without management commands ends the session
            self.state["ended"] = True
        if self.results:
            await self.svc.commands.record_results(self.s, account.device_id, self.results)
        if self.rotation_parked:
            await self._rotation_park()
        if self.inventory:
            await self._apply_inventory()
        return self._finish(final, settings)

    # -------------------------------------------------------------- session row

    async def _load_row(self) -> None:
        assert self.account is not None
        h = self.msg.header
        row = await self.s.scalar(
            select(OmadmSession)
            .where(
                OmadmSession.account_id == self.account.id,
                OmadmSession.session_id == h.session_id,
            )
            .with_for_update()
        )
        # a SessionID is reused by a new session (libdmclient always says 1): a message that
        # is not an exact retransmission of what the stored session saw last starts over when
        # its MsgID is not past the stored one, or when it opens a session (Alert 1200/1201)
        # after the stored one ended. The new session's message 1 may have been challenged
        # and so not stored: then it is its message 2 that meets the old row.
        opens = any(
            c.name == "Alert" and c.data in (ALERT_CLIENT_INITIATED, ALERT_SERVER_INITIATED)
            for c in self.msg.commands
        )
        stale = row is not None and (
            row.updated_at < self.now - timedelta(seconds=self.svc.settings.omadm_session_ttl_s)
            or (
                row.last_request_sha != self.body_sha
                and (self.msg_no <= row.client_msg_id or (row.ended and opens))
            )
        )
        if row is not None and stale:
            # replaced only once this message has authenticated: a stranger's message 1 with
            # the same SessionID must not wipe a live session
            self.replaced = row
            row = None
        if row is None:
            row = OmadmSession(
                account_id=self.account.id,
                session_id=h.session_id,
                client_msg_id=0,
                server_msg_id=0,
                authenticated=False,
                auth_method="",
                failures=0,
                state={},
                started_at=self.now,
                updated_at=self.now,
                last_request_sha="",
                last_response=b"",
                last_response_type="",
                last_response_hmac="",
                ended=False,
            )
            # added at the end (_finish), and only if the session outlives this message:
            # the account row is locked, so no other request of this device can race it
            self.new_row = True
        self.row = row

    # -------------------------------------------------------------- authentication

    def _authenticate(self) -> tuple[int, m.Meta | None]:
        account, row = self.account, self.row
        assert account is not None and row is not None
        h = self.msg.header
        method = account.auth
        # the account's secret and nonce; while a DMAcc rotation's new secret is pending, that
        # one too (with either nonce): the device may hold either set (omadm/dmacc.py)
        self._rotation_expire()
        keys = [(self.svc._unseal(account.client_ha1_sealed), account.client_nonce, False)]
        if account.rotation_client_ha1_sealed:
            new_ha1 = self.svc._unseal(account.rotation_client_ha1_sealed)
            keys.append((new_ha1, account.rotation_client_nonce or account.client_nonce, True))
            if account.rotation_client_nonce not in (None, account.client_nonce):
                keys.append((new_ha1, account.client_nonce, True))
        # which of them verified: (is it the new secret, the nonce used)
        matched: tuple[bool, str] | None = None
        given = h.cred is not None or self.peer.hmac is not None
        ok = False
        if self.peer.client_cert_der is not None and self._cert_matches():
            ok, used = True, "cert"
        elif method == "cert":
            used = "cert"
        elif method == "hmac":
            used = "hmac"
            if self.peer.hmac:
                try:
                    matched = next(
                        (
                            (new, nonce)
                            for ha1, nonce, new in keys
                            if auth.check_hmac(
                                self.peer.hmac,
                                account.client_name,
                                ha1,
                                auth.unb64(nonce),
                                self.body,
                            )
                        ),
                        None,
                    )
                except auth.AuthError:
                    matched = None
        elif h.cred is not None:
            used = "md5" if h.cred.type == auth.AUTH_MD5 else "basic"
            try:
                if used == "md5":
                    matched = next(
                        (
                            (new, nonce)
                            for ha1, nonce, new in keys
                            if auth.check_md5(h.cred.data, ha1, auth.unb64(nonce))
                        ),
                        None,
                    )
                elif method == "basic":
                    matched = next(
                        (
                            (new, nonce)
                            for ha1, nonce, new in keys
                            if auth.check_basic(h.cred.data, account.client_name, ha1)
                        ),
                        None,
                    )
            except auth.AuthError:
                matched = None
        else:
            used = method
        ok = ok or matched is not None
        if not ok and not given and row.authenticated and row.auth_method in ("md5", "basic"):
            # later messages of a session need no credentials, but must come to the RespURI
            # this server gave: its token proves they come from whoever authenticated (a
            # guessable SessionID alone would let anyone continue the session). Certificate
            # sessions are checked on every message above.
            token = str(self.state.get("resp_token", ""))
            if token and hmac.compare_digest(self.peer.session_token.encode(), token.encode()):
                return OK, None
        chal_type = {"md5": auth.AUTH_MD5, "hmac": auth.AUTH_HMAC, "basic": auth.AUTH_BASIC}.get(
            method
        )
        if ok:
            if matched is not None:
                self._rotation_signed_in(*matched)
            first = not row.authenticated
            row.authenticated = True
            row.auth_method = used
            if used in ("md5", "basic"):
                self.state.setdefault("resp_token", secrets.token_urlsafe(18))
            if account.failures:
                account.failures = 0
                account.locked_until = None
            self.svc.address_ok(account.id, self.peer.address)
            chal = None
            if used in ("md5", "hmac"):
                # a fresh nonce for the client's next credentials
                account.client_nonce = auth.new_nonce()
                chal = m.Meta(format="b64", type=chal_type, next_nonce=account.client_nonce)
                self.nonce_sent = True
            if first or h.cred is not None or used == "hmac":
                return AUTH_ACCEPTED, chal
            return OK, chal
        row.failures += 1
        self.svc.address_failed(account.id, self.peer.address)
        # failures count within a window of LOCK_S that opens with the first of them; while
        # the account is not locked, locked_until holds that window's end (no extra column)
        if account.locked_until is None or account.locked_until <= self.now:
            account.failures = 0
            account.locked_until = self.now + timedelta(seconds=LOCK_S)
        account.failures += 1
        if account.failures >= MAX_ACCOUNT_FAILURES:
            # a guess from everywhere at once: the whole account waits (one address is
            # stopped after MAX_FAILURES without shutting the device itself out)
            account.locked_until = self.now + timedelta(seconds=LOCK_S)
            log.warning(
                "omadm account %s locked after %d failures", account.dev_id, account.failures
            )
        if chal_type is None:
            return (INVALID_CRED if given else MISSING_CRED), None
        # the challenge repeats the nonce the device holds: a failed message (perhaps a
        # stranger's) must not move it, or anyone could break the device's next message.
        # Replay is stopped by the rotation after every success, which a failure never is.
        chal = m.Meta(
            format="b64",
            type=chal_type,
            next_nonce=account.client_nonce if method in ("md5", "hmac") else None,
        )
        return (INVALID_CRED if given else MISSING_CRED), chal

    def _cert_matches(self) -> bool:
        assert self.device is not None and self.peer.client_cert_der is not None
        try:
            cert = x509.load_der_x509_certificate(self.peer.client_cert_der)
        except ValueError:
            return False
        return format(cert.serial_number, "x") == self.device.cert_serial

    # -------------------------------------------------------------- the client's commands

    def _status(self, cmd: m.Command, code: int, items: list[m.Item] | None = None) -> None:
        if cmd.no_resp:
            return
        target = cmd.items[0].target if len(cmd.items) == 1 else None
        source = cmd.items[0].source if len(cmd.items) == 1 else None
        self.out.add(
            m.Command(
                name="Status",
                cmd_id=self.out.cmd_id(),
                msg_ref=self.msg.header.msg_id,
                cmd_ref=cmd.cmd_id or "0",
                cmd=cmd.name,
                target_ref=target,
                source_ref=source,
                data=str(code),
            )
        )

    async def _process(self) -> None:
        cmds = self.msg.commands
        # Results before Statuses: a Get's Status closes it, its Results carry the value
        result_codes = {
            id(cmd): self._on_results(cmd)
            for cmd in cmds
            if cmd.name == "Results" and not cmd.error
        }
        for cmd in cmds:
            if cmd.error:
                self._status(cmd, NOT_SUPPORTED if cmd.error.startswith("unknown") else BAD_REQUEST)
            elif cmd.name == "Status":
                self._on_status(cmd)
            elif cmd.name == "Results":
                self._status(cmd, result_codes.get(id(cmd), OK))
            elif cmd.name == "Alert":
                self._on_alert(cmd)
            elif cmd.name in ("Replace", "Add"):
                self._status(cmd, self._on_report(cmd))
            else:
                # a client has no business asking a server to Get/Delete/Exec/Copy
                self._status(cmd, NOT_SUPPORTED)
        self._close_answered()

    def _on_alert(self, cmd: m.Command) -> None:
        code = (cmd.data or "").strip()
        if code in (ALERT_CLIENT_INITIATED, ALERT_SERVER_INITIATED):
            self.state["initiated"] = code
        elif code == ALERT_SESSION_ABORT:
            self.state["ended"] = True
        elif code == ALERT_GENERIC:
            if cmd.correlator and len(self.alerts) < 50:
                item = cmd.items[0] if cmd.items else m.Item()
                self.alerts.append(
                    (
                        cmd.correlator[:64],
                        (item.data or "").strip()[:200],
                        item.source,
                        item.meta.type if item.meta else None,
                    )
                )
            alerts = self.state.setdefault("generic_alerts", [])
            for item in cmd.items[:10]:
                if len(alerts) < 50:
                    alerts.append(
                        {
                            "source": item.source,
                            "type": item.meta.type if item.meta else None,
                            "data": (item.data or "")[:1000],
                            "correlator": cmd.correlator,
                        }
                    )
        self._status(cmd, OK)

    def _chunk(self, key: str, item: m.Item, declared: int | None = None) -> str | None:
        """Join MoreData chunks: the whole value on the last chunk, None while more come.

        ValueError("size") when the joined object is not the size its first chunk announced
        (Status 424), ValueError("large") past the object limit (413).
        """
        chunks = self.state.setdefault("chunks", {})
        held = chunks.get(key)
        if held is not None and held.get("refused"):
            # the rest of an object already refused is not a new object
            if not item.more_data:
                chunks.pop(key, None)
            raise ValueError("large")
        if held is None and not item.more_data:
            return item.data or ""  # the common case: one whole value
        so_far = (held["data"] if held else "") + (item.data or "")
        size = (
            held["size"] if held else (item.meta.size if item.meta and item.meta.size else declared)
        )
        limit = self.svc.settings.omadm_max_obj_size
        # the stored state is bounded: a few objects at once, all of them within the limit
        others = sum(len(k) + len(v["data"]) for k, v in chunks.items() if k != key)
        if (
            len(so_far) > limit
            or (size is not None and size > limit)
            or others + len(key) + len(so_far) > limit
            or len(key) > MAX_CHUNK_KEY
            or (held is None and len(chunks) >= MAX_CHUNKED_OBJECTS)
        ):
            chunks.pop(key, None)
            if item.more_data and len(key) <= MAX_CHUNK_KEY and len(chunks) < MAX_CHUNKED_OBJECTS:
                chunks[key] = {"data": "", "size": None, "refused": True}
            raise ValueError("large")
        if item.more_data:
            chunks[key] = {"data": so_far, "size": size}
            return None
        chunks.pop(key, None)
        if size is not None and len(so_far.encode()) != size:
            raise ValueError("size")
        return so_far

    def _on_report(self, cmd: m.Command) -> int:
        """Replace/Add from the client: values of its nodes (DevInfo in package 1)."""
        code = OK
        for item in cmd.items:
            uri = item.source or item.target
            if not uri:
                code = BAD_REQUEST
                continue
            try:
                value = self._chunk(f"in:{uri}", item, cmd.meta.size if cmd.meta else None)
            except ValueError as exc:
                return SIZE_MISMATCH if str(exc) == "size" else TOO_LARGE
            if value is None:
                code = CHUNK_ACCEPTED
                continue
            fmt = (item.meta.format if item.meta else None) or (
                cmd.meta.format if cmd.meta else None
            )
            if _secret_value("", uri, fmt):
                value = _hidden(value)  # the device's own report of an account secret
            self._note_value(uri, value)
        return code

    def _note_value(self, uri: str, value: str) -> None:
        if len(uri) > 200:
            return
        value = value[:MAX_INVENTORY_VALUE]
        self.inventory[inventory_key(uri)] = value
        mapped = INVENTORY_KEYS.get(uri)
        if mapped:
            self.inventory[mapped] = value

    def _on_results(self, cmd: m.Command) -> int:
        """A Get's value: noted in the inventory and kept for the run. The code for the
        Results' Status: 213 while a large value is still coming in pieces (MoreData)."""
        key = f"{cmd.msg_ref or self.state.get('last_sent_msg', '')}:{cmd.cmd_ref}"
        entry = self.state.get("out", {}).get(key)
        code = OK
        for item in cmd.items:
            uri = item.source or item.target or (entry or {}).get("target")
            if not uri:
                continue
            try:
                value = self._chunk(f"res:{key}:{uri}", item, cmd.meta.size if cmd.meta else None)
            except ValueError as exc:
                too_large = str(exc) != "size"
                if entry is not None:
                    entry.pop("partial", None)
                    entry["error"] = (
                        "result larger than the object limit"
                        if too_large
                        else "result not the size the device announced"
                    )
                code = TOO_LARGE if too_large else SIZE_MISMATCH
                continue
            if value is None:
                if entry is not None:
                    entry["partial"] = True  # the run waits for the rest of the value
                code = CHUNK_ACCEPTED if code == OK else code
                continue
            fmt = (item.meta.format if item.meta else None) or (
                cmd.meta.format if cmd.meta else None
            )
            ours = entry is not None and entry.get("kind") == "rot"  # rotation's own reads
            asked = (entry or {}).get("target", "")
            if not ours and _secret_value(asked, uri, fmt):
                # a DM account secret read back: neither the inventory nor the run keeps it
                value = _hidden(value)
            self._note_value(uri, value)
            if entry is not None:
                entry.pop("partial", None)
                entry.setdefault("data", value)
        return code

    def _on_status(self, cmd: m.Command) -> None:
        account = self.account
        assert account is not None
        if cmd.cmd == "SyncHdr" or cmd.cmd_ref == "0":
            code = (cmd.data or "").strip()
            nonce = cmd.chal.next_nonce if cmd.chal is not None else None
            if nonce and len(nonce) <= 96:
                # the client wants this server's next credentials made with this nonce
                try:
                    auth.unb64(nonce)
                    account.server_nonce = nonce
                    if account.rotation_server_password_sealed:
                        # the device's latest word, whichever set it holds
                        account.rotation_server_nonce = nonce
                    self.server_nonce_given = True
                except auth.AuthError:
                    pass
            self.state["server_authenticated"] = code in ("200", "212")
            return
        key = f"{cmd.msg_ref}:{cmd.cmd_ref}"
        entry = self.state.get("out", {}).get(key)
        if entry is None:
            return
        entry["status"] = (cmd.data or "").strip()[:10]
        answers = [i.data for i in cmd.items if i.data is not None]
        if answers and "data" not in entry:
            # what the user typed or chose, for an interaction alert
            entry["data"] = "\n".join(a[:1000] for a in answers[:20])

    def _close_answered(self) -> None:
        """Commands with a Status are done; their runs close once all their commands are."""
        out: dict[str, dict[str, Any]] = self.state.get("out", {})
        runs: dict[str, dict[str, Any]] = self.state.setdefault("runs", {})
        for key in [k for k, e in out.items() if "status" in e and not e.get("partial")]:
            entry = out.pop(key)
            if entry.get("kind") == "rot":
                self._rotation_answer(entry)
                continue
            if entry.get("kind") == "inv":
                if entry["status"] == "200":
                    self.state["inventory_read"] = True
                elif entry["status"] not in ("404", "405", "406"):
                    # not run (e.g. the client had not yet accepted this server's Cred)
                    self.inventory_retry = True
                continue
            run = runs.get(entry.get("run", ""))
            if run is None:
                continue
            if entry.get("kind") == "wrap":
                run["wrap_status"] = entry["status"]
                continue
            if entry.get("kind") == "chunk" and not entry.get("last"):
                if entry["status"] == str(CHUNK_ACCEPTED):
                    continue  # the device holds the chunk: the next one goes out
                # refused half-way: the op ends with the device's code
                self.state.pop("stream", None)
            elif entry.get("kind") == "chunk":
                self.state.pop("stream", None)
            op = run["ops"][entry["i"]]
            op["status"] = int(entry["status"]) if _digits(entry["status"]) else 0
            if "data" in entry:
                op["data"] = entry["data"][:RUN_OUTPUT_LIMIT]
            if "error" in entry:
                op["error"] = entry["error"]
        if self.msg.final:
            # a client answers every command of a package in its next one: what it left
            # unanswered (no NoResp is ever sent) will not be answered
            current = str(self.row.server_msg_id) if self.row is not None else ""
            for key in [k for k in out if k.split(":", 1)[0] != current]:
                entry = out.pop(key)
                if entry.get("kind") == "rot":
                    self._rotation_answer({**entry, "status": "0"})
                    continue
                run = runs.get(entry.get("run", ""))
                if entry.get("kind") == "chunk":
                    self.state.pop("stream", None)
                if entry.get("kind") == "inv":
                    self.inventory_retry = True
                if run is not None and entry.get("kind") in ("op", "chunk"):
                    op = run["ops"][entry["i"]]
                    if entry.get("partial"):
                        # its Status came, but the value's last piece never did
                        op.setdefault("status", 0)
                        op.setdefault("error", "the value's last piece (MoreData) never came")
                    op.setdefault("status", 0)
                    op.setdefault("error", "no Status from the device")
        self._rotation_advance()
        for run_id, run in list(runs.items()):
            if any("status" not in op for op in run["ops"]):
                continue
            runs.pop(run_id)
            again = run.pop("cmd", None)
            if again is not None and any(op["status"] in (401, 407) for op in run["ops"]):
                # the device refused this server's credentials, so it ran none of it: sent
                # once more in this session, after the credentials are settled
                self.state.setdefault("resent", []).append(run_id)
                self.state.setdefault("later", []).append(again)
                continue
            if any(op["status"] == ACCEPTED and op["verb"] == "Exec" for op in run["ops"]):
                # accepted for asynchronous processing: the result comes in a Generic Alert
                self.waiting[run_id] = run
                continue
            result = _run_result(run_id, run, self.now)
            self.results.append(result)
            if "software" in run:
                self.software_done.append((run, result))

    async def _asynchronous_results(self) -> None:
        """Park runs with an accepted Exec; finish parked runs named by Generic Alerts."""
        from custos.commands.models import CommandRun

        device_id = self.account.device_id if self.account else ""
        for run_id, run in self.waiting.items():
            await self.s.execute(
                update(CommandRun)
                .where(
                    CommandRun.id == run_id,
                    CommandRun.device_id == device_id,
                    # a run cancelled or expired meanwhile stays closed
                    CommandRun.state.in_(("queued", "sent", "acked")),
                )
                .values(state="acked", result={**run, "waiting_for_alert": True})
            )
            if "software" in run:
                await self._report_software(run, None)
        for correlator, data, source, type_ in self.alerts:
            row = (
                await self.s.execute(
                    select(CommandRun.result).where(
                        CommandRun.id == correlator,
                        CommandRun.device_id == device_id,
                        CommandRun.state == "acked",
                    )
                )
            ).first()
            if row is None or not (row[0] or {}).get("waiting_for_alert"):
                continue
            ops = list(row[0]["ops"])
            code = int(data) if _digits(data) else 0
            for op in ops:
                if op["verb"] == "Exec" and op.get("status") == ACCEPTED:
                    # result codes 1200 to 1299 mean success (generic alerts, LAWMO, SCOMO)
                    # (FUMO reports 200-299 for success, SCOMO and LAWMO 1200-1299)
                    good = 1200 <= code < 1300 or 200 <= code < 300
                    op["status"] = OK if good else COMMAND_FAILED
                    op["result_code"] = code
                    if source:
                        op["alert_source"] = source[:200]
                    if type_:
                        op["alert_type"] = type_[:200]
            finished = {**row[0], "ops": ops}
            finished.pop("waiting_for_alert", None)
            result = _run_result(correlator, finished, self.now)
            self.results.append(result)
            if "software" in finished:
                self.software_done.append((finished, result))
        for run, result in self.software_done:
            await self._report_software(run, result)
        self.software_done = []

    # -------------------------------------------------------------- management commands

    async def _send_management(self) -> None:
        if self.state.get("out"):
            return  # still waiting for Statuses of what was sent before
        tries = int(self.state.get("inventory_tries", 0))
        if self.inventory_retry and tries < 2 and self.account is not None:
            # DevDetail Gets the client did not run are asked once more in this session
            self.state["inventory_tries"] = tries + 1
            self.state["inventory_sent"] = False
            self.account.inventory_at = None
        if self.state.get("stream"):
            self._next_chunk()  # a large object under way: one chunk per message
            return
        if self.state.get("rotate"):
            self._rotation_send()  # a DMAcc rotation under way: its next step
            return
        account = self.account
        assert account is not None
        interval = self.svc.settings.omadm_inventory_interval_s
        due = account.inventory_at is None or account.inventory_at < self.now - timedelta(
            seconds=interval
        )
        if due and not self.state.get("inventory_sent"):
            self.state["inventory_sent"] = True
            account.inventory_at = self.now
            for uri in DEVDETAIL_NODES:
                cmd = m.Command(name="Get", cmd_id=self.out.cmd_id(), items=[m.Item(target=uri)])
                self.out.add(cmd, management=True)
                self._expect(cmd.cmd_id, {"kind": "inv", "target": uri})
            return
        later: list[dict[str, Any]] = self.state.pop("later", [])
        work = [DeliveredCommand.model_validate(w) for w in later]
        if work:
            # still open? (an administrator may have cancelled one, or it expired)
            from custos.commands.models import CommandRun

            open_ids = set(
                (
                    await self.s.scalars(
                        select(CommandRun.id).where(
                            CommandRun.id.in_([w.run_id for w in work]),
                            CommandRun.state.in_(("queued", "sent")),
                        )
                    )
                ).all()
            )
            work = [w for w in work if w.run_id in open_ids]
        index = self.svc.work
        if not work and (index is None or index.may_have_work(account.device_id)):
            # new work only once what waited for room has gone out: take_pending hands out
            # `sent` runs again until they are answered, so taking both would send some twice
            work = await self.svc.commands.take_pending(
                self.s, account.device_id, MAX_RUNS_PER_MESSAGE
            )
        resent = self.state.get("resent", [])
        for i, run in enumerate(work):
            if not self._deliver(run):
                self.state["later"] = [w.model_dump(mode="json") for w in work[i:]]
                break
            held = self.state.get("runs", {}).get(run.run_id)
            if held is not None and run.run_id not in resent and len(resent) < MAX_RESENT:
                dumped = run.model_dump(mode="json")
                if len(json.dumps(dumped)) <= RESEND_LIMIT:
                    held["cmd"] = dumped  # to send again should the device refuse our Cred

    def _next_chunk(self) -> None:
        """The next piece of a large object: MoreData on all but the last; Size on the first."""
        st = self.state["stream"]
        raw: bytes = st["data"].encode()
        # what this message has left, less the command's own markup (Target, Meta, MoreData)
        budget = max(self.out.limit - self.out.size - 300 - len(st["target"]), 256)
        pos = int(st["pos"])  # in bytes
        end = min(pos + budget, len(raw))
        while True:
            # never cut inside a UTF-8 sequence, and leave room for XML escapes
            while end < len(raw) and end > pos + 1 and (raw[end] & 0xC0) == 0x80:
                end -= 1
            piece = raw[pos:end].decode()
            grown = len(codec.escape(piece).encode()) - (end - pos)
            if grown <= 0 or end - pos <= 64:
                break
            end = max(pos + 64, end - grown)
        last = end >= len(raw)
        meta = None
        if pos == 0 or st.get("format") or st.get("type"):
            meta = m.Meta(
                format=st.get("format"), type=st.get("type"), size=st["size"] if pos == 0 else None
            )
        cmd = m.Command(
            name=st["verb"],
            cmd_id=self.out.cmd_id(),
            meta=meta,
            items=[m.Item(target=st["target"], data=piece, more_data=not last)],
        )
        self.out.add(cmd, management=True)
        st["pos"] = end
        self._expect(
            cmd.cmd_id,
            {"kind": "chunk", "run": st["run"], "i": 0, "target": st["target"], "last": last},
        )

    def _expect(self, cmd_id: str, entry: dict[str, Any]) -> None:
        assert self.row is not None
        self.state.setdefault("out", {})[f"{self.row.server_msg_id}:{cmd_id}"] = entry

    def _deliver(self, run: DeliveredCommand) -> bool:
        """Add one run's commands to the message; False when they do not fit in it."""
        if dmacc.is_rotation(run.kind, run.payload):
            return self._rotation_start(run)
        ops: list[dict[str, Any]] | None
        if run.kind == "software":
            descriptor = run.payload.get("descriptor") or {}
            if descriptor.get("format") == "file":
                # a plain file reaching an OMA DM device is a firmware image: FUMO
                ops, why = self._fumo_ops(run)
            else:
                ops, why = self._scomo_ops(run), ""
        elif run.kind == "diagnose":
            ops, why = diagmon.diagnose_ops(self.svc.settings), ""  # a DiagMon run
        else:
            ops, why = ops_for(run.kind, run.payload)
        if ops is None:
            self.results.append(
                RunResult(run_id=run.run_id, state="rejected", error=why, finished_at=self.now)
            )
            return True
        budget = self.out.limit - 1200
        big = [
            i for i, op in enumerate(ops) if op.get("data") and len(op["data"].encode()) > budget
        ]
        if big:
            if len(ops) != 1 or run.payload.get("atomic"):
                self.results.append(
                    RunResult(
                        run_id=run.run_id,
                        state="failed",
                        error="a value larger than the device's MaxMsgSize is sent in pieces "
                        "(MoreData), which needs it alone in its run",
                        finished_at=self.now,
                    )
                )
                return True
            op = ops[0]
            size = len(op["data"].encode())
            if self.client_obj_limit and size > self.client_obj_limit:
                self.results.append(
                    RunResult(
                        run_id=run.run_id,
                        state="failed",
                        error=f"data of {size} bytes is larger than the device's MaxObjSize "
                        f"({self.client_obj_limit}): not sent",
                        finished_at=self.now,
                    )
                )
                return True
            if self.out.management:
                return False  # it starts a message of its own
            self.state["stream"] = {
                "run": run.run_id,
                "verb": op["verb"],
                "target": op["target"],
                "format": op.get("format"),
                "type": op.get("type"),
                "data": op["data"],
                "size": len(op["data"].encode()),
                "pos": 0,
            }
            self.state.setdefault("runs", {})[run.run_id] = {
                "ops": [{"verb": op["verb"], "target": op["target"]}]
            }
            self._next_chunk()
            return True
        before = self.out.next_id
        container = (
            "Atomic"
            if run.payload.get("atomic")
            else "Sequence"
            if run.payload.get("sequence")
            else None
        )
        wrap = m.Command(name=container, cmd_id=self.out.cmd_id()) if container else None
        cmds: list[m.Command] = []
        for i, op in enumerate(ops):
            data = op.get("data")
            if (
                data is not None
                and self.client_obj_limit
                and len(data.encode()) > self.client_obj_limit
            ):
                self.out.next_id = before
                self.results.append(
                    RunResult(
                        run_id=run.run_id,
                        state="failed",
                        error=f"op {i + 1}: data larger than the device's MaxObjSize "
                        f"({self.client_obj_limit})",
                        finished_at=self.now,
                    )
                )
                return True
            meta = None
            if op.get("format") or op.get("type"):
                meta = m.Meta(format=op.get("format"), type=op.get("type"))
            if op["verb"] == "Alert":
                # user interaction: options, the text, then the choices, one Item each
                items = [m.Item(data=str(x)) for x in op.get("items", [])]
                cmds.append(
                    m.Command(name="Alert", cmd_id=self.out.cmd_id(), data=op["code"], items=items)
                )
                continue
            item = m.Item(target=op["target"], source=op.get("source"), data=data)
            cmds.append(
                m.Command(
                    name=op["verb"],
                    cmd_id=self.out.cmd_id(),
                    meta=meta,
                    items=[item],
                    # an asynchronous Exec (202) reports back in a Generic Alert naming it
                    correlator=run.run_id if op["verb"] == "Exec" else None,
                )
            )
        if wrap is not None:
            wrap.children = cmds
        saved = (len(self.out.elements), self.out.size, self.out.management)
        for c in [wrap] if wrap is not None else cmds:
            if not self.out.add(c, management=True):
                # none of this run goes out in this message, not even the ops that fitted
                del self.out.elements[saved[0] :]
                self.out.size, self.out.management = saved[1], saved[2]
                self.out.next_id = before
                if saved[2] == 0:
                    # alone in a message and still too big: it would wait forever, and the
                    # device's later work behind it
                    self.results.append(
                        RunResult(
                            run_id=run.run_id,
                            state="failed",
                            error=f"its {len(ops)} commands do not fit in one message of the "
                            f"device's MaxMsgSize ({self.out.limit} bytes): queue fewer "
                            "operations per run",
                            finished_at=self.now,
                        )
                    )
                    return True
                return False
        runs = self.state.setdefault("runs", {})
        runs[run.run_id] = {
            "ops": [
                {"verb": o["verb"], "target": o["target"], **({"ok": o["ok"]} if "ok" in o else {})}
                for o in ops
            ]
        }
        if run.kind == "software":
            runs[run.run_id]["software"] = {
                "deployment_id": run.payload.get("deployment_id"),
                "package_id": run.payload.get("package_id"),
                "action": run.payload.get("action"),
            }
        if wrap:
            self._expect(wrap.cmd_id, {"kind": "wrap", "run": run.run_id})
        for i, c in enumerate(cmds):
            self._expect(
                c.cmd_id, {"kind": "op", "run": run.run_id, "i": i, "target": ops[i]["target"]}
            )
        return True

    # -------------------------------------------------------------- DMAcc rotation
    # (the states a rotation goes through are described in omadm/dmacc.py)

    def _rotation_tls(self) -> bool:
        """Whether new secrets may travel in this session's messages: only over TLS (the
        endpoint as devices reach it, `public_url` behind a TLS proxy, is https), unless
        `omadm_rotate_over_http` allows plain HTTP (test rigs)."""
        url = self.peer.url.lower()
        return url.startswith("https://") or self.svc.settings.omadm_rotate_over_http

    def _rotation_start(self, run: DeliveredCommand) -> bool:
        """Begin rotating the DM account's secrets (one rotation at a time per session)."""
        account = self.account
        assert account is not None
        if self.state.get("rotate") or self.out.management:
            return False  # after the one under way; in a message of its own
        error = None
        if account.auth == "cert":
            error = "a certificate account has no DM secrets to rotate"
        elif not self._rotation_tls():
            error = (
                "rotating DM account secrets needs TLS: the device reaches this server over "
                "plain HTTP, and the new secrets travel in the message (set public_url to the "
                "https:// address devices use behind a TLS proxy; omadm_rotate_over_http "
                "allows it on test rigs)"
            )
        elif account.rotation_run == run.run_id:
            # its secrets went out in a session that ended before their Statuses came
            self.rotation_parked.append((run.run_id, {"rotated": None}))
            return True
        elif account.rotation_run:
            error = (
                "an earlier rotation's secrets are not settled yet (the device has signed in "
                "with neither set since they were sent): try again after its next session"
            )
        if error is not None:
            self.results.append(
                RunResult(run_id=run.run_id, state="failed", error=error, finished_at=self.now)
            )
            return True
        self.state["rotate"] = dmacc.new_state(run.run_id)
        self._rotation_send()
        return True

    def _rotation_send(self) -> None:
        """The current step's commands: Gets while discovering, then the Atomic."""
        rot = self.state["rotate"]
        rot["sent"] = True
        if rot["phase"] != "replace":
            for target in dmacc.requests(rot):
                cmd = m.Command(name="Get", cmd_id=self.out.cmd_id(), items=[m.Item(target=target)])
                self.out.add(cmd)  # a few small Gets, always together
                self.out.management += 1
                self._expect(cmd.cmd_id, {"kind": "rot", "target": target})
            return
        if rot.get("pending"):
            # sent, never answered in its package: not again, as the device may hold
            # either set now; both stay accepted until it signs in with one
            self._rotation_settle(rot, *dmacc.outcome(rot))
            return
        if not self._rotation_tls():
            self._rotation_end(
                "rotating DM account secrets needs TLS (this message came over HTTP)"
            )
            return
        account = self.account
        assert account is not None
        client_password, server_password = secrets.token_urlsafe(18), secrets.token_urlsafe(18)
        # a nonce named in this reply's header Status is the one the client will hold
        client_nonce = account.client_nonce if self.nonce_sent else auth.new_nonce()
        server_nonce = auth.new_nonce()
        # kept on the account from now on: the Statuses may never come (dmacc.py)
        account.rotation_client_ha1_sealed = self.svc._seal(
            auth.ha1(account.client_name, client_password)
        )
        account.rotation_server_password_sealed = self.svc._seal(server_password)
        account.rotation_client_nonce = client_nonce
        account.rotation_server_nonce = server_nonce
        account.rotation_run, account.rotation_at = rot["run"], self.now
        account.rotation_taken = False
        rot["pending"] = True
        self.state["rotation_run"] = rot["run"]  # the session that sent them
        wrap = m.Command(name="Atomic", cmd_id=self.out.cmd_id())
        for r in dmacc.replaces(
            rot, (client_password, client_nonce), (server_password, server_nonce)
        ):
            wrap.children.append(
                m.Command(
                    name="Replace",
                    cmd_id=self.out.cmd_id(),
                    meta=m.Meta(format=r["format"]),
                    items=[m.Item(target=r["target"], data=r["data"])],
                )
            )
        self.out.add(wrap, management=True)
        self.sensitive = True  # the stored copy of this answer is sealed
        self._expect(wrap.cmd_id, {"kind": "rot", "target": "Atomic"})
        for c in wrap.children:
            self._expect(c.cmd_id, {"kind": "rot", "target": c.items[0].target})

    def _rotation_answer(self, entry: dict[str, Any]) -> None:
        rot = self.state.get("rotate")
        if rot is not None:
            dmacc.record(rot, entry.get("target", ""), str(entry["status"]), entry.get("data"))

    def _rotation_advance(self) -> None:
        """Once a step is fully answered: the next one, or the outcome."""
        rot = self.state.get("rotate")
        out = self.state.get("out", {})
        if rot is None or not rot.get("sent") or any(e.get("kind") == "rot" for e in out.values()):
            return
        rot["sent"] = False
        assert self.account is not None
        try:
            done = dmacc.advance(rot, self.account.server_id)
        except dmacc.RotationFailed as exc:
            self._rotation_settle(rot, dmacc.REFUSED, str(exc))
            return
        if done:
            self._rotation_settle(rot, *dmacc.outcome(rot))

    def _rotation_settle(self, rot: dict[str, Any], verdict: str, why: str) -> None:
        """What the Replaces' Statuses (or their absence) mean for the run and the account."""
        account = self.account
        assert account is not None
        mine = account.rotation_run == rot["run"]
        if rot.get("final") or verdict == dmacc.TAKEN:
            # (final: the device already signed in with the new secret, whatever it says)
            if mine:
                account.rotation_taken = True
            self._rotation_end(None)
        elif verdict == dmacc.REFUSED or not mine:
            if mine:
                self._rotation_clear()  # an Atomic device rolled back: it holds the old set
            self._rotation_end(why)
        else:
            self.state.pop("rotate")
            log.info("omadm %s: DMAcc rotation unsettled: %s", account.dev_id, why)
            self.rotation_parked.append(
                (rot["run"], {"ops": rot.get("ops", [])[:100], "rotated": None, "why": why})
            )

    def _rotation_end(self, error: str | None) -> None:
        rot = self.state.pop("rotate")
        ops = rot.get("ops", [])
        if error is not None:
            assert self.account is not None
            log.info("omadm %s: DMAcc rotation failed: %s", self.account.dev_id, error)
        self.results.append(
            RunResult(
                run_id=rot["run"],
                state="failed" if error else "succeeded",
                exit_code=1 if error else 0,
                stdout="" if error else dmacc.summary(rot),
                error=error,
                finished_at=self.now,
                result={"ops": ops[:100], "rotated": error is None},
            )
        )

    def _rotation_clear(self) -> None:
        """No secrets pending any more."""
        account = self.account
        assert account is not None
        account.rotation_client_ha1_sealed = account.rotation_server_password_sealed = None
        account.rotation_client_nonce = account.rotation_server_nonce = None
        account.rotation_run, account.rotation_at, account.rotation_taken = None, None, None

    def _rotation_close(self, run_id: str | None, error: str | None) -> None:
        """Close a rotation's run that may still be waiting (a closed one stays as it is)."""
        if run_id:
            self.results.append(
                RunResult(
                    run_id=run_id,
                    state="failed" if error else "succeeded",
                    exit_code=1 if error else 0,
                    stdout="" if error else "the device signed in with its new DM secrets",
                    error=error,
                    finished_at=self.now,
                    result={"rotated": error is None},
                )
            )

    def _rotation_adopt(self, client_nonce: str | None) -> None:
        """The pending secrets become the account's; the old ones are dropped."""
        account = self.account
        assert account is not None
        assert account.rotation_client_ha1_sealed and account.rotation_server_password_sealed
        account.client_ha1_sealed = account.rotation_client_ha1_sealed
        account.server_password_sealed = account.rotation_server_password_sealed
        account.client_nonce = client_nonce or account.rotation_client_nonce or account.client_nonce
        account.server_nonce = account.rotation_server_nonce or account.server_nonce
        self._rotation_clear()

    def _rotation_signed_in(self, new: bool, nonce: str) -> None:
        """The device signed in with the pending (new) or the account's (old) secret."""
        account = self.account
        assert account is not None
        run = account.rotation_run
        if not run:
            return
        if new:
            self._rotation_adopt(nonce)
            log.info("omadm %s: DM account secrets rotated (DMAcc)", account.dev_id)
            rot = self.state.get("rotate")
            if rot is not None and rot.get("run") == run:
                rot["final"] = True  # its Statuses close the run
            else:
                self._rotation_close(run, None)
        elif self.state.get("rotation_run") != run:
            # a later session with the old secret: the device does not hold the new ones (in
            # the session that sent them, a message may still carry what it had before)
            taken = account.rotation_taken
            self._rotation_clear()
            log.warning(
                "omadm %s: the device signed in with its old DM secrets; the new ones are dropped",
                account.dev_id,
            )
            if not taken:
                self._rotation_close(
                    run,
                    "the device signed in with its old DM account secrets: it did not take the "
                    "new ones, which are dropped",
                )

    def _rotation_expire(self) -> None:
        """Secrets pending for PENDING_TTL with no sign-in: settled by what the device said."""
        account = self.account
        assert account is not None
        if account.rotation_at is None or account.rotation_at > self.now - dmacc.PENDING_TTL:
            return
        run = account.rotation_run
        if account.rotation_taken:
            # every Status was 200 and no session since: the device holds the new set
            self._rotation_adopt(None)
            log.info("omadm %s: DM account secrets rotated (DMAcc, by expiry)", account.dev_id)
            return
        self._rotation_clear()
        log.info("omadm %s: pending DM secrets expired, the old ones stay", account.dev_id)
        self._rotation_close(
            run,
            "the device did not sign in within "
            f"{dmacc.PENDING_TTL.days} days of the new DM account secrets; the old ones stay",
        )

    async def _rotation_park(self) -> None:
        """Runs whose outcome waits for the device's next sign-in: `acked` until then."""
        from custos.commands.models import CommandRun

        assert self.account is not None
        for run_id, result in self.rotation_parked:
            await self.s.execute(
                update(CommandRun)
                .where(
                    CommandRun.id == run_id,
                    CommandRun.device_id == self.account.device_id,
                    CommandRun.state.in_(("queued", "sent", "acked")),
                )
                .values(state="acked", result={**result, "waiting_for_sign_in": True})
            )
        self.rotation_parked = []

    def _server_secret(self) -> tuple[str, str]:
        """The server password (sealed) and nonce the device expects: the new ones in the
        session where it has just taken them, else the account's (a device that signs in with
        the new client secret makes them the account's)."""
        a = self.account
        assert a is not None
        if (
            a.rotation_taken
            and a.rotation_server_password_sealed
            and self.state.get("rotation_run") == a.rotation_run
        ):
            return a.rotation_server_password_sealed, a.rotation_server_nonce or a.server_nonce
        return a.server_password_sealed, a.server_nonce

    def _fumo_ops(self, run: DeliveredCommand) -> tuple[list[dict[str, Any]] | None, str]:
        """A firmware image as FUMO: its name, version and a download link for this device
        in the FUMO node (`omadm_fumo_node`), then Exec DownloadAndUpdate; the outcome comes
        at once or in a Generic Alert (FUMO result 200-299 is success)."""
        p = run.payload
        if p.get("action") == "uninstall":
            return None, "firmware cannot be removed over FUMO: deploy the previous image"
        descriptor = p.get("descriptor") or {}
        node = self.svc.settings.omadm_fumo_node
        assert self.account is not None
        url = self.svc.download_url(
            self.peer.url, self.account.device_id, str(p.get("package_id", ""))
        )
        return [
            {
                "verb": "Replace",
                "target": f"{node}/PkgName",
                "data": str(descriptor.get("name", "")),
            },
            {
                "verb": "Replace",
                "target": f"{node}/PkgVersion",
                "data": str(descriptor.get("version", "")),
            },
            {"verb": "Replace", "target": f"{node}/DownloadAndUpdate/PkgURL", "data": url},
            {"verb": "Exec", "target": f"{node}/DownloadAndUpdate"},
        ], ""

    def _scomo_ops(self, run: DeliveredCommand) -> list[dict[str, Any]]:
        """A deployment's install or removal as SCOMO commands.

        Install: a fresh ./SCOMO/Download/<node> with the package's id, name and a download
        URL for this device alone, then DownloadInstall. Removal: the deployed component's
        Remove. Both answer at once (200) or accept (202) and report in a Generic Alert.
        """
        p = run.payload
        package_id = str(p.get("package_id", ""))
        descriptor = p.get("descriptor") or {}
        node = "Custos" + package_id[:16]
        if p.get("action") == "uninstall":
            return [
                {"verb": "Exec", "target": f"./SCOMO/Inventory/Deployed/{node}/Operations/Remove"}
            ]
        base = f"./SCOMO/Download/{node}"
        assert self.account is not None
        url = self.svc.download_url(self.peer.url, self.account.device_id, package_id)
        return [
            {"verb": "Delete", "target": base, "ok": [NOT_FOUND]},
            {"verb": "Add", "target": base, "format": "node"},
            {"verb": "Add", "target": f"{base}/PkgID", "data": package_id},
            {"verb": "Add", "target": f"{base}/Name", "data": str(descriptor.get("name", ""))},
            {"verb": "Add", "target": f"{base}/PkgURL", "data": url},
            {"verb": "Exec", "target": f"{base}/Operations/DownloadInstall"},
        ]

    async def _report_software(self, run: dict[str, Any], result: RunResult | None) -> None:
        """Tell the deployment how a SCOMO run ended (None: accepted, still installing)."""
        sw = run.get("software")
        if not sw or not sw.get("deployment_id") or not sw.get("package_id"):
            return
        from custos.software.schemas import StatusReport

        removal = sw.get("action") == "uninstall"
        if result is None:
            state = "removing" if removal else "installing"
        elif result.state == "succeeded":
            state = "removed" if removal else "installed"
        else:
            state = "failed"
        assert self.account is not None
        rep = StatusReport(
            deployment_id=sw["deployment_id"],
            package_id=sw["package_id"],
            state=state,
            detail=((result.error or "") if result else "")[:500] or f"SCOMO over OMA DM: {state}",
            log=result.stdout[:4000] if result else "",
        )
        try:
            await self.svc.software_report(self.s, self.account.device_id, rep)
        except NotFound:
            log.info("omadm: deployment %s no longer lists the device", sw["deployment_id"])

    # -------------------------------------------------------------- inventory and answer

    async def _apply_inventory(self) -> None:
        device = self.device
        assert device is not None
        changed = {k: v for k, v in self.inventory.items() if device.inventory.get(k) != v}
        if not changed:
            return
        delta = InventoryDelta(base=device.inventory_version, set=changed)
        await apply_inventory(self.s, device, delta)
        dm_version = self.inventory.get("omadm.dm_version")
        if dm_version:
            device.agent_version = f"omadm/{dm_version}"[:50]

    def _server_cred(self) -> m.Cred | None:
        account = self.account
        assert account is not None
        if self.state.get("server_authenticated") or not self.accepted:
            return None  # never to a message that did not authenticate
        sealed, nonce = self._server_secret()
        if account.auth == "md5":
            server_ha1 = auth.ha1(account.server_id, self.svc._unseal(sealed))
            return m.Cred(
                type=auth.AUTH_MD5,
                format="b64",
                data=auth.md5_digest(server_ha1, auth.unb64(nonce)),
            )
        if account.auth == "basic":
            return m.Cred(
                type=auth.AUTH_BASIC,
                format="b64",
                data=auth.basic(account.server_id, self.svc._unseal(sealed)),
            )
        return None

    def _header(self, msg_id: str, cred: m.Cred | None) -> m.Header:
        h = self.msg.header
        settings = self.svc.settings
        return m.Header(
            session_id=h.session_id,
            msg_id=msg_id,
            target=h.source,
            source=h.target or self.peer.url or settings.omadm_server_id,
            ver_dtd=h.ver_dtd or "1.2",
            ver_proto=h.ver_proto or "DM/1.2",
            cred=cred,
            resp_uri=self._resp_uri(),
            meta=m.Meta(
                max_msg_size=settings.omadm_max_msg_size, max_obj_size=settings.omadm_max_obj_size
            ),
        )

    def _resp_uri(self) -> str | None:
        """Where the rest of this session goes: the endpoint with the session's token."""
        token = self.state.get("resp_token")
        if not token or not self.peer.url or not self.accepted:
            return None  # never handed to a message that did not authenticate
        return f"{self.peer.url.split('?', 1)[0]}?s={token}"

    def _finish(self, final: bool, settings: Settings) -> Reply:
        account, row, device = self.account, self.row, self.device
        assert account is not None and row is not None and device is not None
        header = self._header(str(row.server_msg_id), self._server_cred())
        root = m.build(m.Message(header=header, final=final), self.out.elements)
        body = codec.encode(root, self.kind)
        headers: dict[str, str] = {}
        if account.auth == "hmac":
            sealed, nonce = self._server_secret()
            server_ha1 = auth.ha1(account.server_id, self.svc._unseal(sealed))
            mac = auth.hmac_mac(server_ha1, auth.unb64(nonce), body)
            headers["x-syncml-hmac"] = auth.hmac_header(account.server_id, mac)
        if self.keep_row:
            return Reply(200, body, self.kind, headers)
        row.state = self.state
        flag_modified(row, "state")
        row.ended = bool(self.state.get("ended"))
        if self.new_row and not (row.ended and self.msg_no == 1):
            # a session over in its first message is never read again: not stored
            self.s.add(row)
        row.updated_at = self.now
        row.last_request_sha = self.body_sha
        row.last_response = body
        row.last_response_type = self.kind
        if self.sensitive:
            # new DM secrets are in this answer: the copy kept for a retransmission is sealed
            row.last_response = self.svc._seal_bytes(body)
            row.last_response_type = SEALED + self.kind
        row.last_response_hmac = headers.get("x-syncml-hmac", "")
        if row.authenticated:
            account.last_session_at = self.now
            seen = self.svc.seen
            if seen is None:
                device.last_seen = self.now
            else:
                # batched with the agents' check-ins: no UPDATE of the device per session
                device_id, version = device.id, device.agent_version
                self.uow.after_commit(lambda: seen(device_id, version))
        return Reply(200, body, self.kind, headers)

    def _header_only(self, code: int, chal_type: str | None = None) -> Reply:
        """An answer without state: the header's Status and Final."""
        h = self.msg.header
        status = m.Command(
            name="Status",
            cmd_id="1",
            msg_ref=h.msg_id,
            cmd_ref="0",
            cmd="SyncHdr",
            target_ref=h.target or None,
            source_ref=h.source,
            data=str(code),
            chal=m.Meta(format="b64", type=chal_type) if chal_type else None,
        )
        root = m.build(m.Message(header=self._header("1", None)), [m.command_element(status)])
        return Reply(200, codec.encode(root, self.kind), self.kind)


LAWMO_OPERATIONS = {
    "lock": "./LAWMO/Operations/FullyLock",
    "unlock": "./LAWMO/Operations/UnLock",
    "wipe:selective": "./LAWMO/Operations/Wipe",
    "wipe:full": "./LAWMO/Operations/FactoryReset",
}


def ops_for(kind: str, payload: dict[str, Any]) -> tuple[list[dict[str, Any]] | None, str]:
    """The DM commands of a run of this kind, or None and why it cannot run over OMA DM.

    Lost-device lock, unlock and wipe (policies) map onto LAWMO's Operations nodes.
    """
    if kind == "omadm":
        return list(payload.get("ops", [])), ""
    if kind in ("lock", "unlock"):
        return [{"verb": "Exec", "target": LAWMO_OPERATIONS[kind]}], ""
    if kind == "wipe":
        if payload.get("dry_run"):
            return None, "LAWMO has no dry run: a wipe over OMA DM is always real"
        mode = "full" if payload.get("mode") == "full" else "selective"
        return [{"verb": "Exec", "target": LAWMO_OPERATIONS[f"wipe:{mode}"]}], ""
    return None, f"{kind!r} commands cannot run on an OMA DM device"


def _run_result(run_id: str, run: dict[str, Any], now: Any) -> RunResult:
    ops = run["ops"]
    failed = [
        o
        for o in ops
        if not 200 <= int(o.get("status", 0)) < 300 and o.get("status") not in o.get("ok", ())
    ]
    lines = []
    for o in ops:
        line = f"{o['verb']} {o['target']}: {o.get('status')}"
        if o.get("data") is not None:
            line += f" = {o['data']}"
        lines.append(line)
    stdout = "\n".join(lines)
    return RunResult(
        run_id=run_id,
        state="failed" if failed else "succeeded",
        exit_code=1 if failed else 0,
        stdout=stdout[:RUN_OUTPUT_LIMIT],
        truncated=len(stdout) > RUN_OUTPUT_LIMIT,
        error=(f"{len(failed)} of {len(ops)} commands failed" if failed else None),
        finished_at=now,
        result={
            "ops": ops,
            **({"container_status": run["wrap_status"]} if "wrap_status" in run else {}),
        },
    )
