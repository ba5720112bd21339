"""The benchmarks' reusable deployment: one PostgreSQL database and one enrolled fleet.

Enrolling 100,000 devices takes minutes, so it is done once and kept:

- PostgreSQL database `custos_bench` (created if missing) and the server's data directory
  `var/bench/server-data` (its CA passphrase and TLS certificate);
- `var/bench/fleet.json`: every device's id and private key (the simulator's fleet file);
- `var/bench/state.json`: the admin password and the multi-use enrolment token.

A later run with as many devices or fewer reuses them; with more, only the missing ones are
enrolled. If the database was dropped (the server has another CA), the fleet starts afresh.

Two ways to enrol: `api` (the real protocol, as `custos sim` does) and `bulk` (bench only):
keys and CSRs made here, certificates signed by the server's own CA (`CertificateAuthority.
sign_device_csr`, loaded from the database with the data directory's passphrase) and the
device rows written in batches with the same columns `EnrollmentService.enroll` writes. The
server authenticates such devices exactly like enrolled ones: it only ever uses the stored
public key and status.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, Server, free_port, pg_exec
from custos.sim.fleet import SimDevice, SimFleet

BENCH_GROUP = "bench"
BULK_BATCH = 1000


@dataclass
class Deployment:
    """Where the benchmark's server keeps its state."""

    root: Path
    pg_base: str
    db_name: str = "custos_bench"

    @property
    def data_dir(self) -> Path:
        return self.root / "server-data"

    @property
    def fleet_file(self) -> Path:
        return self.root / "fleet.json"

    @property
    def state_file(self) -> Path:
        return self.root / "state.json"

    @property
    def db_url(self) -> str:
        base = self.pg_base.replace("postgresql://", "postgresql+asyncpg://", 1)
        return f"{base}/{self.db_name}"

    def state(self) -> dict[str, Any]:
        """The saved admin password and enrolment token (made on first use)."""
        try:
            data: dict[str, Any] = json.loads(self.state_file.read_text())
        except (FileNotFoundError, ValueError):
            data = {}
        if not data.get("password"):
            data["password"] = secrets.token_urlsafe(16)
            self._save_state(data)
        return data

    def _save_state(self, data: dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=2)
        os.replace(tmp, self.state_file)

    def ensure_database(self) -> None:
        """CREATE DATABASE custos_bench unless it exists."""
        import asyncpg

        async def run() -> None:
            conn = await asyncpg.connect(self.pg_base + "/postgres", timeout=5)
            try:
                found = await conn.fetchval(
                    "SELECT 1 FROM pg_database WHERE datname = $1", self.db_name
                )
            finally:
                await conn.close()
            if not found:
                await pg_exec(self.pg_base, f'CREATE DATABASE "{self.db_name}"')

        asyncio.run(run())

    async def close_open_runs(self) -> int:
        """Cancel the runs earlier benchmarks left queued, sent or acked (B2 queues plenty).

        Left open they would make every check-in of those devices a database check-in and
        spoil B1's empty check-ins.
        """
        import asyncpg

        conn = await asyncpg.connect(f"{self.pg_base}/{self.db_name}", timeout=5)
        try:
            status = await conn.execute(
                "UPDATE command_runs SET state = 'cancelled', finished_at = now() "
                "WHERE state IN ('queued', 'sent', 'acked')"
            )
        finally:
            await conn.close()
        return int(status.split()[-1])

    async def forget_old_commands(self) -> None:
        """Empty the command tables of earlier runs, so every run starts from the same state.

        Each B2 run leaves ~50,000 finished runs and as many dead row versions; B2 got
        slower from run to run on a bloating `command_runs` (a VACUUM put it back).
        """
        import asyncpg

        conn = await asyncpg.connect(f"{self.pg_base}/{self.db_name}", timeout=5)
        try:
            # no ANALYZE after: statistics of empty tables would make the planner treat them
            # as empty all run long (autovacuum is off on the bench machine's PostgreSQL);
            # truncated tables count as never analysed, and estimates follow their real size
            await conn.execute("TRUNCATE command_runs, commands CASCADE")
        finally:
            await conn.close()

    def server(
        self,
        *,
        transport: str = "https",
        workers: int = 1,
        port: int | None = None,
        env: dict[str, str] | None = None,
    ) -> Server:
        """A `custos server` process on this deployment (not started)."""
        port = port or free_port()
        custos = Path(sys.executable).parent / "custos"
        argv = [str(custos), "server", "--data-dir", str(self.data_dir), "--db", self.db_url]
        argv += ["--port", str(port), "--workers", str(workers)]
        if transport == "http":
            argv.append("--insecure-http")
        scheme = "http" if transport == "http" else "https"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        return Server(
            name=f"custos x{workers}",
            argv=argv,
            url=f"{scheme}://127.0.0.1:{port}",
            health="/healthz",
            log=self.root / "server.log",
            env={"CUSTOS_ADMIN_PASSWORD": self.state()["password"], **(env or {})},
        )

    @property
    def ca_file(self) -> Path:
        """The server's CA certificate, saved by ensure() (what load generators pin)."""
        return self.root / "ca.pem"


