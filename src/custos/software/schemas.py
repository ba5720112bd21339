"""Wire types for packages, labels and deployments: what admins send, what agents report."""

from __future__ import annotations

from datetime import datetime
from itertools import pairwise
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from custos.scheduling import ScheduleError, parse_window
from custos.scheduling import Window as WindowCalc
from custos.tasks.schemas import WindowIn
from custos.validation import AwareTime, ReportedStr, SafeStr

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._+-]*$"
DEVICE_STATES = (
    "pending", "queued", "downloading", "downloaded", "installing", "installed", "removing",
    "removed", "failed", "cancelled",
)  # fmt: skip
# what a device may report (the server sets pending/queued/cancelled)
REPORTED_STATES = (
    "downloading", "downloaded", "installing", "installed", "removing", "removed", "failed",
)  # fmt: skip
MAX_LOG = 65_536


class Strict(BaseModel):
    """Unknown fields are an error."""

    model_config = ConfigDict(extra="forbid")


class PackageOut(BaseModel):
    """A package version as the API shows it."""

    id: str
    name: str
    version: str
    format: str
    sha256: str
    size: int
    filename: str
    platforms: list[str]
    created_by: str
    created_at: datetime
    stored_bytes: int | None = None


class PackageDetail(PackageOut):
    """With its signed descriptor and what inspection found."""

    descriptor: dict[str, Any]
    signature: str
    metadata: dict[str, Any]
    deployments: list[str] = []


class LabelCreate(Strict):
    """A saved query over inventory: every condition must hold."""

    name: str = Field(min_length=1, max_length=100, pattern=NAME_PATTERN)
    conditions: list[Annotated[SafeStr, Field(max_length=800)]] = Field(
        min_length=1, max_length=20, description="e.g. 'os.name = Debian', 'hw.model ~ ^X1'"
    )
    description: SafeStr = Field(default="", max_length=500)


class LabelOut(BaseModel):
    """A label and how many devices it holds now."""

    id: str
    name: str
    query: list[dict[str, Any]]
    text: str
    description: str
    devices: int


class Targets(Strict):
    """Who a deployment is for: any mix of devices, groups and labels."""

    devices: list[Annotated[SafeStr, Field(max_length=100)]] = Field(default=[], max_length=10_000)
    groups: list[Annotated[SafeStr, Field(max_length=100)]] = Field(default=[], max_length=100)
    labels: list[Annotated[SafeStr, Field(max_length=100)]] = Field(default=[], max_length=100)

    @model_validator(mode="after")
    def _some(self) -> Targets:
        if not (self.devices or self.groups or self.labels):
            raise ValueError("name at least one device, group or label")
        return self


class DeploymentCreate(Strict):
    """Install (or remove) a package on targets, in waves, on a schedule."""

    package: SafeStr = Field(
        min_length=1, max_length=210, description="package id, NAME (newest) or NAME==VERSION"
    )
    name: str | None = Field(default=None, min_length=1, max_length=100, pattern=NAME_PATTERN)
    targets: Targets
    action: Literal["install", "uninstall"] = "install"
    mode: Literal["required", "available"] = "required"
    download_at: AwareTime | None = None
    activate_at: AwareTime | None = None
    window: WindowIn | Annotated[SafeStr, Field(max_length=200)] | None = Field(
        default=None, description="object, or text like 'mon-fri 01:00-05:00 Europe/Paris'"
    )
    waves: list[Annotated[int, Field(ge=1, le=100)]] = Field(
        default_factory=lambda: [100], min_length=1, max_length=20,
        description="cumulative percentages of the targets, ending at 100, e.g. [10, 50, 100]",
    )  # fmt: skip
    success_threshold: float = Field(
        default=90.0, ge=0, le=100, description="% of a wave installed before the next starts"
    )
    failure_threshold: float = Field(
        default=20.0, gt=0, le=100, description="% of attempted devices failed: pause"
    )
    auto_upgrade: bool = Field(default=False, description="follow the newest version of NAME")
    limit_bps: int | None = Field(default=None, ge=1024, le=10 * 1024**3)

    @field_validator("waves")
    @classmethod
    def _waves(cls, v: list[int]) -> list[int]:
        if any(b <= a for a, b in pairwise(v)) or v[-1] != 100:
            raise ValueError("waves must rise strictly and end at 100")
        return v

    @model_validator(mode="after")
    def _check(self) -> DeploymentCreate:
        if (
            self.download_at is not None
            and self.activate_at is not None
            and self.activate_at < self.download_at
        ):
            raise ValueError("activate_at is before download_at")
        if self.action == "uninstall" and self.mode == "available":
            raise ValueError("a removal cannot be offered in the catalogue")
        try:
            if isinstance(self.window, str):
                self.window = WindowIn(**parse_window(self.window, "UTC"))
            if self.window is not None:
                WindowCalc.from_doc(self.window.model_dump())
        except ScheduleError as exc:
            raise ValueError(str(exc)) from None
        return self

    def window_doc(self) -> dict[str, Any] | None:
        """The window document, if any."""
        if self.window is None or isinstance(self.window, str):
            return None
        return {**self.window.model_dump(), "days": sorted(set(self.window.days))}


class DeploymentOut(BaseModel):
    """A deployment with counts of its devices by state."""

    id: str
    name: str
    package_id: str
    package: str
    action: str
    mode: str
    targets: dict[str, Any]
    state: str
    state_reason: str
    waves: list[int]
    current_wave: int
    success_threshold: float
    failure_threshold: float
    auto_upgrade: bool
    limit_bps: int | None
    download_at: datetime | None
    activate_at: datetime | None
    window: dict[str, Any] | None
    counts: dict[str, int]
    created_by: str
    created_at: datetime


class DeploymentDeviceOut(BaseModel):
    """One device's status in a deployment."""

    device_id: str
    hostname: str
    wave: int
    state: str
    progress: int
    version: str | None
    detail: str
    log: str
    attempts: int
    updated_at: datetime


class DeploymentDetail(DeploymentOut):
    """With per-device status."""

    devices: list[DeploymentDeviceOut]


class StatusReport(Strict):
    """A device reporting progress on one deployment (cleaned, never refused for its text)."""

    # a deployment's id, or `policy:…` for an install a policy's self-healing started
    deployment_id: str = Field(min_length=1, max_length=200)
    package_id: str = Field(min_length=1, max_length=32)
    state: Literal[
        "downloading", "downloaded", "installing", "installed", "removing", "removed", "failed"
    ]
    progress: int = Field(default=0, ge=0, le=100)
    detail: ReportedStr = ""
    log: ReportedStr = ""

    @field_validator("log")
    @classmethod
    def _cap(cls, v: str) -> str:
        return v[-MAX_LOG:]

    @field_validator("detail")
    @classmethod
    def _cap_detail(cls, v: str) -> str:
        return v[:2000]


class TransferRequest(Strict):
    """A device asking how to get a package: from nothing, or from a version it holds."""

    package_id: str = Field(min_length=1, max_length=32)
    base_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")


class CatalogInstall(Strict):
    """A device (its user) asking for a catalogue package."""

    name: str = Field(min_length=1, max_length=100, pattern=NAME_PATTERN)
