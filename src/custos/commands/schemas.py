"""Wire types for commands, runs and results."""

from __future__ import annotations

import json
import posixpath
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from custos.validation import (
    AwareTime,
    ReportedExitCode,
    ReportedStr,
    ReportedTime,
    SafeStr,
    scrub,
)

KINDS = ("exec", "script", "reboot", "settings", "collect_file", "ping", "diagnose")
RESULT_STATES = ("succeeded", "failed", "interrupted", "expired", "rejected")
MAX_COLLECT_BYTES = 64 * 1024 * 1024
MAX_REPORTED_OUTPUT = 2_200_000


class Strict(BaseModel):
    """Unknown fields are an error."""

    model_config = ConfigDict(extra="forbid")


def check_collect_path(path: str) -> str:
    """An absolute, normalised path with no '..' (Windows drive paths accepted too)."""
    if "\x00" in path or len(path) > 4096:
        raise ValueError("path contains NUL or is too long")
    win = len(path) > 2 and path[1] == ":" and path[2] in "\\/"
    if not (path.startswith("/") or win):
        raise ValueError("path must be absolute")
    parts = path.replace("\\", "/").split("/")
    if ".." in parts:
        raise ValueError("path must not contain '..'")
    if not win and posixpath.normpath(path) != path.rstrip("/"):
        raise ValueError("path must be normalised")
    return path


class CommandCreate(Strict):
    """Queue a command for a device, several devices or a group."""

    target: SafeStr = Field(
        min_length=1, max_length=300, description="device id or name, or group:NAME"
    )
    kind: Literal["exec", "script", "reboot", "settings", "collect_file", "ping", "diagnose"]
    argv: list[Annotated[SafeStr, Field(max_length=32_768)]] | None = Field(
        default=None, max_length=1000
    )
    interpreter: Literal["sh", "python", "powershell"] | None = None
    script: SafeStr | None = Field(default=None, max_length=1_048_576)
    args: list[Annotated[SafeStr, Field(max_length=32_768)]] = Field(
        default_factory=list, max_length=1000
    )
    timeout_s: float = Field(default=300, gt=0, le=86_400)
    path: str | None = None
    max_bytes: int = Field(default=16 * 1024 * 1024, ge=1, le=MAX_COLLECT_BYTES)
    checkin_interval: int | None = Field(default=None, ge=5, le=86_400)
    not_before: AwareTime | None = None
    expires_at: AwareTime | None = None

    @field_validator("path")
    @classmethod
    def _path(cls, v: str | None) -> str | None:
        return None if v is None else check_collect_path(v)

    @model_validator(mode="after")
    def _by_kind(self) -> CommandCreate:
        if self.kind == "exec" and not self.argv:
            raise ValueError("exec needs argv")
        if self.kind == "script" and (not self.interpreter or self.script is None):
            raise ValueError("script needs interpreter and script")
        if self.kind == "collect_file" and not self.path:
            raise ValueError("collect_file needs path")
        if self.kind == "settings" and self.checkin_interval is None:
            raise ValueError("settings needs checkin_interval")
        if self.not_before and self.expires_at and self.expires_at <= self.not_before:
            raise ValueError("expires_at must be after not_before")
        return self

    def payload(self) -> dict[str, Any]:
        """The kind-specific part handed to the agent."""
        if self.kind == "exec":
            return {"argv": self.argv, "timeout_s": self.timeout_s}
        if self.kind == "script":
            return {
                "interpreter": self.interpreter,
                "script": self.script,
                "args": self.args,
                "timeout_s": self.timeout_s,
            }
        if self.kind == "collect_file":
            return {"path": self.path, "max_bytes": self.max_bytes}
        if self.kind == "settings":
            return {"checkin_interval": self.checkin_interval}
        return {}


class DeliveredCommand(BaseModel):
    """A command as the agent receives it; run_id is the idempotency key."""

    run_id: str
    kind: str
    payload: dict[str, Any]
    not_before: datetime | None
    expires_at: datetime | None


class RunResult(Strict):
    """What an agent reports for one run: odd values are cleaned, not refused.

    A refused result would stay at the head of the agent's outbox; so NUL characters are
    replaced, impossible times and exit codes dropped, and overlong text cut.
    """

    run_id: str = Field(pattern=r"^[0-9a-f]{32}$")
    state: Literal["succeeded", "failed", "interrupted", "expired", "rejected"]
    exit_code: ReportedExitCode = None
    stdout: ReportedStr = ""
    stderr: ReportedStr = ""
    truncated: bool = False
    error: ReportedStr | None = None
    started_at: ReportedTime = None
    finished_at: ReportedTime = None
    result: dict[str, Any] = Field(default_factory=dict)

    @field_validator("stdout", "stderr")
    @classmethod
    def _cap_output(cls, v: str) -> str:
        return v if len(v) <= MAX_REPORTED_OUTPUT else v[:MAX_REPORTED_OUTPUT]

    @field_validator("error")
    @classmethod
    def _cap_error(cls, v: str | None) -> str | None:
        return v if v is None or len(v) <= 4096 else v[:4096]

    @field_validator("result")
    @classmethod
    def _small(cls, v: dict[str, Any]) -> dict[str, Any]:
        clean = scrub(v)
        if len(json.dumps(clean, default=str)) > 65_536:
            return {"note": "result object too large; dropped"}
        return clean


class RunOut(BaseModel):
    """One device's run of a command."""

    id: str
    command_id: str
    device_id: str
    device_name: str
    state: str
    deliveries: int
    created_at: datetime
    delivered_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    received_at: datetime | None
    exit_code: int | None
    stdout: str
    stderr: str
    truncated: bool
    error: str | None
    result: dict[str, Any]


class CommandOut(BaseModel):
    """A command with a summary of its runs."""

    id: str
    kind: str
    payload: dict[str, Any]
    target: str
    created_by: str
    created_at: datetime
    not_before: datetime | None
    expires_at: datetime | None
    counts: dict[str, int]


class CommandDetail(CommandOut):
    """A command with its runs (every run, except in the answer to creating it)."""

    runs: list[RunOut]
    runs_total: int = Field(description="how many runs the command has; `runs` may list fewer")


class UploadStart(Strict):
    """A device announcing the file it will send for a collect_file run."""

    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    source_path: ReportedStr = Field(max_length=4096)


class UploadState(BaseModel):
    """How much of an upload the server holds (the agent resumes from `received`)."""

    run_id: str
    size: int
    received: int
    complete: bool
