"""Use cases for policies: profiles, assignments, bundles, compliance, lock and wipe."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import defer

from custos import profiles
from custos.commands.models import Command, CommandRun
from custos.commands.service import CommandService
from custos.db.base import new_id, utcnow
from custos.db.engine import Database, UnitOfWork
from custos.devices.models import Device, Group, device_groups
from custos.devices.scope import Scope, in_scope
from custos.devices.service import resolve_device, retire_in
from custos.errors import Conflict, Forbidden, Invalid, NotFound
from custos.packaging.manifest import compare_versions
from custos.policies.models import (
    ComplianceEvent,
    DevicePolicy,
    LostDevice,
    Policy,
    PolicyAssignment,
    PolicyPackage,
    PolicyVersion,
    RuleStatus,
    WipeOrder,
)
from custos.policies.schemas import (
    AssignmentIn,
    AssignmentOut,
    ComplianceCounts,
    ComplianceEventOut,
    ComplianceRow,
    DeviceCompliance,
    LockIn,
    LostIn,
    LostOut,
    PolicyDetail,
    PolicyOut,
    PolicyReport,
    PolicyVersionOut,
    RuleStatusOut,
    WipeIn,
    WipeOut,
)
from custos.push.hub import PushHub
from custos.software import labels as label_query
from custos.software.models import Label, Package

log = logging.getLogger(__name__)

# rules the server can judge from the inventory alone (agents report them too)
SERVER_RULES = ("software_required", "software_forbidden", "agent_version")
FAILING = ("noncompliant", "error")
EVENTS_SHOWN = 50
MAX_BUNDLE_RULES = 10_000  # what an agent accepts in one bundle (profiles hold 2,000 each)
RECONCILE_LOCK = 0x637573746F01  # pg_advisory_xact_lock key: one reconcile at a time
HISTORY_DAYS = 400  # compliance history kept (a year and a bit, for yearly audits)


async def _emit(s: AsyncSession, event: str, data: dict[str, Any]) -> None:
    """A webhook event, written in the caller's transaction (delivered by the webhook job)."""
    from custos.webhooks.service import emit

    await emit(s, event, data)


def _check_actions(doc: dict[str, Any], *, may_lock: bool, may_wipe: bool) -> None:
    """Forbidden unless the caller may do what the policy's actions do to its devices."""
    kinds = {a.get("do") for a in doc.get("actions", [])}
    if "wipe" in kinds and not may_wipe:
        raise Forbidden(
            "this policy wipes devices: that needs the devices.wipe permission everywhere",
            code="forbidden",
        )
    if "lock" in kinds and not may_lock:
        raise Forbidden(
            "this policy locks devices: that needs the devices.lock permission everywhere",
            code="forbidden",
        )


def _device_status(bundle: dict[str, Any], rows: Iterable[RuleStatus]) -> tuple[str, list[str]]:
    """The device's overall status from its bundle's rules and their statuses."""
    rule_ids = {str(r["id"]) for r in bundle.get("rules", [])}
    if not rule_ids:
        return "none", []
    have = {r.rule_id: r.status for r in rows if r.rule_id in rule_ids}
    failing = sorted(rid for rid, st in have.items() if st in FAILING)
    if failing:
        return "noncompliant", failing
    if rule_ids - have.keys():
        return "pending", []
    return "compliant", []


# where the agent's inventory keeps each source (custos.agent.inventory; Custos-installed
# packages are `custos.pkg.<name>`); a value may list several installed versions
_SOURCE_KEYS = {
    "dpkg": "sw.dpkg.",
    "rpm": "sw.rpm.",
    "pip": "sw.pip.",
    "windows": "sw.winreg.",
    "macos": "sw.macapp.",
    "custos": "custos.pkg.",
}


def _sw_installed(inventory: dict[str, str], name: str, source: str) -> list[str]:
    """Versions of a package the inventory lists, from one source or any."""
    from custos.agent.inventory import key_part, normalize_pip_name  # pure helpers

    found: list[str] = []
    for src, prefix in _SOURCE_KEYS.items():
        if source not in ("any", src):
            continue
        part = normalize_pip_name(name) if src == "pip" else key_part(name)
        raw = inventory.get(prefix + (name if src == "custos" else part))
        if raw:
            found.extend(v for v in raw.split(",") if v)
    return found


def judge_from_inventory(
    rule: dict[str, Any], inventory: dict[str, str], agent_version: str
) -> tuple[str, str] | None:
    """The status of a rule the server can judge from the inventory (None for the others)."""
    kind = rule.get("type")
    if kind == "software_required":
        versions = _sw_installed(inventory, rule["name"], rule.get("source", "any"))
        if not versions:
            return "noncompliant", f"{rule['name']} is not installed"
        want = rule.get("min_version")
        if want and all(compare_versions(v, want) < 0 for v in versions):
            return "noncompliant", f"{rule['name']} {', '.join(versions)} is older than {want}"
        return "compliant", f"{rule['name']} {', '.join(versions)}"
    if kind == "software_forbidden":
        versions = _sw_installed(inventory, rule["name"], rule.get("source", "any"))
        if versions:
            return "noncompliant", f"{rule['name']} {', '.join(versions)} is installed"
        return "compliant", f"{rule['name']} is not installed"
    if kind == "agent_version":
        if not agent_version:
            return None
        if compare_versions(agent_version, rule["min_version"]) < 0:
            return "noncompliant", f"agent {agent_version} is older than {rule['min_version']}"
        return "compliant", f"agent {agent_version}"
    return None


