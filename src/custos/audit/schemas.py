"""Wire types of the audit log: entries, a page of them, and the chain check's report."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

RESULTS = ("ok", "denied", "failed", "error")
VIAS = ("token", "session", "cli", "system", "anonymous")
Result = Literal["ok", "denied", "failed", "error"]
MAX_PAGE = 500


class AuditEntryOut(BaseModel):
    """One recorded action, with the hashes that chain it to the entry before."""

    id: int
    at: datetime
    actor: str = Field(description='username; "" when nobody was authenticated')
    actor_id: int | None
    via: str = Field(description="token | session | cli | system | anonymous")
    action: str = Field(description="stable dotted name, e.g. device.retire")
    target: str
    remote: str = Field(description="client address")
    result: str = Field(description="ok | denied | failed | error")
    status: int | None = Field(description="HTTP status, when the action came over HTTP")
    detail: dict[str, Any]
    prev_hash: str
    hash: str


class AuditPage(BaseModel):
    """Entries newest first; pass `next_before_id` as `before_id` for the next page."""

    entries: list[AuditEntryOut]
    next_before_id: int | None = None


class VerifyReport(BaseModel):
    """The outcome of recomputing the chain.

    `head_id`/`head_hash` name the last entry checked: note them somewhere the server cannot
    write, and pass them back later as an anchor, so that cutting entries off the end of the
    log (which leaves a shorter, still consistent chain) is detected too.
    """

    ok: bool
    checked: int = Field(description="entries whose hash was recomputed")
    first_bad_id: int | None = None
    reason: str | None = None
    head_id: int | None = None
    head_hash: str | None = None
