"""Bad input through the real server: refused with the JSON error shape, nothing half-written."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from e2e_harness import CHECKIN, E2E, AgentProcess, signed_headers
from sqlalchemy import update

from custos import protocol

pytestmark = pytest.mark.e2e


def _error(r: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text[:500])
    body = r.json()
    assert set(body) == {"error", "detail"}, body
    assert body["detail"], body
    if code is not None:
        assert body["error"] == code, body
    return body  # type: ignore[no-any-return]


def _expire_token(db_url: str, token_id: int) -> None:
    """Move a token's expiry into the past (the API only makes tokens that live a minute+)."""
    from custos.db.engine import Database
    from custos.devices.models import EnrollmentToken

    async def go() -> None:
        db = Database(db_url)
        try:
            async with db.transaction() as uow:
                await uow.session.execute(
                    update(EnrollmentToken)
                    .where(EnrollmentToken.id == token_id)
                    .values(expires_at=datetime.now(UTC) - timedelta(seconds=5))
                )
        finally:
            await db.dispose()

    asyncio.run(go())


def test_admin_api_refuses_bad_requests(e2e: E2E) -> None:
    admin = e2e.admin
    agent = e2e.agent("bad-admin")
    http = admin.http
    good = admin.command(target=agent.device_id, kind="ping", not_before="2999-01-01T00:00:00Z")

    # authentication
    r = http.post("/api/v1/auth/login", json={"username": "admin", "password": "wrong"})
    _error(r, 401)
    _error(http.get("/api/v1/devices"), 401, "no_token")
    _error(http.post("/api/v1/commands", json={"target": agent.device_id, "kind": "ping"}), 401)
    bad_token = admin.token[:-4] + ("AAAA" if not admin.token.endswith("AAAA") else "BBBB")
    _error(http.get("/api/v1/devices", headers={"authorization": f"Bearer {bad_token}"}), 401)
    _error(http.get("/api/v1/devices", headers={"authorization": "Bearer nonsense"}), 401)
    _error(http.get("/api/v1/devices", headers={"authorization": f"Basic {admin.token}"}), 401)

    # malformed and oversized bodies
    headers = {**admin.auth, "content-type": "application/json"}
    r = http.post("/api/v1/commands", content=b'{"target": "x", "kind": ', headers=headers)
    _error(r, 422, "malformed_json")
    r = http.post("/api/v1/commands", content=b"[1, 2", headers=headers)
    _error(r, 422)
    huge = json.dumps(
        {"target": agent.device_id, "kind": "exec", "argv": ["x" * (5 * 1024 * 1024)]}
    ).encode()
    _error(http.post("/api/v1/commands", content=huge, headers=headers), 413, "too_large")

    def chunks() -> Any:
        for i in range(0, len(huge), 65536):
            yield huge[i : i + 65536]

    # no Content-Length: the limit holds for a streamed body too
    _error(http.post("/api/v1/commands", content=chunks(), headers=headers), 413, "too_large")

    # well-formed JSON, unacceptable content
    dev = agent.device_id
    bad_bodies: list[dict[str, Any]] = [
        {"target": dev, "kind": "format-disk"},
        {"target": dev, "kind": "exec"},
        {"target": dev, "kind": "exec", "argv": []},
        {"target": dev, "kind": "exec", "argv": ["true"], "surprise": 1},
        {"target": dev, "kind": "exec", "argv": ["true"], "timeout_s": 0},
        {"target": dev, "kind": "script", "interpreter": "perl", "script": "1"},
        {"target": dev, "kind": "script", "interpreter": "sh"},
        {"target": dev, "kind": "settings", "checkin_interval": 1},
        {"target": dev, "kind": "settings"},
        {"target": dev, "kind": "collect_file"},
        {"target": dev, "kind": "collect_file", "path": "../etc/passwd"},
        {"target": dev, "kind": "collect_file", "path": "/tmp/../etc/passwd"},
        {"target": dev, "kind": "collect_file", "path": "etc/passwd"},
        {"target": dev, "kind": "collect_file", "path": "/etc/./passwd"},
        {"target": dev, "kind": "collect_file", "path": "/etc/passwd\u0000.txt"},
        {"target": dev, "kind": "collect_file", "path": "/etc/passwd", "max_bytes": 0},
        {"target": dev, "kind": "ping", "expires_at": "2000-01-01T00:00:00Z"},
        {"target": dev, "kind": "ping", "expires_at": "2999-01-01T00:00:00"},
        {
            "target": dev,
            "kind": "ping",
            "not_before": "2999-01-02T00:00:00Z",
            "expires_at": "2999-01-01T00:00:00Z",
        },
        {"target": "", "kind": "ping"},
        {"target": "x" * 301, "kind": "ping"},
        [],
        "ping",
    ]
    for body in bad_bodies:
        _error(admin.post("/api/v1/commands", json=body), 422)

    _error(admin.post("/api/v1/commands", json={"target": "no-such-device", "kind": "ping"}), 404)
    _error(admin.post("/api/v1/commands", json={"target": uuid.uuid4().hex, "kind": "ping"}), 404)
    r = admin.post("/api/v1/commands", json={"target": f"{dev},no-such-device", "kind": "ping"})
    _error(r, 404)
    _error(admin.post("/api/v1/commands", json={"target": "group:nope", "kind": "ping"}), 404)
    _error(admin.get("/api/v1/devices/no-such-device"), 404, "not_found")
    _error(admin.get("/api/v1/commands/no-such-command"), 404, "not_found")
    _error(admin.get(f"/api/v1/runs/{uuid.uuid4().hex}/file"), 404)
    _error(admin.get("/api/v1/runs/..%2F..%2Fca-passphrase/file"), 404)
    _error(admin.post("/api/v1/devices/no-such-device/retire"), 404)
    _error(admin.get("/api/v1/devices?limit=0"), 422)
    _error(admin.post("/api/v1/enrollment-tokens", json={"uses": 0}), 422)
    _error(admin.post("/api/v1/enrollment-tokens", json={"group": "nope"}), 404)

    # nothing partial was written: the one good command, one run, the one device
    listed = admin.get("/api/v1/commands?limit=1000").json()
    assert [c["id"] for c in listed] == [good["id"]]
    assert listed[0]["counts"] == {"queued": 1}
    devices = admin.get("/api/v1/devices").json()
    assert [(d["id"], d["status"]) for d in devices] == [(dev, "active")]


