"""Use cases for administrator accounts: users, roles and grants, tokens, sessions, TOTP.

A request's caller becomes a `Principal`: the permissions its grants give everywhere, plus
the permissions that some grants give only on a set of device groups. Services that list or
act on devices ask `Principal.device_scope(perm)` for the groups to filter by.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import os
import secrets
import time
from collections import defaultdict, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import pyotp
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import delete, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from custos.accounts.models import (
    ApiToken,
    ConsoleSession,
    Role,
    RoleGrant,
    User,
    role_grant_groups,
)
from custos.accounts.permissions import (
    BUILTIN_DESCRIPTIONS,
    BUILTIN_ROLES,
    PERMISSIONS,
    SCOPABLE,
    unknown,
)
from custos.accounts.schemas import ApiTokenOut as TokenOut
from custos.accounts.schemas import GrantOut, RoleOut, UserOut
from custos.db.base import utcnow
from custos.db.engine import Database
from custos.devices.ca import sha256_hex
from custos.devices.models import Group
from custos.errors import Conflict, Invalid, NotFound, TooManyRequests, Unauthorized

if TYPE_CHECKING:
    from custos.accounts.sync import SyncReport

_hasher = PasswordHasher()
_DUMMY: list[str] = []

TOKEN_PREFIX = "cst_"  # noqa: S105 - a marker, not a secret
MIN_PASSWORD = 8
MAX_TOKEN_DAYS = 3650

# per account: this many failures in a row lock it, for LOCK_BASE_S doubling up to LOCK_MAX_S
LOCK_AFTER = 5
LOCK_BASE_S = 60
LOCK_MAX_S = 900
# per client address, in each process: at most this many failures per window
REMOTE_FAILS = 20
REMOTE_WINDOW_S = 300.0


def _dummy_hash() -> str:
    """A real hash of a random password, made once, to verify unknown users against."""
    if not _DUMMY:
        _DUMMY.append(_hasher.hash(secrets.token_urlsafe(16)))
    return _DUMMY[0]


def _verify(stored: str, password: str) -> bool:
    try:
        return _hasher.verify(stored, password)
    except (VerificationError, InvalidHashError):
        return False


def _totp_step(secret: str, code: str) -> int | None:
    """The 30-second time step a code belongs to (this one, or one either side), or None."""
    totp = pyotp.TOTP(secret)
    now = time.time()
    for offset in (0, -1, 1):
        at = now + offset * totp.interval
        if hmac.compare_digest(totp.at(at), code.strip()):
            return int(at // totp.interval)
    return None


def check_password(password: str) -> None:
    """Refuse passwords that are too short (or absurdly long: argon2 hashes all of it)."""
    if len(password) < MIN_PASSWORD:
        raise Invalid(f"a password has at least {MIN_PASSWORD} characters", code="weak_password")
    if len(password) > 1024:
        raise Invalid("a password has at most 1024 characters", code="invalid")


@dataclass(frozen=True)
class Principal:
    """Who is making an admin request, and what they may do where."""

    user_id: int
    username: str
    role: str
    permissions: frozenset[str] = frozenset()
    scoped: Mapping[str, frozenset[int]] = field(default_factory=dict)
    via: str = "token"

    def can(self, perm: str) -> bool:
        """True if the permission is granted anywhere (everywhere or on some groups)."""
        return perm in self.permissions or bool(self.scoped.get(perm))

    def can_everywhere(self, perm: str) -> bool:
        """True if the permission is granted without a group scope."""
        return perm in self.permissions

    def device_scope(self, perm: str) -> frozenset[int] | None:
        """None: the permission covers every device; else the group ids it covers."""
        if perm in self.permissions:
            return None
        return self.scoped.get(perm, frozenset())


@dataclass(frozen=True)
class SessionGrant:
    """A new console session: the cookie secret (shown once) and its CSRF token."""

    secret: str
    csrf: str
    expires_at: datetime
    principal: Principal


class _RemoteLimiter:
    """Failed logins per client address in this process (a cheap first wall)."""

    def __init__(self) -> None:
        self._fails: dict[str, deque[float]] = defaultdict(deque)

    def check(self, remote: str) -> None:
        q = self._fails.get(remote)
        if not q:
            return
        now = time.monotonic()
        while q and q[0] < now - REMOTE_WINDOW_S:
            q.popleft()
        if len(q) >= REMOTE_FAILS:
            wait = int(q[0] + REMOTE_WINDOW_S - now) + 1
            raise TooManyRequests(
                "too many failed logins from this address; try again later", retry_after=wait
            )

    def failed(self, remote: str) -> None:
        if len(self._fails) > 100_000:  # bounded memory under a spray from many addresses
            self._fails.clear()
        self._fails[remote].append(time.monotonic())


class AccountService:
    """Users, roles, grants, API tokens, console sessions and the checks behind each request."""

    def __init__(
        self,
        db: Database,
        token_ttl_s: int,
        *,
        session_ttl_s: int = 12 * 3600,
        secret: bytes | None = None,
        directory: object | None = None,
    ) -> None:
        self.db = db
        self.token_ttl = timedelta(seconds=token_ttl_s)
        self.session_ttl = timedelta(seconds=session_ttl_s)
        # encrypts TOTP secrets at rest; derived from the CA so every process has the same
        self._aead = AESGCM(secret) if secret else None
        # a custos.accounts.directory.DirectoryLogin, when LDAP is configured
        self.directory = directory
        self._remote = _RemoteLimiter()

    # ------------------------------------------------------------------ bootstrap

    async def ensure_builtin_roles(self) -> None:
        """Create the built-in roles, and keep their permissions equal to this version's."""
        try:
            async with self.db.transaction() as uow:
                existing = {
                    r.name: r
                    for r in (
                        await uow.session.scalars(select(Role).where(Role.name.in_(BUILTIN_ROLES)))
                    ).all()
                }
                for name, perms in BUILTIN_ROLES.items():
                    row = existing.get(name)
                    if row is None:
                        uow.session.add(
                            Role(
                                name=name,
                                description=BUILTIN_DESCRIPTIONS[name],
                                permissions=sorted(perms),
                                builtin=True,
                            )
                        )
                    elif sorted(row.permissions) != sorted(perms) or not row.builtin:
                        row.permissions = sorted(perms)
                        row.builtin = True
        except IntegrityError:
            return  # another process starting at the same time did it

    async def ensure_admin(self, password: str | None) -> str | None:
        """Create the 'admin' account on first start; return the password if it was generated."""
        await self.ensure_builtin_roles()
        generated = None
        try:
            async with self.db.transaction() as uow:
                existing = await uow.session.scalar(select(User.id).limit(1))
                if existing is not None:
                    return None
                if not password:
                    generated = password = secrets.token_urlsafe(12)
                user = User(username="admin", password_hash=_hasher.hash(password))
                uow.session.add(user)
                await uow.session.flush()
                await self._grant(uow.session, user.id, "admin", [], "local")
        except IntegrityError:
            return None  # another process starting at the same time created it
        return generated

    # ------------------------------------------------------------------ users

    async def create_user(
        self,
        username: str,
        password: str | None,
        roles: Sequence[str] = ("admin",),
        *,
        groups: Sequence[str] = (),
        display_name: str = "",
        email: str = "",
    ) -> UserOut:
        """A new local user holding `roles` (on `groups` only, if any are given)."""
        if not username or len(username) > 150 or username != username.strip():
            raise Invalid("a username is 1 to 150 characters without surrounding spaces")
        if password is None:
            raise Invalid("a local user needs a password", code="weak_password")
        check_password(password)
        hashed = await asyncio.to_thread(_hasher.hash, password)
        async with self.db.transaction() as uow:
            s = uow.session
            if await s.scalar(select(User.id).where(User.username == username)):
                raise Conflict(f"user {username!r} exists")
            user = User(
                username=username, password_hash=hashed, display_name=display_name, email=email
            )
            s.add(user)
            await s.flush()
            for role in roles:
                await self._grant(s, user.id, role, groups, "local")
            return (await self._users_out(s, [user.id]))[0]

    async def list_users(self) -> list[UserOut]:
        """Every user with their grants; two queries."""
        async with self.db.read() as s:
            ids = list((await s.scalars(select(User.id).order_by(User.username))).all())
            return await self._users_out(s, ids)

    async def show_user(self, username: str) -> UserOut:
        """One user with their grants."""
        async with self.db.read() as s:
            uid = await self._user_id(s, username)
            return (await self._users_out(s, [uid]))[0]

    async def set_active(self, username: str, active: bool, *, actor: Principal | None) -> UserOut:
        """Disable (tokens and sessions end at once) or re-enable a user."""
        if actor is not None and actor.username == username and not active:
            raise Conflict("you cannot disable your own account", code="self_disable")
        async with self.db.transaction() as uow:
            s = uow.session
            uid = await self._user_id(s, username)
            if not active:
                await self._ensure_other_admin(s, uid)
            await s.execute(
                update(User)
                .where(User.id == uid)
                .values(is_active=active, failed_logins=0, locked_until=None)
            )
            if not active:
                await self._end_access(s, [uid])
            return (await self._users_out(s, [uid]))[0]

    async def set_password(self, username: str, password: str) -> None:
        """Set a local user's password; their other sessions and tokens end."""
        check_password(password)
        hashed = await asyncio.to_thread(_hasher.hash, password)
        async with self.db.transaction() as uow:
            s = uow.session
            uid = await self._user_id(s, username)
            if await s.scalar(select(User.source).where(User.id == uid)) != "local":
                raise Conflict("directory users change their password in the directory")
            await s.execute(
                update(User)
                .where(User.id == uid)
                .values(password_hash=hashed, failed_logins=0, locked_until=None)
            )
            await self._end_access(s, [uid])

    async def change_own_password(
        self, who: Principal, current: str, new: str, *, keep_session: str | None = None
    ) -> None:
        """A local user changes their own password (the current one is checked first).

        Their API tokens and other console sessions end; `keep_session` (the secret of the
        console session making the change) stays signed in.
        """
        check_password(new)
        async with self.db.read() as s:
            row = (
                await s.execute(
                    select(User.password_hash, User.source).where(User.id == who.user_id)
                )
            ).first()
        if row is None or row.source != "local":
            raise Conflict("directory users change their password in the directory")
        if not await asyncio.to_thread(_verify, row.password_hash, current):
            raise Invalid("the current password is wrong", code="bad_credentials")
        hashed = await asyncio.to_thread(_hasher.hash, new)
        async with self.db.transaction() as uow:
            await uow.session.execute(
                update(User).where(User.id == who.user_id).values(password_hash=hashed)
            )
            await uow.session.execute(delete(ApiToken).where(ApiToken.user_id == who.user_id))
            keep = sha256_hex(keep_session.encode()) if keep_session else ""
            await uow.session.execute(
                delete(ConsoleSession).where(
                    ConsoleSession.user_id == who.user_id, ConsoleSession.secret_hash != keep
                )
            )

    # ------------------------------------------------------------------ roles and grants

    async def create_role(self, name: str, permissions: Iterable[str], description: str) -> RoleOut:
        """A custom role made of known permissions."""
        perms = sorted(set(permissions))
        if bad := unknown(perms):
            raise Invalid(
                f"unknown permission(s): {', '.join(bad)}; known: {', '.join(PERMISSIONS)}",
                code="unknown_permission",
            )
        if not perms:
            raise Invalid("a role needs at least one permission")
        if not name or len(name) > 100 or not name.replace("-", "").replace("_", "").isalnum():
            raise Invalid("a role name is 1 to 100 letters, digits, '-' or '_'")
        async with self.db.transaction() as uow:
            if await uow.session.scalar(select(Role.id).where(Role.name == name)):
                raise Conflict(f"role {name!r} exists")
            role = Role(name=name, permissions=perms, description=description[:500])
            uow.session.add(role)
            await uow.session.flush()
            return RoleOut(
                id=role.id,
                name=name,
                description=role.description,
                permissions=perms,
                builtin=False,
                users=0,
            )

    async def delete_role(self, name: str) -> None:
        """Delete a custom role (its grants go with it)."""
        async with self.db.transaction() as uow:
            role = await uow.session.scalar(select(Role).where(Role.name == name))
            if role is None:
                raise NotFound(f"no role {name!r}")
            if role.builtin:
                raise Conflict(f"{name!r} is a built-in role")
            await uow.session.delete(role)

    async def list_roles(self) -> list[RoleOut]:
        """Every role with the number of users holding it."""
        async with self.db.read() as s:
            counts = dict(
                (
                    await s.execute(
                        select(
                            RoleGrant.role_id, func.count(func.distinct(RoleGrant.user_id))
                        ).group_by(RoleGrant.role_id)
                    )
                ).all()
            )
            roles = (await s.scalars(select(Role).order_by(Role.builtin.desc(), Role.name))).all()
            return [
                RoleOut(
                    id=r.id,
                    name=r.name,
                    description=r.description,
                    permissions=sorted(r.permissions),
                    builtin=r.builtin,
                    users=int(counts.get(r.id, 0)),
                )
                for r in roles
            ]

    async def grant(self, username: str, role: str, groups: Sequence[str] = ()) -> UserOut:
        """Give a user a role, everywhere or only on the named device groups."""
        async with self.db.transaction() as uow:
            s = uow.session
            uid = await self._user_id(s, username)
            await self._grant(s, uid, role, groups, "local")
            return (await self._users_out(s, [uid]))[0]

    async def revoke_grant(self, username: str, grant_id: int) -> UserOut:
        """Take a grant away (the last everywhere-admin cannot lose it)."""
        async with self.db.transaction() as uow:
            s = uow.session
            uid = await self._user_id(s, username)
            g = await s.get(RoleGrant, grant_id)
            if g is None or g.user_id != uid:
                raise NotFound(f"{username!r} has no grant {grant_id}")
            await s.delete(g)
            await s.flush()
            await self._ensure_other_admin(s, None)
            return (await self._users_out(s, [uid]))[0]

    async def sync_directory(self) -> SyncReport:
        """Bring directory users in step with LDAP now (a SyncReport); Conflict without one."""
        from custos.accounts.sync import DirectoryLogin

        if not isinstance(self.directory, DirectoryLogin):
            raise Conflict("no directory is configured (ldap_url)", code="no_directory")
        return await self.directory.sync(self)

    # ------------------------------------------------------------------ tokens

    async def login(
        self, username: str, password: str, otp: str | None = None, remote: str = ""
    ) -> tuple[str, datetime]:
        """Check the credentials and issue a login API token (only its hash is stored)."""
        user_id = await self._check_credentials(username, password, otp, remote)
        return await self._issue_token(user_id, "login", "", self.token_ttl)

    async def create_token(self, who: Principal, name: str, days: int) -> tuple[str, TokenOut]:
        """A named API token of the caller, for scripts (shown once)."""
        if not name or len(name) > 100:
            raise Invalid("a token name is 1 to 100 characters")
        if not 1 <= days <= MAX_TOKEN_DAYS:
            raise Invalid(f"a token lives 1 to {MAX_TOKEN_DAYS} days")
        token, _ = await self._issue_token(who.user_id, "api", name, timedelta(days=days))
        async with self.db.read() as s:
            row = await s.scalar(
                select(ApiToken).where(ApiToken.token_hash == sha256_hex(token.encode()))
            )
            assert row is not None
            return token, _token_out(row)

    async def list_tokens(self, username: str) -> list[TokenOut]:
        """A user's unexpired tokens."""
        async with self.db.read() as s:
            uid = await self._user_id(s, username)
            rows = (
                await s.scalars(
                    select(ApiToken)
                    .where(ApiToken.user_id == uid, ApiToken.expires_at > utcnow())
                    .order_by(ApiToken.id)
                )
            ).all()
            return [_token_out(r) for r in rows]

    async def revoke_token(self, who: Principal, token_id: int) -> None:
        """Revoke one of the caller's tokens, or anybody's with users.manage."""
        async with self.db.transaction() as uow:
            row = await uow.session.get(ApiToken, token_id)
            if row is None or (
                row.user_id != who.user_id and not who.can_everywhere("users.manage")
            ):
                raise NotFound(f"no token {token_id}")
            await uow.session.delete(row)

    async def authenticate(self, token: str) -> Principal:
        """The principal behind a bearer token, or Unauthorized."""
        if not token.startswith(TOKEN_PREFIX) or len(token) > 200:
            raise Unauthorized("malformed API token", code="bad_token")
        async with self.db.read() as s:
            # the token, its user and the user's grants in one statement (every admin request)
            rows = (
                await s.execute(
                    _with_grants(
                        select(ApiToken.expires_at, User.id, User.username, User.is_active)
                        .join(User, User.id == ApiToken.user_id)
                        .where(ApiToken.token_hash == sha256_hex(token.encode()))
                    )
                )
            ).all()
            if not rows:
                raise Unauthorized("unknown API token; log in again", code="bad_token")
            expires_at, uid, username, active = rows[0][:4]
            if expires_at < utcnow():
                raise Unauthorized("API token expired; log in again", code="token_expired")
            if not active:
                raise Unauthorized("account disabled", code="account_disabled")
            return await self._principal(s, uid, username, "token", _grants_of(rows, 4))

    # ------------------------------------------------------------------ console sessions

    async def open_session(
        self, username: str, password: str, otp: str | None, remote: str
    ) -> SessionGrant:
        """Log in to the console: a session cookie secret and its CSRF token."""
        user_id = await self._check_credentials(username, password, otp, remote)
        secret = secrets.token_urlsafe(32)
        csrf = secrets.token_urlsafe(32)
        expires = utcnow() + self.session_ttl
        async with self.db.transaction() as uow:
            s = uow.session
            s.add(
                ConsoleSession(
                    user_id=user_id,
                    secret_hash=sha256_hex(secret.encode()),
                    csrf=csrf,
                    remote=remote[:64],
                    expires_at=expires,
                )
            )
            await s.execute(
                delete(ConsoleSession).where(
                    ConsoleSession.user_id == user_id, ConsoleSession.expires_at < utcnow()
                )
            )
            name = await s.scalar(select(User.username).where(User.id == user_id))
            principal = await self._principal(s, user_id, name or username, "session")
        return SessionGrant(secret, csrf, expires, principal)

    async def session_principal(self, secret: str) -> tuple[Principal, str]:
        """The principal and CSRF token of a console session, or Unauthorized."""
        if not secret or len(secret) > 200:
            raise Unauthorized("no console session", code="no_session")
        async with self.db.read() as s:
            rows = (
                await s.execute(
                    _with_grants(
                        select(
                            ConsoleSession.expires_at,
                            ConsoleSession.csrf,
                            User.id,
                            User.username,
                            User.is_active,
                        )
                        .join(User, User.id == ConsoleSession.user_id)
                        .where(ConsoleSession.secret_hash == sha256_hex(secret.encode()))
                    )
                )
            ).all()
            row = rows[0] if rows else None
            if row is None or row[0] < utcnow() or not row[4]:
                raise Unauthorized("session ended; log in again", code="no_session")
            grants = _grants_of(rows, 5)
            return await self._principal(s, row[2], row[3], "session", grants), row[1]

    async def close_session(self, secret: str) -> None:
        """Log out: the session cookie stops working."""
        async with self.db.transaction() as uow:
            await uow.session.execute(
                delete(ConsoleSession).where(
                    ConsoleSession.secret_hash == sha256_hex(secret.encode())
                )
            )

    # ------------------------------------------------------------------ TOTP

    async def totp_begin(self, who: Principal) -> tuple[str, str]:
        """Start TOTP enrolment: a new secret and its otpauth:// URI (pending until confirmed)."""
        secret = pyotp.random_base32()
        async with self.db.transaction() as uow:
            current = await uow.session.scalar(
                select(User.totp_secret).where(User.id == who.user_id)
            )
            if current and not current.startswith("pending:"):
                # replacing an active key would switch two-factor off until re-confirmed
                raise Conflict(
                    "two-factor sign-in is already on; an administrator can reset it",
                    code="totp_on",
                )
            await uow.session.execute(
                update(User)
                .where(User.id == who.user_id)
                .values(totp_secret="pending:" + self._seal(secret))
            )
        uri = pyotp.TOTP(secret).provisioning_uri(name=who.username, issuer_name="Custos")
        return secret, uri

    async def totp_confirm(self, who: Principal, code: str) -> None:
        """Turn TOTP on after the first correct code."""
        async with self.db.transaction() as uow:
            stored = await uow.session.scalar(
                select(User.totp_secret).where(User.id == who.user_id)
            )
            if not stored or not stored.startswith("pending:"):
                raise Conflict("start TOTP enrolment first", code="no_pending_totp")
            sealed = stored.removeprefix("pending:")
            if not pyotp.TOTP(self._open(sealed)).verify(code, valid_window=1):
                raise Invalid("wrong TOTP code", code="bad_otp")
            await uow.session.execute(
                update(User).where(User.id == who.user_id).values(totp_secret=sealed)
            )

    async def totp_reset(self, username: str) -> None:
        """Turn TOTP off for a user (an administrator's recovery action)."""
        async with self.db.transaction() as uow:
            uid = await self._user_id(uow.session, username)
            await uow.session.execute(update(User).where(User.id == uid).values(totp_secret=None))

    def _seal(self, secret: str) -> str:
        if self._aead is None:
            raise Conflict("TOTP needs the server's secret key", code="totp_unavailable")
        nonce = os.urandom(12)
        return base64.urlsafe_b64encode(
            nonce + self._aead.encrypt(nonce, secret.encode(), None)
        ).decode()

    def _open(self, sealed: str) -> str:
        if self._aead is None:
            raise Conflict("TOTP needs the server's secret key", code="totp_unavailable")
        raw = base64.urlsafe_b64decode(sealed)
        return self._aead.decrypt(raw[:12], raw[12:], None).decode()

    # ------------------------------------------------------------------ internals

    async def _check_credentials(
        self, username: str, password: str, otp: str | None, remote: str
    ) -> int:
        """The user id for good credentials; failures count towards lockout.

        The hash check (~0.1 s of CPU) runs in a thread and outside any transaction, and
        unknown users cost the same as known ones, so timing does not reveal usernames.
        """
        self._remote.check(remote)
        async with self.db.read() as s:
            row = (
                await s.execute(
                    select(
                        User.id,
                        User.password_hash,
                        User.is_active,
                        User.source,
                        User.locked_until,
                        User.totp_secret,
                    ).where(User.username == username)
                )
            ).first()
        now = utcnow()
        if row is not None and row.locked_until is not None and row.locked_until > now:
            wait = int((row.locked_until - now).total_seconds()) + 1
            raise TooManyRequests(
                "too many failed logins; the account is locked for a while", retry_after=wait
            )
        directory = self.directory
        if directory is not None and (row is None or row.source == "ldap"):
            from custos.accounts.sync import DirectoryLogin

            assert isinstance(directory, DirectoryLogin)
            user_id = await directory.login(self, username, password)
            if user_id is None:
                await self._failed(row.id if row is not None else None, remote)
                raise Unauthorized("wrong username or password", code="bad_credentials")
            return user_id
        stored = row.password_hash if row is not None and row.password_hash else _dummy_hash()
        ok = await asyncio.to_thread(_verify, stored, password)
        if not ok or row is None or not row.is_active:
            await self._failed(row.id if row is not None else None, remote)
            raise Unauthorized("wrong username or password", code="bad_credentials")
        if row.totp_secret and not row.totp_secret.startswith("pending:"):
            if not otp:
                raise Unauthorized("a TOTP code is required", code="otp_required")
            step = _totp_step(self._open(row.totp_secret), otp)
            if step is None or not await self._spend_totp_step(row.id, step):
                # a wrong code, or a right one already used (a replayed code is refused)
                await self._failed(row.id, remote)
                raise Unauthorized("wrong TOTP code", code="bad_otp")
        await self.logged_in(row.id)
        return int(row.id)

    async def _spend_totp_step(self, user_id: int, step: int) -> bool:
        """Mark a TOTP time step used; False if it (or a later one) was used already.

        One conditional UPDATE, so two server processes cannot both accept the same code.
        """
        async with self.db.transaction() as uow:
            used = await uow.session.scalar(
                update(User)
                .where(
                    User.id == user_id,
                    or_(User.totp_last_step.is_(None), User.totp_last_step < step),
                )
                .values(totp_last_step=step)
                .returning(User.id)
            )
        return used is not None

    async def logged_in(self, user_id: int) -> None:
        """Reset the failure count and note the time of a successful login."""
        async with self.db.transaction() as uow:
            await uow.session.execute(
                update(User)
                .where(User.id == user_id)
                .values(failed_logins=0, locked_until=None, last_login_at=utcnow())
            )

    async def _failed(self, user_id: int | None, remote: str) -> None:
        self._remote.failed(remote)
        if user_id is None:
            return
        async with self.db.transaction() as uow:
            s = uow.session
            fails = await s.scalar(
                update(User)
                .where(User.id == user_id)
                .values(failed_logins=User.failed_logins + 1)
                .returning(User.failed_logins)
            )
            if fails is not None and fails >= LOCK_AFTER:
                wait = min(LOCK_MAX_S, LOCK_BASE_S * 2 ** (fails - LOCK_AFTER))
                await s.execute(
                    update(User)
                    .where(User.id == user_id)
                    .values(locked_until=utcnow() + timedelta(seconds=wait))
                )

    async def _issue_token(
        self, user_id: int, kind: str, name: str, ttl: timedelta
    ) -> tuple[str, datetime]:
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        expires = utcnow() + ttl
        async with self.db.transaction() as uow:
            uow.session.add(
                ApiToken(
                    user_id=user_id,
                    token_hash=sha256_hex(token.encode()),
                    expires_at=expires,
                    kind=kind,
                    name=name,
                    prefix=token[: len(TOKEN_PREFIX) + 6],
                )
            )
            # housekeeping: expired tokens of this user go
            await uow.session.execute(
                delete(ApiToken).where(ApiToken.user_id == user_id, ApiToken.expires_at < utcnow())
            )
        return token, expires

    async def _principal(
        self,
        s: AsyncSession,
        uid: int,
        username: str,
        via: str,
        grants: Sequence[_Grant] | None = None,
    ) -> Principal:
        """The permissions of a user's grants (read here unless the caller has them)."""
        if grants is None:
            grants = _grants_of(
                (
                    await s.execute(
                        select(RoleGrant.id, RoleGrant.scoped, Role.name, Role.permissions)
                        .join(Role, Role.id == RoleGrant.role_id)
                        .where(RoleGrant.user_id == uid)
                    )
                ).all(),
                0,
            )
        rows = grants
        scoped_ids = [r.id for r in rows if r.scoped]
        groups_of: dict[int, set[int]] = defaultdict(set)
        if scoped_ids:
            for gid, group in (
                await s.execute(
                    select(role_grant_groups.c.grant_id, role_grant_groups.c.group_id).where(
                        role_grant_groups.c.grant_id.in_(scoped_ids)
                    )
                )
            ).all():
                groups_of[gid].add(group)
        everywhere: set[str] = set()
        scoped: dict[str, set[int]] = defaultdict(set)
        for r in rows:
            if r.scoped:
                for p in r.permissions:
                    if p in SCOPABLE:
                        scoped[p] |= groups_of[r.id]
            else:
                everywhere.update(r.permissions)
        return Principal(
            user_id=uid,
            username=username,
            role=",".join(sorted({r.name for r in rows})) or "none",
            permissions=frozenset(everywhere),
            scoped={p: frozenset(g) for p, g in scoped.items() if p not in everywhere and g},
            via=via,
        )

    async def principal_for(self, username: str, via: str = "cli") -> Principal:
        """The principal of a named user (for tools that act as that user)."""
        async with self.db.read() as s:
            uid = await self._user_id(s, username)
            return await self._principal(s, uid, username, via)

    async def _user_id(self, s: AsyncSession, username: str) -> int:
        uid = await s.scalar(select(User.id).where(User.username == username))
        if uid is None:
            raise NotFound(f"no user {username!r}")
        return int(uid)

    async def _grant(
        self, s: AsyncSession, uid: int, role: str, groups: Sequence[str], source: str
    ) -> None:
        role_id = await s.scalar(select(Role.id).where(Role.name == role))
        if role_id is None:
            raise NotFound(f"no role {role!r}", code="unknown_role")
        group_ids: list[int] = []
        if groups:
            found = dict(
                (await s.execute(select(Group.name, Group.id).where(Group.name.in_(groups)))).all()
            )
            if missing := sorted(set(groups) - found.keys()):
                raise NotFound(f"no group(s): {', '.join(missing)}", code="unknown_group")
            group_ids = sorted(found.values())
        grant_id = await s.scalar(
            insert(RoleGrant)
            .values(
                user_id=uid,
                role_id=role_id,
                scoped=bool(group_ids),
                source=source,
                created_at=utcnow(),
            )
            .returning(RoleGrant.id)
        )
        if group_ids:
            await s.execute(
                insert(role_grant_groups),
                [{"grant_id": grant_id, "group_id": g} for g in group_ids],
            )

    async def _ensure_other_admin(self, s: AsyncSession, leaving: int | None) -> None:
        """Refuse a change that would leave no active user able to manage users everywhere."""
        stmt = (
            select(func.count(func.distinct(User.id)))
            .join(RoleGrant, RoleGrant.user_id == User.id)
            .join(Role, Role.id == RoleGrant.role_id)
            .where(User.is_active.is_(True), RoleGrant.scoped.is_(False), Role.name == "admin")
        )
        if leaving is not None:
            stmt = stmt.where(User.id != leaving)
        if not await s.scalar(stmt):
            raise Conflict("this would leave no active administrator", code="last_admin")

    async def _end_access(self, s: AsyncSession, uids: Sequence[int]) -> None:
        await s.execute(delete(ApiToken).where(ApiToken.user_id.in_(uids)))
        await s.execute(delete(ConsoleSession).where(ConsoleSession.user_id.in_(uids)))

    async def _users_out(self, s: AsyncSession, ids: Sequence[int]) -> list[UserOut]:
        if not ids:
            return []
        users = {u.id: u for u in (await s.scalars(select(User).where(User.id.in_(ids)))).all()}
        grants = (
            await s.execute(
                select(RoleGrant.id, RoleGrant.user_id, RoleGrant.source, Role.name)
                .join(Role, Role.id == RoleGrant.role_id)
                .where(RoleGrant.user_id.in_(ids))
                .order_by(RoleGrant.id)
            )
        ).all()
        gnames: dict[int, list[str]] = defaultdict(list)
        if grants:
            for gid, name in (
                await s.execute(
                    select(role_grant_groups.c.grant_id, Group.name)
                    .join(Group, Group.id == role_grant_groups.c.group_id)
                    .where(role_grant_groups.c.grant_id.in_([g.id for g in grants]))
                    .order_by(Group.name)
                )
            ).all():
                gnames[gid].append(name)
        by_user: dict[int, list[GrantOut]] = defaultdict(list)
        for g in grants:
            by_user[g.user_id].append(
                GrantOut(id=g.id, role=g.name, groups=gnames[g.id], source=g.source)
            )
        out = []
        for uid in ids:
            u = users[uid]
            out.append(
                UserOut(
                    id=u.id,
                    username=u.username,
                    display_name=u.display_name,
                    email=u.email,
                    source=u.source,
                    is_active=u.is_active,
                    totp=bool(u.totp_secret) and not (u.totp_secret or "").startswith("pending:"),
                    grants=by_user[uid],
                    last_login_at=u.last_login_at,
                    created_at=u.created_at,
                )
            )
        return out


