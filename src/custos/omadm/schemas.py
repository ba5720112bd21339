"""OMA DM admin API bodies: accounts and raw node operations."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

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
    client_name: SafeStr | None = Field(default=None, max_length=100)
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


class OpsRequest(Strict):
    """Node operations for one device, sent in its next session (atomic: all or none)."""

    ops: list[NodeOp] = Field(min_length=1, max_length=100)
    atomic: bool = False
    notify: bool = True


class OpsQueued(BaseModel):
    command_id: str
    run_id: str
    device_id: str
    notified: bool
    notify_detail: str