def test_enrolment_refusals(e2e: E2E) -> None:
    admin = e2e.admin

    def refused(token: str, fingerprint: str | None, *expected: str) -> AgentProcess:
        a = e2e.agent(enroll=False)
        res = a.enroll(e2e.url, token, fingerprint, check=False)
        assert res.returncode != 0, res.stderr
        assert "error:" in res.stderr
        assert any(e in res.stderr for e in expected), res.stderr
        assert "Traceback" not in res.stderr
        # no identity was stored
        assert not (a.state_dir / "device.key").exists()
        assert "device_id" not in a.peek()
        return a

    # a single-use token, already used
    tok = admin.enroll_token(uses=1)
    first = e2e.agent("enrolled", enroll=False)
    first.enroll(e2e.url, tok["token"], tok["ca_fingerprint"])
    assert admin.get("/api/v1/enrollment-tokens").json()[0]["state"] == "used_up"
    refused(tok["token"], e2e.fingerprint, "used up")

    revoked = admin.enroll_token(uses=None)
    r = admin.post(f"/api/v1/enrollment-tokens/{revoked['id']}/revoke")
    assert r.status_code == 200 and r.json()["state"] == "revoked", r.text
    refused(revoked["token"], e2e.fingerprint, "revoked")

    expired = admin.enroll_token(uses=None)
    _expire_token(e2e.server.db_url, expired["id"])
    refused(expired["token"], e2e.fingerprint, "expired")

    refused("cet_" + "x" * 32, e2e.fingerprint, "unknown enrolment token")

    # a pinned fingerprint that does not match: refused before the token is even sent
    fresh = admin.enroll_token(uses=1)
    refused(fresh["token"], "sha256:" + ":".join(["AB"] * 32), "mismatch")

    # an already-enrolled state directory is not enrolled again
    res = first.enroll(e2e.url, fresh["token"], fresh["ca_fingerprint"], check=False)
    assert res.returncode != 0 and "already enrolled" in res.stderr, res.stderr

    tokens = {t["id"]: t for t in admin.get("/api/v1/enrollment-tokens").json()}
    assert tokens[fresh["id"]]["uses"] == 0  # never reached the server
    assert tokens[revoked["id"]]["uses"] == 0
    assert tokens[expired["id"]]["uses"] == 0
    devices = admin.get("/api/v1/devices").json()
    assert [d["name"] for d in devices] == ["enrolled"]  # the one good enrolment only

    # the fresh token still works with the right fingerprint
    ok = e2e.agent(enroll=False)
    ok.enroll(e2e.url, fresh["token"], e2e.fingerprint)
    assert len(admin.get("/api/v1/devices").json()) == 2


