"""Tables the reports read: software per device (kept from inventory) and a summary of it.

`devices.inventory` is one JSON document per device; "who has curl 8.x" over 100,000
devices x 200 packages cannot use an index there. `installed_software` holds the same
`sw.<source>.<name>` keys as rows, written in the transaction that applies the inventory
delta (`sync_installed_software` in custos.reports.service), so it is never behind.
"""

from __future__ import annotations

from sqlalchemy import Column, Float, ForeignKey, Index, Integer, String, Table

from custos.db.base import Base, UTCDateTime

# limits of the indexed copy; the inventory itself keeps the full strings. A name longer than
# this is not indexed (it could collide with another once cut); a version is cut (versions
# this long are garbage, and the btree entry must stay under PostgreSQL's ~2.7 kB limit)
MAX_SOURCE_LEN = 20
MAX_NAME_LEN = 255
MAX_VERSION_LEN = 255

installed_software = Table(
    "installed_software",
    Base.metadata,
    Column("device_id", ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True),
    Column("source", String(MAX_SOURCE_LEN), primary_key=True),
    Column("name", String(MAX_NAME_LEN), primary_key=True),
    Column("version", String(MAX_VERSION_LEN), nullable=False),
    # "who has X (version V)" and the versions of X: every column, so that these are
    # index-only scans (a visit to the table per holder cost 0.7 s for 100,000 holders)
    Index("ix_installed_software_name_version", "name", "version", "source", "device_id"),
    Index("ix_installed_software_source_name", "source", "name"),
    comment="one row per sw.<source>.<name> inventory key of a device (value: version)",
)

# counting 20 million rows takes seconds; the top-N report reads this summary instead,
# refreshed by a job (ReportService.refresh_summary) and stamped with when it was made
software_summary = Table(
    "software_summary",
    Base.metadata,
    Column("source", String(MAX_SOURCE_LEN), primary_key=True),
    Column("name", String(MAX_NAME_LEN), primary_key=True),
    Column("devices", Integer, nullable=False),
    Column("versions", Integer, nullable=False),
)

# when each summary was last rebuilt and how long that took (one row per summary)
report_refreshes = Table(
    "report_refreshes",
    Base.metadata,
    Column("name", String(50), primary_key=True),
    Column("refreshed_at", UTCDateTime, nullable=False),
    Column("took_s", Float, nullable=False),
)

# the fleet's online/offline counts over time (the dashboard's history chart): one row per
# period, written by whichever server process gets there first (the period is the key)
fleet_snapshots = Table(
    "fleet_snapshots",
    Base.metadata,
    Column("at", UTCDateTime, primary_key=True),
    Column("total", Integer, nullable=False),
    Column("online", Integer, nullable=False),
    Column("never_seen", Integer, nullable=False),
    comment="active devices, and how many were online, at the start of each snapshot period",
)
