"""`custos omadm rotate` through the real CLI against a real server: the device (the test DM
client, over HTTPS) is given new DMAcc secrets, then signs in with them and not the old ones.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import subprocess
from pathlib import Path
from typing import cast

import httpx
import pytest
from e2e_harness import ADMIN_PASSWORD, CUSTOS, E2E, clean_env

from omadm_client import DmClient, account_client

pytestmark = [pytest.mark.e2e, pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)]


def _cli(
    env: dict[str, str], *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CUSTOS, *args], capture_output=True, text=True, env=env, input=stdin, timeout=60
    )


def _session(dm: DmClient, ca_file: Path) -> str:
    """One DM session over HTTPS pinned to the server's CA; the header status of package 1."""

    async def go() -> str:
        ctx = ssl.create_default_context(cafile=str(ca_file))
        async with httpx.AsyncClient(verify=ctx, timeout=10) as http:
            dm.http = http
            replies = await dm.session()
        return str(DmClient.header_status(replies[0]).data)

    dm.session_id = str(int(dm.session_id) + 1)
    return asyncio.run(go())


def test_rotate_gives_the_device_new_secrets(e2e: E2E, tmp_path: Path) -> None:
    env = clean_env(CUSTOS_CLI_CONFIG=str(tmp_path / "cli"), COLUMNS="200")
    login = _cli(
        env,
        *("login", e2e.url, "--user", "admin", "--password-stdin"),
        *("--ca-fingerprint", e2e.fingerprint),
        stdin=ADMIN_PASSWORD + "\n",
    )
    assert login.returncode == 0, login.stderr
    ca_file = tmp_path / "ca.pem"
    ca_file.write_text(e2e.ca_pem)
    enrolled = _cli(env, "omadm", "enroll", "IMEI:49015420323751", "--name", "p-1", "--json")
    assert enrolled.returncode == 0, enrolled.stderr
    acc = json.loads(enrolled.stdout)
    dm = account_client(cast(httpx.AsyncClient, None), acc, acc["server_url"], dmacc="custos")
    assert _session(dm, ca_file) == "212"
    old_password = dm.client_password

    queued = _cli(env, "omadm", "rotate", "p-1")
    assert queued.returncode == 0, queued.stderr
    cid = queued.stdout.strip()
    assert _session(dm, ca_file) == "212"
    run = e2e.admin.wait_run(cid, timeout=10)
    assert run["state"] == "succeeded", run
    assert dm.client_password != old_password
    assert old_password not in json.dumps(run) and dm.client_password not in json.dumps(run)
    assert dm.client_password not in e2e.server.log_path.read_text()

    # the device signs in with what it was given; its old password is refused
    assert _session(dm, ca_file) == "212"
    stale = account_client(
        cast(httpx.AsyncClient, None),
        acc,
        acc["server_url"],
        client_password=old_password,
        client_nonce=dm.client_nonce,
    )
    assert _session(stale, ca_file) == "401"

    # a certificate account has nothing to rotate: a clear error, exit 1
    meter = _cli(env, "omadm", "enroll", "METER:9", "--auth", "cert", "--json")
    assert meter.returncode == 0, meter.stderr
    refused = _cli(env, "omadm", "rotate", "METER:9")
    assert refused.returncode != 0 and "certificate" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr
