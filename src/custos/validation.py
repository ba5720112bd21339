"""Input hygiene shared by every wire schema: text the databases can store, sane numbers and times.

PostgreSQL refuses NUL in text and JSON, and both databases refuse datetimes outside their
range; a client must get a 4xx (or, for data it reports, a cleaned value), never a 500.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator

REPLACEMENT = "\ufffd"
MIN_TIME = datetime(2000, 1, 1, tzinfo=UTC)
MAX_TIME = datetime(9000, 1, 1, tzinfo=UTC)
INT64 = 2**63 - 1


def _no_nul(v: str) -> str:
    if "\x00" in v:
        raise ValueError("NUL characters are not allowed")
    return v


def clean_text(v: str) -> str:
    """Reported text with NUL characters replaced (what a device reports is kept, not refused)."""
    return v.replace("\x00", REPLACEMENT) if "\x00" in v else v


def scrub(value: Any) -> Any:
    """A JSON-safe copy of reported data: NUL replaced, NaN/Infinity dropped, ints bounded."""
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return value if -INT64 <= value <= INT64 else str(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {clean_text(str(k)): scrub(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [scrub(v) for v in value]
    return clean_text(json.dumps(value, default=str))


def _aware_in_range(v: datetime) -> datetime:
    if v.tzinfo is None:
        raise ValueError("a timezone is required")
    try:
        utc = v.astimezone(UTC)
    except OverflowError:
        raise ValueError("time out of range") from None
    if not MIN_TIME <= utc <= MAX_TIME:
        raise ValueError("time out of range (years 2000 to 9000)")
    return utc


def _lenient_time(v: Any) -> Any:
    """Reported times that are missing a zone or out of range become None."""
    if v is None or v == "":
        return None
    try:
        dt = v if isinstance(v, datetime) else datetime.fromisoformat(str(v))
        return _aware_in_range(dt)
    except (ValueError, TypeError, OverflowError):
        return None


def _lenient_exit_code(v: Any) -> Any:
    if isinstance(v, bool) or not isinstance(v, int):
        return None if v is None else v
    return v if -INT64 <= v <= INT64 else None


# an identifier-like string from an admin or device: NUL is an error
SafeStr = Annotated[str, AfterValidator(_no_nul)]
# text a device reports (output, errors, inventory): NUL is replaced
ReportedStr = Annotated[str, AfterValidator(clean_text)]
# a time an admin sets: aware and in range, else 422
AwareTime = Annotated[datetime, AfterValidator(_aware_in_range)]
# a time a device reports: kept when sane, dropped otherwise
ReportedTime = Annotated[datetime | None, BeforeValidator(_lenient_time)]
ReportedExitCode = Annotated[int | None, BeforeValidator(_lenient_exit_code)]