def test_device_api_refuses_forged_and_oversized_requests(e2e: E2E) -> None:
    admin = e2e.admin
    agent = e2e.agent("bad-device")
    res = agent.run_once()
    assert res.returncode == 0, res.stderr
    before = admin.device(agent.device_id)
    assert before["inventory_version"] == 1
    dev = agent.device_id
    key = agent.device_key()
    http = admin.http  # pinned to the CA; no admin token is sent on device requests
    body = json.dumps({"results": [], "acks": []}).encode()

    # the device's own key works
    r = http.post(CHECKIN, content=body, headers=signed_headers(key, dev, body))
    assert r.status_code == 200, r.text

    _error(http.post(CHECKIN, content=body, headers={"content-type": "application/json"}), 401)
    forger = ed25519.Ed25519PrivateKey.generate()
    r = http.post(CHECKIN, content=body, headers=signed_headers(forger, dev, body))
    _error(r, 401, "bad_signature")
    r = http.post(CHECKIN, content=body, headers=signed_headers(forger, uuid.uuid4().hex, body))
    _error(r, 401, "unknown_device")
    # a real signature over a different body
    other = json.dumps({"results": [], "acks": [], "agent_version": "evil"}).encode()
    _error(http.post(CHECKIN, content=other, headers=signed_headers(key, dev, body)), 401)
    # a real signature made for another path
    r = http.post(
        protocol.DEVICE_API + "/uploads/" + uuid.uuid4().hex,
        content=body,
        headers=signed_headers(key, dev, body),
    )
    _error(r, 401, "bad_signature")
    # a correct signature, but an hour old
    r = http.post(
        CHECKIN, content=body, headers=signed_headers(key, dev, body, ts=time.time() - 3600)
    )
    _error(r, 401, "clock_skew")
    assert float(r.headers[protocol.H_SERVER_TIME]) == pytest.approx(time.time(), abs=60)
    # the admin token is no device credential
    r = http.post(CHECKIN, content=body, headers={**admin.auth, "content-type": "application/json"})
    _error(r, 401)

    # signed, but not acceptable
    def signed_post(payload: bytes) -> httpx.Response:
        return http.post(CHECKIN, content=payload, headers=signed_headers(key, dev, payload))

    _error(signed_post(b'{"results": ['), 422, "malformed_json")
    _error(signed_post(b""), 422)
    _error(signed_post(json.dumps({"results": [], "surprise": True}).encode()), 422)
    too_long = {"base": 1, "set": {"os.name": "x" * 4097}, "remove": []}
    _error(signed_post(json.dumps({"inventory": too_long}).encode()), 422)
    long_key = {"base": 1, "set": {"k" * 513: "v"}, "remove": []}
    _error(signed_post(json.dumps({"inventory": long_key}).encode()), 422)
    empty_key = {"base": 1, "set": {"": "v"}, "remove": []}
    _error(signed_post(json.dumps({"inventory": empty_key}).encode()), 422)
    bad_result = {"run_id": "x", "state": "exploded"}
    _error(signed_post(json.dumps({"results": [bad_result]}).encode()), 422)
    # a valid inventory change next to an invalid result: the whole check-in is refused
    mixed = {
        "inventory": {"base": 1, "set": {"os.name": "Changed"}, "remove": []},
        "results": [{"run_id": "y" * 33, "state": "succeeded"}],
    }
    _error(signed_post(json.dumps(mixed).encode()), 422)
    big = json.dumps({"agent_version": "x", "results": [], "pad": "p" * (5 << 20)}).encode()
    _error(signed_post(big), 413, "too_large")

    # nothing was applied
    after = admin.device(dev)
    assert after["inventory_version"] == before["inventory_version"]
    assert after["inventory"] == before["inventory"]
    assert after["status"] == "active"
    assert admin.get(f"/api/v1/devices/{dev}/history").json() == []
    assert admin.get("/api/v1/commands").json() == []

    # and the real agent is unharmed
    res = agent.run_once()
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_non_utf8_json_body_is_a_422(e2e: E2E) -> None:
    admin = e2e.admin
    headers = {**admin.auth, "content-type": "application/json"}
    r = admin.http.post("/api/v1/commands", content=b"\xff\xfe not json", headers=headers)
    _error(r, 422)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_an_idle_keep_alive_connection_outlives_the_clients_idle_limit(e2e: E2E) -> None:
    """httpx keeps an idle connection 5 s: the server must keep it longer, or a client can
    reuse one just as the server closes it (a request lost without an answer, seen in B3)."""
    import socket
    import ssl

    host, port = e2e.url.removeprefix("https://").rsplit(":", 1)
    ctx = ssl.create_default_context(cadata=e2e.ca_pem)
    ctx.check_hostname = False
    request = f"GET /api/v1/ca HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    raw = socket.create_connection((host, int(port)), timeout=10)
    with ctx.wrap_socket(raw, server_hostname=host) as conn:
        for attempt in range(2):
            conn.sendall(request)
            got = b""
            while b"\r\n\r\n" not in got or not got.rstrip().endswith(b"}"):
                chunk = conn.recv(65536)
                assert chunk, f"the server closed the connection (request {attempt + 1})"
                got += chunk
            assert got.startswith(b"HTTP/1.1 200"), got[:200]
            if attempt == 0:
                time.sleep(6.5)
