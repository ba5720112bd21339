"""Wire types of the reports (JSON); the CSV exports have the same columns in the same order."""

from __future__ import annotations

from datetime import datetime
from typing import Generic, TypeVar

from pydantic import BaseModel, Field

T = TypeVar("T")


class Page(BaseModel, Generic[T]):
    """One page of a report: its rows and how many there are in all."""

    items: list[T]
    total: int = Field(description="rows matching, whatever the page")
    total_is_estimate: bool = Field(
        default=False, description="true when total is the planner's estimate (above 10,000)"
    )
    limit: int
    offset: int


class FleetPoint(BaseModel):
    """The fleet at one snapshot: active devices, how many were online, how many not."""

    at: datetime
    total: int
    online: int
    offline: int


class DeviceRow(BaseModel):
    """A device in the report list (facts, not the inventory)."""

    id: str
    name: str
    status: str
    os_name: str | None
    os_version: str | None
    manufacturer: str | None
    model: str | None
    last_seen: datetime | None
    enrolled_at: datetime
    agent_version: str
    groups: list[str]


class SoftwareHolder(BaseModel):
    """A device holding a piece of software."""

    device_id: str
    device_name: str
    source: str
    name: str
    version: str
    last_seen: datetime | None


class VersionCount(BaseModel):
    """How many devices hold one version of a piece of software."""

    source: str
    version: str
    devices: int


class MissingSoftware(BaseModel):
    """A device without a piece of software, or with a version below the minimum asked."""

    device_id: str
    device_name: str
    installed_version: str | None = Field(description="null: not installed at all")
    last_seen: datetime | None


class SoftwareCount(BaseModel):
    """A piece of software and on how many devices it is installed."""

    source: str
    name: str
    devices: int
    versions: int


class TopSoftware(BaseModel):
    """The most installed software; from the summary unless counted live."""

    items: list[SoftwareCount]
    live: bool = Field(description="counted now (true) or read from the summary (false)")
    as_of: datetime | None = Field(description="when the counts were made")


class NotSeenDevice(BaseModel):
    """A device that has not checked in for a while (or never)."""

    device_id: str
    device_name: str
    last_seen: datetime | None
    days_since: float | None = Field(description="null: never seen")
    os_name: str | None
    model: str | None


class HardwareModel(BaseModel):
    """Active devices of one manufacturer and model, and how long ago they were enrolled."""

    manufacturer: str | None
    model: str | None
    devices: int
    first_enrolled: datetime
    last_enrolled: datetime
    oldest_days: float = Field(description="age of the longest-enrolled device, in days")
    mean_days: float = Field(description="mean age since enrolment, in days")


class CommandError(BaseModel):
    """A command run that failed, was interrupted, rejected or expired."""

    run_id: str
    command_id: str
    kind: str
    device_id: str
    device_name: str
    state: str
    exit_code: int | None
    error: str | None
    finished_at: datetime | None
    created_by: str


class InstallError(BaseModel):
    """A device whose part in a deployment failed."""

    deployment_id: str
    deployment_name: str
    package_name: str
    action: str
    device_id: str
    device_name: str
    state: str
    detail: str
    attempts: int
    updated_at: datetime
