"""Software distribution with real processes: a real agent installs a .deb built here with
dpkg-deb and a .cpkg, from a required deployment and from its self-service catalogue."""

from __future__ import annotations

import io
import subprocess
import tarfile
import uuid
from pathlib import Path
from typing import Any

import pytest
from e2e_harness import E2E, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.server_env(CUSTOS_SOFTWARE_TICK_S="0.5")]


def _upload(e2e: E2E, path: Path) -> dict[str, Any]:
    r = e2e.admin.http.post(
        "/api/v1/packages",
        params={"filename": path.name},
        content=path.read_bytes(),
        headers={**e2e.admin.auth, "content-type": "application/octet-stream"},
    )
    assert r.status_code == 201, r.text
    return r.json()  # type: ignore[no-any-return]


def _deb(tmp: Path, name: str, marker: Path) -> Path:
    root = tmp / "debroot"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        f"Package: {name}\nVersion: 1.0\nArchitecture: all\n"
        "Maintainer: Custos tests <tests@example.invalid>\nDescription: test package\n"
    )
    dest = root / marker.relative_to("/")
    dest.parent.mkdir(parents=True)
    dest.write_text("hello from a deb\n")
    out = tmp / f"{name}_1.0_all.deb"
    subprocess.run(["dpkg-deb", "--build", str(root), str(out)], check=True, capture_output=True)
    return out


def _device_state(e2e: E2E, dep_id: str) -> list[dict[str, Any]]:
    r = e2e.admin.get(f"/api/v1/deployments/{dep_id}")
    assert r.status_code == 200, r.text
    return r.json()["devices"]  # type: ignore[no-any-return]


def _deploy_and_settle(e2e: E2E, body: dict[str, Any], done: str, what: str) -> dict[str, Any]:
    """Create a deployment and wait until its (single) device reaches `done` or fails."""
    r = e2e.admin.post("/api/v1/deployments", json=body)
    assert r.status_code == 201, r.text
    dep_id = r.json()["id"]
    rows = wait_for(
        what,
        lambda: [d for d in _device_state(e2e, dep_id) if d["state"] in (done, "failed")],
        timeout=60,
    )
    return rows[0]  # type: ignore[no-any-return]


def test_a_real_agent_installs_and_removes_a_deb(e2e: E2E, tmp_path: Path) -> None:
    name = f"custos-e2e-{uuid.uuid4().hex[:8]}"
    marker = Path("/opt") / name / "hello.txt"
    pkg = _upload(e2e, _deb(tmp_path, name, marker))
    assert pkg["format"] == "deb" and pkg["name"] == name
    agent = e2e.agent("sw-deb")
    agent.start()
    try:
        targets = {"devices": [agent.device_id]}
        row = _deploy_and_settle(
            e2e, {"package": name, "targets": targets}, "installed", "the deb installed"
        )
        assert row["state"] == "installed", row
        assert marker.read_text() == "hello from a deb\n"
        status = subprocess.run(["dpkg", "-s", name], capture_output=True, text=True)
        assert "Status: install ok installed" in status.stdout

        body = {"package": name, "targets": targets, "action": "uninstall"}
        row = _deploy_and_settle(e2e, body, "removed", "the deb removed")
        assert row["state"] == "removed", row
        assert not marker.exists()
    finally:
        agent.stop()
        subprocess.run(["dpkg", "--purge", name], capture_output=True, check=False)


def test_self_service_catalogue_install_then_removal(e2e: E2E, tmp_path: Path) -> None:
    target = tmp_path / "tool.txt"
    manifest = (
        'name = "notes"\nversion = "2.1"\ndescription = "a note"\n'
        f'detect = {{ version_file = "{target}", version = "2.1" }}\n'
        f'[[install]]\ncommand = ["/bin/sh", "-c", "echo 2.1 > {target}"]\n'
        f'[[uninstall]]\ncommand = ["/bin/rm", "-f", "{target}"]\n'
    ).encode()
    path = tmp_path / "notes.cpkg"
    with tarfile.open(path, "w") as tf:
        info = tarfile.TarInfo("manifest.toml")
        info.size = len(manifest)
        tf.addfile(info, io.BytesIO(manifest))
    _upload(e2e, path)
    agent = e2e.agent("sw-cat")
    r = e2e.admin.post(
        "/api/v1/deployments",
        json={"package": "notes", "targets": {"devices": [agent.device_id]}, "mode": "available"},
    )
    assert r.status_code == 201, r.text
    listed = agent.cli("catalog")
    assert listed.returncode == 0, listed.stderr
    assert "notes" in listed.stdout and "2.1" in listed.stdout
    assert not target.exists()  # offered, not pushed
    agent.start()
    try:
        res = agent.cli("install", "notes", "--wait", "60", timeout=90)
        assert res.returncode == 0, res.stderr
        assert target.read_text().strip() == "2.1"
        again = agent.cli("install", "nothing-like-this")
        assert again.returncode == 1 and "catalogue" in again.stderr

        # and removed again, by its manifest's uninstall steps
        body = {
            "package": "notes",
            "targets": {"devices": [agent.device_id]},
            "action": "uninstall",
        }
        row = _deploy_and_settle(e2e, body, "removed", "the cpkg removed")
        assert row["state"] == "removed", row
        assert not target.exists()
    finally:
        agent.stop()
