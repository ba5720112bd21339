"""Pre-signed empty check-ins for wrk (bench/checkin.lua), one per simulated device.

A check-in's proof covers a timestamp that the server accepts within ±300 s
(`signature_skew_s`), so a request signed just before a load phase can be replayed by the
load generator for the whole phase. The headers come from the simulator's one signing
function (`SimFleet.auth_headers`), so a change of the proof scheme reaches wrk too.
"""

from __future__ import annotations

from pathlib import Path

import httpx

from custos import protocol
from custos.sim.fleet import SimDevice, SimFleet

CHECKIN_PATH = protocol.DEVICE_API + "/checkin"
EMPTY_CHECKIN = b'{"results":[],"acks":[]}'


async def write_requests(path: Path, fleet: SimFleet, devices: list[SimDevice]) -> None:
    """Sign one empty check-in per device now and write the data file wrk reads.

    Plain lines, not a Lua table: Lua refuses a chunk with more than 65,536 constants, which
    a table of 100,000 devices is. Line 1 is the path, line 2 the body, then one device per
    line: header and value, tab-separated, for every header of its proof.
    """
    lines = [CHECKIN_PATH, EMPTY_CHECKIN.decode()]
    for dev in devices:
        h = await fleet.auth_headers(dev, "POST", CHECKIN_PATH, EMPTY_CHECKIN)
        lines.append("\t".join(f"{k}\t{v}" for k, v in sorted(h.items())))
    path.write_text("\n".join(lines) + "\n")


async def check_one(fleet: SimFleet, dev: SimDevice, base_url: str) -> None:
    """One signed empty check-in with those headers; raises unless the server answers 200."""
    headers = await fleet.auth_headers(dev, "POST", CHECKIN_PATH, EMPTY_CHECKIN)
    headers["content-type"] = "application/json"
    async with httpx.AsyncClient(base_url=base_url, verify=False, timeout=30) as http:
        r = await http.post(CHECKIN_PATH, content=EMPTY_CHECKIN, headers=headers)
    if r.status_code != 200:
        raise RuntimeError(f"a signed check-in got HTTP {r.status_code}: {r.text[:300]}")
