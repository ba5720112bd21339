"""OMA DM admin API bodies: accounts and raw node operations."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from custos.validation import SafeStr

NODE_URI = r"^\.(/[^/\x00-\x1f]{1,255}){0,31}/?$"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AccountCreate(Strict):
    """An OMA DM device: its DevId and how each side proves itself."""

    dev_id: SafeStr = Field(min_length=1, max_length=255)
    name: SafeStr | None = Field(default=None, max_length=255)
    auth: Literal["basic", "md5", "hmac", "cert"] = "md5"
    # printable, without the quote and comma that would break the x-syncml-hmac header
    client_name: SafeStr | None = Field(default=None, max_length=100, pattern=r'^[^",\s]+$')
    client_password: SafeStr | None = Field(default=None, min_length=8, max_length=200)
    server_password: SafeStr | None = Field(default=None, min_length=8, max_length=200)
    group: SafeStr | None = Field(default=None, max_length=100)
    notify_url: str = Field(default="", max_length=500)


class AccountCreated(BaseModel):
    """What the device must be bootstrapped with (its DMAcc), shown this once."""

    device_id: str
    dev_id: str
    name: str
    auth: str
    server_id: str
    server_url: str
    client_name: str
    client_password: str
    server_password: str
    client_nonce: str
    server_nonce: str
    certificate: str
    private_key: str
    ca_certificate: str


class AccountOut(BaseModel):
    device_id: str
    name: str
    dev_id: str
    auth: str
    server_id: str
    client_name: str
    last_session_at: datetime | None
    inventory_at: datetime | None
    notified_at: datetime | None
    locked_until: datetime | None


class NodeOp(Strict):
    """One DM command on one node."""

    verb: Literal["Get", "Replace", "Add", "Delete", "Exec", "Copy"]
    target: str = Field(pattern=NODE_URI, max_length=1000)
    data: str | None = Field(default=None, max_length=1024 * 1024)
    format: (
        Literal["chr", "int", "bool", "b64", "bin", "xml", "node", "float", "date", "time"] | None
    ) = None
    type: str | None = Field(default=None, max_length=200)
    source: str | None = Field(default=None, pattern=NODE_URI, max_length=1000)

    @model_validator(mode="after")
    def _shape(self) -> NodeOp:
        if self.verb == "Copy" and not self.source:
            raise ValueError("Copy needs a source node")
        if self.verb in ("Get", "Delete") and self.data is not None:
            raise ValueError(f"{self.verb} takes no data")
        return self


UI_ALERTS = {
    "display": "1100",
    "confirm": "1101",
    "input": "1102",
    "single": "1103",
    "multi": "1104",
}


class UserAlert(Strict):
    """A user interaction on the device (DM 1.2 Alerts 1100-1104), answered in its Status."""

    kind: Literal["display", "confirm", "input", "single", "multi"]
    text: SafeStr = Field(min_length=1, max_length=1000)
    choices: list[Annotated[SafeStr, Field(min_length=1, max_length=200)]] = Field(
        default_factory=list, max_length=20
    )
    min_display_s: int | None = Field(default=None, ge=1, le=3600)
    max_display_s: int | None = Field(default=None, ge=1, le=86400)
    default: SafeStr | None = Field(default=None, max_length=200)
    notify: bool = True

    @model_validator(mode="after")
    def _shape(self) -> UserAlert:
        if self.kind in ("single", "multi") and len(self.choices) < 2:
            raise ValueError(f"a {self.kind} choice needs at least two choices")
        if self.kind not in ("single", "multi") and self.choices:
            raise ValueError(f"{self.kind} takes no choices")
        return self

    def op(self) -> dict[str, Any]:
        """The alert as a node-operation payload entry (delivered like the others)."""
        opts = []
        if self.min_display_s:
            opts.append(f"MINDT={self.min_display_s}")
        if self.max_display_s:
            opts.append(f"MAXDT={self.max_display_s}")
        if self.default is not None:
            opts.append(f"DR={self.default}")
        return {
            "verb": "Alert",
            "target": "./",
            "code": UI_ALERTS[self.kind],
            "items": ["&".join(opts), self.text, *self.choices],
        }


class OpsRequest(Strict):
    """Node operations for one device, sent in its next session (atomic: all or none)."""

    ops: list[NodeOp] = Field(min_length=1, max_length=100)
    # Atomic: all or none; Sequence: in this order, the device stops at the first failure
    atomic: bool = False
    sequence: bool = False
    notify: bool = True

    @model_validator(mode="after")
    def _one_container(self) -> OpsRequest:
        if self.atomic and self.sequence:
            raise ValueError("choose atomic or sequence, not both")
        return self


class RotateRequest(Strict):
    """Rotate a device's DM account secrets (DMAcc) in its next session."""

    notify: bool = True


class OpsQueued(BaseModel):
    command_id: str
    run_id: str
    device_id: str
    notified: bool
    notify_detail: str
