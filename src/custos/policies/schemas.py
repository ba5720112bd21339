"""Wire types for policies, compliance and lost devices (admin API) and policy reports (agents)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from custos.validation import ReportedStr, ReportedTime, SafeStr

RULE_STATUSES = ("compliant", "repaired", "noncompliant", "error", "unsupported")
EVENT_KINDS = ("drift", "repaired", "repair_failed", "restored")
MAX_REPORT_RULES = 10_001  # a bundle's 10,000 rules and the agent's own guard
MAX_REPORT_EVENTS = 500
MAX_REPORT_BYTES = 1024 * 1024


class Strict(BaseModel):
    """Unknown fields are an error."""

    model_config = ConfigDict(extra="forbid")


class PolicyAdd(Strict):
    """A profile document (YAML or JSON text); a new version when the name exists."""

    document: SafeStr = Field(min_length=1, max_length=512 * 1024)


class AssignmentIn(Strict):
    """Assign a profile to every device, a group or a label."""

    kind: Literal["all", "group", "label"]
    target: SafeStr = Field(default="", max_length=100)
    priority: int = Field(default=0, ge=-1000, le=1000)

    @model_validator(mode="after")
    def _target(self) -> AssignmentIn:
        if self.kind == "all" and self.target:
            raise ValueError("an assignment to all devices names no target")
        if self.kind != "all" and not self.target:
            raise ValueError(f"a {self.kind} assignment names its {self.kind}")
        return self


class AssignmentOut(BaseModel):
    """One assignment."""

    kind: str
    target: str
    priority: int
    created_by: str
    created_at: datetime


class ComplianceCounts(BaseModel):
    """How many devices reached by a policy are in each state."""

    compliant: int = 0
    noncompliant: int = 0
    pending: int = 0


class PolicyOut(BaseModel):
    """A policy in a list."""

    id: str
    name: str
    description: str
    version: int
    rules: int
    assignments: list[AssignmentOut]
    devices: ComplianceCounts
    updated_at: datetime


class PolicyVersionOut(BaseModel):
    """One version of a policy."""

    version: int
    digest: str
    created_by: str
    created_at: datetime


class PolicyDetail(PolicyOut):
    """A policy with its document, source text and versions."""

    document: dict[str, Any]
    source: str
    versions: list[PolicyVersionOut]
    created: bool = False  # set by `add`: a new policy (not a new version)
    changed: bool = True  # set by `add`: false when the document was the same
    devices_updated: int = 0  # bundles queued by this change


class RuleStatusOut(BaseModel):
    """One rule on one device."""

    rule_id: str
    policy: str
    status: str
    detail: str
    source: str
    since: datetime
    checked_at: datetime


class ComplianceEventOut(BaseModel):
    """One history entry."""

    at: datetime
    rule_id: str
    policy: str
    kind: str
    detail: str


class DeviceCompliance(BaseModel):
    """A device's compliance: overall, per rule, recent history, lost/held state."""

    device_id: str
    device: str
    status: str
    status_since: datetime | None
    noncompliant_since: datetime | None
    bundle_sha: str
    profiles: list[dict[str, Any]]
    reported_at: datetime | None
    held: bool
    quarantine_group: str | None
    actions_done: list[str]
    lost: dict[str, Any] | None
    rules: list[RuleStatusOut]
    events: list[ComplianceEventOut]


class ComplianceRow(BaseModel):
    """A device in the compliance report."""

    device_id: str
    device: str
    status: str
    status_since: datetime | None
    noncompliant_since: datetime | None
    failing: list[str]
    policies: list[str]
    held: bool
    last_seen: datetime | None


class LostIn(Strict):
    """Mark a device lost: lock it and/or wipe it at its next contact."""

    lock: bool = True
    wipe: Literal["none", "selective", "full"] = "none"
    dry_run: bool = False
    auto_wipe_days: int | None = Field(default=None, ge=1, le=3650)
    message: SafeStr = Field(default="", max_length=500)
    confirm: SafeStr = Field(default="", max_length=255, description="the device's name, to wipe")


class WipeIn(Strict):
    """Wipe a device at its next contact."""

    mode: Literal["selective", "full"] = "selective"
    dry_run: bool = False
    confirm: SafeStr = Field(default="", max_length=255, description="the device's name")


class LockIn(Strict):
    """Lock a device at its next contact."""

    message: SafeStr = Field(default="", max_length=500)


class WipeOut(BaseModel):
    """One wipe order."""

    id: str
    device_id: str
    device: str
    run_id: str
    mode: str
    dry_run: bool
    reason: str
    requested_by: str
    requested_at: datetime
    state: str
    result: dict[str, Any] | None
    finished_at: datetime | None


class LostOut(BaseModel):
    """A device's lost state after a change."""

    device_id: str
    device: str
    state: str
    lock: bool
    wipe: str
    dry_run: bool
    auto_wipe_days: int | None
    lock_run_id: str | None
    wipe_order: WipeOut | None
    marked_by: str
    marked_at: datetime


# --- what agents send --------------------------------------------------------------------

ShortText = Annotated[ReportedStr, Field(max_length=1000)]


class RuleReport(BaseModel):
    """The status of one rule after an evaluation."""

    model_config = ConfigDict(extra="ignore")

    id: Annotated[ReportedStr, Field(min_length=1, max_length=1200)]
    status: Literal["compliant", "repaired", "noncompliant", "error", "unsupported"]
    detail: ShortText = ""


class EventReport(BaseModel):
    """A drift or repair the agent saw."""

    model_config = ConfigDict(extra="ignore")

    rule_id: Annotated[ReportedStr, Field(min_length=1, max_length=1200)]
    kind: Literal["drift", "repaired", "repair_failed", "restored"]
    detail: ShortText = ""
    at: ReportedTime = None


class PolicyReport(BaseModel):
    """One evaluation's outcome on a device (idempotent by its sequence number)."""

    model_config = ConfigDict(extra="ignore")

    seq: int = Field(ge=1, le=2**62)
    bundle_sha: str = Field(max_length=64, pattern=r"^[0-9a-f]{0,64}$")
    evaluated_at: ReportedTime = None
    clock_offset_s: float | None = Field(default=None, ge=-1e9, le=1e9)
    rules: list[RuleReport] = Field(default_factory=list, max_length=MAX_REPORT_RULES)
    events: list[EventReport] = Field(default_factory=list, max_length=MAX_REPORT_EVENTS)
