"""Wire types for logging in, users, roles, grants, API tokens and TOTP."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from custos.validation import SafeStr

_NAME = r"^[A-Za-z0-9][A-Za-z0-9._@-]*$"


class LoginRequest(BaseModel):
    """Username and password (and a TOTP code once the user has turned TOTP on)."""

    model_config = ConfigDict(extra="forbid")

    username: SafeStr = Field(min_length=1, max_length=150)
    password: SafeStr = Field(min_length=1, max_length=1024)
    otp: SafeStr | None = Field(default=None, max_length=10)


class LoginResponse(BaseModel):
    """A bearer token for the admin API."""

    token: str
    expires_at: datetime
    username: str


class Me(BaseModel):
    """The caller and what it may do."""

    username: str
    role: str
    permissions: list[str]
    scoped: dict[str, list[int]]


class GrantIn(BaseModel):
    """A role, everywhere (no groups) or on the named device groups."""

    model_config = ConfigDict(extra="forbid")

    role: SafeStr = Field(min_length=1, max_length=100)
    groups: list[SafeStr] = Field(default_factory=list, max_length=100)


class UserCreate(BaseModel):
    """A new local user."""

    model_config = ConfigDict(extra="forbid")

    username: SafeStr = Field(min_length=1, max_length=150, pattern=_NAME)
    password: SafeStr = Field(min_length=1, max_length=1024)
    roles: list[SafeStr] = Field(default_factory=lambda: ["helpdesk"], min_length=1, max_length=20)
    groups: list[SafeStr] = Field(default_factory=list, max_length=100)
    display_name: SafeStr = Field(default="", max_length=255)
    email: SafeStr = Field(default="", max_length=255)


class PasswordSet(BaseModel):
    """A new password."""

    model_config = ConfigDict(extra="forbid")

    password: SafeStr = Field(min_length=1, max_length=1024)


class OwnPasswordChange(BaseModel):
    """The caller's current password and the new one."""

    model_config = ConfigDict(extra="forbid")

    current: SafeStr = Field(min_length=1, max_length=1024)
    new: SafeStr = Field(min_length=1, max_length=1024)


class GrantOut(BaseModel):
    """One role a user holds."""

    id: int
    role: str
    groups: list[str]
    source: str


class UserOut(BaseModel):
    """A user (never a password or secret)."""

    id: int
    username: str
    display_name: str
    email: str
    source: str
    is_active: bool
    totp: bool
    grants: list[GrantOut]
    last_login_at: datetime | None
    created_at: datetime


class RoleCreate(BaseModel):
    """A custom role."""

    model_config = ConfigDict(extra="forbid")

    name: SafeStr = Field(min_length=1, max_length=100)
    permissions: list[SafeStr] = Field(min_length=1, max_length=100)
    description: SafeStr = Field(default="", max_length=500)


class RoleOut(BaseModel):
    """A role and how many users hold it."""

    id: int
    name: str
    description: str
    permissions: list[str]
    builtin: bool
    users: int


class PermissionOut(BaseModel):
    """A permission and what it allows."""

    name: str
    description: str
    scopable: bool


class ApiTokenCreate(BaseModel):
    """A named API token for scripts."""

    model_config = ConfigDict(extra="forbid")

    name: SafeStr = Field(min_length=1, max_length=100)
    days: int = Field(default=90, ge=1, le=3650)


class ApiTokenOut(BaseModel):
    """An API token as listed."""

    id: int
    name: str
    kind: str
    prefix: str
    created_at: datetime
    expires_at: datetime


class ApiTokenCreated(ApiTokenOut):
    """A new API token; the secret is in this response only."""

    token: str


class DirectorySyncOut(BaseModel):
    """What a directory sync changed."""

    seen: int
    created: int
    updated: int
    disabled: int


class TotpBegin(BaseModel):
    """A TOTP secret to put in an authenticator app (shown once)."""

    secret: str
    uri: str


class TotpConfirm(BaseModel):
    """The first code from the authenticator app."""

    model_config = ConfigDict(extra="forbid")

    code: SafeStr = Field(min_length=6, max_length=10)
