"""Use cases for software distribution: packages, labels, deployments, rollouts, transfers.

A deployment reaches a device as one `software` command (exactly-once delivery through the
command queue, deferred to the download time); the agent then works on its own, resumably,
and reports each step to `/software/status`. Rollouts advance in a periodic tick: a wave's
devices are sent their command, the next wave starts when enough of this one succeeded,
and the deployment pauses when too many of the devices that tried have failed.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from custos.commands.service import CommandService
from custos.db.base import new_id, utcnow
from custos.db.engine import Database, UnitOfWork
from custos.devices.ca import CertificateAuthority
from custos.devices.models import Device, Group, device_groups
from custos.devices.service import resolve_device
from custos.errors import Conflict, Invalid, NotFound
from custos.packaging.inspect import PackageInfo, inspect_package
from custos.packaging.manifest import PackageError, compare_versions
from custos.policies.models import DevicePolicy, PolicyPackage
from custos.software import labels as label_query
from custos.software.models import Deployment, DeploymentDevice, Label, Package
from custos.software.schemas import (
    DeploymentCreate,
    DeploymentDetail,
    DeploymentDeviceOut,
    DeploymentOut,
    LabelCreate,
    LabelOut,
    PackageDetail,
    PackageOut,
    StatusReport,
)
from custos.software.store import ArtifactStore
from custos.software.transfer import TransferPlanner
from custos.webhooks.service import emit as emit_webhook

log = logging.getLogger(__name__)

DONE = {"install": "installed", "uninstall": "removed"}
# states that count as "tried" for the failure threshold
ATTEMPTED = ("queued", "downloading", "downloaded", "installing", "removing", "installed",
             "removed", "failed")  # fmt: skip
MAX_DEVICES_SHOWN = 5000


def _rank(deployment_id: str, device_id: str) -> bytes:
    return hashlib.sha256(f"{deployment_id}/{device_id}".encode()).digest()


def wave_of(deployment_id: str, device_id: str, waves: Sequence[int]) -> int:
    """The wave a device falls in: a stable pseudo-random percentile against the cut points.

    Stable, so devices that join later (a label now matches) land in a wave without
    reshuffling the ones already placed.
    """
    digest = _rank(deployment_id, device_id)
    pct = int.from_bytes(digest[:4], "big") % 10_000 / 100  # 0.00 .. 99.99
    for i, cut in enumerate(waves):
        if pct < cut:
            return i
    return len(waves) - 1


def _package_out(p: Package, stored: int | None = None) -> PackageOut:
    return PackageOut(
        id=p.id,
        name=p.name,
        version=p.version,
        format=p.format,
        sha256=p.sha256,
        size=p.size,
        filename=p.filename,
        platforms=list(p.platforms or []),
        created_by=p.created_by,
        created_at=p.created_at,
        stored_bytes=stored,
    )


class SoftwareService:
    """Packages and deployments; the artifact store and transfer planner sit behind it."""

    def __init__(
        self,
        db: Database,
        store: ArtifactStore,
        planner: TransferPlanner,
        ca: CertificateAuthority,
        commands: CommandService,
        *,
        tmp_dir: Path,
        refresh_s: float = 30.0,
        default_limit_bps: int | None = None,
        group_limit_bps: Mapping[str, int] | None = None,
    ) -> None:
        self.db = db
        self.store = store
        self.planner = planner
        self.ca = ca
        self.commands = commands
        self.tmp_dir = tmp_dir
        self.refresh_s = refresh_s
        self.default_limit_bps = default_limit_bps
        self.group_limit_bps = dict(group_limit_bps or {})
        self._background: set[asyncio.Task[None]] = set()
        self._last_refresh = 0.0
        self._tick_lock = asyncio.Lock()

    # --- packages ---------------------------------------------------------------------

    async def add_package(
        self,
        path: Path,
        *,
        filename: str,
        created_by: str,
        name: str | None = None,
        version: str | None = None,
        destination: str | None = None,
        mode: int | None = None,
    ) -> PackageDetail:
        """Inspect, store (chunked) and sign an uploaded package; `path` is consumed."""
        try:
            info: PackageInfo = await asyncio.to_thread(
                inspect_package,
                path,
                filename=filename,
                name=name,
                version=version,
                destination=destination,
                mode=mode,
            )
        except PackageError as exc:
            raise Invalid(str(exc), code="bad_package") from None
        async with self.db.read() as s:
            if await s.scalar(
                select(Package.id).where(Package.name == info.name, Package.version == info.version)
            ):
                raise Conflict(f"{info.name} {info.version} exists")
        await asyncio.to_thread(self.store.ingest, path)
        descriptor = info.descriptor()
        signature = self.ca.sign_package(descriptor)
        async with self.db.transaction() as uow:
            s = uow.session
            if await s.scalar(
                select(Package.id).where(Package.name == info.name, Package.version == info.version)
            ):
                raise Conflict(f"{info.name} {info.version} exists")
            pkg = Package(
                id=new_id(),
                name=info.name,
                version=info.version,
                format=info.format,
                sha256=info.sha256,
                size=info.size,
                filename=info.filename,
                platforms=list(info.platforms),
                descriptor=descriptor,
                signature=signature,
                metadata_=dict(info.metadata),
                created_by=created_by,
                created_at=utcnow(),
            )
            s.add(pkg)
            await s.flush()
            await self._follow_newest(s, pkg)
            pkg_id = pkg.id
        return await self.show_package(pkg_id)

    async def _follow_newest(self, s: AsyncSession, pkg: Package) -> None:
        """Auto-upgrade deployments of this package name move to the new version if newer."""
        deps = (
            await s.scalars(
                select(Deployment).where(
                    Deployment.package_name == pkg.name,
                    Deployment.auto_upgrade.is_(True),
                    Deployment.action == "install",
                    Deployment.state.in_(("active", "paused")),
                )
            )
        ).all()
        for dep in deps:
            current = await s.get(Package, dep.package_id)
            if current is not None and compare_versions(pkg.version, current.version) <= 0:
                continue
            dep.package_id = pkg.id
            dep.current_wave = 0
            dep.updated_at = utcnow()
            # every device goes again, wave by wave, from the version it holds (a delta)
            await s.execute(
                update(DeploymentDevice)
                .where(
                    DeploymentDevice.deployment_id == dep.id,
                    DeploymentDevice.state != "pending",
                )
                .values(
                    state="pending",
                    progress=0,
                    detail=f"upgrade to {pkg.version}",
                    updated_at=utcnow(),
                )
            )

    async def list_packages(self, *, name: str | None, limit: int, offset: int) -> list[PackageOut]:
        """Packages, newest first (one query)."""
        async with self.db.read() as s:
            q = select(Package).order_by(Package.created_at.desc(), Package.id)
            if name:
                q = q.where(Package.name == name)
            rows = (await s.scalars(q.limit(limit).offset(offset))).all()
        return [_package_out(p) for p in rows]

    async def _package(self, s: AsyncSession, ref: str) -> Package:
        """By id, NAME==VERSION, or NAME (the newest version)."""
        if "==" in ref:
            name, _, version = ref.partition("==")
            pkg = await s.scalar(
                select(Package).where(Package.name == name, Package.version == version)
            )
        else:
            pkg = await s.get(Package, ref)
            if pkg is None:
                versions = (await s.scalars(select(Package).where(Package.name == ref))).all()
                pkg = _newest(versions)
        if pkg is None:
            raise NotFound(f"no package {ref!r}")
        return pkg

    async def show_package(self, ref: str) -> PackageDetail:
        """One package with its descriptor and the deployments that use it."""
        async with self.db.read() as s:
            p = await self._package(s, ref)
            deps = (
                await s.scalars(select(Deployment.name).where(Deployment.package_id == p.id))
            ).all()
        base = _package_out(p).model_dump()
        return PackageDetail(
            **base,
            descriptor=p.descriptor,
            signature=p.signature,
            metadata=p.metadata_,
            deployments=list(deps),
        )

    async def remove_package(self, ref: str) -> None:
        """Delete a version no deployment uses; its chunks go when nothing else shares them."""
        async with self.db.transaction() as uow:
            s = uow.session
            p = await self._package(s, ref)
            used = await s.scalar(
                select(func.count()).select_from(Deployment).where(Deployment.package_id == p.id)
            )
            if used:
                raise Conflict(f"{p.name} {p.version} is used by {used} deployment(s)")
            sha = p.sha256
            await s.delete(p)
            await s.flush()
            shared = await s.scalar(select(func.count()).where(Package.sha256 == sha))
            if not shared:
                uow.after_commit(lambda: self._forget_artifact(sha))

    def _forget_artifact(self, sha: str) -> None:
        """Delete the artifact's files in a thread: a collection walks the whole store and
        waits for ingests in progress, which must not stall the event loop."""
        task = asyncio.get_running_loop().create_task(self._delete_files(sha))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _delete_files(self, sha: str) -> None:
        try:
            await asyncio.to_thread(self.store.delete, sha)
        except Exception:
            log.exception("software: deleting artifact %s failed", sha)

    # --- labels -------------------------------------------------------------------------

    async def create_label(self, req: LabelCreate) -> LabelOut:
        """A saved inventory query."""
        query = label_query.check_query([label_query.parse_condition(c) for c in req.conditions])
        async with self.db.transaction() as uow:
            s = uow.session
            if await s.scalar(select(Label.id).where(Label.name == req.name)):
                raise Conflict(f"a label named {req.name!r} exists")
            label = Label(id=new_id(), name=req.name, query=query, description=req.description)
            s.add(label)
        return (await self.list_labels(name=req.name))[0]

    async def list_labels(self, name: str | None = None) -> list[LabelOut]:
        """Labels with their current member counts (one scan of the devices' inventory)."""
        async with self.db.read() as s:
            q = select(Label).order_by(Label.name)
            if name:
                q = q.where(Label.name == name)
            rows = (await s.scalars(q)).all()
            members = await self._label_members(s, [r.query for r in rows])
        return [
            LabelOut(
                id=r.id,
                name=r.name,
                query=r.query,
                text=label_query.describe(r.query),
                description=r.description,
                devices=len(m),
            )
            for r, m in zip(rows, members, strict=True)
        ]

    async def remove_label(self, name: str) -> None:
        """Delete a label (deployments that named it keep the devices they already have)."""
        async with self.db.transaction() as uow:
            n = (await uow.session.execute(delete(Label).where(Label.name == name))).rowcount  # type: ignore[attr-defined]
            if not n:
                raise NotFound(f"no label named {name!r}")

    @staticmethod
    async def _label_members(
        s: AsyncSession, queries: Sequence[list[dict[str, Any]]]
    ) -> list[set[str]]:
        """Active devices matching each query, from one pass over the devices."""
        out: list[set[str]] = [set() for _ in queries]
        if not queries:
            return out
        result = await s.stream(
            select(Device.id, Device.inventory, Device.facts).where(Device.status == "active")
        )
        async for dev_id, inv, facts in result:
            for i, q in enumerate(queries):
                if label_query.matches(q, inv or {}, facts or {}):
                    out[i].add(dev_id)
        return out

    # --- deployments --------------------------------------------------------------------

    async def create_deployment(self, req: DeploymentCreate, created_by: str) -> DeploymentDetail:
        """A deployment and its first targets; the tick sends the first wave."""
        async with self.db.transaction() as uow:
            s = uow.session
            pkg = await self._package(s, req.package)
            name = req.name or f"{pkg.name}-{pkg.version}-{req.action}"
            if await s.scalar(
                select(Deployment.id).where(
                    Deployment.name == name, Deployment.state.in_(("active", "paused"))
                )
            ):
                raise Conflict(f"an active deployment named {name!r} exists")
            targets = req.targets.model_dump()
            device_ids = await self._resolve(s, targets)
            if not device_ids:
                raise Invalid("the targets hold no active device")
            now = utcnow()
            dep = Deployment(
                id=new_id(),
                name=name,
                package_id=pkg.id,
                package_name=pkg.name,
                action=req.action,
                mode=req.mode,
                targets=targets,
                download_at=req.download_at,
                activate_at=req.activate_at,
                window=req.window_doc(),
                waves=list(req.waves),
                current_wave=0,
                success_threshold=req.success_threshold,
                failure_threshold=req.failure_threshold,
                auto_upgrade=req.auto_upgrade,
                limit_bps=req.limit_bps,
                state="active",
                created_by=created_by,
                created_at=now,
                updated_at=now,
            )
            s.add(dep)
            await s.flush()
            self._add_devices(s, dep, device_ids, first=True)
            dep_id = dep.id
        await self.tick(only=dep_id)
        return await self.show_deployment(dep_id)

    def _add_devices(
        self, s: AsyncSession, dep: Deployment, device_ids: Sequence[str], *, first: bool = False
    ) -> None:
        """New rows, pending. The first targets are split into waves of the exact sizes asked
        for (in a stable pseudo-random order); devices that join later by their percentile."""
        now = utcnow()
        waves = {d: wave_of(dep.id, d, dep.waves) for d in device_ids}
        if first:
            order = sorted(device_ids, key=lambda d: _rank(dep.id, d))
            n = len(order)
            cuts = [-(-n * pct // 100) for pct in dep.waves]  # ceil
            waves = {
                d: next(w for w, cut in enumerate(cuts) if i < cut) for i, d in enumerate(order)
            }
        s.add_all(
            DeploymentDevice(
                deployment_id=dep.id,
                device_id=d,
                wave=waves[d],
                state="pending",
                updated_at=now,
            )
            for d in device_ids
        )

    async def _resolve(self, s: AsyncSession, targets: dict[str, Any]) -> list[str]:
        """Active device ids named by devices, groups and labels (NotFound for unknown names)."""
        ids: dict[str, None] = {}
        for ref in targets.get("devices", []):
            dev = await resolve_device(s, ref)
            if dev.status != "active":
                raise Conflict(f"device {ref!r} is {dev.status}")
            ids[dev.id] = None
        for gname in targets.get("groups", []):
            gid = await s.scalar(select(Group.id).where(Group.name == gname))
            if gid is None:
                raise NotFound(f"no group named {gname!r}")
            rows = await s.scalars(
                select(Device.id)
                .join(device_groups, device_groups.c.device_id == Device.id)
                .where(device_groups.c.group_id == gid, Device.status == "active")
            )
            ids.update(dict.fromkeys(rows))
        if targets.get("labels"):
            queries = []
            for lname in targets["labels"]:
                label = await s.scalar(select(Label).where(Label.name == lname))
                if label is None:
                    raise NotFound(f"no label named {lname!r}")
                queries.append(label.query)
            for members in await self._label_members(s, queries):
                ids.update(dict.fromkeys(sorted(members)))
        return list(ids)

    async def _deployment(self, s: AsyncSession, ref: str) -> Deployment:
        dep = await s.get(Deployment, ref)
        if dep is None:
            dep = await s.scalar(
                select(Deployment)
                .where(Deployment.name == ref)
                .order_by(Deployment.created_at.desc())
                .limit(1)
            )
        if dep is None:
            raise NotFound(f"no deployment {ref!r}")
        return dep

    async def list_deployments(self, *, limit: int, offset: int) -> list[DeploymentOut]:
        """Deployments, newest first, with device counts by state (three queries)."""
        async with self.db.read() as s:
            deps = (
                await s.scalars(
                    select(Deployment)
                    .order_by(Deployment.created_at.desc(), Deployment.id)
                    .limit(limit)
                    .offset(offset)
                )
            ).all()
            counts = await self._counts(s, [d.id for d in deps])
            labels = await self._package_labels(s, {d.package_id for d in deps})
        return [self._out(d, counts.get(d.id, {}), labels) for d in deps]

    @staticmethod
    async def _counts(s: AsyncSession, ids: Sequence[str]) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {i: {} for i in ids}
        if ids:
            rows = await s.execute(
                select(DeploymentDevice.deployment_id, DeploymentDevice.state, func.count())
                .where(DeploymentDevice.deployment_id.in_(ids))
                .group_by(DeploymentDevice.deployment_id, DeploymentDevice.state)
            )
            for dep_id, state, n in rows:
                out[dep_id][state] = n
        return out

    @staticmethod
    async def _package_labels(s: AsyncSession, ids: set[str]) -> dict[str, str]:
        if not ids:
            return {}
        rows = await s.execute(
            select(Package.id, Package.name, Package.version).where(Package.id.in_(ids))
        )
        return {i: f"{n} {v}" for i, n, v in rows}

    @staticmethod
    def _out(d: Deployment, counts: dict[str, int], labels: dict[str, str]) -> DeploymentOut:
        return DeploymentOut(
            id=d.id,
            name=d.name,
            package_id=d.package_id,
            package=labels.get(d.package_id, d.package_id),
            action=d.action,
            mode=d.mode,
            targets=d.targets,
            state=d.state,
            state_reason=d.state_reason,
            waves=list(d.waves),
            current_wave=d.current_wave,
            success_threshold=d.success_threshold,
            failure_threshold=d.failure_threshold,
            auto_upgrade=d.auto_upgrade,
            limit_bps=d.limit_bps,
            download_at=d.download_at,
            activate_at=d.activate_at,
            window=d.window,
            counts=counts,
            created_by=d.created_by,
            created_at=d.created_at,
        )

    async def show_deployment(self, ref: str) -> DeploymentDetail:
        """A deployment with every device's status."""
        async with self.db.read() as s:
            d = await self._deployment(s, ref)
            counts = await self._counts(s, [d.id])
            rows = await s.execute(
                select(DeploymentDevice, Device.name)
                .join(Device, Device.id == DeploymentDevice.device_id)
                .where(DeploymentDevice.deployment_id == d.id)
                .order_by(DeploymentDevice.wave, Device.name)
                .limit(MAX_DEVICES_SHOWN)
            )
            pairs = rows.all()
            pkg_ids = {d.package_id} | {r.package_id for r, _ in pairs if r.package_id}
            labels = await self._package_labels(s, pkg_ids)
        devices = [
            DeploymentDeviceOut(
                device_id=r.device_id,
                hostname=host or "",
                wave=r.wave,
                state=r.state,
                progress=r.progress,
                version=labels.get(r.package_id).split(" ", 1)[1]  # type: ignore[union-attr]
                if r.package_id in labels
                else None,
                detail=r.detail,
                log=r.log,
                attempts=r.attempts,
                updated_at=r.updated_at,
            )
            for r, host in pairs
        ]
        base = self._out(d, counts[d.id], labels).model_dump()
        return DeploymentDetail(**base, devices=devices)

    async def set_state(self, ref: str, action: str) -> DeploymentDetail:
        """pause | resume | abort. Abort cancels devices that have not started."""
        async with self.db.transaction() as uow:
            s = uow.session
            d = await self._deployment(s, ref)
            if d.state == "aborted":
                raise Conflict("the deployment was aborted")
            now = utcnow()
            if action == "pause":
                d.state, d.state_reason = "paused", "paused by an administrator"
            elif action == "resume":
                d.state, d.state_reason = "active", ""
            elif action == "abort":
                d.state, d.state_reason = "aborted", "aborted by an administrator"
                await s.execute(
                    update(DeploymentDevice)
                    .where(
                        DeploymentDevice.deployment_id == d.id,
                        DeploymentDevice.state.in_(("pending", "queued")),
                    )
                    .values(state="cancelled", updated_at=now)
                )
            else:
                raise Invalid(f"unknown action {action!r}")
            d.updated_at = now
            dep_id = d.id
        if action == "resume":
            await self.tick(only=dep_id)
        return await self.show_deployment(dep_id)

    # --- the rollout tick ---------------------------------------------------------------

    async def tick(self, *, only: str | None = None, refresh: bool | None = None) -> int:
        """Advance rollouts: re-read targets now and then, send due waves, pause on failures.

        Returns how many devices were sent a command. Several processes may tick at once:
        each advances a deployment holding its row lock (FOR UPDATE on PostgreSQL; SQLite
        writes are serialised anyway), and rows move from pending to queued in the same
        transaction that queues the command, so a device is sent a deployment once.
        """
        loop = asyncio.get_running_loop()
        if refresh is None:
            refresh = loop.time() - self._last_refresh >= self.refresh_s
        if refresh:
            self._last_refresh = loop.time()
        sent = 0
        async with self._tick_lock:
            async with self.db.read() as s:
                q = select(Deployment.id).where(Deployment.state == "active")
                if only:
                    q = q.where(Deployment.id == only)
                ids = list((await s.scalars(q)).all())
            for dep_id in ids:
                try:
                    sent += await self._advance(dep_id, refresh=refresh)
                except Exception:
                    log.exception("software: advancing deployment %s failed", dep_id)
        return sent

    async def _advance(self, dep_id: str, *, refresh: bool) -> int:
        async with self.db.transaction() as uow:
            s = uow.session
            dep = await s.get(Deployment, dep_id, with_for_update=True)
            if dep is None or dep.state != "active":
                return 0
            if refresh and (dep.targets.get("groups") or dep.targets.get("labels")):
                try:
                    wanted = await self._resolve(s, dep.targets)
                except (NotFound, Conflict) as exc:
                    log.info("software: %s: targets: %s", dep.name, exc.detail)
                    wanted = []
                have = set(
                    (
                        await s.scalars(
                            select(DeploymentDevice.device_id).where(
                                DeploymentDevice.deployment_id == dep.id
                            )
                        )
                    ).all()
                )
                new = [d for d in wanted if d not in have]
                if new:
                    self._add_devices(s, dep, new)
                    await s.flush()
            rows = await s.execute(
                select(DeploymentDevice.wave, DeploymentDevice.state, func.count())
                .where(DeploymentDevice.deployment_id == dep.id)
                .group_by(DeploymentDevice.wave, DeploymentDevice.state)
            )
            per_wave: dict[int, Counter[str]] = {}
            for wave, state, n in rows:
                per_wave.setdefault(wave, Counter())[state] += n
            done_state = DONE[dep.action]
            attempted = sum(c[st] for c in per_wave.values() for st in ATTEMPTED)
            failed = sum(c["failed"] for c in per_wave.values())
            if attempted and failed * 100 >= dep.failure_threshold * attempted:
                dep.state = "paused"
                dep.state_reason = (
                    f"{failed} of {attempted} devices failed "
                    f"(failure threshold {dep.failure_threshold:g}%)"
                )
                dep.updated_at = utcnow()
                log.warning("software: deployment %s paused: %s", dep.name, dep.state_reason)
                return 0
            # advance through waves whose success is at the threshold (empty waves too)
            while dep.current_wave < len(dep.waves) - 1:
                c = per_wave.get(dep.current_wave, Counter())
                total = sum(c.values())
                if total and c[done_state] * 100 < dep.success_threshold * total:
                    break
                dep.current_wave += 1
                dep.updated_at = utcnow()
            if dep.mode != "required":
                return 0
            due = (
                await s.scalars(
                    select(DeploymentDevice.device_id).where(
                        DeploymentDevice.deployment_id == dep.id,
                        DeploymentDevice.state == "pending",
                        DeploymentDevice.wave <= dep.current_wave,
                        # held back by a policy action until the device complies again
                        DeploymentDevice.device_id.not_in(
                            select(DevicePolicy.device_id).where(DevicePolicy.held.is_(True))
                        ),
                    )
                )
            ).all()
            if not due:
                return 0
            await self._send(uow, dep, list(due))
            return len(due)

    async def _send(self, uow: UnitOfWork, dep: Deployment, device_ids: list[str]) -> None:
        """Queue the `software` command for these devices and mark them queued.

        Devices whose groups cap their download rate (`software_group_limit_bps`) get their
        own command with the lower limit: one command per distinct limit.
        """
        s = uow.session
        pkg = await s.get(Package, dep.package_id)
        if pkg is None:
            raise NotFound("the deployment's package is gone")
        base = dep.limit_bps or self.default_limit_bps
        caps = await self._group_caps(s, device_ids)
        by_limit: dict[int | None, list[str]] = {}
        for d in device_ids:
            limits = [x for x in (base, caps.get(d)) if x]
            by_limit.setdefault(min(limits) if limits else None, []).append(d)
        for limit, ids in by_limit.items():
            payload = self.payload(dep, pkg)
            payload["limit_bps"] = limit
            cmd_id = await self.commands.queue(
                uow,
                kind="software",
                payload=payload,
                target=f"deployment:{dep.name}",
                device_ids=ids,
                created_by=dep.created_by,
                not_before=dep.download_at,
            )
            await s.execute(
                update(DeploymentDevice)
                .where(
                    DeploymentDevice.deployment_id == dep.id,
                    DeploymentDevice.device_id.in_(ids),
                )
                .values(
                    state="queued",
                    package_id=pkg.id,
                    command_id=cmd_id,
                    progress=0,
                    attempts=DeploymentDevice.attempts + 1,
                    updated_at=utcnow(),
                )
            )

    async def _group_caps(self, s: AsyncSession, device_ids: list[str]) -> dict[str, int]:
        """The lowest group rate cap of each device that is in a capped group."""
        if not self.group_limit_bps:
            return {}
        caps: dict[str, int] = {}
        for i in range(0, len(device_ids), 5000):
            rows = await s.execute(
                select(device_groups.c.device_id, Group.name)
                .join(Group, Group.id == device_groups.c.group_id)
                .where(
                    Group.name.in_(list(self.group_limit_bps)),
                    device_groups.c.device_id.in_(device_ids[i : i + 5000]),
                )
            )
            for device_id, name in rows.all():
                cap = self.group_limit_bps[name]
                caps[device_id] = min(cap, caps.get(device_id, cap))
        return caps

    @staticmethod
    def payload(dep: Deployment, pkg: Package) -> dict[str, Any]:
        """What the agent needs to do the deployment alone: the signed descriptor and times."""
        return {
            "deployment_id": dep.id,
            "package_id": pkg.id,
            "action": dep.action,
            "descriptor": pkg.descriptor,
            "signature": pkg.signature,
            "activate_at": dep.activate_at.isoformat() if dep.activate_at else None,
            "window": dep.window,
            "limit_bps": dep.limit_bps,  # _send puts the effective limit here
        }

    # --- what devices ask -----------------------------------------------------------------

    async def report(self, device_id: str, rep: StatusReport) -> None:
        """A device's progress on one deployment; late reports never move a row backwards."""
        if rep.deployment_id.startswith("policy:"):
            # an install a policy's self-healing started: the policy report tells the outcome
            log.info("software: %s: policy install %s: %s", device_id, rep.state, rep.detail[:200])
            return
        async with self.db.transaction() as uow:
            await self.report_in(uow.session, device_id, rep)

    @staticmethod
    async def report_in(s: AsyncSession, device_id: str, rep: StatusReport) -> None:
        """report() inside the caller's transaction (OMA DM sessions report SCOMO outcomes)."""
        row = await s.get(DeploymentDevice, (rep.deployment_id, device_id))
        if row is None:
            raise NotFound("this device is not part of that deployment")
        if row.state == "cancelled":
            return
        if row.package_id is not None and row.package_id != rep.package_id:
            return  # about a version the deployment has moved on from
        newly_failed = rep.state == "failed" and row.state != "failed"
        row.state = rep.state
        row.progress = 100 if rep.state in ("installed", "removed") else rep.progress
        row.detail = rep.detail
        if rep.log:
            row.log = rep.log
        row.updated_at = utcnow()
        if newly_failed:
            dep = await s.get(Deployment, rep.deployment_id)
            await emit_webhook(
                s,
                "deployment.failed",
                {
                    "deployment_id": rep.deployment_id,
                    "deployment": dep.name if dep else None,
                    "package_id": rep.package_id,
                    "package": dep.package_name if dep else None,
                    "device_id": device_id,
                    "detail": rep.detail,
                },
            )

    async def catalog(self, device_id: str) -> list[dict[str, Any]]:
        """Packages offered to this device (available deployments that target it)."""
        async with self.db.read() as s:
            deps = (
                await s.scalars(
                    select(Deployment).where(
                        Deployment.mode == "available", Deployment.state == "active"
                    )
                )
            ).all()
            out = []
            for dep in deps:
                if device_id not in await self._resolve_quiet(s, dep):
                    continue
                pkg = await s.get(Package, dep.package_id)
                if pkg is None:
                    continue
                row = await s.get(DeploymentDevice, (dep.id, device_id))
                out.append(
                    {
                        "name": pkg.name,
                        "version": pkg.version,
                        "format": pkg.format,
                        "size": pkg.size,
                        "description": str(pkg.metadata_.get("description", ""))[:500],
                        "deployment": dep.name,
                        "state": row.state if row else "available",
                    }
                )
        return out

    async def _resolve_quiet(self, s: AsyncSession, dep: Deployment) -> set[str]:
        try:
            return set(await self._resolve(s, dep.targets))
        except (NotFound, Conflict):
            return set()

    async def request_install(self, device_id: str, name: str) -> dict[str, Any]:
        """Self-service: queue the catalogue package `name` for this device now."""
        async with self.db.transaction() as uow:
            s = uow.session
            deps = (
                await s.scalars(
                    select(Deployment).where(
                        Deployment.mode == "available",
                        Deployment.state == "active",
                        Deployment.package_name == name,
                    )
                )
            ).all()
            dep = None
            for d in deps:
                if device_id in await self._resolve_quiet(s, d):
                    dep = d
                    break
            if dep is None:
                raise NotFound(f"{name!r} is not in this device's catalogue")
            row = await s.get(DeploymentDevice, (dep.id, device_id))
            if row is None:
                self._add_devices(s, dep, [device_id])
                await s.flush()
            elif row.state in ("queued", "downloading", "downloaded", "installing"):
                raise Conflict(f"{name} is already on its way ({row.state})")
            pkg = await s.get(Package, dep.package_id)
            assert pkg is not None
            await self._send(uow, dep, [device_id])
            return {"deployment_id": dep.id, "package": f"{pkg.name} {pkg.version}"}

    async def plan_transfer(
        self, device_id: str, package_id: str, base_sha256: str | None
    ) -> dict[str, Any]:
        """How this device gets the package: a plan over what it already holds."""
        async with self.db.read() as s:
            pkg = await self._entitled(s, device_id, package_id)
            sha = pkg.sha256
        if base_sha256 is not None and (base_sha256 == sha or not self.store.has(base_sha256)):
            base_sha256 = None  # a base we do not hold cannot help
        plan = await self.planner.plan(sha, base_sha256)
        return plan.to_dict()

    async def _entitled(self, s: AsyncSession, device_id: str, package_id: str) -> Package:
        """The package, if a deployment has sent it to this device (else NotFound)."""
        ok = await s.scalar(
            select(DeploymentDevice.deployment_id)
            .where(
                DeploymentDevice.device_id == device_id,
                DeploymentDevice.package_id == package_id,
            )
            .limit(1)
        ) or await s.scalar(
            select(PolicyPackage.package_id).where(
                PolicyPackage.device_id == device_id, PolicyPackage.package_id == package_id
            )
        )
        pkg = await s.get(Package, package_id) if ok else None
        if pkg is None:
            raise NotFound("no deployment or policy gives this device that package")
        return pkg

    async def check_plan_access(self, device_id: str, target_sha256: str) -> None:
        """NotFound unless a deployment sent this device a package with this content."""
        async with self.db.read() as s:
            ok = await s.scalar(
                select(DeploymentDevice.deployment_id)
                .join(Package, Package.id == DeploymentDevice.package_id)
                .where(DeploymentDevice.device_id == device_id, Package.sha256 == target_sha256)
                .limit(1)
            ) or await s.scalar(
                select(PolicyPackage.package_id)
                .join(Package, Package.id == PolicyPackage.package_id)
                .where(PolicyPackage.device_id == device_id, Package.sha256 == target_sha256)
                .limit(1)
            )
        if not ok:
            raise NotFound("no such transfer for this device")


def _newest(versions: Sequence[Package]) -> Package | None:
    best: Package | None = None
    for p in versions:
        if best is None or compare_versions(p.version, best.version) > 0:
            best = p
    return best
