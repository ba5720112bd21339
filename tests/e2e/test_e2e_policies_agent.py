"""Policies with a real server and a real agent: drift repaired on the agent's own interval,
a killed required process started again, and the reports reaching the server."""

from __future__ import annotations

import io
import json
import os
import signal
import sys
import tarfile
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from e2e_harness import E2E, wait_for

# what is tested here is the agent; the server side runs on PostgreSQL in the fleet tests
pytestmark = [pytest.mark.e2e, pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)]

INTERVAL_S = 10


def _pids(marker: str) -> list[int]:
    """Processes whose command line holds the marker."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if marker.encode() in cmdline and int(entry.name) != os.getpid():
            out.append(int(entry.name))
    return out


def _compliance(e2e: E2E, device_id: str) -> dict[str, Any]:
    r = e2e.admin.get(f"/api/v1/devices/{device_id}/compliance")
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def _history(e2e: E2E, device_id: str) -> list[dict[str, Any]]:
    r = e2e.admin.get(f"/api/v1/devices/{device_id}/compliance/history")
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def test_policy_drift_repaired_and_process_restarted_offline_of_the_server(e2e: E2E) -> None:
    marker = f"custos-e2e-daemon-{uuid.uuid4().hex}"
    root = e2e.scratch / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "acme.ini").write_text("# keep me\n[main]\nlevel = low\n")
    document = {
        "name": "baseline-e2e",
        "interval": f"{INTERVAL_S}s",
        "files": [{"path": "/etc/motd", "content": "Managed by Custos\n", "mode": "0644"}],
        "settings": [{"provider": "ini", "path": "/etc/acme.ini", "section": "main",
                      "option": "level", "value": "high"}],
        "services": [{"name": "acme-daemon", "provider": "process", "match": marker,
                      "start": [sys.executable, "-c", "import time\nwhile True: time.sleep(1)",
                                marker]}],
    }  # fmt: skip
    agent = e2e.agent("policy-agent")
    agent.env["CUSTOS_AGENT_ROOT"] = str(root)
    agent.start()
    try:
        r = e2e.admin.post("/api/v1/policies", json={"document": json.dumps(document)})
        assert r.status_code == 201, r.text
        r = e2e.admin.post("/api/v1/policies/baseline-e2e/assignments", json={"kind": "all"})
        assert r.status_code == 200, r.text

        motd = root / "etc" / "motd"
        wait_for("the bundle to be enforced", lambda: motd.exists() and _pids(marker),
                 timeout=30)  # fmt: skip
        assert motd.read_text() == "Managed by Custos\n"
        assert "level = high" in (root / "etc" / "acme.ini").read_text()
        assert (root / "etc" / "acme.ini").read_text().startswith("# keep me\n")

        def compliant() -> dict[str, Any] | None:
            c = _compliance(e2e, agent.device_id)
            return c if c["status"] == "compliant" else None

        c = wait_for("the device to be reported compliant", compliant, timeout=30)
        statuses = {r["rule_id"]: r["status"] for r in c["rules"]}
        assert statuses["file:/etc/motd"] in ("repaired", "compliant"), statuses
        assert statuses["service:acme-daemon"] in ("repaired", "compliant"), statuses
        assert agent.status()["policy_bundle_sha"] == c["bundle_sha"]

        # drift: the agent puts the file back on its own interval, no command needed
        motd.write_text("defaced\n")
        tampered_at = time.monotonic()
        wait_for("the file to be repaired", lambda: motd.read_text() == "Managed by Custos\n",
                 timeout=INTERVAL_S * 2 + 5)  # fmt: skip
        assert time.monotonic() - tampered_at <= INTERVAL_S + 5

        # a required process killed: started again by the next evaluation
        (old,) = _pids(marker)
        os.kill(old, signal.SIGKILL)
        restarted = wait_for("the daemon to be started again",
                             lambda: [p for p in _pids(marker) if p != old],
                             timeout=INTERVAL_S * 2 + 5)  # fmt: skip
        assert len(restarted) == 1

        def reported() -> list[dict[str, Any]] | None:
            events = _history(e2e, agent.device_id)
            kinds = {(e["rule_id"], e["kind"]) for e in events}
            want = {
                ("file:/etc/motd", "drift"),
                ("file:/etc/motd", "repaired"),
                ("service:acme-daemon", "drift"),
                ("service:acme-daemon", "repaired"),
            }
            return events if want <= kinds else None

        events = wait_for("the drift and repairs to reach the server", reported, timeout=30)
        drift = [e for e in events if e["rule_id"] == "file:/etc/motd" and e["kind"] == "drift"]
        assert any("content differed" in e["detail"] for e in drift), drift
        assert all(e["policy"] == "baseline-e2e" for e in events if e["rule_id"] != "agent_guard")
        assert agent.running
    finally:
        agent.stop()
        for pid in _pids(marker):
            os.kill(pid, signal.SIGKILL)


def test_selective_wipe_removes_managed_data_and_the_agent_stops_for_good(e2e: E2E) -> None:
    root = e2e.scratch / "root"
    data = root / "var" / "lib" / "acme"
    (data / "cache").mkdir(parents=True)
    (data / "cache" / "secret.db").write_text("customer data")
    (root / "etc").mkdir()
    (root / "etc" / "keep.conf").write_text("not managed")
    document = {"name": "wipeable", "interval": "10s", "managed_data": ["/var/lib/acme"],
                "files": [{"path": "/etc/motd", "content": "hi\n"}]}  # fmt: skip
    agent = e2e.agent("wipe-agent")
    agent.env["CUSTOS_AGENT_ROOT"] = str(root)
    agent.start()
    r = e2e.admin.post("/api/v1/policies", json={"document": json.dumps(document)})
    assert r.status_code == 201, r.text
    r = e2e.admin.post("/api/v1/policies/wipeable/assignments", json={"kind": "all"})
    assert r.status_code == 200, r.text
    wait_for("the bundle to arrive", lambda: (root / "etc" / "motd").exists(), timeout=30)

    r = e2e.admin.post(f"/api/v1/devices/{agent.device_id}/wipe",
                       json={"mode": "selective", "confirm": agent.name})  # fmt: skip
    assert r.status_code == 202, r.text
    assert agent.proc is not None
    code = wait_for("the agent to stop after the wipe", agent.proc.poll, timeout=30)
    assert code == 5
    assert not data.exists() and (root / "etc" / "keep.conf").read_text() == "not managed"
    assert not (agent.state_dir / "device.key").exists()
    again = agent.cli("run", "--once")
    assert again.returncode == 5 and "this device was wiped" in again.stderr

    def confirmed() -> dict[str, Any] | None:
        wipes = e2e.admin.get("/api/v1/wipes").json()
        mine = [w for w in wipes if w["device_id"] == agent.device_id]
        return mine[0] if mine and mine[0]["state"] == "confirmed" else None

    order = wait_for("the server to confirm the wipe", confirmed, timeout=30)
    assert order["result"]["removed"] == ["/var/lib/acme"]

    def retired() -> bool:
        return bool(e2e.admin.device(agent.device_id)["status"] == "retired")

    wait_for("the device to be retired", retired, timeout=30)


def test_required_package_installed_by_the_policy_then_its_service_started(
    e2e: E2E, tmp_path: Path
) -> None:
    marker = f"custos-e2e-av-{uuid.uuid4().hex}"
    target = tmp_path / "acme-av.py"
    manifest = (
        'name = "acme-av"\nversion = "2.1"\ndescription = "an antivirus"\n'
        f'detect = {{ file = "{target}" }}\n'
        f'[[install]]\ncommand = ["/bin/sh", "-c", '
        f"\"printf 'import time\\\\nwhile True: time.sleep(1)\\\\n' > {target}\"]\n"
        f'[[uninstall]]\ncommand = ["/bin/rm", "-f", "{target}"]\n'
    ).encode()
    pkg = tmp_path / "acme-av.cpkg"
    with tarfile.open(pkg, "w") as tf:
        info = tarfile.TarInfo("manifest.toml")
        info.size = len(manifest)
        tf.addfile(info, io.BytesIO(manifest))
    r = e2e.admin.http.post(
        "/api/v1/packages",
        params={"filename": pkg.name},
        content=pkg.read_bytes(),
        headers={**e2e.admin.auth, "content-type": "application/octet-stream"},
    )
    assert r.status_code == 201, r.text
    document = {
        "name": "av-required",
        "interval": "10s",
        "software": {"required": [{"name": "acme-av", "min_version": "2.1", "source": "custos"}]},
        "services": [{"name": "acme-av", "provider": "process", "match": marker,
                      "start": [sys.executable, str(target), marker], "category": "antivirus",
                      "package": "acme-av"}],
    }  # fmt: skip
    root = e2e.scratch / "root"
    root.mkdir()
    agent = e2e.agent("av-agent")
    agent.env["CUSTOS_AGENT_ROOT"] = str(root)
    agent.start()
    try:
        r = e2e.admin.post("/api/v1/policies", json={"document": json.dumps(document)})
        assert r.status_code == 201, r.text
        r = e2e.admin.post("/api/v1/policies/av-required/assignments", json={"kind": "all"})
        assert r.status_code == 200, r.text
        wait_for("the package to be installed", target.exists, timeout=60)
        wait_for("its service to be started", lambda: _pids(marker), timeout=40)

        def compliant() -> dict[str, Any] | None:
            c = _compliance(e2e, agent.device_id)
            return c if c["status"] == "compliant" else None

        c = wait_for("the device to be reported compliant", compliant, timeout=40)
        statuses = {r["rule_id"]: r["status"] for r in c["rules"]}
        assert statuses["software_required:acme-av"] in ("repaired", "compliant"), statuses
        kinds = {(e["rule_id"], e["kind"]) for e in _history(e2e, agent.device_id)}
        assert ("software_required:acme-av", "drift") in kinds

        # removed behind the agent's back: reinstalled from the server, started again
        for pid in _pids(marker):
            os.kill(pid, signal.SIGKILL)
        target.unlink()
        wait_for("the package to be reinstalled", target.exists, timeout=60)
        wait_for("its service to be started again", lambda: _pids(marker), timeout=40)

        def repaired_twice() -> bool:
            events = _history(e2e, agent.device_id)
            return (
                sum(
                    1
                    for e in events
                    if e["rule_id"] == "software_required:acme-av" and e["kind"] == "repaired"
                )
                >= 2
            )

        wait_for("the reinstall to be reported", repaired_twice, timeout=40)
    finally:
        agent.stop()
        for pid in _pids(marker):
            os.kill(pid, signal.SIGKILL)
