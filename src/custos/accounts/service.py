"""Use cases for administrator accounts: first admin, login, API token checks."""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError

from custos.accounts.models import ApiToken, User
from custos.db.base import utcnow
from custos.db.engine import Database
from custos.devices.ca import sha256_hex
from custos.errors import Conflict, Invalid, Unauthorized

_hasher = PasswordHasher()
_DUMMY: list[str] = []


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


TOKEN_PREFIX = "cst_"  # noqa: S105 - a marker, not a secret


@dataclass(frozen=True)
class Principal:
    """Who is making an admin request."""

    user_id: int
    username: str
    role: str


class AccountService:
    """Creates users and turns passwords into API tokens and tokens into principals."""

    def __init__(self, db: Database, token_ttl_s: int) -> None:
        self.db = db
        self.token_ttl = timedelta(seconds=token_ttl_s)

    async def ensure_admin(self, password: str | None) -> str | None:
        """Create the 'admin' account on first start; return the password if it was generated."""
        generated = None
        try:
            async with self.db.transaction() as uow:
                existing = await uow.session.scalar(select(User.id).limit(1))
                if existing is not None:
                    return None
                if not password:
                    generated = password = secrets.token_urlsafe(12)
                uow.session.add(
                    User(username="admin", password_hash=_hasher.hash(password), role="admin")
                )
        except IntegrityError:
            return None  # another process starting at the same time created it
        return generated

    async def create_user(self, username: str, password: str, role: str = "admin") -> int:
        """A new local user."""
        if not username or len(username) > 150:
            raise Invalid("a username is 1 to 150 characters")
        if len(password) < 8:
            raise Invalid("a password has at least 8 characters")
        async with self.db.transaction() as uow:
            if await uow.session.scalar(select(User.id).where(User.username == username)):
                raise Conflict(f"user {username!r} exists")
            user = User(username=username, password_hash=_hasher.hash(password), role=role)
            uow.session.add(user)
            await uow.session.flush()
            return user.id

    async def login(self, username: str, password: str) -> tuple[str, datetime]:
        """Check the password and issue an API token (only its hash is stored).

        The hash check (~0.1 s of CPU) runs in a thread and outside any transaction, and
        unknown users cost the same as known ones, so timing does not reveal usernames.
        """
        async with self.db.read() as s:
            row = (
                await s.execute(
                    select(User.id, User.password_hash, User.is_active).where(
                        User.username == username
                    )
                )
            ).first()
        stored = row[1] if row is not None else _dummy_hash()
        ok = await asyncio.to_thread(_verify, stored, password)
        if not ok or row is None or not row[2]:
            raise Unauthorized("wrong username or password", code="bad_credentials")
        user_id = row[0]
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        expires = utcnow() + self.token_ttl
        async with self.db.transaction() as uow:
            uow.session.add(
                ApiToken(user_id=user_id, token_hash=sha256_hex(token.encode()), expires_at=expires)
            )
            # housekeeping: expired tokens of this user go
            await uow.session.execute(
                delete(ApiToken).where(ApiToken.user_id == user_id, ApiToken.expires_at < utcnow())
            )
        return token, expires

    async def authenticate(self, token: str) -> Principal:
        """The principal behind a bearer token, or Unauthorized."""
        if not token.startswith(TOKEN_PREFIX) or len(token) > 200:
            raise Unauthorized("malformed API token", code="bad_token")
        async with self.db.read() as s:
            row = (
                await s.execute(
                    select(ApiToken.expires_at, User.id, User.username, User.role, User.is_active)
                    .join(User, User.id == ApiToken.user_id)
                    .where(ApiToken.token_hash == sha256_hex(token.encode()))
                )
            ).first()
        if row is None:
            raise Unauthorized("unknown API token; log in again", code="bad_token")
        expires_at, uid, username, role, active = row
        if expires_at < utcnow():
            raise Unauthorized("API token expired; log in again", code="token_expired")
        if not active:
            raise Unauthorized("account disabled", code="account_disabled")
        return Principal(user_id=uid, username=username, role=role)
