"""Wire types for enrolment, devices, groups, inventory and check-in."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from custos.commands.schemas import DeliveredCommand, RunResult
from custos.push.schemas import PushDescriptor
from custos.tasks.schemas import TaskResult, TaskResultRef
from custos.validation import ReportedStr, SafeStr, clean_text

INV_MAX_KEYS = 50_000
INV_MAX_KEY_LEN = 512
INV_MAX_VALUE_LEN = 4096
FACTS_MAX_KEYS = 64


def _check_flat_map(v: dict[str, str], max_keys: int) -> dict[str, str]:
    if len(v) > max_keys:
        raise ValueError(f"at most {max_keys} keys")
    for k, val in v.items():
        if not k or len(k) > INV_MAX_KEY_LEN:
            raise ValueError(f"keys are 1 to {INV_MAX_KEY_LEN} characters")
        if len(val) > INV_MAX_VALUE_LEN:
            raise ValueError(f"value of {k[:60]!r} is longer than {INV_MAX_VALUE_LEN}")
    if any("\x00" in k or "\x00" in val for k, val in v.items()):
        return {clean_text(k): clean_text(val) for k, val in v.items()}
    return v


class Strict(BaseModel):
    """Unknown fields are an error, not silently dropped."""

    model_config = ConfigDict(extra="forbid")


class TokenCreate(Strict):
    """Create an enrolment token."""

    group: SafeStr | None = Field(default=None, max_length=100)
    uses: int | None = Field(default=1, ge=1, le=1_000_000, description="null: unlimited")
    expires_in_s: int | None = Field(default=7 * 86400, ge=60, le=10 * 365 * 86400)
    note: SafeStr = Field(default="", max_length=500)


class TokenOut(BaseModel):
    """An enrolment token as listed (never the secret)."""

    id: int
    prefix: str
    state: str
    max_uses: int | None
    uses: int
    expires_at: datetime | None
    group: str | None
    note: str
    created_by: str
    created_at: datetime
    revoked_at: datetime | None


class TokenCreated(TokenOut):
    """A new token: the secret is shown this once."""

    token: str
    ca_fingerprint: str
    enroll_command: str


class EnrollRequest(Strict):
    """What an agent sends to enrol."""

    token: SafeStr = Field(min_length=1, max_length=200)
    csr: SafeStr = Field(min_length=1, max_length=16_384)
    name: SafeStr | None = Field(default=None, max_length=255)
    facts: dict[str, Annotated[str, Field(max_length=INV_MAX_VALUE_LEN)]] = Field(
        default_factory=dict
    )
    agent_version: SafeStr = Field(default="", max_length=50)

    @field_validator("facts")
    @classmethod
    def _facts(cls, v: dict[str, str]) -> dict[str, str]:
        return _check_flat_map(v, FACTS_MAX_KEYS)


class EnrollResponse(BaseModel):
    """The device's new identity."""

    device_id: str
    certificate: str
    ca_certificate: str
    checkin_interval: int


class InventoryDelta(Strict):
    """Inventory changes since the version the server last acknowledged (or a full snapshot)."""

    base: int = Field(ge=0)
    full: bool = False
    set: dict[str, str] = Field(default_factory=dict)
    remove: list[Annotated[ReportedStr, Field(max_length=INV_MAX_KEY_LEN)]] = Field(
        default_factory=list, max_length=INV_MAX_KEYS
    )

    @field_validator("set")
    @classmethod
    def _set(cls, v: dict[str, str]) -> dict[str, str]:
        return _check_flat_map(v, INV_MAX_KEYS)


class CheckinRequest(Strict):
    """One check-in: results, acknowledgements, inventory changes."""

    agent_version: ReportedStr = Field(default="", max_length=50)
    # set when a push nudge triggered this check-in: look for work whatever the index says
    wake: bool = False
    inventory: InventoryDelta | None = None
    results: list[RunResult] = Field(default_factory=list, max_length=200)
    acks: list[Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]] = Field(
        default_factory=list, max_length=500
    )
    # occurrences of scheduled tasks, oldest first (see tasks/; outbox order, per-task seq)
    task_results: list[TaskResult] = Field(default_factory=list, max_length=200)


class CheckinResponse(BaseModel):
    """Work for the device and the server's view of its inventory."""

    commands: list[DeliveredCommand]
    accepted_results: list[str]
    inventory_version: int
    inventory_resync: bool
    checkin_interval: int
    server_time: float
    accepted_task_results: list[TaskResultRef] = Field(default_factory=list)
    # where to listen for wake nudges; absent or null: the server's WebSocket
    push: PushDescriptor | None = None


class SessionOut(BaseModel):
    """A session key for HMAC-signed device requests (see docs/agent-protocol.md)."""

    token: str
    key: str
    expires_at: int
    server_time: float


class GroupCreate(Strict):
    """Create a group."""

    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    description: SafeStr = Field(default="", max_length=500)


class GroupOut(BaseModel):
    """A group with its size."""

    id: int
    name: str
    description: str
    devices: int


class GroupMembers(Strict):
    """Devices (ids or names) to add to a group."""

    devices: list[Annotated[SafeStr, Field(max_length=255)]] = Field(
        min_length=1, max_length=10_000
    )


class DeviceOut(BaseModel):
    """A device as listed."""

    id: str
    name: str
    status: str
    os: str
    model: str
    last_seen: datetime | None
    enrolled_at: datetime
    agent_version: str
    groups: list[str]


class DeviceDetail(DeviceOut):
    """A device with its identity, facts and current inventory."""

    facts: dict[str, Any]
    inventory: dict[str, str]
    inventory_version: int
    inventory_updated_at: datetime | None
    cert_serial: str
    cert_not_after: datetime
    retired_at: datetime | None
    clock_skew_s: float | None


class InventoryChangeOut(BaseModel):
    """One changed inventory key."""

    version: int
    at: datetime
    key: str
    old: str | None
    new: str | None
