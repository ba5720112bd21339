"""OMA DM limits and lockout, large Results, the client's limits for a whole session, URLs
behind a proxy, DMAcc secrets read back — on SQLite and PostgreSQL, with the test client.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import select, update

from app_harness import running_api
from custos.db.base import utcnow
from custos.omadm import codec, wbxml
from custos.omadm import message as m
from custos.omadm.models import OmadmAccount, OmadmSession
from omadm_client import DmClient, account_client

URL = "http://test/omadm"


_app = running_api  # the app with some settings changed, an admin logged in


async def _enroll(api: Any, dev_id: str = "IMEI:356938035643809", **body: Any) -> dict[str, Any]:
    r = await api.post("/api/v1/omadm/devices", json={"dev_id": dev_id, **body})
    assert r.status_code == 201, r.text
    return r.json()  # type: ignore[no-any-return]


async def _queue(api: Any, device: str, ops: list[dict[str, Any]]) -> dict[str, Any]:
    r = await api.post(f"/api/v1/omadm/devices/{device}/ops", json={"ops": ops})
    assert r.status_code == 201, r.text
    return r.json()  # type: ignore[no-any-return]


async def _run(api: Any, command_id: str) -> dict[str, Any]:
    r = await api.get(f"/api/v1/commands/{command_id}")
    assert r.status_code == 200, r.text
    return r.json()["runs"][0]  # type: ignore[no-any-return]


def _codes(reply: m.Message) -> dict[str, str]:
    return {c.cmd_ref or "": c.data or "" for c in reply.commands if c.name == "Status"}


async def _session_state(api: Any, created: dict[str, Any], session_id: str) -> dict[str, Any]:
    async with api.services.db.read() as s:
        row = await s.scalar(
            select(OmadmSession)
            .join(OmadmAccount, OmadmAccount.id == OmadmSession.account_id)
            .where(
                OmadmAccount.device_id == created["device_id"],
                OmadmSession.session_id == session_id,
            )
        )
    assert row is not None
    return dict(row.state)


# ---------------------------------------------------------------- 1. chunk state is bounded


async def test_large_objects_in_flight_are_capped_in_number_and_bytes(settings: Any) -> None:
    async with _app(settings, omadm_max_obj_size=6000) as api:
        created = await _enroll(api)
        dm = account_client(api.http, created, URL)
        first = dm.package1()
        # nine objects started at once: the ninth is refused, not kept
        for i in range(9):
            first.commands.append(
                m.Command(
                    name="Replace",
                    cmd_id=str(100 + i),
                    items=[m.Item(source=f"./Vendor/Obj{i}", data="abc", more_data=True)],
                )
            )
        first.final = False
        reply = await dm.send(first)
        codes = _codes(reply)
        assert [codes[str(100 + i)] for i in range(9)] == ["213"] * 8 + ["413"]
        state = await _session_state(api, created, dm.session_id)
        assert len(state["chunks"]) == 8
        # each object is under the limit, together they are not: the one that tips it is 413
        more = m.Message(
            header=dm.header(cred=False),
            commands=[
                m.Command(
                    name="Replace",
                    cmd_id=str(200 + i),
                    items=[m.Item(source=f"./Vendor/Obj{i}", data="y" * 2500, more_data=True)],
                )
                for i in range(3)
            ],
            final=False,
        )
        reply = await dm.send(more)
        codes = _codes(reply)
        assert [codes["200"], codes["201"], codes["202"]] == ["213", "213", "413"]
        state = await _session_state(api, created, dm.session_id)
        held = sum(len(k) + len(v["data"]) for k, v in state["chunks"].items())
        assert held <= 6000
        # what was refused is remembered (nothing of it kept), so its later pieces are too
        assert state["chunks"]["in:./Vendor/Obj2"] == {"data": "", "size": None, "refused": True}


# ---------------------------------------------------------------- 2. WBXML expansion


async def test_wbxml_string_table_expansion_is_bounded_by_the_message_size(api: Any) -> None:
    # 1,000 two-byte references to a 1,000-byte string: 3 kB of body, 1 MB of text
    table = b"x" * 1000 + b"\x00"
    body = b"\x02\xa4\x01\x6a" + wbxml._uint(len(table)) + table + b"\x6d" + b"\x83\x00" * 1000
    body += b"\x01"
    assert len(body) < api.services.settings.omadm_max_msg_size
    r = await api.http.post("/omadm", content=body, headers={"content-type": codec.WBXML_TYPE})
    assert r.status_code == 400
    limit = 4 * api.services.settings.omadm_max_msg_size
    assert f"more than {limit} characters of text" in r.text


# ---------------------------------------------------------------- 3. lockout and nonces


async def test_account_failures_decay_and_a_lock_is_not_forever(api: Any) -> None:
    created = await _enroll(api)
    device = created["device_id"]
    now = utcnow()
    # after a lock that has run out, one stray failure does not lock the account again
    async with api.services.db.transaction() as uow:
        await uow.session.execute(
            update(OmadmAccount)
            .where(OmadmAccount.device_id == device)
            .values(failures=150, locked_until=now - timedelta(seconds=1))
        )
    stranger = httpx.ASGITransport(app=api.app, client=("10.9.9.9", 4000))
    async with httpx.AsyncClient(transport=stranger, base_url="http://test") as http:
        bad = account_client(http, created, URL, client_password="wrong-password")
        bad.session_id = "90"
        reply = await bad.send(bad.package1())
        assert DmClient.header_status(reply).data == "401"
    good = account_client(api.http, created, URL)
    good.session_id = "91"
    reply = await good.send(good.package1())
    assert DmClient.header_status(reply).data == "212"
    # a hundred within the window do lock it (counted from anywhere)
    async with api.services.db.transaction() as uow:
        await uow.session.execute(
            update(OmadmAccount)
            .where(OmadmAccount.device_id == device)
            .values(failures=99, locked_until=utcnow() + timedelta(seconds=200))
        )
    async with httpx.AsyncClient(transport=stranger, base_url="http://test") as http:
        bad = account_client(http, created, URL, client_password="wrong-password")
        bad.session_id = "92"
        await bad.send(bad.package1())
    listed = (await api.get("/api/v1/omadm/devices")).json()
    assert listed[0]["locked_until"] is not None
    chal = DmClient.header_status(reply).chal
    assert chal is not None and chal.next_nonce
    good = account_client(api.http, created, URL, client_nonce=chal.next_nonce)
    good.session_id = "93"
    reply = await good.send(good.package1())
    assert DmClient.header_status(reply).data == "401"
    # a window that has passed starts the count again
    async with api.services.db.transaction() as uow:
        await uow.session.execute(
            update(OmadmAccount)
            .where(OmadmAccount.device_id == device)
            .values(failures=99, locked_until=utcnow() - timedelta(seconds=1))
        )
    async with httpx.AsyncClient(transport=stranger, base_url="http://test") as http:
        bad = account_client(http, created, URL, client_password="wrong-password")
        bad.session_id = "94"
        await bad.send(bad.package1())
    listed = (await api.get("/api/v1/omadm/devices")).json()
    assert listed[0]["locked_until"] is None
    good.session_id = "95"
    good.msg_id = 0
    reply = await good.send(good.package1())
    assert DmClient.header_status(reply).data == "212"


def test_an_address_failure_long_ago_does_not_add_up(monkeypatch: pytest.MonkeyPatch) -> None:
    from custos.omadm import service

    svc = service.OmadmService.__new__(service.OmadmService)
    svc._failed = {}
    clock = [1000.0]
    monkeypatch.setattr(service.time, "monotonic", lambda: clock[0])
    for _ in range(service.MAX_FAILURES - 1):
        svc.address_failed(1, "10.0.0.1")
        clock[0] += service.LOCK_S + 1  # each one after the last has expired
    svc.address_failed(1, "10.0.0.1")
    assert not svc.address_locked(1, "10.0.0.1")
    for _ in range(service.MAX_FAILURES):
        svc.address_failed(1, "10.0.0.1")
    assert svc.address_locked(1, "10.0.0.1")


@pytest.mark.parametrize("method", ["md5", "hmac"])
async def test_a_strangers_failure_does_not_move_the_devices_nonce(api: Any, method: str) -> None:
    created = await _enroll(api, auth=method)
    dm = account_client(api.http, created, URL)
    held = dm.client_nonce
    stranger = httpx.ASGITransport(app=api.app, client=("10.7.7.7", 4000))
    async with httpx.AsyncClient(transport=stranger, base_url="http://test") as http:
        bad = account_client(http, created, URL, client_password="not-the-password")
        bad.session_id = "66"
        reply = await bad.send(bad.package1())
        hs = DmClient.header_status(reply)
        assert hs.data == "401"
        # the challenge names the nonce the device already holds
        assert hs.chal is not None and hs.chal.next_nonce == held
    replies = await dm.session()
    assert DmClient.header_status(replies[0]).data == "212"
    if method == "hmac":
        # in the middle of a session too: a stranger's message does not break the next one
        q = await _queue(api, created["device_id"], [{"verb": "Get", "target": "./DevInfo/Man"}])
        dm.session_id = "67"
        dm.msg_id = 0
        reply = await dm.send(dm.package1())
        async with httpx.AsyncClient(transport=stranger, base_url="http://test") as http:
            bad = account_client(http, created, URL, client_password="not-the-password")
            bad.session_id = "68"
            await bad.send(bad.package1())
        while (nxt := dm.respond(reply)) is not None:
            reply = await dm.send(nxt)
            assert DmClient.header_status(reply).data in ("200", "212")
        assert (await _run(api, q["command_id"]))["state"] == "succeeded"


# ---------------------------------------------------------------- 4. large Results


async def test_large_results_get_213_per_piece_and_reach_the_run(api: Any) -> None:
    created = await _enroll(api)
    dm = account_client(api.http, created, URL)
    await dm.session()  # the inventory read is out of the way
    q = await _queue(api, created["device_id"], [{"verb": "Get", "target": "./Vendor/Log"}])
    big = "".join(f"entry {i:04d} ü\n" for i in range(400))
    dm.session_id = "80"
    dm.msg_id = 0
    dm.url = URL
    reply = await dm.send(dm.package1())
    get = next(c for c in reply.commands if c.name == "Get")
    cut = [0, 2000, 4000, len(big)]
    pieces = [big[cut[i] : cut[i + 1]] for i in range(3)]
    hdr = m.Command(
        name="Status",
        cmd_id="1",
        msg_ref=reply.header.msg_id,
        cmd_ref="0",
        cmd="SyncHdr",
        data="212",
    )
    st = m.Command(
        name="Status",
        cmd_id="2",
        msg_ref=reply.header.msg_id,
        cmd_ref=get.cmd_id,
        cmd="Get",
        data="200",
    )
    for i, piece in enumerate(pieces):
        last = i == len(pieces) - 1
        res = m.Command(
            name="Results",
            cmd_id=str(10 + i),
            msg_ref=reply.header.msg_id,
            cmd_ref=get.cmd_id,
            meta=m.Meta(size=len(big.encode())) if i == 0 else None,
            items=[m.Item(source="./Vendor/Log", data=piece, more_data=not last)],
        )
        cmds = [hdr, st, res] if i == 0 else [res]
        answer = await dm.send(m.Message(header=dm.header(cred=False), commands=cmds, final=last))
        assert _codes(answer)[str(10 + i)] == ("200" if last else "213")
    run = await _run(api, q["command_id"])
    assert run["state"] == "succeeded", run
    assert run["result"]["ops"][0]["data"] == big


# ---------------------------------------------------------------- 5. the client's limits


async def test_the_clients_max_msg_size_holds_for_the_session_and_has_a_floor(api: Any) -> None:
    created = await _enroll(api)
    dm = account_client(api.http, created, URL, max_msg_size=2500, meta_first_only=True)
    await dm.session()
    big = "x" * 900
    qs = [
        await _queue(
            api, created["device_id"], [{"verb": "Replace", "target": f"./V/N{i}", "data": big}]
        )
        for i in range(4)
    ]
    dm.session_id = "81"
    replies = await dm.session()
    assert len(replies) >= 3
    for _msg, reply in dm.log[-len(replies) :]:
        assert len(codec.to_xml(m.build(reply))) <= 2500
    for q in qs:
        assert (await _run(api, q["command_id"]))["state"] == "succeeded"


async def test_a_tiny_max_msg_size_is_raised_to_2048(api: Any) -> None:
    created = await _enroll(api)
    dm = account_client(api.http, created, URL)
    await dm.session()
    # a MaxMsgSize too small for anything is taken as 2048: small work still goes together
    tiny = account_client(api.http, created, URL, max_msg_size=300, client_nonce=dm.client_nonce)
    for i in range(3):
        await _queue(api, created["device_id"], [{"verb": "Get", "target": f"./DevInfo/X{i}"}])
    tiny.session_id = "82"
    replies = await tiny.session()
    gets = [c for c in replies[0].commands if c.name == "Get"]
    assert len(gets) == 3


async def test_an_object_larger_than_the_clients_max_obj_size_is_not_streamed(api: Any) -> None:
    created = await _enroll(api)
    dm = account_client(
        api.http, created, URL, max_msg_size=3000, max_obj_size=8000, meta_first_only=True
    )
    await dm.session()
    blob = "z" * 20_000  # needs MoreData under 3000, and is over the client's 8000
    q = await _queue(
        api, created["device_id"], [{"verb": "Replace", "target": "./V/Big", "data": blob}]
    )
    dm.session_id = "83"
    await dm.session()
    assert "./V/Big" not in dm.tree and not dm.partial
    run = await _run(api, q["command_id"])
    assert run["state"] == "failed" and "MaxObjSize (8000)" in run["error"], run


# ---------------------------------------------------------------- 7. behind a proxy


async def test_resp_uri_and_download_links_use_the_public_url(settings: Any, tmp_path: Any) -> None:
    async with _app(settings, public_url="https://mdm.example.com/") as api:
        created = await _enroll(api, name="router-9")
        # the registration answer names the address devices use
        assert created["server_url"] == "https://mdm.example.com/omadm"
        dm = account_client(api.http, created, URL)
        replies = await dm.session()
        assert replies[0].header.resp_uri is not None
        assert replies[0].header.resp_uri.startswith("https://mdm.example.com/omadm?s=")
        image = tmp_path / "fw.bin"
        image.write_bytes(b"\x7fFW" * 100)
        r = await api.http.post(
            "/api/v1/packages",
            params={
                "filename": image.name,
                "name": "fw",
                "version": "1",
                "destination": "/lib/firmware/fw.bin",
            },
            content=image.read_bytes(),
            headers={**api.auth, "content-type": "application/octet-stream"},
        )
        assert r.status_code == 201, r.text
        r = await api.post(
            "/api/v1/deployments", json={"package": "fw", "targets": {"devices": ["router-9"]}}
        )
        assert r.status_code == 201, r.text
        await api.services.software.tick()
        dm.session_id = "84"
        await dm.session()
        url = dm.tree["./FUMO/Custos/DownloadAndUpdate/PkgURL"]
        assert url.startswith("https://mdm.example.com/omadm/pkg/")
    async with _app(settings) as api:
        created = await _enroll(api, dev_id="IMEI:1")
        dm = account_client(api.http, created, URL)
        replies = await dm.session()
        assert (replies[0].header.resp_uri or "").startswith("http://test/omadm?s=")


# ---------------------------------------------------------------- DMAcc secrets read back
# (the rotation itself: test_omadm_rotation.py)


async def test_a_dm_account_secret_read_back_is_not_kept(api: Any) -> None:
    created = await _enroll(api, name="phone-s")
    dm = account_client(api.http, created, URL, dmacc="srv1")
    dm.tree["./DMAcc/legacy/ClientPW"] = "old-style-pw"
    await dm.session()
    device = created["device_id"]
    queued = await _queue(
        api,
        device,
        [
            {"verb": "Get", "target": "./DMAcc/srv1/AppAuth/cl/AAuthSecret"},
            {"verb": "Get", "target": "./DMAcc/legacy/ClientPW"},
            {"verb": "Get", "target": "./DMAcc/srv1/ServerID"},
        ],
    )
    dm.session_id = "S2"
    await dm.session()
    run = await _run(api, queued["command_id"])
    assert run["state"] == "succeeded", run
    values = [op["data"] for op in run["result"]["ops"]]
    assert values[0].startswith("(secret, ") and "not kept" in values[1]
    assert values[2] == dm.tree["./DMAcc/srv1/ServerID"]  # other DMAcc leaves are read as usual
    inventory = (await api.get(f"/api/v1/devices/{device}")).json()["inventory"]
    text = str(run) + str(inventory)
    assert dm.client_password not in text and "old-style-pw" not in text
    assert inventory["dm/DMAcc/srv1/AppAuth/cl/AAuthSecret"].startswith("(secret, ")

    # a whole-subtree read (the device answers for the node we asked, with every value in
    # it), an unknown leaf under the account, and the device's own report are hidden too;
    # the list of an interior node's children is kept
    dm.tree["./DMAcc/srv1/Vendor"] = "also-" + dm.client_password
    queued = await _queue(
        api,
        device,
        [
            {"verb": "Get", "target": "./DMAcc/srv1/Vendor"},
            {"verb": "Get", "target": "./DMAcc"},
        ],
    )
    dm.session_id = "S3"
    await dm.session()
    run = await _run(api, queued["command_id"])
    values = [op["data"] for op in run["result"]["ops"]]
    assert values[0].startswith("(secret, "), values
    assert "srv1" in values[1] and "legacy" in values[1], values
    inventory = (await api.get(f"/api/v1/devices/{device}")).json()["inventory"]
    assert dm.client_password not in str(run) + str(inventory)


async def test_the_rest_of_a_refused_object_is_refused_too(settings: Any) -> None:
    async with _app(settings, omadm_max_obj_size=3000) as api:
        created = await _enroll(api)
        dm = account_client(api.http, created, URL)
        first = dm.package1()
        first.commands.append(
            m.Command(
                name="Replace",
                cmd_id="100",
                items=[m.Item(source="./Vendor/Big", data="a" * 3500, more_data=True)],
            )
        )
        first.final = False
        assert _codes(await dm.send(first))["100"] == "413"
        # its further pieces are not a new object: refused until the last one
        for cmd_id, more in (("200", True), ("201", False)):
            msg = m.Message(
                header=dm.header(cred=False),
                commands=[
                    m.Command(
                        name="Replace",
                        cmd_id=cmd_id,
                        items=[m.Item(source="./Vendor/Big", data="tail", more_data=more)],
                    )
                ],
                final=not more,
            )
            assert _codes(await dm.send(msg))[cmd_id] == "413", cmd_id
        state = await _session_state(api, created, dm.session_id)
        assert not state.get("chunks")
        inventory = (await api.get(f"/api/v1/devices/{created['device_id']}")).json()["inventory"]
        assert "dm/Vendor/Big" not in inventory
        # and the next object under that name is taken as usual
        msg = m.Message(
            header=dm.header(cred=False),
            commands=[
                m.Command(
                    name="Replace", cmd_id="300", items=[m.Item(source="./Vendor/Big", data="ok")]
                )
            ],
        )
        assert _codes(await dm.send(msg))["300"] == "200"


async def test_a_run_too_big_for_any_message_fails_instead_of_waiting_forever(api: Any) -> None:
    created = await _enroll(api)
    dm = account_client(api.http, created, URL, max_msg_size=2048)
    await dm.session()
    many = [{"verb": "Get", "target": f"./Vendor/Acme/Setting{i:03d}/Value"} for i in range(40)]
    q = await _queue(api, created["device_id"], many)
    small = await _queue(api, created["device_id"], [{"verb": "Get", "target": "./DevInfo/Man"}])
    dm.session_id = "91"
    await dm.session()
    run = await _run(api, q["command_id"])
    assert run["state"] == "failed" and "MaxMsgSize" in run["error"], run
    # the device's queue is not blocked behind it
    assert (await _run(api, small["command_id"]))["state"] == "succeeded"


# ------------------------------------------------- found re-running libdmclient (2026-11-24)


async def test_a_new_session_reusing_a_session_id_after_a_challenge_goes_on(api: Any) -> None:
    # libdmclient always says SessionID 1 and starts md5 with no nonce: its message 1 is
    # challenged (and not stored), so its message 2 meets the previous session's row
    created = await _enroll(api)
    dm = account_client(api.http, created, URL)
    dm.session_id = "1"
    await dm.session()  # several messages: the row is kept, ended
    q = await _queue(api, created["device_id"], [{"verb": "Get", "target": "./DevInfo/Man"}])
    dm.msg_id = 0
    good_nonce, dm.client_nonce = dm.client_nonce, "AAAAAAAAAAAAAAAA"
    reply = await dm.send(dm.package1())
    status = DmClient.header_status(reply)
    assert status.data == "401" and status.chal is not None
    dm.client_nonce = status.chal.next_nonce or good_nonce
    reply = await dm.send(dm.package1())  # MsgID 2, the right Cred
    assert DmClient.header_status(reply).data == "212"
    for _ in range(10):
        nxt = dm.respond(reply)
        if nxt is None:
            break
        reply = await dm.send(nxt)
    assert (await _run(api, q["command_id"]))["state"] == "succeeded"


async def test_work_the_device_refused_with_our_cred_is_sent_again(api: Any) -> None:
    # libdmclient refuses this server's Cred when its stored nonce moved on: it answers the
    # header and every command 401 with a Chal, and runs none of them
    created = await _enroll(api)
    dm = account_client(api.http, created, URL)
    await dm.session()
    q = await _queue(api, created["device_id"], [{"verb": "Get", "target": "./DevInfo/Mod"}])
    dm.session_id = "2"
    dm.msg_id = 0
    reply = await dm.send(dm.package1())
    assert any(c.name == "Get" for c in reply.commands)
    nxt = dm.respond(reply)
    assert nxt is not None
    for c in nxt.commands:
        if c.name == "Status":
            c.data = "401"
            c.items = []
        if c.name == "Status" and c.cmd == "SyncHdr":
            c.chal = m.Meta(type="syncml:auth-md5", format="b64", next_nonce=dm.server_nonce)
    nxt.commands = [c for c in nxt.commands if c.name == "Status"]
    reply = await dm.send(nxt)
    # sent again, with the server's Cred, and this time answered
    assert any(c.name == "Get" for c in reply.commands), reply.commands
    for _ in range(10):
        nxt = dm.respond(reply)
        if nxt is None:
            break
        reply = await dm.send(nxt)
    run = await _run(api, q["command_id"])
    assert run["state"] == "succeeded", run
    assert run["result"]["ops"][0]["data"] == dm.tree["./DevInfo/Mod"]
