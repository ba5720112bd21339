"""Wire types of the webhook admin API."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

NAME_PATTERN = r"^[a-z0-9._-]{1,100}$"
MAX_URL = 2000
MAX_EVENTS = 20


class Strict(BaseModel):
    """Unknown fields are an error."""

    model_config = ConfigDict(extra="forbid")


class WebhookCreate(Strict):
    """A new webhook; without a secret the server makes one (returned once)."""

    name: str = Field(pattern=NAME_PATTERN, max_length=100)
    url: str = Field(min_length=1, max_length=MAX_URL)
    events: list[str] = Field(min_length=1, max_length=MAX_EVENTS)
    secret: str | None = Field(default=None, min_length=16, max_length=200)


class WebhookOut(BaseModel):
    """A webhook as listed (never its secret)."""

    id: int
    name: str
    url: str
    events: list[str]
    enabled: bool
    created_by: str
    created_at: datetime
    pending: int = 0
    failed: int = 0
    last_delivery_at: datetime | None = None


class WebhookCreated(WebhookOut):
    """The created webhook with its signing secret: shown this once only."""

    secret: str


class DeliveryOut(BaseModel):
    """One delivery of one event to one webhook, with the outcome of its last attempt."""

    id: str
    webhook: str
    event: str
    state: str
    attempts: int
    created_at: datetime
    next_attempt_at: datetime | None
    last_attempt_at: datetime | None
    delivered_at: datetime | None
    status_code: int | None
    duration_ms: int | None
    error: str
    response: str
    redelivery_of: str | None
    data: dict[str, Any]
