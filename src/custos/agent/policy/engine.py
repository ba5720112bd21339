"""The policy engine: holds the bundle, evaluates it on its interval, queues and sends reports.

Evaluation needs no network (only reinstalls do): the bundle, the statuses and the unsent
reports live in the agent's SQLite file, and the loop runs on the device's own clock.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from custos.agent.client import RequestRejected, ServerError, ServerRefused
from custos.agent.policy import checks, files, services, settings
from custos.agent.policy.base import (
    ERROR,
    NONCOMPLIANT,
    UNSUPPORTED,
    Context,
    Outcome,
    Runner,
    Sandbox,
    cut,
    run,
)
from custos.agent.policy.guard import RULE_ID as GUARD_ID
from custos.agent.policy.guard import AgentGuard
from custos.agent.policy.packages import PackageRules, collect_software
from custos.agent.policy.services import ProcessSupervisor
from custos.agent.policy.store import PolicyStore

if TYPE_CHECKING:
    from custos.agent.software import SoftwareManager
    from custos.agent.state import AgentState

log = logging.getLogger("custos.agent.policy")

DEFAULT_INTERVAL_S = 900.0
MIN_INTERVAL_S, MAX_INTERVAL_S = 10.0, 86400.0
HEARTBEAT_S = 6 * 3600.0
RETRY_S = 30.0
INVENTORY_TTL_S = 60.0
MAX_RULES = 10_000  # a device's merged bundle (several profiles of up to 2,000 each)
MAX_RULE_ID = 1200  # the longest rule id the server takes back in a report
MAX_EVENTS = 500
MAX_REPORT_BYTES = 1_000_000  # the server takes 1 MiB; room left for headers and rounding
# software first (services may wait for their package), checks last
ORDER = {"software_required": 0, "software_forbidden": 0, "file": 1, "setting": 2,
         "service": 3}  # fmt: skip
CHECKS = ("agent_version", "disk_encryption", "screen_lock", "password")

Sender = Callable[[bytes], Awaitable[Any]]


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat()


class BundleError(ValueError):
    """A `policy` command payload the agent cannot use."""


def check_bundle(doc: Any) -> dict[str, Any]:
    """The bundle if its shape is usable; BundleError says why not."""
    if not isinstance(doc, dict):
        raise BundleError("the payload is not an object")
    for key in ("bundle_sha", "issued_at"):
        if not isinstance(doc.get(key), str) or not doc[key]:
            raise BundleError(f"{key} is missing")
    try:
        datetime.fromisoformat(doc["issued_at"])
    except ValueError:
        raise BundleError("issued_at is not an ISO time") from None
    rules = doc.get("rules")
    if not isinstance(rules, list) or len(rules) > MAX_RULES:
        raise BundleError(f"rules must be a list of at most {MAX_RULES}")
    seen: set[str] = set()
    for rule in rules:
        if not isinstance(rule, dict) or not rule.get("id") or not rule.get("type"):
            raise BundleError("every rule needs an id and a type")
        if len(str(rule["id"])) > MAX_RULE_ID:
            raise BundleError(f"a rule id is longer than {MAX_RULE_ID} characters")
        if rule["id"] in seen or rule["id"] == GUARD_ID:
            raise BundleError(f"rule id {rule['id']!r} appears twice")
        seen.add(str(rule["id"]))
    interval = doc.get("interval_s", DEFAULT_INTERVAL_S)
    if not isinstance(interval, int | float) or isinstance(interval, bool):
        raise BundleError("interval_s must be a number")
    for key in ("managed_data", "managed_accounts"):
        if not isinstance(doc.get(key) or [], list):
            raise BundleError(f"{key} must be a list")
    return doc


_SEVERITY = {"error": 0, "noncompliant": 1, "repaired": 2, "unsupported": 3, "compliant": 4}


def _size(report: dict[str, Any]) -> int:
    return len(json.dumps(report, separators=(",", ":"), ensure_ascii=False).encode())


def fit_report(report: dict[str, Any], limit: int = MAX_REPORT_BYTES) -> dict[str, Any]:
    """The report within the server's size limit, shortening details if it must.

    Details go first (down to none), then events; only if 10,000 long rule ids alone are
    still too large are the least telling statuses (compliant ones last) left out: the server
    keeps a rule's last status until a report names it again.
    """
    for keep in (None, 200, 40, 0):
        if keep is not None:
            report = {
                **report,
                "rules": [_cut_detail(r, keep) for r in report["rules"]],
                "events": [_cut_detail(e, keep) for e in report["events"]],
            }
        if _size(report) <= limit:
            return report
    report = {**report, "events": []}
    size = _size(report)
    if size <= limit:
        return report
    rules = sorted(report["rules"], key=lambda r: _SEVERITY.get(str(r.get("status")), 0))
    while rules and size > limit:
        dropped = rules.pop()
        size -= len(json.dumps(dropped, separators=(",", ":"), ensure_ascii=False).encode()) + 1
    return {**report, "rules": rules}


def _cut_detail(item: dict[str, Any], keep: int) -> dict[str, Any]:
    """An item with its detail cut to keep characters (an empty detail is left out)."""
    detail = str(item.get("detail", ""))[:keep]
    rest = {k: v for k, v in item.items() if k != "detail"}
    return {**rest, "detail": detail} if detail else rest


class PolicyEngine:
    """Evaluates the policy bundle and reports compliance."""

    def __init__(
        self,
        state: AgentState,
        *,
        root: Path = Path("/"),
        software: SoftwareManager | None = None,
        send: Sender | None = None,
        server_now: Callable[[], float] = time.time,
        clock_offset: Callable[[], float] = lambda: 0.0,
        inventory: Callable[[], dict[str, str]] = collect_software,
        runner: Runner = run,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.state = state
        self.store = PolicyStore(state._db)
        self.sandbox = Sandbox(root)
        self.software = software
        self.send = send
        self.server_now = server_now
        self.clock_offset = clock_offset
        self.inventory = inventory
        self.runner = runner
        self.wall_clock = wall_clock
        self.guard = AgentGuard(state, self.store)
        self.packages = PackageRules(self.store, software, now=wall_clock)
        self.supervisor = ProcessSupervisor()
        self._wake = asyncio.Event()
        self._eval_lock = asyncio.Lock()
        self._send_lock = asyncio.Lock()
        self._inventory_cache: tuple[float, dict[str, str]] | None = None

    # --- the command ---

    def handle(self, payload: dict[str, Any]) -> dict[str, Any]:
        """A `policy` command: keep the bundle if newer, and evaluate it at once."""
        try:
            doc = check_bundle(payload)
        except BundleError as exc:
            return {"state": "rejected", "error": f"unusable policy bundle: {exc}"}
        applied = self.store.store_bundle(doc)
        if applied:
            log.info("policy bundle %s (%d rules) received", doc["bundle_sha"][:12],
                     len(doc["rules"]))  # fmt: skip
            self._wake.set()
        return {"result": {"bundle_sha": doc["bundle_sha"], "applied": applied}}

    # --- timing ---

    def interval(self) -> float:
        """Seconds between evaluations: the bundle's, within bounds."""
        bundle = self.store.bundle()
        value = float((bundle or {}).get("interval_s") or DEFAULT_INTERVAL_S)
        return min(MAX_INTERVAL_S, max(MIN_INTERVAL_S, value))

    def next_due(self) -> float:
        """When the next evaluation is due, on this device's clock."""
        last = self.store.meta("last_evaluation")
        if not last or self.store.meta("evaluated_sha") != self._bundle_sha():
            return 0.0
        return float(last) + self.interval()

    def _bundle_sha(self) -> str:
        return str((self.store.bundle() or {}).get("bundle_sha") or "")

    # --- evaluation ---

    async def evaluate(self) -> dict[str, Outcome]:
        """Evaluate every rule once, repair drift, store statuses and queue a report if due."""
        async with self._eval_lock:
            return await self._evaluate()

    async def _evaluate(self) -> dict[str, Outcome]:
        bundle = self.store.bundle()
        rules: list[dict[str, Any]] = list((bundle or {}).get("rules") or [])
        rules.sort(key=lambda r: ORDER.get(str(r.get("type")), 9))
        ctx = Context(sandbox=self.sandbox, state_dir=self.state.dir, run=self.runner)
        ctx.extra["supervisor"] = self.supervisor
        ctx.extra["policy_ids"] = {
            str(p.get("name")): str(p.get("policy_id"))
            for p in (bundle or {}).get("profiles") or []
            if isinstance(p, dict)
        }
        if any(str(r.get("type", "")).startswith("software_") for r in rules):
            ctx.extra["software"] = await self._software_inventory()
        outcomes: dict[str, Outcome] = {}
        at: dict[str, float] = {}
        try:
            # in this thread: the guard reads the SQLite connection, which is bound to it
            outcomes[GUARD_ID] = self.guard.check()
        except Exception as exc:  # the guard must not stop the rules
            log.exception("agent guard failed")
            outcomes[GUARD_ID] = Outcome(ERROR, f"agent error: {exc}")
        at[GUARD_ID] = self.server_now()
        for rule in rules:
            rule_id = str(rule["id"])
            try:
                outcome = await self._one(rule, ctx)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # one broken rule must not stop the others
                log.exception("policy rule %s failed", rule_id)
                outcome = Outcome(ERROR, f"agent error: {exc}")
            outcome.detail = cut(outcome.detail)
            outcomes[rule_id] = ctx.outcomes[rule_id] = outcome
            at[rule_id] = self.server_now()
        self._record(bundle, outcomes, at)
        return outcomes

    async def _software_inventory(self) -> dict[str, str]:
        """Installed software by source; listing it costs seconds, so it is reused briefly."""
        now = time.monotonic()
        if self._inventory_cache is None or now - self._inventory_cache[0] > INVENTORY_TTL_S:
            self._inventory_cache = (now, await asyncio.to_thread(self.inventory))
        return self._inventory_cache[1]

    async def _one(self, rule: dict[str, Any], ctx: Context) -> Outcome:
        kind = str(rule["type"])
        if kind == "file":
            return await files.evaluate(rule, ctx)
        if kind == "setting":
            return await settings.evaluate(rule, ctx)
        if kind == "service":
            return await services.evaluate(rule, ctx)
        if kind in ("software_required", "software_forbidden"):
            return await self.packages.evaluate(rule, ctx)
        if kind in CHECKS:
            return await checks.evaluate(rule, ctx)
        return Outcome(UNSUPPORTED, f"this agent does not know the rule type {kind!r}")

    def _record(
        self, bundle: dict[str, Any] | None, outcomes: dict[str, Outcome], at: dict[str, float]
    ) -> None:
        """Store the statuses; queue a report when something changed or a heartbeat is due."""
        previous = self.store.statuses()
        now = self.wall_clock()
        events: list[dict[str, Any]] = []
        for rule_id, o in outcomes.items():
            before = previous.get(rule_id)
            if before == (NONCOMPLIANT, o.detail) and o.status == NONCOMPLIANT:
                continue  # the same drift as last time: already reported
            for kind, detail in o.events:
                events.append({"rule_id": rule_id, "kind": kind, "detail": cut(detail),
                               "at": _iso(at[rule_id])})  # fmt: skip
                log.info("policy %s: %s %s", rule_id, kind, detail[:200])
        current = {k: (o.status, o.detail) for k, o in outcomes.items()}
        sha = str((bundle or {}).get("bundle_sha") or "")
        last_report = float(self.store.meta("last_report") or "0")
        changed = {k: v[0] for k, v in current.items()} != {k: v[0] for k, v in previous.items()}
        due = (
            bool(events)
            or changed
            or sha != (self.store.meta("last_reported_sha") or "")
            or now - last_report >= HEARTBEAT_S
        )
        report = None
        if bundle is not None and due:
            report = fit_report({
                "bundle_sha": sha,
                "evaluated_at": _iso(self.server_now()),
                "clock_offset_s": round(self.clock_offset(), 1),
                "rules": [{"id": k, "status": s, "detail": d} for k, (s, d) in current.items()],
                "events": events[:MAX_EVENTS],
            })  # fmt: skip
        self.store.save_evaluation(current, report, now)
        self.store.set_meta(evaluated_sha=sha)

    # --- reports ---

    async def flush_reports(self) -> bool:
        """Send unsent reports oldest first; False if some must wait (offline, server error)."""
        if self.send is None:
            return False
        async with self._send_lock:
            while True:
                batch = self.store.outbox()
                if not batch:
                    return True
                for seq, report in batch:
                    body = json.dumps(report, separators=(",", ":"), ensure_ascii=False).encode()
                    try:
                        await self.send(body)
                    except RequestRejected as exc:
                        # this report will never pass; the next ones must not wait behind it
                        log.error("dropping policy report %d: the server refused it: %s", seq, exc)
                    except (ServerError, ServerRefused) as exc:
                        log.info("policy report %d not sent yet: %s", seq, exc)
                        return False
                    self.store.sent(seq)

    # --- loops ---

    async def run_once(self) -> None:
        """Evaluate if due (or never done), then send what waits (`agent run --once`)."""
        if self.wall_clock() >= self.next_due():
            await self.evaluate()
        await self.flush_reports()

    def software_changed(self) -> None:
        """A software job installed or removed something: evaluate again with a fresh list."""
        self._inventory_cache = None
        self._wake.set()

    def wake(self) -> None:
        """Evaluate now (a new bundle, or a test)."""
        self._wake.set()

    async def run_forever(self, stop: asyncio.Event) -> None:
        """Evaluate at start, on a new bundle and every interval; send reports when online."""
        now_please = True
        while not stop.is_set():
            # cleared before evaluating: a bundle arriving meanwhile triggers another round
            self._wake.clear()
            try:
                if now_please or self.wall_clock() >= self.next_due():
                    await self.evaluate()
                delay = max(0.5, self.next_due() - self.wall_clock())
                if not await self.flush_reports() and self.store.pending():
                    delay = min(delay, RETRY_S)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("the policy engine failed; trying again")
                delay = RETRY_S
            waiter = asyncio.ensure_future(self._wake.wait())
            stopper = asyncio.ensure_future(stop.wait())
            try:
                await asyncio.wait({waiter, stopper}, timeout=delay,
                                   return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
            finally:
                waiter.cancel()
                stopper.cancel()
            now_please = self._wake.is_set()

    def summary(self) -> dict[str, Any]:
        """What `custos agent status` shows about policies."""
        return self.store.summary()
