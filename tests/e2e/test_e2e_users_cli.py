"""Users and roles through the real `custos` CLI against a real server process."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from e2e_harness import ADMIN_PASSWORD, CUSTOS, E2E, clean_env

pytestmark = pytest.mark.e2e
PW = "helpdesk-pass-1"


def _cli(
    env: dict[str, str], *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CUSTOS, *args], capture_output=True, text=True, env=env, input=stdin, timeout=120
    )


def _login(env: dict[str, str], e2e: E2E, user: str, pw: str) -> subprocess.CompletedProcess[str]:
    return _cli(
        env,
        *(
            "login",
            e2e.url,
            "--user",
            user,
            "--password-stdin",
            "--ca-fingerprint",
            e2e.fingerprint,
        ),
        stdin=pw + "\n",
    )


def test_user_and_role_commands(e2e: E2E, tmp_path: Path) -> None:
    admin = clean_env(CUSTOS_CLI_CONFIG=str(tmp_path / "admin"), COLUMNS="200")
    desk = clean_env(CUSTOS_CLI_CONFIG=str(tmp_path / "desk"), COLUMNS="200")
    assert _login(admin, e2e, "admin", ADMIN_PASSWORD).returncode == 0

    made = _cli(
        admin,
        "user",
        "create",
        "hd",
        "--role",
        "helpdesk",
        "--password-stdin",
        "--json",
        stdin=PW + "\n",
    )
    assert made.returncode == 0, made.stderr
    assert [g["role"] for g in json.loads(made.stdout)["grants"]] == ["helpdesk"]
    short = _cli(admin, "user", "create", "x", "--password-stdin", stdin="short\n")
    assert short.returncode == 1 and "at least 8" in short.stderr

    viewer = _cli(admin, "role", "create", "viewer", "-p", "devices.view,reports.view")
    assert viewer.returncode == 0, viewer.stderr
    bad = _cli(admin, "role", "create", "odd", "-p", "devices.fly")
    assert bad.returncode == 1 and "unknown permission" in bad.stderr
    assert _cli(admin, "role", "grant", "viewer", "hd").returncode == 0
    roles = {r["name"]: r for r in json.loads(_cli(admin, "role", "ls", "--json").stdout)}
    assert roles["viewer"]["users"] == 1 and roles["helpdesk"]["builtin"]
    table = _cli(admin, "user", "ls")
    assert table.returncode == 0 and "helpdesk, viewer" in table.stdout

    # helpdesk works, but an admin-only action is refused with the reason, exit 1
    assert _login(desk, e2e, "hd", PW).returncode == 0
    assert _cli(desk, "device", "ls", "--json").returncode == 0
    refused = _cli(desk, "token", "create", "--uses", "1")
    assert refused.returncode == 1 and "devices.enroll" in refused.stderr
    refused = _cli(desk, "user", "ls")
    assert refused.returncode == 1 and "users.manage" in refused.stderr

    # a personal API token works like the login and ends with it
    tok = _cli(desk, "apitoken", "create", "nightly", "--json")
    assert tok.returncode == 0, tok.stderr

    assert _cli(admin, "user", "disable", "hd").returncode == 0
    gone = _cli(desk, "device", "ls")
    assert gone.returncode == 1 and "log in" in gone.stderr
    listed = {u["username"]: u for u in json.loads(_cli(admin, "user", "ls", "--json").stdout)}
    assert listed["hd"]["is_active"] is False
    assert _cli(admin, "role", "revoke", "viewer", "hd").returncode == 0
    assert _cli(admin, "role", "rm", "viewer").returncode == 0
