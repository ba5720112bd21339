"""`software_required` and `software_forbidden` rules, repaired through the software jobs."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

from custos.agent import inventory as inv
from custos.agent.install import DETECT_TIMEOUT_S, detect
from custos.agent.policy.base import (
    COMPLIANT,
    NONCOMPLIANT,
    REPAIRED,
    Context,
    Outcome,
    cut,
)
from custos.packaging.manifest import PackageError, compare_versions

if TYPE_CHECKING:
    from custos.agent.policy.store import PolicyStore
    from custos.agent.software import SoftwareManager

# inventory key prefix of each source a rule may name
PREFIXES = {"dpkg": "sw.dpkg.", "rpm": "sw.rpm.", "pip": "sw.pip.", "windows": "sw.winreg.",
            "macos": "sw.macapp."}  # fmt: skip
RETRY_BASE_S = 300.0
RETRY_MAX_S = 6 * 3600.0


def collect_software() -> dict[str, str]:
    """The software part of the inventory (blocking; never raises)."""
    return inv._run_collectors(
        (inv._collect_dpkg, inv._collect_rpm, inv._collect_pip, inv._collect_winreg,
         inv._collect_macapps)
    )  # fmt: skip


def installed_versions(
    name: str, source: str, software: dict[str, str], custos: dict[str, str]
) -> list[tuple[str, str]]:
    """(source, version) of every install of the named software the rule's source covers."""
    found: list[tuple[str, str]] = []
    if source in ("any", "custos") and name in custos:
        found.append(("custos", custos[name]))
    for src, prefix in PREFIXES.items():
        if source not in ("any", src):
            continue
        key = prefix + (inv.normalize_pip_name(name) if src == "pip" else inv.key_part(name))
        for version in (software.get(key) or "").split(","):
            if version:
                found.append((src, version))
    return found


def presence_of(detect_rule: dict[str, Any]) -> dict[str, Any]:
    """A detect rule without its version floor or hash: is the package there at all."""
    return {k: v for k, v in detect_rule.items() if k not in ("min_version", "sha256")}


def _satisfies(src: str, version: str, minimum: str | None) -> bool:
    if not minimum:
        return True
    return compare_versions(version, minimum, "pep440" if src == "pip" else "deb") >= 0


