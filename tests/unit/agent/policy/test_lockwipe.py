"""Lock, unlock and wipe on a sandbox root, and the key erasure once the server has the result."""

from __future__ import annotations

import json
import sys

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from custos import protocol
from custos.agent.client import DeviceClient
from custos.agent.identity import Identity
from custos.agent.policy import lockwipe
from custos.agent.policy.base import Sandbox
from custos.agent.runtime import AgentRuntime, DeviceWiped
from custos.agent.software import SoftwareStore
from custos.agent.state import AgentState


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "root"
    (r / "var" / "lib" / "acme" / "sub").mkdir(parents=True)
    (r / "var" / "lib" / "acme" / "sub" / "data.db").write_text("secret")
    (r / "etc").mkdir()
    (r / "etc" / "acme.conf").write_text("x")
    return r


@pytest.fixture
def state(tmp_path):
    st = AgentState(tmp_path / "state")
    yield st
    st.close()


async def test_selective_wipe_dry_run_touches_nothing(root, state):
    res = await lockwipe.wipe(
        {"mode": "selective", "dry_run": True, "paths": ["/var/lib/acme", "/etc/gone"]},
        run_id="r1", state=state, sandbox=Sandbox(root), managed_data=[], software=None,
    )  # fmt: skip
    assert res["result"]["removed"] == ["/var/lib/acme"] and res["result"]["missing"] == [
        "/etc/gone"
    ]
    assert (root / "var" / "lib" / "acme" / "sub" / "data.db").exists()
    assert not state.get(lockwipe.PENDING_WIPE)