async def admin_login(http: httpx.AsyncClient, password: str) -> str:
    """Log in as admin; the API token."""
    r = await http.post("/api/v1/auth/login", json={"username": "admin", "password": password})
    r.raise_for_status()
    return str(r.json()["token"])


async def _token(http: httpx.AsyncClient, dep: Deployment, api_token: str) -> str:
    """The deployment's multi-use enrolment token into group `bench` (made once)."""
    state = dep.state()
    auth = {"authorization": f"Bearer {api_token}"}
    secret = state.get("token")
    if secret:
        r = await http.get("/api/v1/enrollment-tokens", headers=auth)
        if any(t["prefix"] == secret[:10] and t["state"] == "active" for t in r.json()):
            return str(secret)
    r = await http.post("/api/v1/groups", json={"name": BENCH_GROUP}, headers=auth)
    if r.status_code not in (201, 409):
        r.raise_for_status()
    r = await http.post(
        "/api/v1/enrollment-tokens",
        json={"uses": None, "group": BENCH_GROUP, "note": "benchmarks"},
        headers=auth,
    )
    r.raise_for_status()
    state["token"] = secret = str(r.json()["token"])
    dep._save_state(state)
    return secret


async def prepare_fleet(dep: Deployment, url: str, count: int, mode: str) -> dict[str, Any]:
    """Make sure `count` devices are enrolled and saved; what was done and how long it took."""
    state = dep.state()
    async with httpx.AsyncClient(base_url=url, verify=False, timeout=120) as http:
        api_token = await admin_login(http, state["password"])
        token = await _token(http, dep, api_token)
    fleet = SimFleet(url, token, count=count, concurrency=32, timeout=120)
    fleet.load(dep.fleet_file)
    from custos.agent.identity import ca_fingerprint, fetch_pinned_ca

    ca_pem = await fetch_pinned_ca(url, None)
    dep.ca_file.write_text(ca_pem)
    if fleet.saved_ca_fingerprint not in (None, ca_fingerprint(ca_pem)):
        print("  the fleet file belongs to another CA: enrolling afresh", flush=True)
        fleet = SimFleet(url, token, count=count, concurrency=32, timeout=120)
    fleet.use_ca(ca_pem)
    have = fleet.stats().enrolled
    if have and not await _known(fleet):
        print("  the database does not know the saved devices: enrolling afresh", flush=True)
        fleet = SimFleet(url, token, count=count, concurrency=32, timeout=120)
        fleet.use_ca(ca_pem)
        have = 0
    missing = count - have
    started = time.monotonic()
    if missing > 0:
        print(f"  enrolling {missing} devices ({mode}) …", flush=True)
        if mode == "bulk":
            todo = [d for d in fleet.devices if not d.enrolled]
            await bulk_seed(dep, token, todo, fleet)
        else:
            await fleet.enroll_all()
        # every device the file lists is on the server; the file also keeps any beyond count
        fleet.save(dep.fleet_file)
    took = time.monotonic() - started
    await fleet.aclose()
    return {
        "enrolled_now": max(0, missing),
        "seconds": took,
        "rate": missing / took if missing > 0 and took else None,
        "mode": mode,
        "token": token,
    }


