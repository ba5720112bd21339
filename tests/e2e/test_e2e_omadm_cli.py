"""`custos omadm …` through the real CLI against a real server, with a test DM client as the device.

The device side is tests/omadm_client.py over HTTPS to the server's SyncML endpoint; package #0
goes to a real HTTP receiver standing in for an SMS/WAP-push gateway.
"""

from __future__ import annotations

import asyncio
import json
import re
import ssl
import subprocess
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12
from e2e_harness import ADMIN_PASSWORD, CUSTOS, E2E, clean_env, wait_for

from omadm_client import DmClient, account_client
from webhook_receiver import Receiver

# the CLI is what is tested here: one database is enough (the service runs on both elsewhere)
pytestmark = [pytest.mark.e2e, pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)]

DEV_ID = "IMEI:356938035643809"


def _cli(
    env: dict[str, str], *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CUSTOS, *args], capture_output=True, text=True, env=env, input=stdin, timeout=60
    )


def _start(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [CUSTOS, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


def _finish(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"the CLI did not finish:\n{out}\n{err}")
    return proc.returncode, out, err


def _session(dm: DmClient, ca_file: Path, client_cert: tuple[Path, Path] | None = None) -> str:
    """One DM session of the device over HTTPS pinned to the server's CA; the header status."""

    async def go() -> str:
        ctx = ssl.create_default_context(cafile=str(ca_file))
        if client_cert is not None:
            ctx.load_cert_chain(*client_cert)
        async with httpx.AsyncClient(verify=ctx, timeout=10) as http:
            dm.http = http
            replies = await dm.session()
        return str(DmClient.header_status(replies[0]).data)

    dm.session_id = str(int(dm.session_id) + 1)
    return asyncio.run(go())


def _dmacc(text: str) -> dict[str, str]:
    """The DMAcc grid `omadm enroll` prints: label, value, node (columns 2+ spaces apart)."""
    rows = [re.split(r"\s{2,}", line.strip()) for line in text.splitlines()]
    return {r[0]: r[1] for r in rows if len(r) == 3}


def _no_traceback(*results: Any) -> None:
    for r in results:
        assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, r.stderr


def test_enroll_list_and_node_operations_with_a_device(e2e: E2E, tmp_path: Path) -> None:
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

    with Receiver() as gateway:
        # enrol with an encrypted PKCS#12 file; --json gives the DMAcc with the full server URL
        pfx = tmp_path / "phone.p12"
        enrolled = _cli(
            env,
            *("omadm", "enroll", DEV_ID, "--name", "phone-1"),
            *("--notify-url", gateway.url + "/wap-push"),
            *("--pfx", str(pfx), "--pfx-password", "pfx-secret-1", "--json"),
        )
        assert enrolled.returncode == 0, enrolled.stderr
        acc = json.loads(enrolled.stdout)
        assert acc["server_url"] == e2e.url + "/omadm" and acc["auth"] == "md5"
        assert acc["pfx_file"] == str(pfx) and pfx.stat().st_mode & 0o777 == 0o600
        key, cert, cas = pkcs12.load_key_and_certificates(pfx.read_bytes(), b"pfx-secret-1")
        assert key is not None and cert is not None
        pub = serialization.PublicFormat.SubjectPublicKeyInfo
        enc = serialization.Encoding.PEM
        assert key.public_key().public_bytes(enc, pub) == cert.public_key().public_bytes(enc, pub)
        assert cert.public_bytes(enc).decode() == acc["certificate"]
        assert [c.public_bytes(enc).decode() for c in cas] == [e2e.ca_pem]
        # an existing file is never overwritten, and nothing is enrolled then
        again = _cli(env, "omadm", "enroll", "IMEI:1", "--pfx", str(pfx))
        assert again.returncode == 2 and "already exists" in again.stderr

        # the human form: the DMAcc values on stdout, an unencrypted file
        plain = tmp_path / "meter.p12"
        shown = _cli(env, "omadm", "enroll", "METER:77", "--auth", "cert", "--pfx", str(plain))
        assert shown.returncode == 0, shown.stderr
        assert e2e.url + "/omadm" in shown.stdout and "Client password" in shown.stdout
        assert "cert (X509)" in shown.stdout and "unencrypted" in shown.stderr
        key2, cert2, _ = pkcs12.load_key_and_certificates(plain.read_bytes(), None)
        assert key2 is not None and cert2 is not None
        key_file, cert_file = tmp_path / "meter.key", tmp_path / "meter.crt"
        key_file.write_bytes(
            key2.private_bytes(enc, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        )
        cert_file.write_bytes(cert2.public_bytes(enc))

        listed = _cli(env, "omadm", "ls", "--json")
        assert sorted(a["dev_id"] for a in json.loads(listed.stdout)) == [DEV_ID, "METER:77"]
        table = _cli(env, "omadm", "ls")
        assert "phone-1" in table.stdout and "METER:77" in table.stdout

        # the device's HTTP client is opened per session (each in its own event loop)
        dm = account_client(cast(httpx.AsyncClient, None), acc, acc["server_url"])

        # get --wait: the CLI waits while package #0 wakes the device and it answers
        proc = _start(env, "omadm", "get", "phone-1", "./DevDetail/SwV", "--wait", "20")
        wait_for("package #0 at the gateway", lambda: gateway.requests)
        assert gateway.requests[0].headers["x-omadm-devid"] == DEV_ID
        _session(dm, ca_file)
        code, out, err = _finish(proc)
        assert code == 0, err
        assert out == "4.2.1\n" and "200 OK" in err and "package #0 delivered" in err

        # set (Add) without waiting: the command id on stdout, the value in the device's tree
        queued = _cli(env, "omadm", "set", "phone-1", "./Vendor/Acme/Motd", "hello", "--add")
        assert queued.returncode == 0, queued.stderr
        cid = queued.stdout.strip()
        _session(dm, ca_file)
        assert dm.tree["./Vendor/Acme/Motd"] == "hello"
        assert e2e.admin.wait_run(cid, timeout=10)["state"] == "succeeded"

        # a device that refuses: exit 1 with its status code
        dm.fail_nodes.add("./Vendor/Acme/Reboot")
        proc = _start(env, "omadm", "exec", "phone-1", "./Vendor/Acme/Reboot", "--wait", "20")
        wait_for("the Exec queued", lambda: len(gateway.requests) == 3)
        _session(dm, ca_file)
        code, out, err = _finish(proc)
        assert code == 1 and "500 command failed" in err, err

        # a question to the user: the typed answer on stdout, exit 0
        dm.user = {"1102": (200, ["blue"])}
        proc = _start(
            env, "omadm", "alert", "phone-1", "Favourite colour?", "--input", "--wait", "20"
        )
        wait_for("the alert queued", lambda: len(gateway.requests) == 4)
        _session(dm, ca_file)
        code, out, err = _finish(proc)
        assert code == 0 and out.strip() == "blue", (out, err)
        assert dm.shown[-1][1] == "Favourite colour?"

        # nobody answers: exit 3, said so
        slow = _cli(env, "omadm", "delete", "phone-1", "./Vendor/Acme/Motd", "--wait", "1")
        assert slow.returncode == 3 and "timed out" in slow.stderr, slow.stderr

        sent = _cli(env, "omadm", "notify", "phone-1")
        assert sent.returncode == 0 and "package #0 delivered" in sent.stderr

    # the certificate from the --pfx file is the meter's credential in its DM session
    tariff = _cli(env, "omadm", "set", "METER:77", "./Vendor/Acme/Tariff", "7", "--format", "int")
    assert tariff.returncode == 0 and "no notification hook" in tariff.stderr, tariff.stderr
    shown_acc = _dmacc(shown.stdout)
    meter = DmClient(
        http=cast(httpx.AsyncClient, None),
        url=shown_acc["Server URL"],
        dev_id="METER:77",
        client_name=shown_acc["Client name"],
        client_password=shown_acc["Client password"],
        server_id=shown_acc["Server ID"],
        server_password=shown_acc["Server password"],
        auth="cert",
        server_nonce=shown_acc["Server nonce"],
    )
    assert _session(meter, ca_file) != "212"  # without it the meter is not let in
    assert _session(meter, ca_file, (cert_file, key_file)) == "212"
    assert meter.tree["./Vendor/Acme/Tariff"] == "7"

    # bad input: a clear message and a non-zero exit, never a traceback
    agent = e2e.agent("kiosk-1")
    bad = [
        (_cli(env, "omadm", "get", "phone-1", "DevDetail/SwV"), 2, "starting with ./"),
        (_cli(env, "omadm", "get", "phone-1", "./a//b"), 2, "not a valid DM tree URI"),
        (_cli(env, "omadm", "get", "no-such-phone", "./DevInfo/DevId"), 1, "no device"),
        (_cli(env, "omadm", "get", agent.name, "./DevInfo/DevId"), 1, "not an OMA DM device"),
        (_cli(env, "omadm", "notify", agent.name), 1, "not an OMA DM device"),
        (_cli(env, "omadm", "set", "phone-1", "./X", "ten", "--format", "int"), 2, "integer"),
        (_cli(env, "omadm", "enroll", "IMEI:2", "--auth", "cert"), 2, "--pfx"),
        (_cli(env, "omadm", "enroll", "IMEI:3", "--auth", "x509"), 2, "--auth is one of"),
        (_cli(env, "omadm", "alert", "phone-1", "hi", "--choice", "a"), 2, "at least two"),
        (_cli(env, "omadm", "alert", "phone-1", "hi", "--confirm", "--input"), 2, "one of"),
    ]
    for result, code, message in bad:
        assert result.returncode == code and message in result.stderr, (result.args, result.stderr)
    _no_traceback(login, enrolled, again, shown, listed, table, queued, slow, sent, tariff)
    _no_traceback(*(r for r, _, _ in bad))