@dataclass(frozen=True)
class _Grant:
    id: int
    scoped: bool
    name: str
    permissions: list[str]


def _with_grants(stmt: Any) -> Any:
    """Add the user's grants (grant id, scoped, role name, permissions) to a query on User."""
    return (
        stmt.add_columns(RoleGrant.id, RoleGrant.scoped, Role.name, Role.permissions)
        .outerjoin(RoleGrant, RoleGrant.user_id == User.id)
        .outerjoin(Role, Role.id == RoleGrant.role_id)
    )


def _grants_of(rows: Sequence[Any], start: int) -> list[_Grant]:
    """The grants in rows whose grant columns begin at `start` (outer-join NULLs skipped)."""
    out = []
    for r in rows:
        gid, scoped, name, perms = r[start : start + 4]
        if gid is not None and name is not None:
            out.append(_Grant(gid, bool(scoped), name, list(perms or ())))
    return out


def _token_out(row: ApiToken) -> TokenOut:
    return TokenOut(
        id=row.id,
        name=row.name,
        kind=row.kind,
        prefix=row.prefix,
        created_at=row.created_at,
        expires_at=row.expires_at,
    )


def same_secret(a: str, b: str) -> bool:
    """Constant-time comparison of two secrets (CSRF tokens)."""
    return hmac.compare_digest(a.encode(), b.encode())