async def _known(fleet: SimFleet) -> bool:
    """Whether the server accepts the last saved device (the database matches the file)."""
    last = [d for d in fleet.devices if d.enrolled][-1]
    try:
        await fleet.checkin_once(last)
    except Exception:
        return False
    return not last.refused


async def bulk_seed(dep: Deployment, token: str, devices: list[SimDevice], fleet: SimFleet) -> None:
    """Enrol devices straight into the database, with certificates from the server's CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519
    from cryptography.x509.oid import NameOID
    from sqlalchemy import insert, select, update

    from custos.agent.inventory import FACT_KEYS
    from custos.db.base import new_id, utcnow
    from custos.db.engine import Database
    from custos.devices.ca import sha256_hex
    from custos.devices.identity import load_or_create_ca
    from custos.devices.models import Device, EnrollmentToken, device_groups
    from custos.sim.fleet import AGENT_VERSION

    db = Database(dep.db_url)
    try:
        ca = await load_or_create_ca(db, dep.data_dir, os.environ.get("CUSTOS_CA_PASSPHRASE"))
        async with db.read() as s:
            tok = await s.scalar(
                select(EnrollmentToken).where(
                    EnrollmentToken.token_hash == sha256_hex(token.encode())
                )
            )
        assert tok is not None, "the bench enrolment token is missing"
        done = 0
        for i in range(0, len(devices), BULK_BATCH):
            chunk = devices[i : i + BULK_BATCH]
            rows, members, keys = [], [], []
            now = utcnow()
            for dev in chunk:
                inv = dev.inventory()
                key = ed25519.Ed25519PrivateKey.generate()
                csr = (
                    x509.CertificateSigningRequestBuilder()
                    .subject_name(
                        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dev.hostname)])
                    )
                    .sign(key, None)
                )
                device_id = new_id()
                issued = ca.sign_device_csr(
                    csr.public_bytes(serialization.Encoding.PEM).decode(), device_id
                )
                rows.append(
                    {
                        "id": device_id,
                        "name": dev.hostname[:255],
                        "status": "active",
                        "public_key": issued.public_key,
                        "cert_serial": issued.serial,
                        "cert_pem": issued.pem,
                        "cert_not_after": issued.not_after,
                        "facts": {k: inv[k] for k in FACT_KEYS if inv.get(k)},
                        "enrolled_at": now,
                        "enrolled_with": tok.id,
                        "agent_version": AGENT_VERSION,
                        "inventory": {},
                        "inventory_version": 0,
                    }
                )
                if tok.group_id is not None:
                    members.append({"device_id": device_id, "group_id": tok.group_id})
                keys.append((dev, device_id, key))
            async with db.transaction() as uow:
                await uow.session.execute(insert(Device), rows)
                if members:
                    await uow.session.execute(device_groups.insert(), members)
                await uow.session.execute(
                    update(EnrollmentToken)
                    .where(EnrollmentToken.id == tok.id)
                    .values(uses=EnrollmentToken.uses + len(rows))
                )
            for dev, device_id, key in keys:
                dev.key, dev.device_id = key, device_id
            done += len(keys)
            print(f"    {done}/{len(devices)}", flush=True)
    finally:
        await db.dispose()


def default_root() -> Path:
    """var/bench in the project (CUSTOS_BENCH_DIR overrides it)."""
    return Path(os.environ.get("CUSTOS_BENCH_DIR") or ROOT / "var" / "bench")


def ensure(dep: Deployment, count: int, mode: str) -> dict[str, Any]:
    """Database, server data and `count` enrolled devices, reused from earlier runs."""
    dep.ensure_database()
    srv = dep.server(transport="http")
    print(f"setup: {count} devices on PostgreSQL database {dep.db_name} ({dep.root})", flush=True)
    srv.start()
    try:
        info = asyncio.run(prepare_fleet(dep, srv.url, count, mode))
    finally:
        srv.stop()
    if info["enrolled_now"]:
        print(
            f"  enrolled {info['enrolled_now']} in {info['seconds']:.1f}s "
            f"({info['rate']:.0f}/s, {mode})",
            flush=True,
        )
    closed = asyncio.run(dep.close_open_runs())
    if closed:
        print(f"  cancelled {closed} runs left open by an earlier benchmark", flush=True)
    asyncio.run(dep.forget_old_commands())
    return info