async def test_selective_wipe_removes_paths_not_link_targets(root, state, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("keep")
    (root / "var" / "lib" / "link").symlink_to(outside)
    (root / "var" / "lib" / "exit").symlink_to(outside)
    res = await lockwipe.wipe(
        {"mode": "selective", "dry_run": False},
        run_id="r2", state=state, sandbox=Sandbox(root),
        managed_data=["/var/lib/acme", "/etc/acme.conf", "/var/lib/link", "/var/lib/exit/keep.txt",
                      "/../../etc/passwd"],
        software=SoftwareStore(state._db),
    )  # fmt: skip
    out = res["result"]
    assert out["removed"] == ["/var/lib/acme", "/etc/acme.conf", "/var/lib/link"]
    assert [f["path"] for f in out["failed"]] == ["/var/lib/exit/keep.txt", "/../../etc/passwd"]
    assert (
        not (root / "var" / "lib" / "acme").exists() and not (root / "etc" / "acme.conf").exists()
    )
    assert (outside / "keep.txt").read_text() == "keep"  # the link went, not what it pointed to
    assert out["applications"] == []
    # a partial wipe is a failure that names what failed, and the key is kept
    assert res["state"] == "failed"
    assert "/var/lib/exit/keep.txt" in res["error"] and "/../../etc/passwd" in res["error"]
    assert not state.get(lockwipe.PENDING_WIPE)


async def test_selective_wipe_that_removes_everything_schedules_the_erasure(root, state):
    res = await lockwipe.wipe(
        {"mode": "selective", "dry_run": False, "paths": ["/var/lib/acme", "/etc/gone"]},
        run_id="r2b", state=state, sandbox=Sandbox(root), managed_data=[], software=None,
    )  # fmt: skip
    assert res["state"] == "succeeded" and res["result"]["removed"] == ["/var/lib/acme"]
    assert state.get(lockwipe.PENDING_WIPE) == "r2b"


async def test_wipe_refuses_the_agent_state_and_top_level_directories(tmp_path):
    root = tmp_path / "root"
    (root / "var" / "lib" / "custos" / "agent").mkdir(parents=True)
    (root / "var" / "lib" / "other").mkdir()
    (root / "etc").mkdir()
    (root / "home" / "alice").mkdir(parents=True)
    st = AgentState(root / "var" / "lib" / "custos" / "agent")
    try:
        res = await lockwipe.wipe(
            {"mode": "selective", "dry_run": False,
             "paths": ["/var/lib/custos", "/var/lib/custos/agent", "/var/lib/custos/agent/state.db",
                       "/etc", "/home", "/var/lib/other"]},
            run_id="r9", state=st, sandbox=Sandbox(root), managed_data=[], software=None,
        )  # fmt: skip
        out = res["result"]
        errors = {f["path"]: f["error"] for f in out["failed"]}
        for agent_path in ("/var/lib/custos", "/var/lib/custos/agent",
                           "/var/lib/custos/agent/state.db"):  # fmt: skip
            assert errors[agent_path] == "refused: protects the agent"
        for top in ("/etc", "/home"):
            assert errors[top].startswith("refused:")
        assert out["removed"] == ["/var/lib/other"]
        assert res["state"] == "failed" and not st.get(lockwipe.PENDING_WIPE)
        assert (root / "etc").is_dir() and (root / "home" / "alice").is_dir()
        assert (root / "var" / "lib" / "custos" / "agent").is_dir()
    finally:
        st.close()


async def test_full_wipe_needs_a_platform_hook(root, state, monkeypatch, tmp_path):
    monkeypatch.delenv("CUSTOS_AGENT_WIPE_COMMAND", raising=False)
    args = {"run_id": "r3", "state": state, "sandbox": Sandbox(root), "managed_data": [],
            "software": None}  # fmt: skip
    res = await lockwipe.wipe({"mode": "full"}, **args)
    assert res["state"] == "failed" and res["error"] == "full wipe is not available on this device"
    marker = tmp_path / "wiped-by-hook"
    hook = [sys.executable, "-c", f"open({str(marker)!r}, 'w').write('1')"]
    monkeypatch.setenv("CUSTOS_AGENT_WIPE_COMMAND", json.dumps(hook))
    res = await lockwipe.wipe({"mode": "full"}, **args)
    assert res["state"] == "succeeded" and marker.read_text() == "1"
    assert state.get(lockwipe.PENDING_WIPE) == "r3"


async def test_lock_runs_the_hook_and_skips_accounts_in_a_sandbox(root, monkeypatch, tmp_path):
    marker = tmp_path / "locked"
    hook = [sys.executable, "-c", f"open({str(marker)!r}, 'w').write('1')"]
    monkeypatch.setenv("CUSTOS_AGENT_LOCK_COMMAND", json.dumps(hook))
    res = await lockwipe.lock({"message": "Lost: call IT", "accounts": ["kiosk", "-rf"]},
                              sandbox=Sandbox(root), managed_accounts=[])  # fmt: skip
    assert res["result"]["locked"] is True and res["result"]["method"] == sys.executable
    assert marker.exists()
    accounts = res["result"]["accounts"]
    assert accounts["-rf"].startswith("skipped: not a valid")
    assert accounts["kiosk"].startswith("skipped")
    monkeypatch.setenv("CUSTOS_AGENT_LOCK_COMMAND", json.dumps([sys.executable, "-c", "exit(2)"]))
    failed = await lockwipe.lock({}, sandbox=Sandbox(root), managed_accounts=["kiosk"])
    assert failed["state"] == "failed" and "exit code 2" in failed["error"]
    assert list(failed["result"]["accounts"]) == ["kiosk"]
    unlocked = await lockwipe.unlock({}, sandbox=Sandbox(root), managed_accounts=["kiosk"])
    assert unlocked["result"]["unlocked"] is True


class FakeServer:
    """Just enough of the device API for a check-in round with a wipe."""

    def __init__(self, commands: list[dict]) -> None:
        self.commands = commands
        self.results: list[dict] = []
        self.reports: list[dict] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == protocol.SESSION_PATH:
            return httpx.Response(404, json={"error": "not_found", "detail": "no sessions"})
        if path == protocol.DEVICE_API + "/policy/report":
            doc = json.loads(request.content)
            self.reports.append(doc)
            return httpx.Response(200, json={"accepted": doc["seq"]})
        if path == protocol.DEVICE_API + "/checkin":
            body = json.loads(request.content)
            self.results += body.get("results") or []
            commands, self.commands = self.commands, []
            return httpx.Response(200, json={
                "commands": commands,
                "accepted_results": [r["run_id"] for r in body.get("results") or []],
                "checkin_interval": 60, "inventory_version": 1, "server_time": None,
            })  # fmt: skip
        return httpx.Response(404, json={"error": "not_found", "detail": path})


async def test_wipe_result_accepted_erases_the_key_and_stops_the_agent(root, state):
    key = ed25519.Ed25519PrivateKey.generate()
    (state.dir / "device.key").write_bytes(b"PRIVATE KEY")
    state.set(server_url="http://mdm.test", device_id="dev1")
    server = FakeServer([
        {"run_id": "w1", "kind": "policy", "payload": {
            "bundle_sha": "a" * 64, "issued_at": "2026-11-23T21:00:00+00:00", "interval_s": 60,
            "profiles": [], "rules": [], "managed_data": ["/var/lib/acme"],
            "managed_accounts": []}},
        {"run_id": "w2", "kind": "wipe", "payload": {"mode": "selective", "dry_run": False}},
    ])  # fmt: skip
    client = DeviceClient("http://mdm.test", "dev1", key, ca_pem=None,
                          transport=httpx.MockTransport(server))  # fmt: skip
    runtime = AgentRuntime(state, Identity("http://mdm.test", "dev1", key, ""), client=client,
                           collect=dict, root=root)  # fmt: skip
    try:
        with pytest.raises(DeviceWiped):
            await runtime.run_once()
    finally:
        await client.aclose()
    by_run = {r["run_id"]: r for r in server.results}
    assert by_run["w1"]["result"] == {"bundle_sha": "a" * 64, "applied": True}
    assert by_run["w2"]["result"]["removed"] == ["/var/lib/acme"]
    assert not (root / "var" / "lib" / "acme").exists()
    assert not (state.dir / "device.key").exists()
    assert lockwipe.is_wiped(state)
    assert server.reports and server.reports[0]["bundle_sha"] == "a" * 64


def test_agent_run_refuses_a_wiped_state_and_status_shows_policy(tmp_path):
    from typer.testing import CliRunner

    from custos.agent.policy.store import PolicyStore
    from custos.cli.main import build_app

    st = AgentState(tmp_path / "s")
    PolicyStore(st._db).store_bundle({"bundle_sha": "b" * 64, "issued_at": "2026-11-23T00:00:00",
                                      "rules": []})  # fmt: skip
    st.set(**{lockwipe.WIPE_MARK: "1"})
    st.close()
    runner = CliRunner()
    res = runner.invoke(build_app(), ["agent", "run", "--state-dir", str(tmp_path / "s")])
    assert res.exit_code == 5 and "this device was wiped" in res.output
    res = runner.invoke(build_app(), ["agent", "status", "--state-dir", str(tmp_path / "s"),
                                      "--json"])  # fmt: skip
    info = json.loads(res.stdout)
    assert info["policy_bundle_sha"] == "b" * 64 and info["policy_noncompliant"] == 0


async def test_partial_wipe_result_accepted_keeps_the_key(root, state, tmp_path):
    key = ed25519.Ed25519PrivateKey.generate()
    (state.dir / "device.key").write_bytes(b"PRIVATE KEY")
    state.set(server_url="http://mdm.test", device_id="dev1")
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "var" / "lib" / "exit").symlink_to(outside)
    server = FakeServer([
        {"run_id": "w1", "kind": "policy", "payload": {
            "bundle_sha": "a" * 64, "issued_at": "2026-11-23T21:00:00+00:00", "interval_s": 60,
            "profiles": [], "rules": [], "managed_data": ["/var/lib/acme", "/var/lib/exit/x"],
            "managed_accounts": []}},
        {"run_id": "w2", "kind": "wipe", "payload": {"mode": "selective", "dry_run": False}},
    ])  # fmt: skip
    client = DeviceClient("http://mdm.test", "dev1", key, ca_pem=None,
                          transport=httpx.MockTransport(server))  # fmt: skip
    runtime = AgentRuntime(state, Identity("http://mdm.test", "dev1", key, ""), client=client,
                           collect=dict, root=root)  # fmt: skip
    try:
        await runtime.run_once()  # no DeviceWiped: the wipe was partial
    finally:
        await client.aclose()
    by_run = {r["run_id"]: r for r in server.results}
    assert by_run["w2"]["state"] == "failed" and "/var/lib/exit/x" in by_run["w2"]["error"]
    assert by_run["w2"]["result"]["removed"] == ["/var/lib/acme"]
    assert (state.dir / "device.key").read_bytes() == b"PRIVATE KEY"
    assert not lockwipe.is_wiped(state)


def test_only_a_succeeded_real_wipe_erases():
    assert lockwipe.wipe_succeeded({"state": "succeeded", "result": {"dry_run": False}})
    assert not lockwipe.wipe_succeeded({"state": "failed", "result": {"dry_run": False}})
    assert not lockwipe.wipe_succeeded({"state": "succeeded", "result": {"dry_run": True}})
    assert not lockwipe.wipe_succeeded(None)
