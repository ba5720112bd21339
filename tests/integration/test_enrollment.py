"""Enrolment tokens and device identity, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import func, select, update

from custos.agent.client import ServerRefused
from custos.db.base import utcnow
from custos.devices.models import Device, EnrollmentToken


async def test_enrol_and_check_in(api):
    dev = await api.new_device("laptop-1", facts={"os.name": "Debian GNU/Linux"})
    resp = await dev.checkin({"results": [], "acks": []})
    assert resp["commands"] == []
    r = await api.get("/api/v1/devices")
    assert [d["name"] for d in r.json()] == ["laptop-1"]
    assert r.json()[0]["os"] == "Debian GNU/Linux"


async def _enrol_with(api, token, fp):
    import uuid
    from pathlib import Path

    import httpx

    from custos.agent.identity import EnrollError, enroll
    from custos.agent.state import AgentState

    state = AgentState(Path(api.services.settings.data_dir).parent / uuid.uuid4().hex)
    try:
        await enroll(
            state, "http://test", token, fp, facts={}, transport=httpx.ASGITransport(app=api.app)
        )
    except EnrollError as exc:
        return str(exc)
    return None


async def test_single_use_token_is_used_up(api):
    tok = await api.enroll_token(uses=1)
    assert await _enrol_with(api, tok["token"], tok["ca_fingerprint"]) is None
    msg = await _enrol_with(api, tok["token"], tok["ca_fingerprint"])
    assert msg and "used up" in msg


async def test_revoked_and_expired_tokens_refused(api):
    tok = await api.enroll_token(uses=None)
    r = await api.post(f"/api/v1/enrollment-tokens/{tok['id']}/revoke")
    assert r.json()["state"] == "revoked"
    assert "revoked" in (await _enrol_with(api, tok["token"], tok["ca_fingerprint"]) or "")

    tok2 = await api.enroll_token()
    async with api.services.db.transaction() as uow:
        await uow.session.execute(
            update(EnrollmentToken)
            .where(EnrollmentToken.id == tok2["id"])
            .values(expires_at=utcnow() - timedelta(seconds=1))
        )
    assert "expired" in (await _enrol_with(api, tok2["token"], tok2["ca_fingerprint"]) or "")
    assert "unknown" in (await _enrol_with(api, "cet_nope", tok2["ca_fingerprint"]) or "")
    # none of the refusals left a device behind
    async with api.services.db.read() as s:
        assert await s.scalar(select(func.count()).select_from(Device)) == 0


async def test_wrong_fingerprint_refused_before_sending_token(api):
    tok = await api.enroll_token()
    msg = await _enrol_with(api, tok["token"], "00" * 32)
    assert msg and "mismatch" in msg
    r = await api.get("/api/v1/enrollment-tokens")
    assert r.json()[0]["uses"] == 0


async def test_token_group_and_multi_use(api):
    r = await api.post("/api/v1/groups", json={"name": "kiosks"})
    assert r.status_code == 201
    tok = await api.enroll_token(group="kiosks", uses=3, note="lobby")
    for _ in range(3):
        assert await _enrol_with(api, tok["token"], tok["ca_fingerprint"]) is None
    assert "used up" in (await _enrol_with(api, tok["token"], tok["ca_fingerprint"]) or "")
    r = await api.get("/api/v1/devices", params={"group": "kiosks"})
    assert len(r.json()) == 3
    assert all(d["groups"] == ["kiosks"] for d in r.json())


async def test_retired_device_is_refused(api):
    dev = await api.new_device("to-retire")
    await dev.checkin({})
    r = await api.post(f"/api/v1/devices/{dev.device_id}/retire")
    assert r.status_code == 200 and r.json()["status"] == "retired"
    with pytest.raises(ServerRefused) as exc:
        await dev.checkin({})
    assert exc.value.code == "retired"


async def test_forged_signature_and_unknown_device_refused(api):
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from custos.agent.client import DeviceClient

    dev = await api.new_device("real")
    import httpx

    transport = httpx.ASGITransport(app=api.app)
    forged = DeviceClient(
        "http://test",
        dev.device_id,
        ed25519.Ed25519PrivateKey.generate(),
        ca_pem=None,
        transport=transport,
    )
    for client, code in (
        (forged, "bad_signature"),
        (
            DeviceClient("http://test", "f" * 32, dev.key, ca_pem=None, transport=transport),
            "unknown_device",
        ),
    ):
        with pytest.raises(ServerRefused) as exc:
            await client.checkin({})
        assert exc.value.code == code
    # unsigned request
    r = await api.http.post("/api/device/v1/checkin", json={})
    assert r.status_code == 401 and r.json()["error"] == "unsigned"
