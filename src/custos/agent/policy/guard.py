"""The implicit `agent_guard` rule: the agent's own configuration is put back if tampered with.

The CA, the device certificate and the identity values (server URL, device id, CA
fingerprint) are snapshotted the first time the guard runs: a hash in the policy tables and,
for files, a private copy in `<state>/guard/`. Removed or altered ones are restored. The
private key is never copied.
"""

from __future__ import annotations

import hashlib
import logging
from typing import TYPE_CHECKING

from custos.agent.policy.base import COMPLIANT, Outcome, atomic_write

if TYPE_CHECKING:
    from custos.agent.policy.store import PolicyStore
    from custos.agent.state import AgentState

log = logging.getLogger("custos.agent.policy")

GUARDED_FILES = ("ca.pem", "device.pem")
GUARDED_KEYS = ("server_url", "device_id", "ca_fingerprint")
RULE_ID = "agent_guard"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class AgentGuard:
    """Snapshots and restores the agent's configuration."""

    def __init__(self, state: AgentState, store: PolicyStore) -> None:
        self.state = state
        self.store = store
        self.dir = state.dir / "guard"

    def snapshot(self) -> None:
        """Take the current configuration as the one to keep (after it is legitimately written)."""
        self.dir.mkdir(exist_ok=True, mode=0o700)
        for name in GUARDED_FILES:
            path = self.state.dir / name
            if path.is_file():
                data = path.read_bytes()
                atomic_write(self.dir / name, data, 0o600)
                self.store.set_guard(name, _sha(data))
        for key in GUARDED_KEYS:
            value = self.state.get(key)
            if value is not None:
                self.store.set_guard(f"kv:{key}", _sha(value.encode()), value)

    def check(self) -> Outcome:
        """Compare with the snapshot, restore what differs (first run: take the snapshot)."""
        snap = self.store.guard()
        if not snap:
            self.snapshot()
            return Outcome(COMPLIANT, "snapshot taken")
        drift: list[str] = []
        fixed: list[str] = []
        failed: list[str] = []
        for name in GUARDED_FILES:
            if name not in snap:
                continue
            path = self.state.dir / name
            try:
                current = _sha(path.read_bytes()) if path.is_file() else None
            except OSError:
                current = None
            if current == snap[name][0]:
                continue
            drift.append(f"{name} was {'removed' if current is None else 'altered'}")
            try:
                backup = (self.dir / name).read_bytes()
            except OSError as exc:
                failed.append(f"{name}: no backup ({exc.strerror})")
                continue
            if _sha(backup) != snap[name][0]:
                failed.append(f"{name}: the backup copy does not match its snapshot")
                continue
            try:
                atomic_write(path, backup, 0o644)
            except OSError as exc:
                failed.append(f"{name}: {exc}")
                continue
            fixed.append(name)
        for key in GUARDED_KEYS:
            item = snap.get(f"kv:{key}")
            if item is None or item[1] is None:
                continue
            if self.state.get(key) != item[1]:
                drift.append(f"{key} was changed")
                self.state.set(**{key: item[1]})
                fixed.append(key)
        if not drift:
            return Outcome(COMPLIANT)
        why = "; ".join(drift)
        log.warning("agent guard: %s", why)
        events = [("drift", why)]
        if fixed:
            events.append(("restored", "restored " + ", ".join(fixed)))
        if failed:
            detail = "; ".join(failed)
            events.append(("repair_failed", detail))
            return Outcome("noncompliant", f"{why}; {detail}", events)
        return Outcome("repaired", f"{why}; restored", events)
