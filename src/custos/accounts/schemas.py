"""Wire types for logging in."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from custos.validation import SafeStr


class LoginRequest(BaseModel):
    """Username and password."""

    model_config = ConfigDict(extra="forbid")

    username: SafeStr = Field(min_length=1, max_length=150)
    password: SafeStr = Field(min_length=1, max_length=1024)


class LoginResponse(BaseModel):
    """A bearer token for the admin API."""

    token: str
    expires_at: datetime
    username: str


class Me(BaseModel):
    """The caller."""

    username: str
    role: str
