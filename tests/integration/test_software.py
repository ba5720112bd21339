"""Software distribution through the API and the device protocol — SQLite and PostgreSQL.

The device side is the agent's real SoftwareManager (download, rebuild, install engine) on
the in-process transport; end-to-end tests with agent processes are in tests/e2e.
"""

from __future__ import annotations

import asyncio
import io
import os
import random
import tarfile
from pathlib import Path
from typing import Any

from custos.agent.software import SoftwareManager, SoftwareStore


def cpkg(path: Path, version: str, target: Path, payload: bytes, *, fail: bool = False) -> Path:
    """A .cpkg whose install copies payload.bin to `target` and writes its version beside it."""
    script = f"cp payload.bin {target} && echo {version} > {target}.v"
    if fail:
        script = "echo simulated failure >&2; exit 3"
    steps = (
        "[[install]]\n"
        f'command = ["/bin/sh", "-c", "{script}"]\n'
        f'[[uninstall]]\ncommand = ["/bin/rm", "-f", "{target}", "{target}.v"]\n'
    )
    manifest = (
        f'name = "tool"\nversion = "{version}"\n'
        f'detect = {{ version_file = "{target}.v", version = "{version}" }}\n{steps}'
    ).encode()
    with tarfile.open(path, "w") as tf:
        for name, data in (("manifest.toml", manifest), ("payload.bin", payload)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def payload(seed: int, size: int = 3 * 1024 * 1024) -> bytes:
    """Compressible, chunkable data: text-like lines with some randomness."""
    rng = random.Random(seed)
    words = [f"word{i}" for i in range(500)]
    lines = []
    total = 0
    while total < size:
        line = " ".join(rng.choice(words) for _ in range(12)) + f" {rng.getrandbits(32):08x}\n"
        lines.append(line)
        total += len(line)
    return "".join(lines).encode()[:size]


def edited(data: bytes, seed: int, fraction: float = 0.01) -> bytes:
    """About `fraction` of the bytes changed, in a few scattered places."""
    rng = random.Random(seed)
    out = bytearray(data)
    for _ in range(8):
        at = rng.randrange(0, len(out) - 5000)
        n = int(len(out) * fraction / 8)
        out[at : at + n] = bytes(rng.getrandbits(8) for _ in range(n))
    return bytes(out)


async def upload(api: Any, path: Path, **params: str) -> dict[str, Any]:
    r = await api.http.post(
        "/api/v1/packages",
        params={"filename": path.name, **params},
        content=path.read_bytes(),
        headers={**api.auth, "content-type": "application/octet-stream"},
    )
    assert r.status_code == 201, r.text
    return r.json()  # type: ignore[no-any-return]


def manager(dev: Any, tmp: Path) -> SoftwareManager:
    return SoftwareManager(
        SoftwareStore(dev.state._db),
        dev,
        ca_pem=dev.identity.ca_pem,
        work_dir=tmp / f"sw-{dev.device_id[:6]}",
        server_now=lambda: __import__("time").time(),
    )


async def take_software(api: Any, dev: Any, mgr: SoftwareManager) -> list[dict[str, Any]]:
    """Check in until a software command arrives; hand it to the manager and run it."""
    for _ in range(200):
        await api.services.software.tick()
        resp = await dev.checkin({})
        cmds = [c for c in resp["commands"] if c["kind"] == "software"]
        if cmds:
            await dev.checkin({"acks": [c["run_id"] for c in resp["commands"]]})
            for c in cmds:
                assert mgr.handle(c["payload"])["result"]["accepted"] is True
            await mgr.run_once()
            assert await mgr.flush_reports()
            return cmds
        await asyncio.sleep(0.05)
    raise AssertionError("no software command reached the device")


async def test_deploy_install_then_upgrade_sends_only_what_changed(api, tmp_path):
    target = tmp_path / "installed" / "tool.bin"
    target.parent.mkdir()
    v1_data = payload(1)
    v2_data = edited(v1_data, 2)
    p1 = await upload(api, cpkg(tmp_path / "tool-1.cpkg", "1.0", target, v1_data))
    assert p1["format"] == "cpkg" and p1["name"] == "tool" and p1["signature"]

    dev = await api.new_device("box")
    mgr = manager(dev, tmp_path)
    r = await api.post(
        "/api/v1/deployments",
        json={"package": "tool", "targets": {"devices": ["box"]}, "auto_upgrade": True},
    )
    assert r.status_code == 201, r.text
    dep = r.json()
    await take_software(api, dev, mgr)
    assert target.read_bytes() == v1_data
    show = (await api.get(f"/api/v1/deployments/{dep['id']}")).json()
    assert show["devices"][0]["state"] == "installed", show
    assert show["devices"][0]["version"] == "1.0"

    # a new version: the auto-upgrade deployment follows it, and the device gets a plan
    # against the version it holds
    p2 = await upload(api, cpkg(tmp_path / "tool-2.cpkg", "2.0", target, v2_data))
    plans: list[dict[str, Any]] = []
    real = api.services.software.plan_transfer

    async def spy(device_id: str, package_id: str, base: str | None) -> dict[str, Any]:
        plan = await real(device_id, package_id, base)
        plans.append({"base": base, **plan})
        return plan

    api.services.software.plan_transfer = spy
    await take_software(api, dev, mgr)
    assert target.read_bytes() == v2_data
    (plan,) = plans
    assert plan["base"] == p1["sha256"]
    assert plan["wire_size"] < 0.2 * p2["size"], plan["wire_size"]
    show = (await api.get(f"/api/v1/deployments/{dep['id']}")).json()
    assert show["package_id"] == p2["id"]
    assert show["devices"][0]["state"] == "installed" and show["devices"][0]["version"] == "2.0"

    # a package in use cannot be deleted; removal is its own deployment
    r = await api.http.delete(f"/api/v1/packages/{p2['id']}", headers=api.auth)
    assert r.status_code == 409
    r = await api.post(
        "/api/v1/deployments",
        json={"package": "tool", "targets": {"devices": ["box"]}, "action": "uninstall"},
    )
    assert r.status_code == 201, r.text
    await take_software(api, dev, mgr)
    assert not target.exists()
    removal = (await api.get(f"/api/v1/deployments/{r.json()['id']}")).json()
    assert removal["devices"][0]["state"] == "removed"


async def test_rollout_pauses_at_failure_threshold_and_resumes(api, tmp_path):
    target = tmp_path / "t.bin"
    await upload(api, cpkg(tmp_path / "bad.cpkg", "1.0", target, b"x" * 1000, fail=True))
    devs = [await api.new_device(f"d{i}") for i in range(10)]
    r = await api.post(
        "/api/v1/deployments",
        json={
            "package": "tool",
            "targets": {"devices": [f"d{i}" for i in range(10)]},
            "waves": [20, 100],
            "failure_threshold": 50,
        },
    )
    assert r.status_code == 201, r.text
    dep = r.json()
    first = [d for d in dep["devices"] if d["wave"] == 0]
    assert all(d["state"] == "queued" for d in first)
    assert all(d["state"] == "pending" for d in dep["devices"] if d["wave"] == 1)
    by_id = {d.device_id: d for d in devs}
    for row in first:
        dev = by_id[row["device_id"]]
        await take_software(api, dev, manager(dev, tmp_path))
    await api.services.software.tick()
    show = (await api.get(f"/api/v1/deployments/{dep['id']}")).json()
    assert show["state"] == "paused", show
    assert "failure threshold" in show["state_reason"]
    assert all(d["state"] == "failed" for d in show["devices"] if d["wave"] == 0), [
        (d["state"], d["detail"]) for d in show["devices"]
    ]
    assert all(d["state"] == "pending" for d in show["devices"] if d["wave"] == 1)
    failed = next(d for d in show["devices"] if d["state"] == "failed")
    assert "simulated failure" in failed["log"]

    r = await api.post(f"/api/v1/deployments/{dep['id']}/abort")
    assert r.json()["state"] == "aborted"
    assert all(d["state"] in ("failed", "cancelled") for d in r.json()["devices"])


async def test_waves_advance_on_success_and_labels_pick_devices(api, tmp_path):
    target = tmp_path / "ok.bin"
    await upload(api, cpkg(tmp_path / "ok.cpkg", "1.0", target, b"ok" * 500))
    devs = [await api.new_device(f"w{i}", facts={"hw.model": "X1" if i < 4 else "T14"})
            for i in range(6)]  # fmt: skip
    r = await api.post("/api/v1/labels", json={"name": "x1", "conditions": ["hw.model = X1"]})
    assert r.status_code == 201, r.text
    assert r.json()["devices"] == 4
    r = await api.post(
        "/api/v1/deployments",
        json={"package": "tool", "targets": {"labels": ["x1"]}, "waves": [50, 100],
              "success_threshold": 100},
    )  # fmt: skip
    assert r.status_code == 201, r.text
    dep = r.json()
    assert len(dep["devices"]) == 4
    by_id = {d.device_id: d for d in devs}
    done: set[str] = set()
    for _ in range(3):
        show = (await api.get(f"/api/v1/deployments/{dep['id']}")).json()
        for row in show["devices"]:
            if row["state"] == "queued" and row["device_id"] not in done:
                dev = by_id[row["device_id"]]
                await take_software(api, dev, manager(dev, tmp_path / row["device_id"][:6]))
                done.add(row["device_id"])
        await api.services.software.tick()
    show = (await api.get(f"/api/v1/deployments/{dep['id']}")).json()
    assert show["current_wave"] == 1
    assert {d["state"] for d in show["devices"]} == {"installed"}, show["devices"]


async def test_bad_uploads_and_transfers_are_refused(api, tmp_path):
    # not a package of any kind we can name: a plain file needs name, version, destination
    junk = tmp_path / "junk.bin"
    junk.write_bytes(os.urandom(1000))
    r = await api.http.post(
        "/api/v1/packages",
        params={"filename": junk.name},
        content=junk.read_bytes(),
        headers={**api.auth, "content-type": "application/octet-stream"},
    )
    assert r.status_code == 422 and r.json()["error"] == "bad_package", r.text
    # a cpkg that escapes its directory
    evil = tmp_path / "evil.cpkg"
    with tarfile.open(evil, "w") as tf:
        for name, data in (("manifest.toml", b'name="e"\nversion="1"\n'), ("../x", b"x")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    r = await api.http.post(
        "/api/v1/packages",
        params={"filename": evil.name},
        content=evil.read_bytes(),
        headers={**api.auth, "content-type": "application/octet-stream"},
    )
    assert r.status_code == 422, r.text
    empty = await api.http.post(
        "/api/v1/packages",
        params={"filename": "e.cpkg"},
        content=b"",
        headers={**api.auth, "content-type": "application/octet-stream"},
    )
    assert empty.status_code == 422
    # a device may not fetch packages no deployment gave it
    p = await upload(api, cpkg(tmp_path / "t.cpkg", "1.0", tmp_path / "t", b"t" * 100))
    dev = await api.new_device("nosy")
    from custos.agent.client import RequestRejected

    try:
        await dev.request("POST", "/api/device/v1/transfers",
                          body=f'{{"package_id":"{p["id"]}"}}'.encode())  # fmt: skip
    except RequestRejected as exc:
        assert exc.status == 404
    else:
        raise AssertionError("the transfer was planned")
    r = await api.post(
        "/api/v1/deployments", json={"package": "nope", "targets": {"devices": ["nosy"]}}
    )
    assert r.status_code == 404
    r = await api.post(
        "/api/v1/deployments",
        json={"package": "tool", "targets": {"devices": ["nosy"]}, "waves": [50, 40]},
    )
    assert r.status_code == 422


async def test_download_time_and_activation_time_are_honoured(api, tmp_path):
    import time
    from datetime import UTC, datetime, timedelta

    target = tmp_path / "later.bin"
    await upload(api, cpkg(tmp_path / "l.cpkg", "1.0", target, b"later" * 100))
    dev = await api.new_device("late")
    mgr = manager(dev, tmp_path)
    now = datetime.now(UTC)
    r = await api.post(
        "/api/v1/deployments",
        json={
            "package": "tool",
            "targets": {"devices": ["late"]},
            "download_at": (now + timedelta(seconds=2)).isoformat(),
            "activate_at": (now + timedelta(seconds=4)).isoformat(),
        },
    )
    assert r.status_code == 201, r.text
    # queued, but not handed out before its download time
    resp = await dev.checkin({})
    assert not [c for c in resp["commands"] if c["kind"] == "software"]
    t0 = time.monotonic()
    await take_software(api, dev, mgr)
    assert time.monotonic() - t0 >= 1.0
    # downloaded, not installed: the activation time has not come
    assert not target.exists()
    dep = (await api.get(f"/api/v1/deployments/{r.json()['id']}")).json()
    assert dep["devices"][0]["state"] == "downloaded", dep["devices"]
    wait = await mgr.run_once()
    assert 0 < wait <= 4.5
    await asyncio.sleep(wait)
    await mgr.run_once()
    assert await mgr.flush_reports()
    assert target.exists()
    dep = (await api.get(f"/api/v1/deployments/{r.json()['id']}")).json()
    assert dep["devices"][0]["state"] == "installed"


async def test_a_tampered_descriptor_or_artifact_is_refused(api, tmp_path):
    target = tmp_path / "t.bin"
    pkg = await upload(api, cpkg(tmp_path / "t.cpkg", "1.0", target, payload(7, 400_000)))
    dev = await api.new_device("victim")
    mgr = manager(dev, tmp_path)
    r = await api.post(
        "/api/v1/deployments", json={"package": "tool", "targets": {"devices": ["victim"]}}
    )
    assert r.status_code == 201
    cmd = None
    for _ in range(100):
        resp = await dev.checkin({})
        cmds = [c for c in resp["commands"] if c["kind"] == "software"]
        if cmds:
            cmd = cmds[0]
            break
        await asyncio.sleep(0.05)
    assert cmd is not None
    # a descriptor changed on the way (a different hash, say) fails the signature check
    forged = {**cmd["payload"], "descriptor": {**cmd["payload"]["descriptor"], "sha256": "0" * 64}}
    res = mgr.handle(forged)
    assert res["state"] == "failed" and "refused" in res["error"]
    # the genuine one is accepted, but the server's copy of a chunk was altered: the body
    # does not match the plan's hash, nothing is installed
    store_dir = api.services.settings.data_dir / "artifacts" / "chunks"
    frames = sorted(p for p in store_dir.rglob("*") if p.is_file())
    assert frames
    for f in frames:
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0xFF
        f.write_bytes(bytes(data))
    assert mgr.handle(cmd["payload"])["result"]["accepted"] is True
    await mgr.run_once()
    assert await mgr.flush_reports()
    assert not target.exists()
    dep = (await api.get(f"/api/v1/deployments/{r.json()['id']}")).json()
    row = dep["devices"][0]
    assert row["state"] in ("downloading", "failed") and row["state"] != "installed", row
    assert row["detail"].startswith("download rejected"), row
    assert pkg["sha256"] not in (p.name for p in (tmp_path / f"sw-{dev.device_id[:6]}").rglob("*"))


async def test_group_rate_caps_split_the_command_by_limit(api, tmp_path):
    """A device in a capped group downloads at its group's rate; the lower limit wins."""
    target = tmp_path / "installed" / "capped.bin"
    target.parent.mkdir()
    pkg = await upload(api, cpkg(tmp_path / "capped-1.cpkg", "1.0", target, payload(5, 4096)))
    for name in ("office", "branch", "branch2"):
        await api.new_device(name)
    await api.post("/api/v1/groups", json={"name": "branch-office"})
    await api.post("/api/v1/groups", json={"name": "slow-link"})
    await api.post("/api/v1/groups/branch-office/devices", json={"devices": ["branch", "branch2"]})
    await api.post("/api/v1/groups/slow-link/devices", json={"devices": ["branch2"]})
    svc = api.services.software
    svc.group_limit_bps = {"branch-office": 500_000, "slow-link": 64_000}
    r = await api.post(
        "/api/v1/deployments",
        json={
            "package": pkg["name"],
            "targets": {"devices": ["office", "branch", "branch2"]},
            "limit_bps": 200_000,
        },
    )
    assert r.status_code == 201, r.text
    await svc.tick()
    listed = (await api.get("/api/v1/commands")).json()
    limits = {}
    for c in listed:
        if c["kind"] != "software":
            continue
        detail = (await api.get(f"/api/v1/commands/{c['id']}")).json()
        for run in detail["runs"]:
            limits[run["device_name"]] = c["payload"]["limit_bps"]
    # office: the deployment's own limit; branch: still the deployment's (lower than the
    # group's); branch2: the slow-link cap, lower than both
    assert limits == {"office": 200_000, "branch": 200_000, "branch2": 64_000}
