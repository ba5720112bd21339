"""imitune (PyPI, a Windows-style OMA DM client written by others) against a real server.

The client proves its identity with a TLS client certificate issued at registration (a
PKCS#12 file, as Windows MDM clients hold theirs), sends package 1 with its DevInfo, answers
the server's Gets, Replaces, Adds and Execs from its management tree, and ends the session
when the server has nothing more. Its interpreter is .venv-imitune (Python 3.12, `make
install`); tests/interop/imitune_run.py points it at this server instead of Intune.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID
from e2e_harness import E2E, wait_for

ROOT = Path(__file__).resolve().parents[2]
IMITUNE_PYTHON = ROOT / ".venv-imitune" / "bin" / "python"
RUNNER = ROOT / "tests" / "interop" / "imitune_run.py"

pytestmark = [pytest.mark.e2e, pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)]

TREE = {
    "./DevInfo/DevId": "",  # filled with the device name
    "./DevInfo/Man": "Contoso",
    "./DevInfo/Mod": "Surface Test 9",
    "./DevInfo/DmV": "1.3",
    "./DevInfo/Lang": "en-US",
    "./Vendor/MSFT/DMClient/HWDevID": "A1B2C3D4E5F6",
    "./DevDetail/Ext/Microsoft/DNSComputerName": "WIN-IMITUNE",
    "./DevDetail/Ext/Microsoft/OSPlatform": "Windows 11 Enterprise",
    "./Vendor/MSFT/Policy/Config/Camera/AllowCamera": "1",
}


def _pfx(path: Path, key_pem: str, cert_pem: str) -> None:
    key = serialization.load_pem_private_key(key_pem.encode(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    cert = x509.load_pem_x509_certificate(cert_pem.encode())
    data = pkcs12.serialize_key_and_certificates(
        b"custos-omadm",
        key,
        cert,
        None,
        serialization.NoEncryption(),  # type: ignore[arg-type]
    )
    path.write_bytes(data)


def _imitune(e2e: E2E, name: str, pfx: Path, work: Path) -> subprocess.CompletedProcess[str]:
    assert IMITUNE_PYTHON.exists(), (
        f"{IMITUNE_PYTHON} is missing: `make install` creates it (Python 3.12 with imitune)"
    )
    (work / name).mkdir(parents=True, exist_ok=True)
    (work / name / "managementTree.json").write_text(json.dumps({**TREE, "./DevInfo/DevId": name}))
    ca_file = e2e.root / "ca.pem"
    return subprocess.run(
        [
            str(IMITUNE_PYTHON),
            str(RUNNER),
            e2e.url + "/omadm",
            name,
            str(pfx),
            str(ca_file),
            str(work),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


def _tree(work: Path, name: str) -> dict[str, Any]:
    return json.loads((work / name / "managementTree.json").read_text())


def test_imitune_completes_a_session_with_its_client_certificate(e2e: E2E) -> None:
    admin = e2e.admin
    r = admin.post("/api/v1/omadm/devices", json={"dev_id": "IMITUNE-01", "auth": "cert"})
    assert r.status_code == 201, r.text
    created = r.json()
    pfx = e2e.root / "imitune.pfx"
    _pfx(pfx, created["private_key"], created["certificate"])
    r = admin.post(
        f"/api/v1/omadm/devices/{created['device_id']}/ops",
        json={
            "ops": [
                {
                    "verb": "Replace",
                    "target": "./Vendor/MSFT/Policy/Config/Camera/AllowCamera",
                    "data": "0",
                    "format": "int",
                },
                {"verb": "Add", "target": "./Vendor/Custos/Note", "data": "managed by custos"},
                {"verb": "Get", "target": "./Vendor/MSFT/DMClient/HWDevID"},
                {"verb": "Exec", "target": "./Vendor/MSFT/Reboot/RebootNow"},
            ]
        },
    )
    assert r.status_code == 201, r.text
    command_id = r.json()["command_id"]
    work = e2e.root / "imitune"
    done = _imitune(e2e, "IMITUNE-01", pfx, work)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    tree = _tree(work, "IMITUNE-01")
    assert tree["./Vendor/MSFT/Policy/Config/Camera/AllowCamera"] == "0"
    assert tree["./Vendor/Custos/Note"] == "managed by custos"
    run = admin.run_of(command_id)
    assert run is not None and run["state"] == "succeeded", run
    ops = run["result"]["ops"]
    assert [o["status"] for o in ops] == [200, 200, 200, 200]
    assert ops[2]["data"] == "A1B2C3D4E5F6"
    device = admin.device(created["device_id"])
    inv = device["inventory"]
    assert inv["hw.manufacturer"] == "Contoso" and inv["hw.model"] == "Surface Test 9"
    # DevDetail read in the same session
    assert inv["os.hostname"] == "WIN-IMITUNE" and inv["os.name"] == "Windows 11 Enterprise"
    # last-seen times are written in batches (every 0.5 s here)
    wait_for("last seen", lambda: admin.device(created["device_id"])["last_seen"] is not None)


def test_a_certificate_is_only_good_for_its_own_device(e2e: E2E) -> None:
    admin = e2e.admin
    made = []
    for dev_id in ("IMITUNE-A", "IMITUNE-B"):
        r = admin.post("/api/v1/omadm/devices", json={"dev_id": dev_id, "auth": "cert"})
        assert r.status_code == 201, r.text
        made.append(r.json())
    r = admin.post(
        f"/api/v1/omadm/devices/{made[1]['device_id']}/ops",
        json={"ops": [{"verb": "Replace", "target": "./Vendor/Custos/X", "data": "1"}]},
    )
    command_id = r.json()["command_id"]
    # A's certificate, B's DevId: the server answers 401 and hands out nothing
    pfx = e2e.root / "a.pfx"
    _pfx(pfx, made[0]["private_key"], made[0]["certificate"])
    work = e2e.root / "wrong"
    _imitune(e2e, "IMITUNE-B", pfx, work)
    assert "./Vendor/Custos/X" not in _tree(work, "IMITUNE-B")
    run = admin.run_of(command_id)
    assert run is not None and run["state"] == "queued"
    # a certificate from another CA does not get through the TLS handshake at all
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "intruder")])
    import datetime as dt

    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    foreign = e2e.root / "foreign.pfx"
    foreign.write_bytes(
        pkcs12.serialize_key_and_certificates(b"x", key, cert, None, serialization.NoEncryption())
    )
    refused = _imitune(e2e, "IMITUNE-B", foreign, e2e.root / "foreign")
    assert refused.returncode != 0
    # (under TLS 1.3 the client learns of the refusal as a closed connection)
    assert "SSL" in refused.stderr or "Connection aborted" in refused.stderr, refused.stderr[-500:]
    assert admin.run_of(command_id)["state"] == "queued"  # type: ignore[index]
