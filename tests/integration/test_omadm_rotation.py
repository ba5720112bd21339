"""DMAcc secret rotation over OMA DM: the new secrets kept on the account until the device
signs in with one set (lost or partial Statuses, refusals, expiry), and only over TLS — on
SQLite and PostgreSQL, with the test DM client against the app in-process.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select, update

from app_harness import running_api
from custos.db.base import utcnow
from custos.omadm import auth, codec, dmacc, notification
from custos.omadm import message as m
from custos.omadm.models import OmadmAccount, OmadmSession
from omadm_client import DmClient, account_client

URL = "http://test/omadm"


_app = running_api  # the app with some settings changed, an admin logged in


@pytest.fixture
async def api(settings: Any) -> AsyncIterator[Any]:
    """In-process tests reach the endpoint as http://test: plain HTTP allowed for rotation."""
    async with _app(settings, omadm_rotate_over_http=True) as a:
        yield a


async def _enroll(api: Any, dev_id: str = "IMEI:356938035643809", **body: Any) -> dict[str, Any]:
    r = await api.post("/api/v1/omadm/devices", json={"dev_id": dev_id, **body})
    assert r.status_code == 201, r.text
    return r.json()  # type: ignore[no-any-return]


async def _rotate(api: Any, device: str) -> str:
    r = await api.post(f"/api/v1/omadm/devices/{device}/rotate", json={"notify": False})
    assert r.status_code == 201, r.text
    return str(r.json()["command_id"])


async def _run(api: Any, command_id: str) -> dict[str, Any]:
    r = await api.get(f"/api/v1/commands/{command_id}")
    assert r.status_code == 200, r.text
    return r.json()["runs"][0]  # type: ignore[no-any-return]


async def _account(api: Any, created: dict[str, Any]) -> OmadmAccount:
    async with api.services.db.read() as s:
        account = await s.scalar(
            select(OmadmAccount).where(OmadmAccount.device_id == created["device_id"])
        )
    assert account is not None
    return account


def _pending(account: OmadmAccount) -> bool:
    return account.rotation_client_ha1_sealed is not None


async def _audit(api: Any) -> list[dict[str, Any]]:
    r = await api.get("/api/v1/audit", params={"limit": 500})
    assert r.status_code == 200, r.text
    return r.json()["entries"]  # type: ignore[no-any-return]


async def _until_atomic(dm: DmClient, session_id: str) -> m.Message:
    """A session driven up to the server's message that carries the credential Atomic."""
    dm.session_id, dm.msg_id = session_id, 0
    dm.url = dm.url.split("?", 1)[0]
    reply = await dm.send(dm.package1())
    for _ in range(8):
        if any(c.name == "Atomic" for c in reply.commands):
            return reply
        nxt = dm.respond(reply)
        assert nxt is not None, "the session ended without an Atomic"
        reply = await dm.send(nxt)
    raise AssertionError("no Atomic")


def _new_secrets(reply: m.Message) -> tuple[str, str]:
    """(client, server) secrets in the Atomic's AAuthSecret Replaces."""
    atomic = next(c for c in reply.commands if c.name == "Atomic")
    found = {
        (c.items[0].target or "").split("/")[-2]: c.items[0].data or ""
        for c in atomic.children
        if (c.items[0].target or "").endswith("/AAuthSecret")
    }
    return found["cl"], found["srv"]


def _lost_reply(dm: DmClient, reply: m.Message) -> None:
    """The device got the reply's header (its NextNonce) but not the commands."""
    hs = DmClient.header_status(reply)
    if hs.chal is not None and hs.chal.next_nonce:
        dm.client_nonce = hs.chal.next_nonce


async def _finish(dm: DmClient, reply: m.Message) -> None:
    while (nxt := dm.respond(reply)) is not None:
        reply = await dm.send(nxt)


def _stale(api: Any, created: dict[str, Any], password: str, nonce: str, sid: str) -> DmClient:
    dm = account_client(api.http, created, URL, client_password=password, client_nonce=nonce)
    dm.session_id = sid
    return dm


# ---------------------------------------------------------------- the whole rotation


