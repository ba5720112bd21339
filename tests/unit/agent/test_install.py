"""The agent's install engine with real processes: cpkg, deb, whl, plain files, detection."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import os
import secrets
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psutil
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from custos.agent.install import LOG_LIMIT, detect, install, uninstall
from custos.packaging.inspect import Limits, inspect_package
from custos.packaging.signing import sign_descriptor

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX installers")

PY = sys.executable


# --------------------------------------------------------------------------- builders


def make_cpkg(
    path: Path,
    members: dict[str, bytes],
    extra: Callable[[tarfile.TarFile], None] | None = None,
) -> Path:
    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o755 if name.endswith(".sh") else 0o644
            tf.addfile(info, io.BytesIO(data))
        if extra is not None:
            extra(tf)
    return path


def manifest(target: Path, *, install_steps: str, extra: str = "") -> bytes:
    return (
        f'name = "hello"\nversion = "1.0"\n{extra}\n'
        f'detect = {{ version_file = "{target}", version = "1.0" }}\n'
        f"{install_steps}\n"
        f'[[uninstall]]\ncommand = ["/bin/rm", "-f", "{target}"]\n'
    ).encode()


def _ca() -> tuple[ec.EllipticCurvePrivateKey, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Test CA")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return key, cert.public_bytes(serialization.Encoding.PEM).decode()


def described(path: Path, **kw: Any) -> dict[str, Any]:
    return inspect_package(path, filename=kw.pop("filename", path.name), **kw).descriptor()


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


# --------------------------------------------------------------------------- cpkg


async def test_cpkg_signed_install_detect_uninstall(tmp_path: Path) -> None:
    target = tmp_path / "installed" / "VERSION"
    seen = tmp_path / "seen.txt"
    script = (
        b"#!/bin/sh\nset -e\n"
        b'mkdir -p "$(dirname "$TARGET")"\n'
        b'printf "1.0\\n" > "$TARGET"\n'
        b'printf "%s|%s|%s" "$PWD" "$CUSTOS_PACKAGE_NAME" "$(cat payload.txt)" > "$SEEN"\n'
        b"echo installed-ok\n"
    )
    steps = (
        f'[[install]]\nscript = "install.sh"\nenv = {{ TARGET = "{target}", SEEN = "{seen}" }}\n'
    )
    pkg = make_cpkg(
        tmp_path / "hello.cpkg",
        {
            "manifest.toml": manifest(target, install_steps=steps),
            "install.sh": script,
            "payload.txt": b"payload",
        },
    )
    desc = described(pkg)
    key, ca_pem = _ca()
    sig = sign_descriptor(key, desc)
    work = tmp_path / "work"

    res = await install(desc, pkg, work, timeout_s=30, signature=sig, ca_cert_pem=ca_pem)
    assert res.ok and res.action == "installed", res.to_dict()
    assert res.exit_codes == [0]
    assert "installed-ok" in res.steps[0].stdout
    assert res.detection is not None and res.detection.installed
    assert res.detection.version == "1.0"
    cwd, name, payload = seen.read_text().split("|")
    assert (name, payload) == ("hello", "payload")
    assert Path(cwd).parent == work
    assert list(work.iterdir()) == []  # the extraction directory is gone
    json.dumps(res.to_dict())  # what the agent reports must be JSON

    again = await install(desc, pkg, work, timeout_s=30, signature=sig, ca_cert_pem=ca_pem)
    assert again.ok and again.action == "already_installed" and again.steps == []

    removed = await uninstall(desc, pkg, work, timeout_s=30, signature=sig, ca_cert_pem=ca_pem)
    assert removed.ok and removed.action == "removed", removed.to_dict()
    assert not target.exists()
    assert not (await detect(desc["detect"])).installed
    gone = await uninstall(desc, None, work, timeout_s=30)
    assert gone.ok and gone.action == "already_removed"


async def test_bad_signature_or_artifact_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "VERSION"
    steps = f'[[install]]\ncommand = ["/bin/sh", "-c", "echo 1.0 > {marker}"]\n'
    pkg = make_cpkg(tmp_path / "p.cpkg", {"manifest.toml": manifest(marker, install_steps=steps)})
    desc = described(pkg)
    key, ca_pem = _ca()
    sig = sign_descriptor(key, desc)
    tampered = {**desc, "version": "1.1"}
    res = await install(
        tampered, pkg, tmp_path / "w", timeout_s=30, signature=sig, ca_cert_pem=ca_pem
    )
    assert not res.ok and res.action == "failed" and "signature" in (res.error or "")

    other = make_cpkg(
        tmp_path / "o.cpkg", {"manifest.toml": manifest(marker, install_steps=steps + "\n")}
    )
    res = await install(desc, other, tmp_path / "w", timeout_s=30)
    assert not res.ok and ("bytes" in (res.error or "") or "SHA-256" in (res.error or ""))
    assert res.steps == [] and not marker.exists()

    windows_only = make_cpkg(
        tmp_path / "win.cpkg",
        {"manifest.toml": manifest(marker, install_steps=steps, extra='platforms = ["windows"]')},
    )
    res = await install(described(windows_only), windows_only, tmp_path / "w", timeout_s=30)
    assert not res.ok and "windows" in (res.error or "") and not marker.exists()


async def test_failing_step_reports_logs_and_rolls_back(tmp_path: Path) -> None:
    target = tmp_path / "VERSION"
    steps = (
        f'[[install]]\ncommand = ["/bin/sh", "-c", "echo 1.0 > {target}; echo half-done"]\n'
        '[[install]]\ncommand = ["/bin/sh", "-c", "echo boom >&2; exit 3"]\n'
        '[[install]]\ncommand = ["/bin/sh", "-c", "echo never"]\n'
    )
    plain = make_cpkg(tmp_path / "a.cpkg", {"manifest.toml": manifest(target, install_steps=steps)})
    res = await install(described(plain), plain, tmp_path / "w", timeout_s=30)
    assert not res.ok and res.action == "failed"
    assert res.exit_codes == [0, 3]  # the third step never ran
    assert "boom" in res.steps[1].stderr and res.steps[1].error == "exit code 3"
    assert "install step failed" in (res.error or "")
    assert target.exists()  # no rollback was asked for

    target.unlink()
    undo = make_cpkg(
        tmp_path / "b.cpkg",
        {
            "manifest.toml": manifest(
                target, install_steps=steps, extra="uninstall_on_failure = true"
            )
        },
    )
    res = await install(described(undo), undo, tmp_path / "w", timeout_s=30)
    assert not res.ok and res.action == "rolled_back"
    assert [s.phase for s in res.steps] == ["install", "install", "rollback"]
    assert not target.exists()  # the uninstall step removed what the first step wrote


async def test_step_timeout_kills_the_process_group(tmp_path: Path) -> None:
    target = tmp_path / "VERSION"
    pidfile = tmp_path / "pid"
    steps = (
        f'[[install]]\ncommand = ["/bin/sh", "-c", "sleep 60 & echo $! > {pidfile}; wait"]\n'
        "timeout = 1\n"
    )
    pkg = make_cpkg(tmp_path / "t.cpkg", {"manifest.toml": manifest(target, install_steps=steps)})
    started = time.monotonic()
    res = await install(described(pkg), pkg, tmp_path / "w", timeout_s=30)
    assert time.monotonic() - started < 10
    assert not res.ok and res.steps[0].timed_out
    assert "timed out" in (res.steps[0].error or "")
    grandchild = int(pidfile.read_text())
    for _ in range(50):
        if _gone(grandchild):
            break
        await asyncio.sleep(0.1)
    assert _gone(grandchild)


async def test_overall_timeout_and_bounded_logs(tmp_path: Path) -> None:
    target = tmp_path / "VERSION"
    noisy = (
        "import sys; sys.stdout.write('A' * 300000 + 'THE-END'); "
        f"open('{target}', 'w').write('1.0')"
    )
    steps = (
        f'[[install]]\ncommand = ["{PY}", "-c", "{noisy}"]\n'
        '[[install]]\ncommand = ["sleep", "30"]\n'
    )
    pkg = make_cpkg(tmp_path / "n.cpkg", {"manifest.toml": manifest(target, install_steps=steps)})
    res = await install(described(pkg), pkg, tmp_path / "w", timeout_s=3)
    out = res.steps[0].stdout
    assert len(out.encode()) <= LOG_LIMIT // 2 + 200
    assert out.endswith("THE-END") and "omitted" in out
    assert res.steps[1].timed_out and not res.ok


def _link_out(tf: tarfile.TarFile) -> None:
    info = tarfile.TarInfo("lib")
    info.type = tarfile.SYMTYPE
    info.linkname = "../../../../etc"
    tf.addfile(info)


@pytest.mark.parametrize("case", ["traversal", "symlink", "oversized"])
async def test_agent_refuses_hostile_archives(tmp_path: Path, case: str) -> None:
    """The agent re-validates: a descriptor matching a hostile artifact still installs nothing."""
    target = tmp_path / "VERSION"
    steps = f'[[install]]\ncommand = ["/bin/sh", "-c", "echo 1.0 > {target}"]\n'
    body = manifest(target, install_steps=steps)
    good = make_cpkg(tmp_path / "good.cpkg", {"manifest.toml": body})
    members = {"manifest.toml": body}
    extra = None
    if case == "traversal":
        members["../../escaped.txt"] = b"x"
    elif case == "symlink":
        extra = _link_out
    else:
        members["big.bin"] = b"\0" * 10_000
    bad = make_cpkg(tmp_path / "bad.cpkg", members, extra)
    data = bad.read_bytes()
    desc = {**described(good), "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    work = tmp_path / "a" / "b" / "work"
    res = await install(desc, bad, work, timeout_s=30, limits=Limits(max_member_bytes=4096))
    assert not res.ok and "refused" in (res.error or ""), res.to_dict()
    assert res.steps == [] and not target.exists()
    assert not (tmp_path / "a" / "escaped.txt").exists()
    assert list(work.iterdir()) == []


async def test_cpkg_files_install_rollback_and_removal(tmp_path: Path) -> None:
    dest = tmp_path / "opt"
    dest.mkdir()
    (dest / "tool").write_text("old tool\n")
    body = (
        'name = "tool"\nversion = "2"\n'
        f'[[files]]\nsource = "bin/tool"\ndestination = "{dest / "tool"}"\nmode = 0o750\n'
        f'[[files]]\nsource = "etc/tool.conf"\ndestination = "{dest / "conf" / "tool.conf"}"\n'
    )
    payload = {"bin/tool": b"#!/bin/sh\necho new\n", "etc/tool.conf": b"x = 1\n"}
    failing = make_cpkg(
        tmp_path / "f.cpkg",
        {"manifest.toml": (body + '[[verify]]\ncommand = ["false"]\n').encode(), **payload},
    )
    res = await install(described(failing), failing, tmp_path / "w", timeout_s=30)
    assert not res.ok and res.action == "rolled_back" and "verify" in (res.error or "")
    assert (dest / "tool").read_text() == "old tool\n"  # restored
    assert not (dest / "conf" / "tool.conf").exists()  # did not exist before

    pkg = make_cpkg(tmp_path / "ok.cpkg", {"manifest.toml": body.encode(), **payload})
    desc = described(pkg)
    res = await install(desc, pkg, tmp_path / "w", timeout_s=30)
    assert res.ok and res.action == "installed", res.to_dict()
    assert (dest / "tool").read_bytes() == payload["bin/tool"]
    assert (dest / "tool").stat().st_mode & 0o777 == 0o750
    assert (dest / "conf" / "tool.conf").stat().st_mode & 0o777 == 0o644
    assert list((tmp_path / "w").iterdir()) == []  # backups discarded

    res = await uninstall(desc, None, tmp_path / "w", timeout_s=30)
    assert res.ok and res.action == "removed"
    assert not (dest / "tool").exists() and not (dest / "conf" / "tool.conf").exists()


# --------------------------------------------------------------------------- plain files


async def test_file_install_and_rollback(tmp_path: Path) -> None:
    dest = tmp_path / "etc" / "app.conf"
    v1 = tmp_path / "v1.conf"
    v1.write_text("version 1\n")
    d1 = described(v1, name="app-conf", version="1", destination=str(dest), mode=0o640)
    res = await install(d1, v1, tmp_path / "w", timeout_s=30)
    assert res.ok and res.action == "installed" and dest.read_text() == "version 1\n"
    assert dest.stat().st_mode & 0o777 == 0o640
    assert (await install(d1, v1, tmp_path / "w", timeout_s=30)).action == "already_installed"

    # v2 whose detection never succeeds: the engine puts v1 back
    v2 = tmp_path / "v2.conf"
    v2.write_text("version 2\n")
    d2 = described(
        v2, name="app-conf", version="2", destination=str(dest), detect={"command": ["false"]}
    )
    res = await install(d2, v2, tmp_path / "w", timeout_s=30)
    assert not res.ok and res.action == "rolled_back"
    assert res.detection is not None and not res.detection.installed
    assert dest.read_text() == "version 1\n" and dest.stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in dest.parent.iterdir()) == ["app.conf"]  # no temp files left

    res = await uninstall(d1, None, tmp_path / "w", timeout_s=30)
    assert res.ok and res.action == "removed" and not dest.exists()


async def test_msi_and_rpm_elsewhere(tmp_path: Path) -> None:
    msi = tmp_path / "setup.msi"
    msi.write_bytes(bytes.fromhex("d0cf11e0a1b11ae1") + b"\0" * 4096)
    desc = described(
        msi, name="setup", version="1.0", product_code="{12345678-1234-1234-1234-123456789ABC}"
    )
    desc["platforms"] = []  # pretend the server let it through: the engine still says why not
    res = await install(desc, msi, tmp_path / "w", timeout_s=30)
    assert not res.ok and "only on Windows" in (res.error or "")
    assert not (await detect(desc["detect"])).installed
    missing = await detect({"rpm": f"custos-test-absent-{secrets.token_hex(4)}"})
    assert not missing.installed and missing.version is None


async def test_detect_rules(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"abc")
    digest = hashlib.sha256(b"abc").hexdigest()
    assert (await detect({"file": str(f), "sha256": digest})).installed
    assert not (await detect({"file": str(f), "sha256": "0" * 64})).installed
    assert not (await detect({"file": str(tmp_path / "nope")})).installed
    assert (await detect({"command": ["true"]})).installed
    assert (await detect({"command": ["sh", "-c", "exit 4"], "exit_code": 4})).installed
    assert not (await detect({"command": ["/nonexistent/prog"]})).installed
    (tmp_path / "v").write_text("2.5\nrest\n")
    found = await detect({"version_file": str(tmp_path / "v"), "version": "2.5"})
    assert found.installed and found.version == "2.5"
    dpkg = await detect({"dpkg": "dpkg", "min_version": "1.0"})
    assert dpkg.installed and dpkg.version
    assert not (await detect({"dpkg": "dpkg", "min_version": "999"})).installed
    pip = await detect({"pip": "pytest", "min_version": "1.0"}, python=PY)
    assert pip.installed and pip.version
    assert not (await detect({"pip": f"custos-absent-{secrets.token_hex(4)}"})).installed


# --------------------------------------------------------------------------- deb (real dpkg)


def build_deb(tmp_path: Path, name: str, version: str, *, postinst_fails: bool = False) -> Path:
    root = tmp_path / f"root-{version}"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        f"Package: {name}\nVersion: {version}\nArchitecture: all\n"
        "Maintainer: Custos Tests <tests@example.invalid>\nDescription: custos install test\n"
    )
    if postinst_fails:
        post = root / "DEBIAN" / "postinst"
        post.write_text("#!/bin/sh\necho postinst failing >&2\nexit 1\n")
        post.chmod(0o755)
    (root / "opt" / name).mkdir(parents=True)
    (root / "opt" / name / "hello").write_text(f"hello {version}\n")
    out = tmp_path / f"{name}_{version}_all.deb"
    subprocess.run(
        ["dpkg-deb", "-Zgzip", "--root-owner-group", "--build", str(root), str(out)],
        check=True,
        capture_output=True,
    )
    return out


@pytest.fixture
def deb_name() -> Iterator[str]:
    name = f"custos-test-hello-{secrets.token_hex(4)}"
    try:
        yield name
    finally:
        subprocess.run(["dpkg", "--purge", name], capture_output=True, check=False)
        shutil.rmtree(f"/opt/{name}", ignore_errors=True)


async def test_deb_install_upgrade_rollback_remove(tmp_path: Path, deb_name: str) -> None:
    v1 = build_deb(tmp_path, deb_name, "1.0")
    d1 = described(v1)
    assert (d1["format"], d1["name"], d1["detect"]) == (
        "deb",
        deb_name,
        {"dpkg": deb_name, "min_version": "1.0"},
    )
    res = await install(d1, v1, tmp_path / "w", timeout_s=120)
    assert res.ok and res.action == "installed", res.to_dict()
    assert res.detection is not None and res.detection.version == "1.0"
    assert Path(f"/opt/{deb_name}/hello").read_text() == "hello 1.0\n"

    # an upgrade whose maintainer script fails: dpkg fails, the engine reinstalls 1.0
    v2 = build_deb(tmp_path, deb_name, "2.0", postinst_fails=True)
    res = await install(described(v2), v2, tmp_path / "w", timeout_s=120, previous_artifact=v1)
    assert not res.ok and res.action == "rolled_back", res.to_dict()
    assert [s.phase for s in res.steps] == ["install", "rollback"]
    assert res.steps[0].exit_code != 0 and "postinst failing" in res.steps[0].stderr
    now = await detect({"dpkg": deb_name})
    assert now.installed and now.version == "1.0"

    res = await uninstall(d1, None, tmp_path / "w", timeout_s=120)
    assert res.ok and res.action == "removed", res.to_dict()
    assert not (await detect({"dpkg": deb_name})).installed
    assert not Path(f"/opt/{deb_name}/hello").exists()


# --------------------------------------------------------------------------- wheel (real pip)


def build_wheel(directory: Path, dist: str, version: str, module: str) -> Path:
    info_dir = f"{dist}-{version}.dist-info"
    files = {
        f"{module}/__init__.py": f"VERSION = {version!r}\n".encode(),
        f"{info_dir}/METADATA": (
            f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n".encode()
        ),
        f"{info_dir}/WHEEL": b"Wheel-Version: 1.0\nGenerator: custos-tests\n"
        b"Root-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for name, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(data)}")
    files[f"{info_dir}/RECORD"] = ("\n".join([*record, f"{info_dir}/RECORD,,"]) + "\n").encode()
    path = directory / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


async def test_wheel_into_a_throwaway_venv(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([PY, "-m", "venv", "--without-pip", str(venv)], check=True, capture_output=True)
    python = str(venv / "bin" / "python")
    dist, module = "custos_test_wheel", "custos_test_wheel_mod"
    whl = build_wheel(tmp_path, dist, "1.0", module)
    desc = described(whl)
    assert desc["detect"] == {"pip": dist, "min_version": "1.0", "python": None}

    res = await install(desc, whl, tmp_path / "w", timeout_s=120, python=python)
    assert res.ok and res.action == "installed", res.to_dict()
    assert "--no-index" in res.steps[0].argv and "--no-deps" in res.steps[0].argv
    assert res.detection is not None and res.detection.version == "1.0"
    out = subprocess.run(
        [python, "-c", f"import {module}; print({module}.VERSION)"], capture_output=True, text=True
    )
    assert out.stdout.strip() == "1.0"
    # the agent's own interpreter was left alone
    assert not (await detect({"pip": dist}, python=PY)).installed

    res = await uninstall(desc, None, tmp_path / "w", timeout_s=120, python=python)
    assert res.ok and res.action == "removed", res.to_dict()
    assert not (await detect({"pip": dist}, python=python)).installed
    assert os.listdir(tmp_path / "w") == []
