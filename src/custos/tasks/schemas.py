"""Wire types for scheduled tasks: what admins send, what the API shows, what agents report."""

from __future__ import annotations

import math
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from custos.scheduling import ScheduleError, check_cron, parse_window, zone
from custos.scheduling import Window as WindowCalc
from custos.validation import ReportedExitCode, ReportedStr, ReportedTime, SafeStr

TASK_KINDS = ("exec", "script")
REPORTED_STATES = ("succeeded", "failed", "missed", "interrupted", "rejected")
# what one task run may carry back (the agent captures 32 KiB per stream)
MAX_TASK_OUTPUT = 65_536
MAX_CLOCK_OFFSET_S = 10 * 365 * 86400.0


class Strict(BaseModel):
    """Unknown fields are an error."""

    model_config = ConfigDict(extra="forbid")


class WindowIn(Strict):
    """A maintenance window: occurrences start only inside it."""

    days: list[Annotated[int, Field(ge=0, le=6)]] = Field(
        default_factory=lambda: list(range(7)), min_length=1, max_length=7,
        description="weekdays, 0 = Monday",
    )  # fmt: skip
    start: str = Field(pattern=r"^([01]?\d|2[0-3]):[0-5]\d$", description="HH:MM, inclusive")
    end: str = Field(pattern=r"^([01]?\d|2[0-3]):[0-5]\d$", description="HH:MM, exclusive")
    timezone: SafeStr = Field(default="UTC", max_length=64)


class TaskCreate(Strict):
    """Create a scheduled task on a device, several devices or a group."""

    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    target: SafeStr = Field(
        min_length=1, max_length=300, description="device id or name, list, or group:NAME"
    )
    kind: Literal["exec", "script"]
    argv: list[Annotated[SafeStr, Field(max_length=32_768)]] | None = Field(
        default=None, max_length=1000
    )
    interpreter: Literal["sh", "python", "powershell"] | None = None
    script: SafeStr | None = Field(default=None, max_length=1_048_576)
    args: list[Annotated[SafeStr, Field(max_length=32_768)]] = Field(
        default_factory=list, max_length=1000
    )
    timeout_s: float = Field(default=3600, gt=0, le=86_400)
    cron: SafeStr | None = Field(default=None, max_length=200, description="5-field cron")
    every_s: int | None = Field(default=None, ge=1, le=366 * 86400)
    timezone: SafeStr = Field(default="UTC", max_length=64, description="zone of the cron")
    window: WindowIn | Annotated[SafeStr, Field(max_length=200)] | None = Field(
        default=None, description="object, or text like 'mon-fri 01:00-05:00 Europe/Paris'"
    )
    misfire_grace_s: int = Field(default=3600, ge=0, le=30 * 86400)
    enabled: bool = True

    @model_validator(mode="after")
    def _check(self) -> TaskCreate:
        if self.kind == "exec" and not self.argv:
            raise ValueError("exec needs argv")
        if self.kind == "script" and (not self.interpreter or self.script is None):
            raise ValueError("script needs interpreter and script")
        if (self.cron is None) == (self.every_s is None):
            raise ValueError("give exactly one of cron and every_s")
        try:
            zone(self.timezone)
            if self.cron is not None:
                self.cron = check_cron(self.cron)
            if isinstance(self.window, str):
                self.window = WindowIn(**parse_window(self.window, self.timezone))
            if self.window is not None:
                WindowCalc.from_doc(self.window.model_dump())
        except ScheduleError as exc:
            raise ValueError(str(exc)) from None
        return self

    def action(self) -> dict[str, Any]:
        """What the agent runs."""
        if self.kind == "exec":
            return {"argv": self.argv}
        return {"interpreter": self.interpreter, "script": self.script, "args": self.args}

    def schedule_doc(self) -> dict[str, Any]:
        """The schedule document (cron or interval, and the cron's zone)."""
        if self.cron is not None:
            return {"cron": self.cron, "timezone": self.timezone}
        return {"every_s": self.every_s, "timezone": self.timezone}

    def window_doc(self) -> dict[str, Any] | None:
        """The window document, if any."""
        if self.window is None or isinstance(self.window, str):
            return None
        return {**self.window.model_dump(), "days": sorted(set(self.window.days))}


class TaskDeviceOut(BaseModel):
    """One target device of a task and what it last reported."""

    device_id: str
    device_name: str
    status: str
    clock_skew_s: float | None
    runs: int
    last_seq: int | None
    last_state: str | None
    last_scheduled_at: datetime | None
    last_started_at: datetime | None
    last_received_at: datetime | None
    last_clock_offset_s: float | None
    missing_seqs: int


class TaskOut(BaseModel):
    """A task as listed."""

    id: str
    name: str
    target: str
    kind: str
    action: dict[str, Any]
    timeout_s: float
    schedule: dict[str, Any]
    window: dict[str, Any] | None
    describe: str
    misfire_grace_s: int
    enabled: bool
    revision: int
    created_by: str
    created_at: datetime
    updated_at: datetime
    devices: int


class TaskDetail(TaskOut):
    """A task with its next occurrences (server clock) and every target device's last run."""

    next_runs: list[datetime]
    targets: list[TaskDeviceOut]


class TaskRunOut(BaseModel):
    """One reported occurrence, with the agent's times and the server-corrected ones."""

    task_id: str
    device_id: str
    device_name: str
    seq: int
    revision: int
    state: str
    scheduled_at: datetime | None
    missed_count: int
    first_missed_at: datetime | None
    agent_started_at: datetime | None
    agent_finished_at: datetime | None
    clock_offset_s: float | None
    started_at: datetime | None
    finished_at: datetime | None
    received_at: datetime
    delay_s: float | None
    exit_code: int | None
    stdout: str
    stderr: str
    truncated: bool
    error: str | None
    duration_s: float | None


def _lenient_float(v: Any) -> Any:
    """A reported number: dropped (None) when it is not a finite, plausible number."""
    if v is None or isinstance(v, bool):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError, OverflowError):
        return None
    return f if math.isfinite(f) and abs(f) <= MAX_CLOCK_OFFSET_S else None


ReportedFloat = Annotated[float | None, BeforeValidator(_lenient_float)]


class TaskResult(Strict):
    """What an agent reports for one occurrence; odd values are cleaned, not refused."""

    task_id: str = Field(pattern=r"^[0-9a-f]{32}$")
    seq: int = Field(ge=1, le=2**62)
    revision: int = Field(default=0, ge=0, le=2**31 - 1)
    state: Literal["succeeded", "failed", "missed", "interrupted", "rejected"]
    scheduled_at: ReportedTime = None
    missed_count: int = Field(default=0, ge=0, le=2**62)
    first_missed_at: ReportedTime = None
    started_at: ReportedTime = None
    finished_at: ReportedTime = None
    clock_offset_s: ReportedFloat = None
    exit_code: ReportedExitCode = None
    stdout: ReportedStr = ""
    stderr: ReportedStr = ""
    truncated: bool = False
    error: ReportedStr | None = None
    duration_s: ReportedFloat = None

    @field_validator("stdout", "stderr")
    @classmethod
    def _cap_output(cls, v: str) -> str:
        return v if len(v) <= MAX_TASK_OUTPUT else v[:MAX_TASK_OUTPUT]

    @field_validator("error")
    @classmethod
    def _cap_error(cls, v: str | None) -> str | None:
        return v if v is None or len(v) <= 4096 else v[:4096]


class TaskResultRef(BaseModel):
    """Names one stored result, so the agent may drop it from its outbox."""

    task_id: str
    seq: int