@pytest.mark.parametrize("method", ["md5", "hmac", "basic"])
async def test_dmacc_rotation_gives_the_device_new_secrets(
    api: Any, method: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    created = await _enroll(api, auth=method, name="phone-r")
    dm = account_client(api.http, created, URL, dmacc="srv1", wbxml=method == "md5")
    # another server's account on the same device is left alone
    dm.tree["./DMAcc/other/ServerID"] = "someone-else"
    dm.tree["./DMAcc/other/AppAuth/a/AAuthLevel"] = "CLCRED"
    dm.tree["./DMAcc/other/AppAuth/a/AAuthSecret"] = "theirs"
    await dm.session()
    old = (dm.client_password, dm.server_password)
    command_id = await _rotate(api, "phone-r")
    dm.session_id = "R1"
    await dm.session()
    assert dm.server_auth_ok is True
    run = await _run(api, command_id)
    assert run["state"] == "succeeded", run
    # the device holds new secrets for both sides, only in this server's account
    assert dm.client_password != old[0] and dm.server_password != old[1]
    assert dm.tree["./DMAcc/srv1/AppAuth/cl/AAuthSecret"] == dm.client_password
    assert dm.tree["./DMAcc/other/AppAuth/a/AAuthSecret"] == "theirs"
    # the secrets are nowhere but on the device: not in the run, the logs or the audit log
    text = str(run) + caplog.text + str(await _audit(api))
    for secret in (dm.client_password, dm.server_password):
        assert secret not in text
    async with api.services.db.read() as s:
        rows = (await s.scalars(select(OmadmSession.last_response))).all()
    assert not any(dm.client_password.encode() in (b or b"") for b in rows)
    assert any(e["action"] == "omadm.rotate" for e in await _audit(api))
    account = await _account(api, created)
    # an HMAC device signs the message with its Statuses with the new secret: settled at
    # once; the others are settled by their next sign-in
    assert _pending(account) is (method != "hmac")
    if method != "hmac":
        assert account.rotation_taken is True and account.rotation_run == run["id"]
        # sealed at rest, like the account's own
        assert dm.server_password not in str(account.rotation_server_password_sealed)
        # package #0 meanwhile is signed with the server secret the device said it took
        r = await api.get(f"/api/v1/omadm/devices/{created['device_id']}/package0")
        assert r.status_code == 200
        new_ha1 = auth.ha1(dm.server_id, dm.server_password)
        assert notification.verify(r.content, new_ha1, auth.unb64(dm.server_nonce))
    # the next session authenticates with the new secrets (and checks the server's)
    dm.session_id = "R2"
    dm.server_auth_ok = None
    replies = await dm.session()
    assert DmClient.header_status(replies[0]).data == "212"
    assert dm.server_auth_ok is True
    assert not _pending(await _account(api, created))
    # the old client secret no longer works
    stale = _stale(api, created, old[0], dm.client_nonce, "R3")
    reply = await stale.send(stale.package1())
    assert DmClient.header_status(reply).data == "401"


async def test_a_refused_rotation_keeps_the_old_secrets(api: Any) -> None:
    created = await _enroll(api, name="phone-s")
    dm = account_client(api.http, created, URL, dmacc="srv1")
    await dm.session()
    old = dm.client_password
    dm.fail_nodes.add("./DMAcc/srv1/AppAuth/srv/AAuthSecret")
    command_id = await _rotate(api, "phone-s")
    reply = await _until_atomic(dm, "S1")
    new_client, _ = _new_secrets(reply)
    await _finish(dm, reply)
    run = await _run(api, command_id)
    assert run["state"] == "failed"
    assert "old ones stay" in run["error"] and "AAuthSecret: 500" in run["error"]
    assert dm.client_password == old  # the device rolled the Atomic back
    # a definite refusal: the new secrets are dropped at once
    assert not _pending(await _account(api, created))
    stale = _stale(api, created, new_client, dm.client_nonce, "S1b")
    assert DmClient.header_status(await stale.send(stale.package1())).data == "401"
    dm.session_id = "S2"
    replies = await dm.session()
    assert DmClient.header_status(replies[0]).data == "212"
    # a device without an account for this server: the run fails with the reason
    dm.tree["./DMAcc/srv1/ServerID"] = "not-us"
    command_id = await _rotate(api, "phone-s")
    dm.session_id = "S3"
    await dm.session()
    run = await _run(api, command_id)
    assert run["state"] == "failed" and "ServerID" in run["error"]
    assert not _pending(await _account(api, created))
    # certificate accounts have nothing to rotate; helpdesk may not rotate
    cert = await _enroll(api, dev_id="IMEI:2", auth="cert")
    r = await api.post(f"/api/v1/omadm/devices/{cert['device_id']}/rotate")
    assert r.status_code == 422 and "certificate" in r.text
    r = await api.post(
        "/api/v1/users",
        json={"username": "hd", "password": "helpdesk-pw-12", "roles": ["helpdesk"]},
    )
    assert r.status_code == 201, r.text
    r = await api.http.post(
        "/api/v1/auth/login", json={"username": "hd", "password": "helpdesk-pw-12"}
    )
    helpdesk = {"authorization": f"Bearer {r.json()['token']}"}
    r = await api.http.post("/api/v1/omadm/devices/phone-s/rotate", headers=helpdesk)
    assert r.status_code == 403


async def test_the_answer_with_new_secrets_is_stored_sealed_and_replayed(api: Any) -> None:
    created = await _enroll(api, name="phone-t")
    dm = account_client(api.http, created, URL, dmacc="srv1")
    await dm.session()
    await _rotate(api, "phone-t")
    dm.session_id = "T1"
    dm.msg_id = 0
    reply = await dm.send(dm.package1())
    for _ in range(6):
        nxt = dm.respond(reply)
        assert nxt is not None
        body = codec.to_xml(m.build(nxt))
        first = await api.http.post(dm.url, content=body, headers={"content-type": codec.XML_TYPE})
        reply = m.parse(codec.parse_xml(first.content))
        dm.log.append((nxt, reply))
        if any(c.name == "Atomic" for c in reply.commands):
            break
    secrets = _new_secrets(reply)
    assert all(secrets)
    async with api.services.db.read() as s:
        row = await s.scalar(select(OmadmSession).where(OmadmSession.session_id == "T1"))
    assert row is not None and row.last_response_type.startswith("sealed;")
    assert not any(x.encode() in row.last_response for x in secrets)
    # a retransmission of the client's message gets the same answer back, unsealed
    again = await api.http.post(dm.url, content=body, headers={"content-type": codec.XML_TYPE})
    assert again.content == first.content
    assert again.headers["content-type"].startswith(codec.XML_TYPE)
    await _finish(dm, reply)
    assert dm.client_password == secrets[0]


# ---------------------------------------------------------------- Statuses lost or partial


@pytest.mark.parametrize("method", ["md5", "hmac", "basic"])
async def test_statuses_lost_after_the_device_applied_the_secrets(api: Any, method: str) -> None:
    created = await _enroll(api, auth=method, name="phone-l")
    dm = account_client(api.http, created, URL, dmacc="srv1")
    await dm.session()
    old = dm.client_password
    command_id = await _rotate(api, "phone-l")
    reply = await _until_atomic(dm, "L1")
    new_client, new_server = _new_secrets(reply)
    # the device applies the Atomic, and its answer never reaches the server: the session
    # expires with the run open and the new secrets pending on the account
    assert dm.respond(reply) is not None
    assert (dm.client_password, dm.server_password) == (new_client, new_server)
    account = await _account(api, created)
    assert _pending(account) and account.rotation_run is not None
    assert account.rotation_taken is False
    assert (await _run(api, command_id))["state"] in ("sent", "acked")
    # its next session, with the new secrets, gets in, the server proves itself with the
    # new server secret, and the rotation is final
    dm.session_id = "L2"
    dm.server_auth_ok = None
    replies = await dm.session()
    assert DmClient.header_status(replies[0]).data == "212"
    assert dm.server_auth_ok is True
    run = await _run(api, command_id)
    assert run["state"] == "succeeded", run
    assert run["result"]["rotated"] is True
    assert not _pending(await _account(api, created))
    stale = _stale(api, created, old, dm.client_nonce, "L3")
    assert DmClient.header_status(await stale.send(stale.package1())).data == "401"
    # and it goes on with them
    dm.session_id = "L4"
    replies = await dm.session()
    assert DmClient.header_status(replies[0]).data == "212"


@pytest.mark.parametrize("method", ["md5", "hmac", "basic"])
async def test_the_device_never_applied_and_signs_in_with_the_old_secret(
    api: Any, method: str
) -> None:
    created = await _enroll(api, auth=method, name="phone-n")
    dm = account_client(api.http, created, URL, dmacc="srv1")
    await dm.session()
    old = dm.client_password
    command_id = await _rotate(api, "phone-n")
    reply = await _until_atomic(dm, "N1")
    new_client, _ = _new_secrets(reply)
    _lost_reply(dm, reply)  # the Atomic never reached the device
    assert _pending(await _account(api, created))
    dm.session_id = "N2"
    dm.server_auth_ok = None
    replies = await dm.session()
    assert DmClient.header_status(replies[0]).data == "212"
    assert dm.server_auth_ok is True and dm.client_password == old
    # a later session with the old secret settles it: the new ones are dropped
    run = await _run(api, command_id)
    assert run["state"] == "failed" and "old DM account secrets" in run["error"], run
    assert not _pending(await _account(api, created))
    stale = _stale(api, created, new_client, dm.client_nonce, "N3")
    assert DmClient.header_status(await stale.send(stale.package1())).data == "401"


@pytest.mark.parametrize("method", ["md5", "hmac"])
async def test_a_missing_child_status_is_the_same_as_lost(api: Any, method: str) -> None:
    created = await _enroll(api, auth=method, name="phone-c")
    dm = account_client(api.http, created, URL, dmacc="srv1")
    await dm.session()
    old = dm.client_password
    command_id = await _rotate(api, "phone-c")
    reply = await _until_atomic(dm, "C1")
    atomic = next(c for c in reply.commands if c.name == "Atomic")
    nxt = dm.respond(reply)  # applied
    assert nxt is not None
    # the Atomic answered 200, the Status of one Replace left out
    dropped = atomic.children[1].cmd_id
    nxt.commands = [c for c in nxt.commands if not (c.name == "Status" and c.cmd_ref == dropped)]
    reply = await dm.send(nxt)
    await _finish(dm, reply)
    run = await _run(api, command_id)
    account = await _account(api, created)
    if method == "hmac":
        # the message that lacked the Status was signed with the new secret: final
        assert run["state"] == "succeeded" and not _pending(account), run
    else:
        # unsettled: the run waits for the device's next sign-in, both sets stay valid
        assert run["state"] == "acked", run
        assert run["result"]["waiting_for_sign_in"] is True
        assert "Replace" in run["result"]["why"] and "no Status" in run["result"]["why"]
        assert _pending(account) and account.rotation_taken is False
    dm.session_id = "C2"
    replies = await dm.session()
    assert DmClient.header_status(replies[0]).data == "212"
    run = await _run(api, command_id)
    assert run["state"] == "succeeded", run
    assert not _pending(await _account(api, created))
    stale = _stale(api, created, old, dm.client_nonce, "C3")
    assert DmClient.header_status(await stale.send(stale.package1())).data == "401"


async def test_a_second_rotation_waits_for_the_first_to_settle(api: Any) -> None:
    created = await _enroll(api, name="phone-2")
    dm = account_client(api.http, created, URL, dmacc="srv1")
    await dm.session()
    first = await _rotate(api, "phone-2")
    second = await _rotate(api, "phone-2")
    reply = await _until_atomic(dm, "W1")
    nxt = dm.respond(reply)
    assert nxt is not None
    # the Atomic's own Status is lost: unsettled
    atomic = next(c for c in reply.commands if c.name == "Atomic")
    nxt.commands = [
        c for c in nxt.commands if not (c.name == "Status" and c.cmd_ref == atomic.cmd_id)
    ]
    await _finish(dm, await dm.send(nxt))
    assert (await _run(api, first))["state"] == "acked"
    run = await _run(api, second)
    assert run["state"] == "failed" and "not settled" in run["error"], run
    dm.session_id = "W2"
    await dm.session()
    assert (await _run(api, first))["state"] == "succeeded"
    assert not _pending(await _account(api, created))


# ---------------------------------------------------------------- expiry


async def _age(api: Any, created: dict[str, Any], days: int) -> None:
    async with api.services.db.transaction() as uow:
        await uow.session.execute(
            update(OmadmAccount)
            .where(OmadmAccount.device_id == created["device_id"])
            .values(rotation_at=utcnow() - timedelta(days=days))
        )


async def test_unsettled_secrets_expire_and_the_old_ones_stay(api: Any) -> None:
    created = await _enroll(api, auth="md5", name="phone-x")
    dm = account_client(api.http, created, URL, dmacc="srv1")
    await dm.session()
    command_id = await _rotate(api, "phone-x")
    reply = await _until_atomic(dm, "X1")
    new_client, _ = _new_secrets(reply)
    _lost_reply(dm, reply)  # the Atomic never reached the device, nor did it sign in since
    assert _pending(await _account(api, created))
    await _age(api, created, dmacc.PENDING_TTL.days + 1)
    stale = _stale(api, created, new_client, dm.client_nonce, "X2")
    reply = await stale.send(stale.package1())
    assert DmClient.header_status(reply).data == "401"  # expired: the new secret is gone
    run = await _run(api, command_id)
    assert run["state"] == "failed" and "did not sign in within 7 days" in run["error"], run
    assert not _pending(await _account(api, created))
    dm.session_id = "X3"
    replies = await dm.session()
    assert DmClient.header_status(replies[0]).data == "212"


async def test_taken_secrets_become_final_at_expiry(api: Any) -> None:
    created = await _enroll(api, auth="md5", name="phone-y")
    dm = account_client(api.http, created, URL, dmacc="srv1")
    await dm.session()
    old = dm.client_password
    command_id = await _rotate(api, "phone-y")
    dm.session_id = "Y1"
    await dm.session()
    assert (await _run(api, command_id))["state"] == "succeeded"
    account = await _account(api, created)
    assert account.rotation_taken is True
    # no sign-in for longer than the pending time: the device said it took them
    await _age(api, created, dmacc.PENDING_TTL.days + 1)
    stale = _stale(api, created, old, account.client_nonce, "Y2")
    assert DmClient.header_status(await stale.send(stale.package1())).data == "401"
    assert not _pending(await _account(api, created))
    dm.session_id = "Y3"
    dm.server_auth_ok = None
    replies = await dm.session()
    assert DmClient.header_status(replies[0]).data == "212" and dm.server_auth_ok is True


async def test_taken_secrets_a_later_session_does_not_use_are_dropped(api: Any) -> None:
    created = await _enroll(api, auth="md5", name="phone-z")
    dm = account_client(api.http, created, URL, dmacc="srv1")
    await dm.session()
    old = (dm.client_password, dm.server_password, dm.server_nonce)
    await _rotate(api, "phone-z")
    dm.session_id = "Z1"
    await dm.session()
    new = dm.client_password
    account = await _account(api, created)
    assert _pending(account) and account.rotation_taken is True
    # the device answered 200 but did not keep them: it signs in with the old set, and the
    # server answers with the old server secret
    lost = account_client(
        api.http,
        created,
        URL,
        client_password=old[0],
        client_nonce=account.client_nonce,
        server_password=old[1],
        server_nonce=old[2],
    )
    lost.session_id = "Z2"
    replies = await lost.session()
    assert DmClient.header_status(replies[0]).data == "212" and lost.server_auth_ok is True
    assert not _pending(await _account(api, created))
    stale = _stale(api, created, new, lost.client_nonce, "Z3")
    assert DmClient.header_status(await stale.send(stale.package1())).data == "401"


# ---------------------------------------------------------------- TLS only


async def test_rotation_over_plain_http_is_refused(settings: Any) -> None:
    async with _app(settings) as api:  # omadm_rotate_over_http is off by default
        created = await _enroll(api, name="phone-h")
        dm = account_client(api.http, created, URL, dmacc="srv1")
        await dm.session()
        old = dm.client_password
        command_id = await _rotate(api, "phone-h")
        dm.session_id = "H1"
        replies = await dm.session()
        run = await _run(api, command_id)
        assert run["state"] == "failed" and "needs TLS" in run["error"], run
        # nothing was sent towards the DMAcc tree, and the old secret still works
        sent = [c for r in replies for c in r.commands if c.name in ("Get", "Atomic")]
        assert not any("DMAcc" in (c.items[0].target if c.items else "") for c in sent)
        assert not any(c.name == "Atomic" for c in sent)
        assert dm.client_password == old and not _pending(await _account(api, created))
        dm.session_id = "H2"
        replies = await dm.session()
        assert DmClient.header_status(replies[0]).data == "212"
    # behind a TLS proxy (public_url is https) the device's URL is https: allowed
    async with _app(settings, public_url="https://mdm.example.com/") as api:
        command_id = await _rotate(api, "phone-h")
        dm.http = api.http
        dm.session_id = "H3"
        await dm.session()
        run = await _run(api, command_id)
        assert run["state"] == "succeeded", run
        assert dm.client_password != old
