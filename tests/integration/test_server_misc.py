"""OpenAPI, health, admin auth and the `custos db upgrade` command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import custos


async def test_openapi_lists_the_api(api):
    r = await api.http.get("/api/openapi.json")
    assert r.status_code == 200
    paths = r.json()["paths"]
    for p in (
        "/api/v1/auth/login",
        "/api/v1/enrollment-tokens",
        "/api/v1/devices",
        "/api/v1/commands",
        "/api/device/v1/enroll",
        "/api/device/v1/checkin",
    ):
        assert p in paths, p
    body = paths["/api/device/v1/checkin"]["post"]["requestBody"]
    assert "results" in body["content"]["application/json"]["schema"]["properties"]


async def test_health_and_auth_errors(api):
    assert (await api.http.get("/healthz")).json() == {"status": "ok"}
    r = await api.http.get("/api/v1/devices")
    assert r.status_code == 401 and r.json() == {
        "error": "no_token",
        "detail": "an API token is required (Authorization: Bearer …)",
    }
    r = await api.http.post("/api/v1/auth/login", json={"username": "admin", "password": "nope"})
    assert r.status_code == 401 and r.json()["error"] == "bad_credentials"
    r = await api.http.get("/api/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"] == "not_found"


MIGRATIONS = Path(custos.__file__).parent / "db" / "migrations" / "versions"


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_db_upgrade_command(tmp_path, db_url):
    data = tmp_path / "fresh"
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "from custos.cli.main import main; main()",
            "db",
            "upgrade",
            "--data-dir",
            str(data),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    newest = max(p.name[:4] for p in MIGRATIONS.glob("[0-9][0-9][0-9][0-9]_*.py"))
    assert f"database at revision {newest}" in out.stderr
    assert (data / "custos.db").exists()
    bad = subprocess.run(
        [
            sys.executable,
            "-c",
            "from custos.cli.main import main; main()",
            "db",
            "upgrade",
            "--db",
            "postgresql+asyncpg://nobody@127.0.0.1:1/none",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 1 and "migration failed" in bad.stderr
