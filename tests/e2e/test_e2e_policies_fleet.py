"""Policies across several real agents and through the real CLI: the compliance report lists
exactly the non-compliant devices; a lost device is wiped when it reconnects and then refused;
a role without the wipe permission is refused."""

from __future__ import annotations

import json
import ssl
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
from e2e_harness import ADMIN_PASSWORD, CHECKIN, CUSTOS, E2E, clean_env, signed_headers, wait_for

# PostgreSQL, the production path (the agent tests beside these run on SQLite)
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.postgres,
    pytest.mark.parametrize("db_url", ["postgres"], indirect=True),
]

PROFILE = """\
name: fleet-baseline
interval: 10s
files:
  - {path: /etc/motd, content: "managed\\n", mode: "0644"}
settings:
  - {provider: ini, path: /etc/acme/acme.ini, section: main, option: level, value: high}
managed_data: [/var/lib/acme]
"""


def _cli(
    env: dict[str, str], *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CUSTOS, *args], capture_output=True, text=True, env=env, input=stdin, timeout=120
    )


def _login(env: dict[str, str], e2e: E2E, user: str, pw: str) -> None:
    res = _cli(
        env,
        "login",
        e2e.url,
        "--user",
        user,
        "--password-stdin",
        "--ca-fingerprint",
        e2e.fingerprint,
        stdin=pw + "\n",
    )
    assert res.returncode == 0, res.stderr


def _sandbox(base: Path, *, writable: bool = True) -> Path:
    root = base
    (root / "etc").mkdir(parents=True)
    if writable:
        (root / "etc" / "acme").mkdir()
    else:
        # a file where the setting's directory should be: the ini setting cannot be repaired
        # (not even by root, which a permission bit would not stop)
        (root / "etc" / "acme").write_text("in the way")
    (root / "var" / "lib" / "acme").mkdir(parents=True)
    (root / "var" / "lib" / "acme" / "data.db").write_text("managed data")
    (root / "home").mkdir()
    (root / "home" / "notes.txt").write_text("the user's own")
    return root


def test_compliance_report_lists_exactly_the_noncompliant_devices(e2e: E2E, tmp_path: Path) -> None:
    admin = clean_env(CUSTOS_CLI_CONFIG=str(tmp_path / "cli"), COLUMNS="200")
    _login(admin, e2e, "admin", ADMIN_PASSWORD)
    profile = tmp_path / "baseline.yaml"
    profile.write_text(PROFILE)
    added = _cli(admin, "policy", "add", str(profile), "--json")
    assert added.returncode == 0, added.stderr
    assert json.loads(added.stdout)["rules"] == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nfiles: [{path: relative}]\n")
    refused = _cli(admin, "policy", "add", str(bad))
    assert refused.returncode == 1 and "absolute path" in refused.stderr

    agents = []
    broken = None
    try:
        for i in range(3):
            agent = e2e.agent(f"fleet-{i}")
            root = _sandbox(tmp_path / f"root{i}", writable=i != 1)
            if i == 1:
                broken = agent
            agent.env["CUSTOS_AGENT_ROOT"] = str(root)
            agent.start()
            agents.append(agent)
        assert broken is not None
        assigned = _cli(admin, "policy", "assign", "fleet-baseline", "--all", "--json")
        assert assigned.returncode == 0, assigned.stderr

        def settled() -> list[dict[str, Any]] | None:
            res = _cli(admin, "policy", "compliance", "--json")
            rows = json.loads(res.stdout) if res.returncode == 0 else []
            if len(rows) == 3 and all(r["status"] != "pending" for r in rows):
                return rows  # type: ignore[no-any-return]
            return None

        rows = wait_for("every device to report", settled, timeout=60, interval=1)
        assert {r["device"]: r["status"] for r in rows} == {
            "fleet-0": "compliant",
            "fleet-1": "noncompliant",
            "fleet-2": "compliant",
        }
        res = _cli(admin, "policy", "compliance", "--status", "noncompliant", "--json")
        only = json.loads(res.stdout)
        assert [r["device"] for r in only] == ["fleet-1"]
        assert only[0]["failing"] == ["setting:ini:/etc/acme/acme.ini:main.level"]
        shown = _cli(admin, "device", "compliance", "fleet-1")
        assert shown.returncode == 0 and "noncompliant" in shown.stdout
        listed = _cli(admin, "policy", "ls", "--json")
        counts = json.loads(listed.stdout)[0]["devices"]
        assert counts == {"compliant": 2, "noncompliant": 1, "pending": 0}
    finally:
        for a in agents:
            a.stop()