class PolicyService:
    """Profiles, their delivery as bundles, compliance with history, and lost-device orders."""

    def __init__(
        self,
        db: Database,
        commands: CommandService,
        push: PushHub,
        *,
        default_limit_bps: int | None = None,
        refresh_s: float = 60.0,
    ) -> None:
        self.db = db
        self.commands = commands
        self.push = push
        self.default_limit_bps = default_limit_bps
        self._next_prune = 0.0
        self._next_reconcile = 0.0
        self._reconciled_at = utcnow()
        self.refresh_s = refresh_s

    # --- profiles -------------------------------------------------------------------------

    async def add(
        self, text: str, created_by: str, *, may_lock: bool = True, may_wipe: bool = True
    ) -> PolicyDetail:
        """A new policy, or a new version of the one with the document's name.

        A policy whose actions lock or wipe devices can only be written by someone who may
        lock or wipe every device (it will act on whatever it is assigned to).
        """
        try:
            profile, doc = profiles.parse_profile(text)
        except profiles.ProfileError as exc:
            raise Invalid(f"invalid profile: {exc}", code="invalid_profile") from None
        _check_actions(doc, may_lock=may_lock, may_wipe=may_wipe)
        digest = profiles.document_digest(doc)
        now = utcnow()
        created = changed = False
        async with self.db.transaction() as uow:
            s = uow.session
            pol = await s.scalar(select(Policy).where(Policy.name == profile.name))
            if pol is None:
                pol = Policy(
                    id=new_id(),
                    name=profile.name,
                    description=profile.description,
                    version=1,
                    doc=doc,
                    digest=digest,
                    created_by=created_by,
                    created_at=now,
                    updated_at=now,
                )
                s.add(pol)
                created = changed = True
            elif pol.digest != digest:
                pol.version += 1
                pol.doc, pol.digest, pol.description = doc, digest, profile.description
                pol.updated_at = now
                changed = True
            if changed:
                await s.flush()
                s.add(
                    PolicyVersion(
                        policy_id=pol.id,
                        version=pol.version,
                        doc=doc,
                        source=text,
                        digest=digest,
                        created_by=created_by,
                        created_at=now,
                    )
                )
            policy_id = pol.id
        updated = await self.reconcile() if changed else 0
        out = await self.show(policy_id)
        return out.model_copy(
            update={"created": created, "changed": changed, "devices_updated": updated}
        )

    async def _policy(self, s: AsyncSession, ref: str) -> Policy:
        pol = await s.scalar(select(Policy).where(or_(Policy.id == ref, Policy.name == ref)))
        if pol is None:
            raise NotFound(f"no policy {ref!r}")
        return pol

    async def list_policies(self) -> list[PolicyOut]:
        """Every policy with its assignments and how many of its devices comply."""
        async with self.db.read() as s:
            pols = (await s.scalars(select(Policy).order_by(Policy.name))).all()
            assigns = await self._assignments(s, [p.id for p in pols])
            counts = await self._counts(s)
        return [self._out(p, assigns.get(p.id, []), counts.get(p.name)) for p in pols]

    @staticmethod
    async def _assignments(s: AsyncSession, ids: Sequence[str]) -> dict[str, list[AssignmentOut]]:
        out: dict[str, list[AssignmentOut]] = {}
        if not ids:
            return out
        rows = await s.scalars(
            select(PolicyAssignment)
            .where(PolicyAssignment.policy_id.in_(ids))
            .order_by(PolicyAssignment.priority.desc(), PolicyAssignment.kind)
        )
        for a in rows:
            out.setdefault(a.policy_id, []).append(
                AssignmentOut(
                    kind=a.kind,
                    target=a.target,
                    priority=a.priority,
                    created_by=a.created_by,
                    created_at=a.created_at,
                )
            )
        return out

    @staticmethod
    async def _counts(s: AsyncSession) -> dict[str, ComplianceCounts]:
        """Per policy name: devices compliant, non-compliant and pending (one pass)."""
        rows = await s.execute(
            select(DevicePolicy.status, DevicePolicy.policies)
            .join(Device, Device.id == DevicePolicy.device_id)
            .where(Device.status == "active", DevicePolicy.status != "none")
        )
        counts: dict[str, Counter[str]] = {}
        for status, names in rows:
            for name in names or ():
                counts.setdefault(str(name), Counter())[status] += 1
        return {
            name: ComplianceCounts(
                compliant=c["compliant"], noncompliant=c["noncompliant"], pending=c["pending"]
            )
            for name, c in counts.items()
        }

    @staticmethod
    def _out(p: Policy, assigns: list[AssignmentOut], counts: ComplianceCounts | None) -> PolicyOut:
        return PolicyOut(
            id=p.id,
            name=p.name,
            description=p.description,
            version=p.version,
            rules=len(profiles.Profile.model_validate(p.doc).rules()),
            assignments=assigns,
            devices=counts or ComplianceCounts(),
            updated_at=p.updated_at,
        )

    async def show(self, ref: str, version: int | None = None) -> PolicyDetail:
        """A policy with its document (current or an older version) and history."""
        async with self.db.read() as s:
            pol = await self._policy(s, ref)
            versions = (
                await s.scalars(
                    select(PolicyVersion)
                    .where(PolicyVersion.policy_id == pol.id)
                    .order_by(PolicyVersion.version.desc())
                )
            ).all()
            chosen = next((v for v in versions if v.version == (version or pol.version)), None)
            if chosen is None:
                raise NotFound(f"policy {pol.name!r} has no version {version}")
            assigns = await self._assignments(s, [pol.id])
            counts = await self._counts(s)
        base = self._out(pol, assigns.get(pol.id, []), counts.get(pol.name))
        return PolicyDetail(
            **base.model_dump(),
            document=chosen.doc,
            source=chosen.source,
            versions=[
                PolicyVersionOut(
                    version=v.version,
                    digest=v.digest,
                    created_by=v.created_by,
                    created_at=v.created_at,
                )
                for v in versions
            ],
        )

    async def remove(self, ref: str) -> int:
        """Delete a policy; its devices get bundles without its rules."""
        async with self.db.transaction() as uow:
            pol = await self._policy(uow.session, ref)
            await uow.session.delete(pol)
        return await self.reconcile()

    async def assign(
        self,
        ref: str,
        req: AssignmentIn,
        created_by: str,
        *,
        may_lock: bool = True,
        may_wipe: bool = True,
    ) -> PolicyDetail:
        """Assign a policy to all devices, a group or a label (the priority is updated if so)."""
        async with self.db.transaction() as uow:
            s = uow.session
            pol = await self._policy(s, ref)
            _check_actions(pol.doc, may_lock=may_lock, may_wipe=may_wipe)
            if req.kind == "group" and not await s.scalar(
                select(Group.id).where(Group.name == req.target)
            ):
                raise NotFound(f"no group named {req.target!r}")
            if req.kind == "label" and not await s.scalar(
                select(Label.id).where(Label.name == req.target)
            ):
                raise NotFound(f"no label named {req.target!r}")
            row = await s.scalar(
                select(PolicyAssignment).where(
                    PolicyAssignment.policy_id == pol.id,
                    PolicyAssignment.kind == req.kind,
                    PolicyAssignment.target == req.target,
                )
            )
            if row is None:
                s.add(
                    PolicyAssignment(
                        policy_id=pol.id,
                        kind=req.kind,
                        target=req.target,
                        priority=req.priority,
                        created_by=created_by,
                        created_at=utcnow(),
                    )
                )
            else:
                row.priority = req.priority
            policy_id = pol.id
        updated = await self.reconcile()
        out = await self.show(policy_id)
        return out.model_copy(update={"devices_updated": updated})

    async def unassign(self, ref: str, kind: str, target: str) -> PolicyDetail:
        """Remove one assignment."""
        async with self.db.transaction() as uow:
            s = uow.session
            pol = await self._policy(s, ref)
            res = await s.execute(
                delete(PolicyAssignment).where(
                    PolicyAssignment.policy_id == pol.id,
                    PolicyAssignment.kind == kind,
                    PolicyAssignment.target == target,
                )
            )
            if not res.rowcount:  # type: ignore[attr-defined]
                raise NotFound(f"policy {pol.name!r} is not assigned to {kind} {target!r}")
            policy_id = pol.id
        updated = await self.reconcile()
        out = await self.show(policy_id)
        return out.model_copy(update={"devices_updated": updated})

    # --- bundles ----------------------------------------------------------------------------

    async def reconcile(self) -> int:
        """Send every device whose effective bundle changed its new bundle; how many were sent.

        A periodic job (group and label membership change without telling anyone) and the
        tail of every policy change. Devices with the same bundle share one `policy` command;
        an undelivered older bundle is cancelled. On PostgreSQL one process reconciles at a
        time (a transaction-scoped advisory lock), so two cannot queue the same bundle.
        """
        async with self.db.transaction() as uow:
            s = uow.session
            if self.db.dialect == "postgresql":
                await s.execute(select(func.pg_advisory_xact_lock(RECONCILE_LOCK)))
            assigns = (await s.execute(select(PolicyAssignment, Policy).join(Policy))).all()
            # only the shas: full rows are loaded for the devices whose bundle changes
            held = dict(
                (await s.execute(select(DevicePolicy.device_id, DevicePolicy.bundle_sha))).all()
            )
            if not assigns and not any(held.values()):
                return 0
            wanted = await self._bundles(s, [(a, p) for a, p in assigns])
            changed = {
                d: b
                for d, b in wanted.items()
                if held.get(d, "") != (b["bundle_sha"] if b["rules"] else "")
                and (d in held or b["rules"])  # never had a policy, still has none
            }
            if not changed:
                return 0
            now = utcnow()
            rows: dict[str, DevicePolicy] = {}
            ids = list(changed)
            for i in range(0, len(ids), 500):
                for dp in await s.scalars(
                    select(DevicePolicy).where(DevicePolicy.device_id.in_(ids[i : i + 500]))
                ):
                    rows[dp.device_id] = dp
            by_sha: dict[str, tuple[dict[str, Any], list[str]]] = {}
            stale: dict[str, set[str]] = {}  # rules whose content changed: judged afresh
            issued = now
            for device_id, bundle in changed.items():
                if len(bundle["rules"]) > MAX_BUNDLE_RULES:
                    log.warning(
                        "policies: %s would get %d rules (at most %d); not sent",
                        device_id,
                        len(bundle["rules"]),
                        MAX_BUNDLE_RULES,
                    )
                    continue
                sha = bundle["bundle_sha"] if bundle["rules"] else ""
                found = rows.get(device_id)
                if found is None:
                    dp = DevicePolicy(device_id=device_id, status_since=now)
                    s.add(dp)
                else:
                    dp = found
                    old = {str(r["id"]): r for r in dp.bundle.get("rules", [])}
                    stale[device_id] = {
                        str(r["id"])
                        for r in bundle["rules"]
                        if old.get(str(r["id"])) not in (None, r)
                    }
                    if dp.sent_at is not None and dp.sent_at >= issued:
                        # strictly increasing per device, whichever process's clock it is
                        issued = dp.sent_at + timedelta(milliseconds=1)
                dp.bundle_sha = sha
                dp.bundle = bundle
                dp.policies = [p["name"] for p in bundle["profiles"]]
                dp.inventory_seen = -1  # judge the new rules from the inventory again
                by_sha.setdefault(sha, (bundle, []))[1].append(device_id)
            await s.flush()
            sent = 0
            for sha, (bundle, group) in by_sha.items():
                await self._cancel_undelivered(s, group)
                await self._grant_packages(s, bundle, group)
                await self.commands.queue(
                    uow,
                    kind="policy",
                    payload={**bundle, "issued_at": issued.isoformat()},
                    target="policy:" + (sha[:12] or "none"),
                    device_ids=group,
                    created_by="policy",
                )
                sent += len(group)
                await self._restatus(s, group, stale)
            for _, group in by_sha.values():
                for i in range(0, len(group), 500):
                    await s.execute(
                        update(DevicePolicy)
                        .where(DevicePolicy.device_id.in_(group[i : i + 500]))
                        .values(sent_at=issued)
                    )
        if sent:
            log.info("policies: new bundles for %d devices", sent)
        return sent

    @staticmethod
    async def _cancel_undelivered(s: AsyncSession, device_ids: Sequence[str]) -> None:
        """Cancel queued `policy` runs of these devices: a newer bundle replaces them."""
        for i in range(0, len(device_ids), 500):
            chunk = list(device_ids[i : i + 500])
            await s.execute(
                update(CommandRun)
                .where(
                    CommandRun.device_id.in_(chunk),
                    CommandRun.state == "queued",
                    CommandRun.command_id.in_(select(Command.id).where(Command.kind == "policy")),
                )
                .values(state="cancelled", finished_at=utcnow())
            )

    async def _bundles(
        self, s: AsyncSession, assigns: list[tuple[PolicyAssignment, Policy]]
    ) -> dict[str, dict[str, Any]]:
        """Every active device's effective bundle."""
        need_labels = any(a.kind == "label" for a, _ in assigns)
        cols: list[Any] = [Device.id]
        if need_labels:
            cols += [Device.inventory, Device.facts]
        devices = (await s.execute(select(*cols).where(Device.status == "active"))).all()
        groups: dict[str, set[str]] = {}
        group_names = {a.target for a, _ in assigns if a.kind == "group"}
        if group_names:
            rows = await s.execute(
                select(device_groups.c.device_id, Group.name)
                .join(Group, Group.id == device_groups.c.group_id)
                .where(Group.name.in_(group_names))
            )
            for device_id, name in rows:
                groups.setdefault(device_id, set()).add(name)
        label_queries: dict[str, list[dict[str, Any]]] = {}
        if need_labels:
            names = {a.target for a, _ in assigns if a.kind == "label"}
            for lbl in await s.scalars(select(Label).where(Label.name.in_(names))):
                label_queries[lbl.name] = lbl.query
        packages = await self._packages(s, [p for _, p in assigns])
        cache: dict[frozenset[tuple[int, int]], dict[str, Any]] = {}
        out: dict[str, dict[str, Any]] = {}
        for row in devices:
            device_id = row[0]
            mine: list[tuple[int, int]] = []
            for i, (a, _p) in enumerate(assigns):
                if a.kind == "all":
                    hit = True
                elif a.kind == "group":
                    hit = a.target in groups.get(device_id, ())
                else:
                    q = label_queries.get(a.target)
                    hit = q is not None and label_query.matches(q, row[1] or {}, row[2] or {})
                if hit:
                    mine.append((i, a.priority))
            key = frozenset(mine)
            bundle = cache.get(key)
            if bundle is None:
                bundle = profiles.merge(
                    profiles.Assigned(
                        policy_id=assigns[i][1].id,
                        name=assigns[i][1].name,
                        version=assigns[i][1].version,
                        doc=assigns[i][1].doc,
                        priority=assigns[i][0].priority,
                        kind=assigns[i][0].kind,
                    )
                    for i, _ in mine
                )
                self._attach_installs(bundle, packages)
                cache[key] = bundle
            out[device_id] = bundle
        return out

    async def _packages(self, s: AsyncSession, pols: Sequence[Policy]) -> dict[str, Package]:
        """The newest Custos package of each name some policy requires."""
        names = {
            r["name"]
            for p in pols
            for r in p.doc.get("software", {}).get("required", [])
            if r.get("source", "any") in ("any", "custos")
        }
        best: dict[str, Package] = {}
        if not names:
            return best
        for pkg in await s.scalars(select(Package).where(Package.name.in_(names))):
            held = best.get(pkg.name)
            if held is None or compare_versions(pkg.version, held.version) > 0:
                best[pkg.name] = pkg
        return best

    def _attach_installs(self, bundle: dict[str, Any], packages: dict[str, Package]) -> None:
        """Give required-software rules a signed install payload where the server has one."""
        policy_ids = {p["name"]: p["policy_id"] for p in bundle["profiles"]}
        for rule in bundle["rules"]:
            if rule["type"] != "software_required" or rule.get("source") not in ("any", "custos"):
                continue
            pkg = packages.get(rule["name"])
            if pkg is None:
                continue
            want = rule.get("min_version")
            if want and compare_versions(pkg.version, want) < 0:
                continue
            rule["install"] = {
                "deployment_id": f"policy:{policy_ids.get(rule['policy'], '')}",
                "package_id": pkg.id,
                "action": "install",
                "descriptor": pkg.descriptor,
                "signature": pkg.signature,
                "activate_at": None,
                "window": None,
                "limit_bps": self.default_limit_bps,
            }
        if bundle["rules"]:
            bundle["bundle_sha"] = profiles.bundle_digest(bundle)

    @staticmethod
    async def _grant_packages(s: AsyncSession, bundle: dict[str, Any], ids: list[str]) -> None:
        """Let these devices download the packages their bundle may install."""
        pkgs = {r["install"]["package_id"] for r in bundle["rules"] if r.get("install")}
        if not pkgs:
            return
        have = set(
            (
                await s.execute(
                    select(PolicyPackage.device_id, PolicyPackage.package_id).where(
                        PolicyPackage.device_id.in_(ids), PolicyPackage.package_id.in_(pkgs)
                    )
                )
            ).all()
        )
        s.add_all(
            PolicyPackage(device_id=d, package_id=p)
            for d in ids
            for p in pkgs
            if (d, p) not in have
        )

    async def _restatus(
        self,
        s: AsyncSession,
        device_ids: Sequence[str],
        stale: dict[str, set[str]] | None = None,
    ) -> None:
        """Drop statuses of rules no longer in a device's bundle, or whose content changed
        (a status about the old content says nothing of the new); recompute its status."""
        for i in range(0, len(device_ids), 500):
            chunk = list(device_ids[i : i + 500])
            dps = (
                await s.scalars(select(DevicePolicy).where(DevicePolicy.device_id.in_(chunk)))
            ).all()
            rows = (
                await s.scalars(select(RuleStatus).where(RuleStatus.device_id.in_(chunk)))
            ).all()
            by_device: dict[str, list[RuleStatus]] = {}
            for r in rows:
                by_device.setdefault(r.device_id, []).append(r)
            for dp in dps:
                keep = {str(r["id"]) for r in dp.bundle.get("rules", [])}
                keep -= (stale or {}).get(dp.device_id, set())
                mine = by_device.get(dp.device_id, [])
                for r in mine:
                    if r.rule_id not in keep:
                        await s.delete(r)
                await self._set_status(s, dp, [r for r in mine if r.rule_id in keep])

    # --- compliance ---------------------------------------------------------------------------

    async def record_report(self, device_id: str, rep: PolicyReport) -> int:
        """A device's evaluation: rule statuses, drift and repair events; idempotent by seq."""
        now = utcnow()
        async with self.db.transaction() as uow:
            s = uow.session
            dp = await s.get(DevicePolicy, device_id, with_for_update=True)
            if dp is None:
                dp = DevicePolicy(device_id=device_id, status="none", status_since=now)
                s.add(dp)
                await s.flush()
            if rep.seq <= dp.report_seq:
                return rep.seq  # already stored (an answer lost on the way)
            dp.report_seq = rep.seq
            dp.reported_sha = rep.bundle_sha
            dp.reported_at = now
            owner = {str(r["id"]): str(r.get("policy", "")) for r in dp.bundle.get("rules", [])}
            s.add_all(
                ComplianceEvent(
                    device_id=device_id,
                    rule_id=e.rule_id,
                    policy=owner.get(e.rule_id, ""),
                    kind=e.kind,
                    detail=e.detail,
                    at=min(e.at or now, now),
                )
                for e in rep.events
            )
            if rep.bundle_sha != dp.bundle_sha or not dp.bundle_sha:
                return rep.seq  # about a bundle this device no longer has
            rows = {
                r.rule_id: r
                for r in (
                    await s.scalars(select(RuleStatus).where(RuleStatus.device_id == device_id))
                ).all()
            }
            for rr in rep.rules:
                if rr.id not in owner:
                    continue
                self._put_status(
                    s, rows, device_id, rr.id, owner[rr.id], rr.status, rr.detail, "agent", now
                )
            await s.flush()
            await self._set_status(s, dp, list(rows.values()))
        return rep.seq

    @staticmethod
    def _put_status(
        s: AsyncSession,
        rows: dict[str, RuleStatus],
        device_id: str,
        rule_id: str,
        policy: str,
        status: str,
        detail: str,
        source: str,
        now: datetime,
    ) -> None:
        """Set one rule's status; a change of status goes to the history."""
        row = rows.get(rule_id)
        if row is None:
            row = RuleStatus(
                device_id=device_id,
                rule_id=rule_id,
                policy=policy,
                status=status,
                detail=detail,
                source=source,
                since=now,
                checked_at=now,
            )
            s.add(row)
            rows[rule_id] = row
            changed = True
        else:
            changed = row.status != status
            row.detail, row.source, row.checked_at, row.policy = detail, source, now, policy
            if changed:
                row.status, row.since = status, now
        if changed:
            s.add(
                ComplianceEvent(
                    device_id=device_id,
                    rule_id=rule_id,
                    policy=policy,
                    kind=status,
                    detail=detail,
                    at=now,
                )
            )

    async def _set_status(self, s: AsyncSession, dp: DevicePolicy, rows: list[RuleStatus]) -> None:
        """The device's overall status; leaving non-compliance undoes quarantine and hold."""
        status, failing = _device_status(dp.bundle, rows)
        now = utcnow()
        dp.failing = failing
        if status == dp.status:
            return
        was = dp.status
        dp.status, dp.status_since = status, now
        if status == "noncompliant":
            dp.noncompliant_since = dp.noncompliant_since or now
            s.add(
                ComplianceEvent(
                    device_id=dp.device_id,
                    rule_id="*",
                    kind="noncompliant",
                    detail=", ".join(failing)[:1000],
                    at=now,
                )
            )
            return
        if was != "noncompliant":
            return
        s.add(ComplianceEvent(device_id=dp.device_id, rule_id="*", kind=status, at=now))
        if dp.quarantine_group:
            gid = await s.scalar(select(Group.id).where(Group.name == dp.quarantine_group))
            if gid is not None:
                await s.execute(
                    delete(device_groups).where(
                        device_groups.c.device_id == dp.device_id, device_groups.c.group_id == gid
                    )
                )
        notified = any(a.endswith(":notify") for a in dp.actions_done)
        dp.noncompliant_since, dp.held, dp.quarantine_group, dp.actions_done = None, False, None, []
        if notified:
            await _emit(s, "device.compliant", {"device_id": dp.device_id})

    async def judge_inventory(self) -> int:
        """Judge inventory-visible rules of devices whose inventory or bundle changed."""
        judged = 0
        async with self.db.transaction() as uow:
            s = uow.session
            rows = (
                await s.execute(
                    select(
                        DevicePolicy,
                        Device.inventory,
                        Device.inventory_version,
                        Device.agent_version,
                    )
                    .join(Device, Device.id == DevicePolicy.device_id)
                    .where(
                        Device.status == "active",
                        DevicePolicy.bundle_sha != "",
                        DevicePolicy.inventory_seen != Device.inventory_version,
                    )
                    .limit(2000)
                )
            ).all()
            now = utcnow()
            statuses: dict[str, dict[str, RuleStatus]] = {}
            ids = [dp.device_id for dp, *_ in rows]
            for i in range(0, len(ids), 500):  # one query per 500 devices, not one each
                for r in await s.scalars(
                    select(RuleStatus).where(RuleStatus.device_id.in_(ids[i : i + 500]))
                ):
                    statuses.setdefault(r.device_id, {})[r.rule_id] = r
            for dp, inventory, inv_version, agent_version in rows:
                dp.inventory_seen = inv_version
                rules = [r for r in dp.bundle.get("rules", []) if r["type"] in SERVER_RULES]
                if not rules:
                    continue
                have = statuses.setdefault(dp.device_id, {})
                reported = dp.reported_sha == dp.bundle_sha
                for rule in rules:
                    held = have.get(rule["id"])
                    if reported and held is not None and held.source == "agent":
                        continue  # the agent's own check of this bundle is fresher
                    verdict = judge_from_inventory(rule, inventory or {}, agent_version or "")
                    if verdict is None:
                        continue
                    self._put_status(
                        s,
                        have,
                        dp.device_id,
                        rule["id"],
                        rule.get("policy", ""),
                        verdict[0],
                        verdict[1],
                        "server",
                        now,
                    )
                await s.flush()
                await self._set_status(s, dp, list(have.values()))
                judged += 1
        return judged

    async def device_compliance(self, ref: str, scope: Scope = None) -> DeviceCompliance:
        """One device's status, rules, recent history and lost state."""
        async with self.db.read() as s:
            d = await resolve_device(s, ref, scope)
            dp = await s.get(DevicePolicy, d.id)
            rules = (
                await s.scalars(
                    select(RuleStatus)
                    .where(RuleStatus.device_id == d.id)
                    .order_by(RuleStatus.rule_id)
                )
            ).all()
            events = (
                await s.scalars(
                    select(ComplianceEvent)
                    .where(ComplianceEvent.device_id == d.id)
                    .order_by(ComplianceEvent.at.desc(), ComplianceEvent.id.desc())
                    .limit(EVENTS_SHOWN)
                )
            ).all()
            lost = await s.get(LostDevice, d.id)
        return DeviceCompliance(
            device_id=d.id,
            device=d.name,
            status=dp.status if dp else "none",
            status_since=dp.status_since if dp else None,
            noncompliant_since=dp.noncompliant_since if dp else None,
            bundle_sha=dp.bundle_sha if dp else "",
            profiles=(dp.bundle.get("profiles", []) if dp else []),
            reported_at=dp.reported_at if dp else None,
            held=bool(dp and dp.held),
            quarantine_group=dp.quarantine_group if dp else None,
            actions_done=list(dp.actions_done) if dp else [],
            lost=(
                {
                    "state": lost.state,
                    "lock": lost.lock,
                    "wipe": lost.wipe,
                    "auto_wipe_days": lost.auto_wipe_days,
                    "marked_at": lost.marked_at.isoformat(),
                    "marked_by": lost.marked_by,
                }
                if lost
                else None
            ),
            rules=[
                RuleStatusOut(
                    rule_id=r.rule_id,
                    policy=r.policy,
                    status=r.status,
                    detail=r.detail,
                    source=r.source,
                    since=r.since,
                    checked_at=r.checked_at,
                )
                for r in rules
            ],
            events=[self._event_out(e) for e in events],
        )

    @staticmethod
    def _event_out(e: ComplianceEvent) -> ComplianceEventOut:
        return ComplianceEventOut(
            at=e.at, rule_id=e.rule_id, policy=e.policy, kind=e.kind, detail=e.detail
        )

    async def history(
        self,
        ref: str,
        *,
        rule: str | None,
        since: datetime | None,
        limit: int,
        offset: int,
        scope: Scope = None,
    ) -> list[ComplianceEventOut]:
        """A device's compliance history, newest first, optionally for one rule."""
        async with self.db.read() as s:
            d = await resolve_device(s, ref, scope)
            q = select(ComplianceEvent).where(ComplianceEvent.device_id == d.id)
            if rule:
                q = q.where(ComplianceEvent.rule_id == rule)
            if since:
                q = q.where(ComplianceEvent.at >= since)
            rows = (
                await s.scalars(
                    q.order_by(ComplianceEvent.at.desc(), ComplianceEvent.id.desc())
                    .limit(limit)
                    .offset(offset)
                )
            ).all()
        return [self._event_out(e) for e in rows]

    async def compliance(
        self,
        *,
        status: str | None,
        policy: str | None,
        limit: int,
        offset: int,
        scope: Scope = None,
    ) -> list[ComplianceRow]:
        """Devices with a policy and their compliance (e.g. exactly the non-compliant ones)."""
        async with self.db.read() as s:
            q = (
                select(DevicePolicy, Device.name, Device.last_seen)
                .options(defer(DevicePolicy.bundle))
                .join(Device, Device.id == DevicePolicy.device_id)
                .where(
                    Device.status == "active",
                    DevicePolicy.status != "none",
                    in_scope(Device.id, scope),
                )
            )
            if status:
                q = q.where(DevicePolicy.status == status)
            rows = (await s.execute(q.order_by(Device.name, Device.id))).all()
        out = []
        for dp, name, last_seen in rows:
            names = list(dp.policies or ())
            if policy and policy not in names:
                continue
            out.append(
                ComplianceRow(
                    device_id=dp.device_id,
                    device=name,
                    status=dp.status,
                    status_since=dp.status_since,
                    noncompliant_since=dp.noncompliant_since,
                    failing=list(dp.failing),
                    policies=names,
                    held=dp.held,
                    last_seen=last_seen,
                )
            )
        return out[offset : offset + limit]

    async def held_devices(self, s: AsyncSession, device_ids: Sequence[str]) -> set[str]:
        """Which of these devices are held back from deployments by a policy action."""
        if not device_ids:
            return set()
        rows = await s.scalars(
            select(DevicePolicy.device_id).where(
                DevicePolicy.held.is_(True), DevicePolicy.device_id.in_(list(device_ids))
            )
        )
        return set(rows.all())

    # --- non-compliance actions ---------------------------------------------------------------

    async def act(self) -> int:
        """Take the actions whose grace period has passed on non-compliant devices."""
        taken = 0
        now = utcnow()
        async with self.db.transaction() as uow:
            s = uow.session
            rows = (
                await s.execute(
                    select(DevicePolicy, Device.name)
                    .join(Device, Device.id == DevicePolicy.device_id)
                    .where(Device.status == "active", DevicePolicy.status == "noncompliant")
                    .with_for_update(of=DevicePolicy, skip_locked=True)
                )
            ).all()
            if not rows:
                return 0
            docs = {p.name: p.doc for p in (await s.scalars(select(Policy))).all()}
            for dp, name in rows:
                since = dp.noncompliant_since or now
                owner = {str(r["id"]): r.get("policy", "") for r in dp.bundle.get("rules", [])}
                failing_policies = sorted({owner.get(rid, "") for rid in dp.failing} - {""})
                done = list(dp.actions_done)
                for pname in failing_policies:
                    for i, action in enumerate(docs.get(pname, {}).get("actions", [])):
                        key = f"{pname}#{i}:{action['do']}"
                        if key in done or since + timedelta(seconds=action["after"]) > now:
                            continue
                        done.append(key)
                        await self._take(uow, dp, name, pname, action)
                        taken += 1
                dp.actions_done = done
        return taken

    async def _take(
        self, uow: UnitOfWork, dp: DevicePolicy, name: str, pname: str, action: dict[str, Any]
    ) -> None:
        s = uow.session
        what = action["do"]
        log.info("policies: %s on %s (non-compliant with %s)", what, name, pname)
        s.add(
            ComplianceEvent(
                device_id=dp.device_id,
                rule_id="*",
                policy=pname,
                kind=f"action:{what}",
                detail=f"after {action['after']} s non-compliant",
                at=utcnow(),
            )
        )
        if what == "notify":
            await _emit(
                s,
                "device.noncompliant",
                {
                    "device_id": dp.device_id,
                    "device": name,
                    "policy": pname,
                    "failing": dp.failing,
                    "noncompliant_since": (dp.noncompliant_since or utcnow()).isoformat(),
                },
            )
        elif what == "quarantine":
            group = await s.scalar(select(Group).where(Group.name == action["group"]))
            if group is None:
                group = Group(name=action["group"], description="devices quarantined by policy")
                s.add(group)
                await s.flush()
            present = await s.scalar(
                select(func.count()).where(
                    device_groups.c.device_id == dp.device_id,
                    device_groups.c.group_id == group.id,
                )
            )
            if not present:
                await s.execute(
                    device_groups.insert().values(device_id=dp.device_id, group_id=group.id)
                )
            dp.quarantine_group = group.name
        elif what == "hold":
            dp.held = True
        elif what == "lock":
            await self._queue_lock(
                uow, dp.device_id, f"locked by policy {pname}", dp.bundle, by=f"policy:{pname}"
            )
        elif what == "wipe":
            await self._queue_wipe(
                uow,
                dp.device_id,
                mode=action.get("mode", "selective"),
                dry_run=False,
                reason=f"policy {pname}",
                by=f"policy:{pname}",
                bundle=dp.bundle,
            )

    # --- lost devices, lock and wipe -------------------------------------------------------------

    async def _queue_lock(
        self, uow: UnitOfWork, device_id: str, message: str, bundle: dict[str, Any], *, by: str
    ) -> str:
        cmd = await self.commands.queue(
            uow,
            kind="lock",
            payload={"message": message, "accounts": list(bundle.get("managed_accounts", []))},
            target=f"device:{device_id}",
            device_ids=[device_id],
            created_by=by,
        )
        return await self._run_of(uow.session, cmd, device_id)

    @staticmethod
    async def _run_of(s: AsyncSession, command_id: str, device_id: str) -> str:
        run_id = await s.scalar(
            select(CommandRun.id).where(
                CommandRun.command_id == command_id, CommandRun.device_id == device_id
            )
        )
        assert run_id is not None
        return run_id

    async def _queue_wipe(
        self,
        uow: UnitOfWork,
        device_id: str,
        *,
        mode: str,
        dry_run: bool,
        reason: str,
        by: str,
        bundle: dict[str, Any] | None = None,
    ) -> WipeOrder:
        s = uow.session
        if bundle is None:
            dp = await s.get(DevicePolicy, device_id)
            bundle = dp.bundle if dp else {}
        cmd = await self.commands.queue(
            uow,
            kind="wipe",
            payload={
                "mode": mode,
                "dry_run": dry_run,
                "paths": list(bundle.get("managed_data", [])),
                "applications": True,
                "secrets": True,
            },
            target=f"device:{device_id}",
            device_ids=[device_id],
            created_by=by,
        )
        order = WipeOrder(
            id=new_id(),
            device_id=device_id,
            run_id=await self._run_of(s, cmd, device_id),
            mode=mode,
            dry_run=dry_run,
            reason=reason,
            requested_by=by,
            requested_at=utcnow(),
            state="sent",
        )
        s.add(order)
        await s.flush()
        return order

    @staticmethod
    def _check_confirm(device: Device, confirm: str) -> None:
        if confirm != device.name and confirm != device.id:
            raise Invalid(
                f"a wipe must be confirmed with the device's name ({device.name!r})",
                code="confirmation_required",
            )

    async def mark_lost(
        self, ref: str, req: LostIn, by: str, *, scope: Scope = None, may_wipe: bool
    ) -> LostOut:
        """Mark a device lost: lock and/or wipe it at its next contact (or after N silent days)."""
        wipes = req.wipe != "none" or req.auto_wipe_days is not None
        if wipes and not may_wipe:
            raise Forbidden("wiping needs the devices.wipe permission", code="forbidden")
        async with self.db.transaction() as uow:
            s = uow.session
            d = await resolve_device(s, ref, scope)
            if d.status != "active":
                raise Conflict(f"device {d.name!r} is {d.status}")
            if wipes and not req.dry_run:
                self._check_confirm(d, req.confirm)
            lost = await s.get(LostDevice, d.id)
            if lost is None:
                lost = LostDevice(device_id=d.id)
                s.add(lost)
            lost.state, lost.message, lost.lock = "lost", req.message, req.lock
            lost.wipe = (
                req.wipe if req.wipe != "none" else ("selective" if req.auto_wipe_days else "none")
            )
            lost.dry_run, lost.auto_wipe_days = req.dry_run, req.auto_wipe_days
            lost.marked_by, lost.marked_at, lost.found_at = by, utcnow(), None
            if req.lock:
                lost.lock_run_id = await self._queue_lock(
                    uow, d.id, req.message or "this device was reported lost", {}, by=by
                )
            order = None
            if req.wipe != "none" and req.auto_wipe_days is None:
                order = await self._queue_wipe(
                    uow, d.id, mode=req.wipe, dry_run=req.dry_run, reason="lost", by=by
                )
            await _emit(
                s,
                "device.lost",
                {
                    "device_id": d.id,
                    "device": d.name,
                    "lock": req.lock,
                    "wipe": lost.wipe,
                    "auto_wipe_days": req.auto_wipe_days,
                    "by": by,
                },
            )
            await s.flush()
            return self._lost_out(d, lost, order)

    def _lost_out(self, d: Device, lost: LostDevice, order: WipeOrder | None) -> LostOut:
        return LostOut(
            device_id=d.id,
            device=d.name,
            state=lost.state,
            lock=lost.lock,
            wipe=lost.wipe,
            dry_run=lost.dry_run,
            auto_wipe_days=lost.auto_wipe_days,
            lock_run_id=lost.lock_run_id,
            wipe_order=self._wipe_out(order, d.name) if order else None,
            marked_by=lost.marked_by,
            marked_at=lost.marked_at,
        )

    @staticmethod
    def _wipe_out(o: WipeOrder, name: str) -> WipeOut:
        return WipeOut(
            id=o.id,
            device_id=o.device_id,
            device=name,
            run_id=o.run_id,
            mode=o.mode,
            dry_run=o.dry_run,
            reason=o.reason,
            requested_by=o.requested_by,
            requested_at=o.requested_at,
            state=o.state,
            result=o.result,
            finished_at=o.finished_at,
        )

    async def found(self, ref: str, by: str, *, scope: Scope = None) -> LostOut:
        """A lost device is back: undelivered lock and wipe are cancelled, a lock is undone."""
        async with self.db.transaction() as uow:
            s = uow.session
            d = await resolve_device(s, ref, scope)
            lost = await s.get(LostDevice, d.id)
            if lost is None or lost.state != "lost":
                raise Conflict(f"device {d.name!r} is not marked lost")
            lost.state, lost.found_at = "found", utcnow()
            orders = (
                await s.scalars(
                    select(WipeOrder).where(WipeOrder.device_id == d.id, WipeOrder.state == "sent")
                )
            ).all()
            pending = [o.run_id for o in orders]
            if lost.lock_run_id:
                pending.append(lost.lock_run_id)
            cancelled = set()
            if pending:
                # only what the device has not been handed: a run sent may already be on it
                # (it will run, and its result decides; a delivered lock is undone below)
                res = await s.execute(
                    update(CommandRun)
                    .where(CommandRun.id.in_(pending), CommandRun.state == "queued")
                    .values(state="cancelled", finished_at=utcnow())
                    .returning(CommandRun.id)
                )
                cancelled = set(res.scalars().all())
            for o in orders:
                if o.run_id in cancelled:
                    o.state, o.finished_at = "cancelled", utcnow()
            if lost.lock and lost.lock_run_id and lost.lock_run_id not in cancelled:
                dp = await s.get(DevicePolicy, d.id)
                await self.commands.queue(
                    uow,
                    kind="unlock",
                    payload={
                        "accounts": list((dp.bundle if dp else {}).get("managed_accounts", []))
                    },
                    target=f"device:{d.id}",
                    device_ids=[d.id],
                    created_by=by,
                )
            await _emit(s, "device.found", {"device_id": d.id, "device": d.name, "by": by})
            await s.flush()
            return self._lost_out(d, lost, None)

    async def lock(self, ref: str, req: LockIn, by: str, *, scope: Scope = None) -> dict[str, str]:
        """Lock a device at its next contact."""
        async with self.db.transaction() as uow:
            d = await resolve_device(uow.session, ref, scope)
            if d.status != "active":
                raise Conflict(f"device {d.name!r} is {d.status}")
            dp = await uow.session.get(DevicePolicy, d.id)
            run_id = await self._queue_lock(
                uow,
                d.id,
                req.message or "locked by an administrator",
                dp.bundle if dp else {},
                by=by,
            )
            await _emit(uow.session, "device.locked", {"device_id": d.id, "device": d.name})
        return {"device_id": d.id, "run_id": run_id}

    async def wipe(self, ref: str, req: WipeIn, by: str, *, scope: Scope = None) -> WipeOut:
        """Wipe a device at its next contact (confirmed with its name unless a dry run)."""
        async with self.db.transaction() as uow:
            d = await resolve_device(uow.session, ref, scope)
            if d.status != "active":
                raise Conflict(f"device {d.name!r} is {d.status}")
            if not req.dry_run:
                self._check_confirm(d, req.confirm)
            order = await self._queue_wipe(
                uow, d.id, mode=req.mode, dry_run=req.dry_run, reason="admin", by=by
            )
            return self._wipe_out(order, d.name)

    async def wipes(self, *, limit: int, offset: int, scope: Scope = None) -> list[WipeOut]:
        """Wipe orders, newest first."""
        async with self.db.read() as s:
            rows = (
                await s.execute(
                    select(WipeOrder, Device.name)
                    .join(Device, Device.id == WipeOrder.device_id)
                    .where(in_scope(Device.id, scope))
                    .order_by(WipeOrder.requested_at.desc())
                    .limit(limit)
                    .offset(offset)
                )
            ).all()
        return [self._wipe_out(o, n) for o, n in rows]

    async def tick_lost(self) -> int:
        """Auto-wipe lost devices silent too long; confirm wipes and retire wiped devices."""
        changed = 0
        now = utcnow()
        retired: list[str] = []
        async with self.db.transaction() as uow:
            s = uow.session
            due = (
                await s.execute(
                    select(LostDevice, Device)
                    .join(Device, Device.id == LostDevice.device_id)
                    .where(
                        LostDevice.state == "lost",
                        LostDevice.auto_wipe_days.is_not(None),
                        Device.status == "active",
                    )
                )
            ).all()
            for lost, d in due:
                assert lost.auto_wipe_days is not None
                silent_since = d.last_seen or d.enrolled_at
                if silent_since > now - timedelta(days=lost.auto_wipe_days):
                    continue
                if await s.scalar(
                    select(WipeOrder.id).where(
                        WipeOrder.device_id == d.id,
                        WipeOrder.requested_at >= lost.marked_at,
                        WipeOrder.state.in_(("sent", "confirmed")),
                    )
                ):
                    continue
                await self._queue_wipe(
                    uow,
                    d.id,
                    mode=lost.wipe if lost.wipe != "none" else "selective",
                    dry_run=lost.dry_run,
                    reason=f"lost and silent {lost.auto_wipe_days} days",
                    by="auto-wipe",
                )
                changed += 1
            finished = (
                await s.execute(
                    select(WipeOrder, CommandRun.state, CommandRun.result, CommandRun.error, Device)
                    .join(CommandRun, CommandRun.id == WipeOrder.run_id)
                    .join(Device, Device.id == WipeOrder.device_id)
                    .where(
                        WipeOrder.state == "sent",
                        CommandRun.state.in_(
                            (
                                "succeeded",
                                "failed",
                                "interrupted",
                                "expired",
                                "rejected",
                                "cancelled",
                            )
                        ),
                    )
                    .with_for_update(of=WipeOrder, skip_locked=True)
                )
            ).all()
            for order, run_state, result, error, d in finished:
                order.result = {"run_state": run_state, "error": error, **(result or {})}
                order.finished_at = now
                changed += 1
                if run_state != "succeeded":
                    order.state = "failed"
                    continue
                order.state = "confirmed"
                if order.dry_run:
                    continue
                await _emit(
                    s,
                    "device.wiped",
                    {
                        "device_id": d.id,
                        "device": d.name,
                        "mode": order.mode,
                        "result": order.result,
                    },
                )
                if d.status == "active":
                    await retire_in(uow, d, self.push, reason="wiped")
                    retired.append(d.id)
        if retired:
            log.info("policies: %d wiped devices retired", len(retired))
        return changed

    async def tick(self) -> int:
        """The periodic job: bundles, inventory judgements, actions, lost devices.

        Bundles are recomputed every `refresh_s` only (reading every device's groups, and
        its inventory when labels are assigned, is the costly part); policy changes send
        theirs at once.
        """
        n = 0
        if time.monotonic() >= self._next_reconcile or await self._enrolled_since_reconcile():
            self._next_reconcile = time.monotonic() + self.refresh_s
            self._reconciled_at = utcnow()
            n += await self.reconcile()
        n += await self.judge_inventory()
        n += await self.act()
        n += await self.tick_lost()
        if time.monotonic() >= self._next_prune:
            self._next_prune = time.monotonic() + 3600
            await self.prune_history()
        return n

    async def _enrolled_since_reconcile(self) -> bool:
        """Whether a device enrolled since the last reconcile (it gets its bundle at once)."""
        async with self.db.read() as s:
            return bool(
                await s.scalar(
                    select(Device.id)
                    .where(Device.status == "active", Device.enrolled_at >= self._reconciled_at)
                    .limit(1)
                )
            )

    async def prune_history(self, now: datetime | None = None) -> int:
        """Delete compliance history older than HISTORY_DAYS (hourly, from the tick)."""
        cutoff = (now or utcnow()) - timedelta(days=HISTORY_DAYS)
        async with self.db.transaction() as uow:
            res = await uow.session.execute(
                delete(ComplianceEvent).where(ComplianceEvent.at < cutoff)
            )
        return int(res.rowcount or 0)  # type: ignore[attr-defined]
