"""The agent's software jobs: download (resumable, delta), wait for activation, install, report.

A `software` command only records a job in the agent's SQLite file and returns; the job
then runs here, step by step, so that a restart resumes it where it stopped (a partial
download continues at its byte). Every step is reported to `/software/status`; a report
that cannot be sent is kept and sent again, the last state winning.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import sqlite3
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from custos import protocol
from custos.agent import install as engine
from custos.agent.client import DeviceClient, RequestRejected, ServerError, ServerRefused
from custos.agent.transfer import Downloader, TransferError
from custos.artifacts.plan import Plan, reconstruct
from custos.packaging.inspect import sha256_file
from custos.packaging.manifest import Descriptor, PackageError
from custos.packaging.signing import SignatureError, verify_descriptor
from custos.scheduling import ScheduleError, Window

log = logging.getLogger("custos.agent.software")

SCHEMA = """
CREATE TABLE IF NOT EXISTS software_jobs (
    deployment_id TEXT PRIMARY KEY,
    package_id TEXT NOT NULL,
    payload TEXT NOT NULL,
    state TEXT NOT NULL,          -- new | downloaded | done
    report TEXT,                  -- the last status not yet accepted by the server (JSON)
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS software_installed (
    name TEXT PRIMARY KEY,
    version TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    package_id TEXT NOT NULL,
    artifact TEXT                 -- kept for deltas and rollback
);
"""
INSTALL_TIMEOUT_S = 3600.0
PROGRESS_EVERY_S = 2.0
RETRY_S = 30.0


class SoftwareStore:
    """Jobs and installed packages in the agent's SQLite file."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        db.executescript(SCHEMA)

    def add(self, payload: dict[str, Any]) -> bool:
        """Record a job (a newer package for the same deployment replaces the old job)."""
        dep, pkg = str(payload["deployment_id"]), str(payload["package_id"])
        with self.db:
            row = self.db.execute(
                "SELECT package_id, state FROM software_jobs WHERE deployment_id = ?", (dep,)
            ).fetchone()
            if row is not None and row[0] == pkg and row[1] != "done":
                return False  # already working on it
            self.db.execute(
                "INSERT INTO software_jobs (deployment_id, package_id, payload, state, updated)"
                " VALUES (?, ?, ?, 'new', ?) ON CONFLICT(deployment_id) DO UPDATE SET"
                " package_id = excluded.package_id, payload = excluded.payload, state = 'new',"
                " updated = excluded.updated",
                (dep, pkg, json.dumps(payload), time.time()),
            )
        return True

    def open_jobs(self) -> list[tuple[str, dict[str, Any], str]]:
        """(deployment id, payload, state) of jobs not done."""
        rows = self.db.execute(
            "SELECT deployment_id, payload, state FROM software_jobs WHERE state != 'done'"
            " ORDER BY updated"
        ).fetchall()
        return [(r[0], json.loads(r[1]), r[2]) for r in rows]

    def set_state(self, deployment_id: str, state: str) -> None:
        """Move a job on."""
        with self.db:
            self.db.execute(
                "UPDATE software_jobs SET state = ?, updated = ? WHERE deployment_id = ?",
                (state, time.time(), deployment_id),
            )

    def set_report(self, deployment_id: str, report: dict[str, Any] | None) -> None:
        """Remember the status to send (None: the server has it)."""
        with self.db:
            self.db.execute(
                "UPDATE software_jobs SET report = ? WHERE deployment_id = ?",
                (json.dumps(report) if report else None, deployment_id),
            )

    def unsent_reports(self) -> list[tuple[str, dict[str, Any]]]:
        """Statuses the server has not acknowledged yet."""
        rows = self.db.execute(
            "SELECT deployment_id, report FROM software_jobs WHERE report IS NOT NULL"
        ).fetchall()
        return [(r[0], json.loads(r[1])) for r in rows]

    def job_state(self, deployment_id: str) -> str | None:
        """A job's state (new | downloaded | done), None if there is no such job."""
        row = self.db.execute(
            "SELECT state FROM software_jobs WHERE deployment_id = ?", (deployment_id,)
        ).fetchone()
        return str(row[0]) if row else None

    def install_payload(self, package_id: str) -> dict[str, Any] | None:
        """The signed payload of the newest install job for a package (to remove it later)."""
        for (raw,) in self.db.execute(
            "SELECT payload FROM software_jobs WHERE package_id = ? ORDER BY updated DESC",
            (package_id,),
        ):
            payload: dict[str, Any] = json.loads(raw)
            if payload.get("action", "install") == "install":
                return payload
        return None

    def installed(self, name: str) -> dict[str, Any] | None:
        """What this agent installed under that name."""
        row = self.db.execute(
            "SELECT version, sha256, package_id, artifact FROM software_installed WHERE name = ?",
            (name,),
        ).fetchone()
        if row is None:
            return None
        return {"version": row[0], "sha256": row[1], "package_id": row[2], "artifact": row[3]}

    def all_installed(self) -> dict[str, str]:
        """name -> version (reported as inventory)."""
        return dict(self.db.execute("SELECT name, version FROM software_installed").fetchall())

    def record_installed(self, name: str, version: str, sha: str, pkg: str, artifact: str) -> None:
        """After an install: the version and the artifact kept for the next delta."""
        with self.db:
            self.db.execute(
                "INSERT INTO software_installed VALUES (?, ?, ?, ?, ?) ON CONFLICT(name) DO"
                " UPDATE SET version = excluded.version, sha256 = excluded.sha256,"
                " package_id = excluded.package_id, artifact = excluded.artifact",
                (name, version, sha, pkg, artifact),
            )

    def forget_installed(self, name: str) -> None:
        """After a removal."""
        with self.db:
            self.db.execute("DELETE FROM software_installed WHERE name = ?", (name,))


class SoftwareManager:
    """Runs software jobs in the background of the agent's loop."""

    def __init__(
        self,
        store: SoftwareStore,
        client: DeviceClient,
        *,
        ca_pem: str,
        work_dir: Path,
        server_now: Callable[[], float],
        downloader: Downloader | None = None,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.store = store
        self.client = client
        self.ca_pem = ca_pem
        self.dir = work_dir
        self.server_now = server_now
        self.downloader = downloader or Downloader(client.http, client.signed_headers)
        self.on_change = on_change or (lambda: None)
        self._wake = asyncio.Event()
        self._send_lock = asyncio.Lock()

    # --- from the command queue ---

    def handle(self, payload: dict[str, Any]) -> dict[str, Any]:
        """A `software` command: check the signature now, then leave the work to the loop."""
        try:
            desc = self._verified(payload)
        except (SignatureError, PackageError, KeyError, TypeError) as exc:
            return {"state": "failed", "error": f"refused: {exc}"}
        fresh = self.store.add(payload)
        self._wake.set()
        return {"result": {"accepted": fresh, "package": f"{desc.name} {desc.version}"}}

    def _verified(self, payload: dict[str, Any]) -> Descriptor:
        descriptor = payload["descriptor"]
        verify_descriptor(self.ca_pem, descriptor, str(payload["signature"]))
        return Descriptor.from_dict(descriptor)

    # --- the loop ---

    async def run_forever(self, stop: asyncio.Event) -> None:
        """Work on open jobs until stop is set; sleeps until woken or a job's time comes."""
        while not stop.is_set():
            self._wake.clear()
            delay = await self.run_once()
            with contextlib.suppress(TimeoutError):
                waiter = asyncio.ensure_future(self._wake.wait())
                stopper = asyncio.ensure_future(stop.wait())
                try:
                    await asyncio.wait({waiter, stopper}, timeout=delay,
                                       return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
                finally:
                    waiter.cancel()
                    stopper.cancel()

    async def run_once(self) -> float:
        """One pass over open jobs and unsent reports; returns seconds until the next pass."""
        delay = 3600.0
        if not await self.flush_reports():
            delay = RETRY_S
        for dep_id, payload, state in self.store.open_jobs():
            try:
                wait = await self._step(dep_id, payload, state)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # one broken job must not stop the others
                log.exception("software job %s failed", dep_id)
                self._finish(dep_id, payload, "failed", f"agent error: {exc}")
                continue
            if wait is not None:
                delay = min(delay, wait)
        return max(0.5, delay)

    async def _step(self, dep_id: str, payload: dict[str, Any], state: str) -> float | None:
        """Advance one job as far as it can go now; seconds to wait, or None when finished."""
        try:
            desc = self._verified(payload)
        except (SignatureError, PackageError, KeyError, TypeError) as exc:
            self._finish(dep_id, payload, "failed", f"refused: {exc}")
            return None
        action = payload.get("action", "install")
        job_dir = self.dir / dep_id
        artifact = job_dir / desc.filename
        if action == "install" and state == "new":
            try:
                await self._download(dep_id, payload, desc, job_dir, artifact)
            except (TransferError, ServerError) as exc:
                self._report(dep_id, payload, "downloading", 0, f"download paused: {exc}")
                return RETRY_S
            except (RequestRejected, ServerRefused) as exc:
                self._finish(dep_id, payload, "failed", f"download refused: {exc}")
                return None
            except ValueError as exc:  # a plan or artifact that does not verify
                self._finish(dep_id, payload, "failed", f"download rejected: {exc}")
                return None
            self.store.set_state(dep_id, "downloaded")
            self._report(dep_id, payload, "downloaded", 100, "")
        wait = self._until_active(payload)
        if wait > 0:
            return wait
        if action == "uninstall":
            await self._remove(dep_id, payload, desc, job_dir)
        else:
            await self._install(dep_id, payload, desc, job_dir, artifact)
        return None

    def _until_active(self, payload: dict[str, Any]) -> float:
        """Seconds until the activation time and inside the maintenance window (0: now)."""
        now = self.server_now()
        at = payload.get("activate_at")
        if at:
            t = datetime.fromisoformat(str(at)).timestamp()
            if t > now:
                return t - now
        window = payload.get("window")
        if window:
            try:
                w = Window.from_doc(window)
            except ScheduleError:
                return 0.0
            if not w.contains(datetime.fromtimestamp(now, UTC)):
                return 60.0  # look again in a minute
        return 0.0

    async def _download(
        self, dep_id: str, payload: dict[str, Any], desc: Descriptor, job_dir: Path, out: Path
    ) -> None:
        held = self.store.installed(desc.name)
        base_path = await asyncio.to_thread(_prepare, job_dir, out, desc.sha256, held)
        if base_path == out:
            return  # downloaded before a restart
        body = {"package_id": payload["package_id"]}
        if base_path is not None and held is not None:
            body["base_sha256"] = held["sha256"]
        plan_doc = await self.client.request(
            "POST", protocol.DEVICE_API + "/transfers", body=json.dumps(body).encode()
        )
        plan = Plan.from_dict(plan_doc)
        if plan.target_sha256 != desc.sha256:
            raise ValueError("the transfer plan is for other content than the signed package")
        self._report(dep_id, payload, "downloading", 0, f"{plan.kind}: {plan.wire_size} bytes")
        last = [0.0]

        def progress(done: int, total: int) -> None:
            now = time.monotonic()
            if now - last[0] >= PROGRESS_EVERY_S and total:
                last[0] = now
                self._report(dep_id, payload, "downloading", int(done * 100 / total), "")

        wire = job_dir / f"wire-{plan.id}"
        limit = payload.get("limit_bps")
        await self.downloader.fetch(
            f"{protocol.DEVICE_API}/transfers/{plan.id}",
            wire,
            size=plan.wire_size,
            sha256=plan.wire_sha256,
            etag=plan.id,
            limit_bps=int(limit) if limit else None,
            progress=progress,
        )
        await asyncio.to_thread(reconstruct, plan, base_path if plan.base_sha256 else None,
                                wire, out)  # fmt: skip
        wire.unlink(missing_ok=True)

    async def _install(
        self, dep_id: str, payload: dict[str, Any], desc: Descriptor, job_dir: Path, art: Path
    ) -> None:
        self._report(dep_id, payload, "installing", 100, "")
        held = self.store.installed(desc.name)
        previous = Path(held["artifact"]) if held and held.get("artifact") else None
        res = await engine.install(
            payload["descriptor"],
            art,
            job_dir / "work",
            timeout_s=INSTALL_TIMEOUT_S,
            previous_artifact=previous if previous and previous.is_file() else None,
        )
        doc = res.to_dict()
        log_text = json.dumps(doc, default=str)[-60_000:]
        if not res.ok:
            self._finish(dep_id, payload, "failed", _why(doc), log_text)
            return
        # keep this artifact for the next version's delta; drop the one before
        keep = self.dir / "installed" / desc.name
        keep.mkdir(parents=True, exist_ok=True)
        kept = keep / f"{desc.sha256}-{desc.filename}"
        shutil.move(str(art), kept)
        for old in keep.iterdir():
            if old != kept:
                old.unlink(missing_ok=True)
        self.store.record_installed(
            desc.name, desc.version, desc.sha256, str(payload["package_id"]), str(kept)
        )
        self._finish(dep_id, payload, "installed", str(doc.get("action", "installed")), log_text)
        self.on_change()
        shutil.rmtree(job_dir, ignore_errors=True)

    async def _remove(
        self, dep_id: str, payload: dict[str, Any], desc: Descriptor, job_dir: Path
    ) -> None:
        self._report(dep_id, payload, "removing", 0, "")
        held = self.store.installed(desc.name)
        kept = Path(held["artifact"]) if held and held.get("artifact") else None
        res = await engine.uninstall(
            payload["descriptor"],
            kept if kept is not None and kept.is_file() else None,
            job_dir / "work",
            timeout_s=INSTALL_TIMEOUT_S,
        )
        doc = res.to_dict()
        log_text = json.dumps(doc, default=str)[-60_000:]
        if not res.ok:
            self._finish(dep_id, payload, "failed", _why(doc), log_text)
            return
        if kept is not None:
            shutil.rmtree(kept.parent, ignore_errors=True)
        self.store.forget_installed(desc.name)
        self._finish(dep_id, payload, "removed", "removed", log_text)
        self.on_change()
        shutil.rmtree(job_dir, ignore_errors=True)

    # --- reporting ---

    def _finish(
        self, dep_id: str, payload: dict[str, Any], state: str, detail: str, log_text: str = ""
    ) -> None:
        self.store.set_state(dep_id, "done")
        self._report(dep_id, payload, state, 100 if state != "failed" else 0, detail, log_text)

    def _report(
        self,
        dep_id: str,
        payload: dict[str, Any],
        state: str,
        progress: int,
        detail: str,
        log_text: str = "",
    ) -> None:
        """Queue a status for the server (sent in the background; the last one wins)."""
        report = {
            "deployment_id": dep_id,
            "package_id": payload["package_id"],
            "state": state,
            "progress": max(0, min(100, progress)),
            "detail": detail[:2000],
            "log": log_text,
        }
        log.info("software %s: %s %s%% %s", dep_id, state, progress, detail[:200])
        self.store.set_report(dep_id, report)
        task = asyncio.get_running_loop().create_task(self.flush_reports())
        _pending.add(task)
        task.add_done_callback(_pending.discard)

    async def flush_reports(self) -> bool:
        """Send the latest unsent status of every job, one at a time (so none overtakes
        another); False if some could not be sent."""
        async with self._send_lock:
            ok = True
            for dep_id, report in self.store.unsent_reports():
                ok = await self._send(dep_id, report) and ok
            return ok

    async def _send(self, dep_id: str, report: dict[str, Any]) -> bool:
        try:
            await self.client.request(
                "POST",
                protocol.DEVICE_API + "/software/status",
                body=json.dumps(report).encode(),
            )
        except RequestRejected as exc:
            log.warning("software status for %s refused: %s", dep_id, exc)
        except (ServerError, ServerRefused) as exc:
            log.info("software status for %s not sent yet: %s", dep_id, exc)
            return False
        # only clear it if no newer report replaced it meanwhile
        current = dict(self.store.unsent_reports()).get(dep_id)
        if current == report:
            self.store.set_report(dep_id, None)
        return True


_pending: set[asyncio.Task[bool]] = set()  # report flushes in flight (kept referenced)


def _prepare(job_dir: Path, out: Path, sha: str, held: dict[str, Any] | None) -> Path | None:
    """Make the job directory; `out` if already downloaded, else the base artifact (or None)."""
    job_dir.mkdir(parents=True, exist_ok=True)
    if out.exists() and sha256_file(out) == sha:
        return out
    base = Path(held["artifact"]) if held and held.get("artifact") else None
    return base if base is not None and base.is_file() else None


def _why(doc: dict[str, Any]) -> str:
    for key in ("error", "detail", "reason"):
        if doc.get(key):
            return str(doc[key])[:2000]
    return str(doc.get("action", "failed"))
