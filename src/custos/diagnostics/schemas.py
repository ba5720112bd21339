"""Wire types for diagnostics reports, and the clean-up of the health numbers they carry."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel

# the health numbers every report may carry, whatever its source
BYTE_FIELDS = ("mem_total", "mem_available", "storage_total", "storage_free")
HEALTH_FIELDS = (*BYTE_FIELDS, "battery_pct", "uptime_s", "load1")
MAX_BYTES_VALUE = 2**62
MAX_UPTIME_S = 100 * 366 * 86400
MAX_LOAD = 1e6

Source = Literal["agent", "omadm"]


def clean_health(raw: dict[str, Any]) -> dict[str, int | float | None]:
    """The health numbers of `raw` that make sense; anything odd becomes None.

    Devices report these, so nothing here may raise: a string, a negative size, a battery
    at 250% or a NaN load is dropped rather than stored.
    """
    out: dict[str, int | float | None] = {}
    for name in HEALTH_FIELDS:
        value = raw.get(name)
        if isinstance(value, bool) or not isinstance(value, int | float):
            out[name] = None
            continue
        if not math.isfinite(value) or value < 0:
            out[name] = None
        elif name in BYTE_FIELDS:
            out[name] = int(value) if value <= MAX_BYTES_VALUE else None
        elif name == "uptime_s":
            out[name] = int(value) if value <= MAX_UPTIME_S else None
        elif name == "battery_pct":
            out[name] = round(float(value), 1) if value <= 100 else None
        else:
            out[name] = round(float(value), 3) if value <= MAX_LOAD else None
    return out


@dataclass
class NewReport:
    """A report about to be stored (the services of other features build these)."""

    device_id: str
    source: Source
    kind: str
    data: dict[str, Any]
    health: dict[str, Any] = field(default_factory=dict)
    run_id: str | None = None


class ReportSummary(BaseModel):
    """A report without its data: what a list shows."""

    id: int
    device_id: str
    source: str
    kind: str
    run_id: str | None
    received_at: datetime
    mem_total: int | None
    mem_available: int | None
    storage_total: int | None
    storage_free: int | None
    battery_pct: float | None
    uptime_s: int | None
    load1: float | None


class ReportOut(ReportSummary):
    """A report with what the device sent (a snapshot, or DiagMon node values and alerts)."""

    data: dict[str, Any]