def test_lost_device_wiped_on_reconnect_then_refused_and_roles_enforced(
    e2e: E2E, tmp_path: Path
) -> None:
    admin = clean_env(CUSTOS_CLI_CONFIG=str(tmp_path / "admin"), COLUMNS="200")
    desk = clean_env(CUSTOS_CLI_CONFIG=str(tmp_path / "desk"), COLUMNS="200")
    _login(admin, e2e, "admin", ADMIN_PASSWORD)
    made = _cli(
        admin,
        "user",
        "create",
        "desk",
        "--role",
        "helpdesk",
        "--password-stdin",
        stdin="helpdesk-pass-1\n",
    )
    assert made.returncode == 0, made.stderr
    _login(desk, e2e, "desk", "helpdesk-pass-1")
    profile = tmp_path / "baseline.yaml"
    profile.write_text(PROFILE)
    assert _cli(admin, "policy", "add", str(profile)).returncode == 0
    assert _cli(admin, "policy", "assign", "fleet-baseline", "--all").returncode == 0

    root = _sandbox(tmp_path / "root")
    agent = e2e.agent("laptop-lost")
    agent.env["CUSTOS_AGENT_ROOT"] = str(root)
    agent.start()
    wait_for("the policy to be applied", lambda: (root / "etc" / "motd").exists(), timeout=40)
    stolen_key = agent.device_key()  # what a thief holding a copy of the identity would have
    agent.stop()

    # helpdesk may not wipe (and the CLI says why), nor add policies
    refused = _cli(desk, "device", "wipe", "laptop-lost", "--yes")
    assert refused.returncode == 1 and "devices.wipe" in refused.stderr
    refused = _cli(desk, "device", "lost", "laptop-lost", "--wipe", "selective", "--yes")
    assert refused.returncode == 1 and "devices.wipe" in refused.stderr
    assert _cli(desk, "policy", "add", str(profile)).returncode == 1
    # a wipe needs the right name typed
    typo = _cli(admin, "device", "lost", "laptop-lost", "--wipe", "selective", stdin="laptop\n")
    assert typo.returncode == 1 and "did not match" in typo.stderr
    lost = _cli(
        admin,
        "device",
        "lost",
        "laptop-lost",
        "--wipe",
        "selective",
        "--json",
        stdin="laptop-lost\n",
    )
    assert lost.returncode == 0, lost.stderr
    assert json.loads(lost.stdout)["wipe_order"]["state"] == "sent"

    # the device comes back: it is locked and wiped at once, then stops for good
    agent.env["CUSTOS_AGENT_LOCK_COMMAND"] = json.dumps(
        ["/bin/sh", "-c", f"echo locked > {root / 'locked'}"]
    )
    agent.start()
    assert agent.proc is not None
    code = wait_for("the agent to stop after the wipe", agent.proc.poll, timeout=60)
    assert code == 5
    assert not (root / "var" / "lib" / "acme").exists()
    assert (root / "home" / "notes.txt").read_text() == "the user's own"
    assert (root / "locked").read_text().strip() == "locked"

    def retired() -> bool:
        return bool(e2e.admin.device(agent.device_id)["status"] == "retired")

    wait_for("the device to be retired", retired, timeout=30)
    # even with a copy of its key, the device is refused from now on
    body = b"{}"
    headers = signed_headers(stolen_key, agent.device_id, body)
    r = httpx.post(
        e2e.url + CHECKIN,
        content=body,
        headers=headers,
        verify=ssl.create_default_context(cafile=str(e2e.root / "ca.pem")),
    )
    assert r.status_code == 401 and r.json()["error"] == "retired", r.text
    wipes = json.loads(_cli(admin, "policy", "wipes", "--json").stdout)
    assert wipes[0]["state"] == "confirmed" and wipes[0]["device"] == "laptop-lost"
    audit = _cli(admin, "audit", "ls", "--json")
    actions = {e["action"] for e in json.loads(audit.stdout)}
    assert {"device.lost", "policy.add", "policy.assign"} <= actions