class PackageRules:
    """Evaluates software rules; starts and follows the software jobs that repair them."""

    def __init__(
        self, store: PolicyStore, manager: SoftwareManager | None, now: Any = time.time
    ) -> None:
        self.store = store
        self.manager = manager
        self.now = now

    def _custos(self) -> dict[str, str]:
        return self.manager.store.all_installed() if self.manager is not None else {}

    async def _still_there(self, rule: dict[str, Any]) -> bool:
        """Whether a package the agent installed passes its detect rule now (True if unknown)."""
        install = rule.get("install")
        descriptor = install.get("descriptor") if isinstance(install, dict) else None
        if not isinstance(descriptor, dict):
            return True
        detect_rule = descriptor.get("detect") or (descriptor.get("manifest") or {}).get("detect")
        if not isinstance(detect_rule, dict):
            return True
        try:
            result = await detect(presence_of(detect_rule), timeout_s=DETECT_TIMEOUT_S / 4)
        except (PackageError, ValueError, OSError):
            return True  # a rule this agent cannot evaluate: trust its own record
        return result.installed

    def _job(self, rule_id: str) -> dict[str, Any] | None:
        raw = self.store.meta(f"job:{rule_id}")
        return json.loads(raw) if raw else None

    def _set_job(self, rule_id: str, job: dict[str, Any] | None) -> None:
        self.store.set_meta(**{f"job:{rule_id}": json.dumps(job) if job else ""})

    def _job_running(self, job: dict[str, Any] | None) -> bool:
        if job is None or self.manager is None:
            return False
        return self.manager.store.job_state(str(job["id"])) not in (None, "done")

    async def evaluate(self, rule: dict[str, Any], ctx: Context) -> Outcome:
        """Check one software rule, starting a job to repair it where the rule allows."""
        software: dict[str, str] = ctx.extra.get("software") or {}
        name, source = str(rule.get("name", "")), str(rule.get("source", "any"))
        found = installed_versions(name, source, software, self._custos())
        if any(s == "custos" for s, _ in found) and not await self._still_there(rule):
            # the agent installed it, but it has been removed behind its back since
            found = [(s, v) for s, v in found if s != "custos"]
        rule_id = str(rule["id"])
        job = self._job(rule_id)
        if rule["type"] == "software_required":
            minimum = rule.get("min_version")
            good = [f"{s} {v}" for s, v in found if _satisfies(s, v, minimum)]
            if good:
                if job and job.get("open"):
                    self._set_job(rule_id, {**job, "open": False, "ok": True})
                    return Outcome(REPAIRED, f"installed by job {job['id']}: {good[0]}",
                                   [("repaired", f"installed: {good[0]}")])  # fmt: skip
                return Outcome(COMPLIANT, good[0])
            why = "not installed" if not found else (
                f"{found[0][0]} {found[0][1]} is older than {minimum}")  # fmt: skip
            install = rule.get("install")
            if not isinstance(install, dict):
                return Outcome(NONCOMPLIANT, f"{why}; nothing to install from",
                               [("drift", why)])  # fmt: skip
            return self._repair(rule, ctx, job, why, {**install, "action": "install"})
        # software_forbidden
        if not found:
            if job and job.get("open"):
                self._set_job(rule_id, {**job, "open": False, "ok": True})
                return Outcome(REPAIRED, f"removed by job {job['id']}", [("repaired", "removed")])
            return Outcome(COMPLIANT)
        why = "installed (" + ", ".join(f"{s} {v}" for s, v in found) + ")"
        held = self.manager.store.installed(name) if self.manager is not None else None
        if held is None or source not in ("any", "custos"):
            return Outcome(NONCOMPLIANT, f"{why}; not installed by Custos, so not removed",
                           [("drift", why)])  # fmt: skip
        assert self.manager is not None
        payload = self.manager.store.install_payload(str(held["package_id"]))
        if payload is None:
            return Outcome(NONCOMPLIANT, f"{why}; the agent no longer knows how it installed it",
                           [("drift", why)])  # fmt: skip
        return self._repair(rule, ctx, job, why, {**payload, "action": "uninstall"})

    def _repair(
        self, rule: dict[str, Any], ctx: Context, job: dict[str, Any] | None, why: str,
        payload: dict[str, Any],
    ) -> Outcome:  # fmt: skip
        rule_id, name = str(rule["id"]), str(rule.get("name", ""))
        verb = "installing" if payload["action"] == "install" else "removing"
        if self.manager is None:
            return Outcome(NONCOMPLIANT, f"{why}; software jobs are not available here",
                           [("drift", why)])  # fmt: skip
        if self._job_running(job):
            assert job is not None
            return Outcome(NONCOMPLIANT, f"{why}; {verb} (job {job['id']})")
        events: list[tuple[str, str]] = []
        attempt = 1
        if job is not None:
            attempt = int(job.get("attempt", 0)) + 1
            if job.get("open"):
                # the job finished, yet the rule is still not met
                events.append(("repair_failed", f"job {job['id']} did not fix it"))
                self._set_job(rule_id, job := {**job, "open": False})
            wait = min(RETRY_MAX_S, RETRY_BASE_S * 2 ** max(0, int(job.get("attempt", 1)) - 1))
            # after a job that worked, new drift is repaired at once; after one that did not,
            # the next attempt waits (a package that cannot install must not loop)
            if not job.get("ok") and self.now() - float(job.get("at", 0)) < wait:
                return Outcome(NONCOMPLIANT, f"{why}; {verb} failed, trying again later", events)
        policy_ids: dict[str, str] = ctx.extra.get("policy_ids") or {}
        policy_id = policy_ids.get(str(rule.get("policy", "")), str(rule.get("policy", "")))
        job_id = f"policy:{policy_id}:{name}:{attempt}"
        res = self.manager.handle({**payload, "deployment_id": job_id, "activate_at": None,
                                   "window": None})  # fmt: skip
        if res.get("state") == "failed":
            failure = cut(str(res.get("error")))
            return Outcome(NONCOMPLIANT, cut(f"{why}; {failure}"),
                           [*events, ("drift", why), ("repair_failed", failure)])  # fmt: skip
        self._set_job(rule_id, {"id": job_id, "attempt": attempt, "at": self.now(), "open": True})
        return Outcome(NONCOMPLIANT, f"{why}; {verb} (job {job_id})", [*events, ("drift", why)])
