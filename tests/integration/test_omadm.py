"""The OMA DM server through the app, on SQLite and PostgreSQL, with a test DM client.

The client is ours (tests/omadm_client.py); interoperability with clients written by others
is in tests/e2e/test_e2e_omadm_imitune.py and docs/omadm.md (libdmclient).
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from custos.omadm import auth, codec, notification
from custos.omadm import message as m
from omadm_client import DmClient, account_client
from webhook_receiver import Receiver

URL = "http://test/omadm"


async def _enroll(api: Any, **body: Any) -> dict[str, Any]:
    r = await api.post("/api/v1/omadm/devices", json={"dev_id": "IMEI:356938035643809", **body})
    assert r.status_code == 201, r.text
    return r.json()  # type: ignore[no-any-return]


def _client(api: Any, created: dict[str, Any], **kw: Any) -> DmClient:
    return account_client(api.http, created, URL, **kw)


async def _queue(api: Any, device: str, ops: list[dict[str, Any]], **kw: Any) -> dict[str, Any]:
    r = await api.post(f"/api/v1/omadm/devices/{device}/ops", json={"ops": ops, **kw})
    assert r.status_code == 201, r.text
    return r.json()  # type: ignore[no-any-return]


async def _run(api: Any, command_id: str) -> dict[str, Any]:
    r = await api.get(f"/api/v1/commands/{command_id}")
    assert r.status_code == 200, r.text
    return r.json()["runs"][0]  # type: ignore[no-any-return]


async def test_md5_session_reads_devinfo_and_devdetail_into_the_inventory(api: Any) -> None:
    created = await _enroll(api, name="phone-1")
    dm = _client(api, created)
    replies = await dm.session()
    first = replies[0]
    hs = DmClient.header_status(first)
    assert hs.data == "212"
    # the server proved itself with the md5 credentials the client holds for it
    assert dm.server_auth_ok is True
    # a fresh nonce for the client's next credentials
    assert hs.chal is not None and hs.chal.next_nonce and hs.chal.type == auth.AUTH_MD5
    # every command of package 1 has a Status
    refs = {c.cmd_ref for c in first.commands if c.name == "Status"}
    assert {"0", "1", "2"} <= refs
    gets = [c for c in first.commands if c.name == "Get"]
    assert "./DevDetail/SwV" in {c.items[0].target for c in gets}
    # the last package has no management commands: the session is over
    assert not [c for c in replies[-1].commands if c.name not in ("Status", "Results")]
    r = await api.get(f"/api/v1/devices/{created['device_id']}")
    inv = r.json()["inventory"]
    assert inv["hw.manufacturer"] == "Acme" and inv["hw.model"] == "Roadrunner 3"
    assert inv["os.version"] == "4.2.1" and inv["dm/DevDetail/FwV"] == "fw-17"
    assert r.json()["agent_version"] == "omadm/1.2"
    # the device is in the same list as agents
    r = await api.get("/api/v1/devices")
    assert "phone-1" in {d["name"] for d in r.json()}
    # a second session in the same interval does not read DevDetail again
    dm.session_id = "2"
    replies = await dm.session()
    assert len(replies) == 1 and DmClient.header_status(replies[0]).data == "212"


async def test_missing_and_wrong_credentials_are_challenged(api: Any) -> None:
    created = await _enroll(api)
    dm = _client(api, created)
    reply = await dm.send(dm.package1(cred=False))
    hs = DmClient.header_status(reply)
    assert hs.data == "407" and hs.chal is not None and hs.chal.type == auth.AUTH_MD5
    # the server's own credentials are never handed to a message that did not authenticate
    assert reply.header.cred is None
    # the commands were not executed: they carry the header's code, to be sent again
    assert {c.data for c in reply.commands if c.name == "Status" and c.cmd != "SyncHdr"} == {"407"}
    # the client retries with the nonce from the challenge
    dm.client_nonce = hs.chal.next_nonce or ""
    reply = await dm.send(dm.package1())
    assert DmClient.header_status(reply).data == "212"
    # a wrong password: 401, whatever the session
    bad = _client(api, created, client_password="not-the-password")
    bad.session_id = "9"
    bad.client_nonce = DmClient.header_status(reply).chal.next_nonce or ""  # type: ignore[union-attr]
    reply = await bad.send(bad.package1())
    assert DmClient.header_status(reply).data == "401"


async def test_repeated_failures_lock_out_that_address(api: Any) -> None:
    created = await _enroll(api, auth="basic")
    for i in range(10):
        bad = _client(api, created, client_password="wrong-password")
        bad.session_id = str(100 + i)
        reply = await bad.send(bad.package1())
        assert DmClient.header_status(reply).data == "401"
    good = _client(api, created)
    good.session_id = "200"
    reply = await good.send(good.package1())
    assert DmClient.header_status(reply).data == "401"  # locked for a while, even when right
    # the device itself, at another address, is not shut out by a stranger's guesses
    elsewhere = httpx.ASGITransport(app=api.app, client=("10.20.30.40", 40000))
    async with httpx.AsyncClient(transport=elsewhere, base_url="http://test") as http:
        device = account_client(http, created, URL)
        device.session_id = "201"
        reply = await device.send(device.package1())
        assert DmClient.header_status(reply).data == "212"


async def test_unknown_device_and_garbage(api: Any) -> None:
    created = await _enroll(api)
    stranger = _client(api, {**created, "dev_id": "IMEI:000000000000000"})
    reply = await stranger.send(stranger.package1())
    assert DmClient.header_status(reply).data == "401"
    for body, ctype in (
        (b"not xml", codec.XML_TYPE),
        (b"<SyncML><SyncHdr/></SyncML>", codec.XML_TYPE),
        (b'<!DOCTYPE x [<!ENTITY a "b">]><SyncML/>', codec.XML_TYPE),
        (b"\x02\xa4\x01\x6a\x00\xff", codec.WBXML_TYPE),
        (b"<SyncML/>", "application/json"),
    ):
        r = await api.http.post("/omadm", content=body, headers={"content-type": ctype})
        assert r.status_code == 400, (body, r.text)
        assert r.text
    r = await api.http.post(
        "/omadm", content=b"<" * (70 * 1024), headers={"content-type": codec.XML_TYPE}
    )
    assert r.status_code == 413


@pytest.mark.parametrize("method", ["basic", "hmac"])
async def test_basic_and_hmac_sessions(api: Any, method: str) -> None:
    created = await _enroll(api, auth=method)
    dm = _client(api, created)
    replies = await dm.session()
    assert DmClient.header_status(replies[0]).data == "212"
    assert dm.server_auth_ok is True
    if method == "hmac":
        # a message whose body was altered after the MAC was made is refused
        dm.session_id = "77"
        msg = dm.package1(cred=False)
        body = codec.to_xml(m.build(msg))
        mac = auth.hmac_mac(
            auth.ha1(dm.client_name, dm.client_password), auth.unb64(dm.client_nonce), body
        )
        tampered = body.replace(b"Acme", b"Evil")
        r = await api.http.post(
            "/omadm",
            content=tampered,
            headers={
                "content-type": codec.XML_TYPE,
                "x-syncml-hmac": auth.hmac_header(dm.client_name, mac),
            },
        )
        reply = m.parse(codec.parse_xml(r.content))
        assert DmClient.header_status(reply).data == "401"


async def test_wbxml_session(api: Any) -> None:
    created = await _enroll(api)
    dm = _client(api, created, wbxml=True)
    replies = await dm.session()
    assert DmClient.header_status(replies[0]).data == "212"
    r = await api.get(f"/api/v1/devices/{created['device_id']}")
    assert r.json()["inventory"]["os.version"] == "4.2.1"


async def test_node_operations_from_the_api(api: Any) -> None:
    created = await _enroll(api)
    device = created["device_id"]
    dm = _client(api, created)
    dm.tree["./Vendor/Acme/Volume"] = "3"
    await dm.session()  # the inventory read is out of the way
    q = await _queue(
        api,
        device,
        [
            {"verb": "Get", "target": "./DevDetail/SwV"},
            {"verb": "Replace", "target": "./Vendor/Acme/Volume", "data": "7", "format": "int"},
            {"verb": "Add", "target": "./Vendor/Acme/Note", "data": "hello <&> world"},
            {"verb": "Exec", "target": "./Vendor/Acme/Ring"},
            {"verb": "Copy", "target": "./Vendor/Acme/Copy", "source": "./Vendor/Acme/Note"},
            {"verb": "Delete", "target": "./Vendor/Acme/Missing"},
        ],
    )
    assert q["notified"] is False and "next session" in q["notify_detail"]
    dm.session_id = "5"
    await dm.session()
    assert dm.tree["./Vendor/Acme/Volume"] == "7"
    assert dm.tree["./Vendor/Acme/Copy"] == "hello <&> world"
    assert dm.executed == ["./Vendor/Acme/Ring"]
    run = await _run(api, q["command_id"])
    assert run["state"] == "failed"  # the Delete found nothing (404)
    ops = run["result"]["ops"]
    assert [o["status"] for o in ops] == [200, 200, 200, 200, 200, 404]
    assert ops[0]["data"] == "4.2.1"
    assert "Get ./DevDetail/SwV: 200 = 4.2.1" in run["stdout"]


async def test_atomic_is_all_or_nothing(api: Any) -> None:
    created = await _enroll(api)
    dm = _client(api, created)
    await dm.session()
    dm.fail_nodes.add("./Vendor/Acme/Broken")
    q = await _queue(
        api,
        created["device_id"],
        [
            {"verb": "Replace", "target": "./Vendor/Acme/A", "data": "1"},
            {"verb": "Replace", "target": "./Vendor/Acme/Broken", "data": "2"},
        ],
        atomic=True,
    )
    dm.session_id = "6"
    await dm.session()
    assert "./Vendor/Acme/A" not in dm.tree  # rolled back
    run = await _run(api, q["command_id"])
    assert run["state"] == "failed"
    assert run["result"]["container_status"] == "507"
    assert [o["status"] for o in run["result"]["ops"]] == [216, 500]


async def test_max_msg_size_spreads_commands_over_messages(api: Any) -> None:
    created = await _enroll(api)
    dm = _client(api, created, max_msg_size=2500)
    await dm.session()
    big = "x" * 900
    qs = [
        await _queue(
            api,
            created["device_id"],
            [{"verb": "Replace", "target": f"./Vendor/N{i}", "data": big}],
        )
        for i in range(4)
    ]
    dm.session_id = "8"
    replies = await dm.session()
    assert len(replies) >= 3
    for _msg, reply in dm.log[-len(replies) :]:
        assert len(codec.to_xml(m.build(reply))) <= 2500
    for q in qs:
        assert (await _run(api, q["command_id"]))["state"] == "succeeded"
    assert all(dm.tree[f"./Vendor/N{i}"] == big for i in range(4))


async def test_retransmission_gets_the_same_answer_and_state_survives_another_app(
    api: Any, settings: Any
) -> None:
    from custos.server.app import create_app

    created = await _enroll(api)
    dm = _client(api, created)
    msg = dm.package1()
    body = codec.to_xml(m.build(msg))
    first = await api.http.post("/omadm", content=body, headers={"content-type": codec.XML_TYPE})
    again = await api.http.post("/omadm", content=body, headers={"content-type": codec.XML_TYPE})
    assert first.content == again.content
    reply = m.parse(codec.parse_xml(first.content))
    dm.log.append((msg, reply))
    nxt = dm.respond(reply)
    assert nxt is not None
    # someone who knows the DevId and SessionID but not the RespURI's token gets nothing
    intruder = await api.http.post(
        "/omadm", content=codec.to_xml(m.build(nxt)), headers={"content-type": codec.XML_TYPE}
    )
    hijack = m.parse(codec.parse_xml(intruder.content))
    assert DmClient.header_status(hijack).data == "407"
    assert not [c for c in hijack.commands if c.name == "Get"]
    assert hijack.header.resp_uri is None  # the token is not given away
    assert hijack.header.cred is None
    # nor can a stranger's message 1 under the same SessionID replace the live session
    fresh = _client(api, created, client_password="wrong-password-x")
    fresh.session_id = dm.session_id
    await fresh.send(fresh.package1())
    assert reply.header.resp_uri and "?s=" in reply.header.resp_uri
    dm.url = reply.header.resp_uri
    # the next message goes to another server process on the same database
    other = create_app(settings)
    async with (
        other.router.lifespan_context(other),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=other), base_url="http://test") as h2,
    ):
        dm.http = h2
        reply = await dm.send(nxt)
        assert DmClient.header_status(reply).data in ("200", "212")
        # the second process knew which Gets it was waiting for
        while (nxt := dm.respond(reply)) is not None:
            reply = await dm.send(nxt)
    r = await api.get(f"/api/v1/devices/{created['device_id']}")
    assert r.json()["inventory"]["os.version"] == "4.2.1"


async def test_package0_through_the_notification_hook(api: Any) -> None:
    with Receiver() as gateway:
        created = await _enroll(api, notify_url=gateway.url + "/sms")
        q = await _queue(api, created["device_id"], [{"verb": "Get", "target": "./DevInfo/Man"}])
        assert q["notified"] is True
        assert len(gateway.requests) == 1
        req = gateway.requests[0]
        assert req.headers["content-type"] == codec.NOTIFICATION_TYPE
        assert req.headers["x-omadm-devid"] == created["dev_id"]
        pkg = notification.parse(req.body)
        assert pkg.server_id == created["server_id"] and pkg.initiator_server
        server_ha1 = auth.ha1(created["server_id"], created["server_password"])
        assert notification.verify(req.body, server_ha1, auth.unb64(created["server_nonce"]))
        assert not notification.verify(
            req.body, auth.ha1("custos", "wrong"), auth.unb64(created["server_nonce"])
        )
        # the device calls back with Alert 1200 and the notification's session id
        dm = _client(api, created)
        dm.session_id = format(pkg.session_id, "X")
        await dm.session(alert="1200")
        run = await _run(api, q["command_id"])
        assert run["state"] == "succeeded" and run["result"]["ops"][0]["data"] == "Acme"


async def test_commands_an_omadm_device_cannot_run_are_rejected(api: Any) -> None:
    created = await _enroll(api)
    cmd = await api.command(created["device_id"], kind="exec", argv=["true"])
    dm = _client(api, created)
    await dm.session()
    await asyncio.sleep(0)
    run = await _run(api, cmd["id"])
    assert run["state"] == "rejected" and "OMA DM" in run["error"]


async def test_helpdesk_cannot_enroll_and_bad_bodies_are_refused(api: Any) -> None:
    r = await api.post("/api/v1/omadm/devices", json={"dev_id": ""})
    assert r.status_code == 422
    r = await api.post("/api/v1/omadm/devices", json={"dev_id": "x", "auth": "kerberos"})
    assert r.status_code == 422
    created = await _enroll(api)
    r = await api.post("/api/v1/omadm/devices", json={"dev_id": created["dev_id"]})
    assert r.status_code == 409
    bad_ops = [
        {"verb": "Get", "target": "DevInfo/Man"},  # not a ./ URI
        {"verb": "Copy", "target": "./A"},
        {"verb": "Get", "target": "./A", "data": "x"},
        {"verb": "Format", "target": "./A"},
    ]
    for op in bad_ops:
        r = await api.post(f"/api/v1/omadm/devices/{created['device_id']}/ops", json={"ops": [op]})
        assert r.status_code == 422, op
    agent = await api.new_device("laptop")
    r = await api.post(
        f"/api/v1/omadm/devices/{agent.device_id}/ops",
        json={"ops": [{"verb": "Get", "target": "./DevInfo/Man"}]},
    )
    assert r.status_code == 422 and "not an OMA DM device" in r.text


async def test_lost_device_lock_and_wipe_over_lawmo(api: Any) -> None:
    from custos.commands.models import CommandRun

    created = await _enroll(api, name="lost-phone")
    device = created["device_id"]
    dm = _client(api, created)
    await dm.session()
    # a lock through the ordinary lost-device API becomes LAWMO FullyLock, answered at once
    r = await api.post(f"/api/v1/devices/{device}/lock", json={})
    assert r.status_code == 200, r.text
    dm.session_id = "20"
    await dm.session()
    assert dm.executed == ["./LAWMO/Operations/FullyLock"]
    async with api.services.db.read() as s:
        runs = (
            await s.execute(select(CommandRun.state).where(CommandRun.device_id == device))
        ).all()
    assert [x[0] for x in runs] == ["succeeded"]
    # a dry run cannot be honoured over LAWMO: refused, never executed
    r = await api.post(
        f"/api/v1/devices/{device}/wipe", json={"mode": "selective", "dry_run": True}
    )
    assert r.status_code == 202, r.text
    dm.session_id = "21"
    await dm.session()
    assert dm.executed == ["./LAWMO/Operations/FullyLock"]
    # a full wipe: the device accepts (202) and reports completion in a later session
    dm.async_nodes.add("./LAWMO/Operations/FactoryReset")
    r = await api.post(
        f"/api/v1/devices/{device}/wipe", json={"mode": "full", "confirm": "lost-phone"}
    )
    assert r.status_code == 202, r.text
    wipe_run = r.json()["run_id"]
    dm.session_id = "22"
    await dm.session()
    assert dm.executed[-1] == "./LAWMO/Operations/FactoryReset"
    async with api.services.db.read() as s:
        state = await s.scalar(select(CommandRun.state).where(CommandRun.id == wipe_run))
    assert state == "acked"  # accepted, not yet done
    dm.session_id = "23"
    await dm.session()  # package 1 carries the Generic Alert with the run id as correlator
    async with api.services.db.read() as s:
        run = await s.get(CommandRun, wipe_run)
        assert run is not None and run.state == "succeeded", (run.state, run.result)
        assert run.result["ops"][0]["result_code"] == 1200
    await api.services.policies.tick_lost()
    r = await api.get(f"/api/v1/devices/{device}")
    assert r.json()["status"] == "retired"
    # a retired device's sessions are refused
    dm.session_id = "24"
    reply = await dm.send(dm.package1())
    assert DmClient.header_status(reply).data == "403"


async def test_deployments_reach_omadm_devices_through_scomo(api: Any, tmp_path: Any) -> None:
    from test_software import cpkg, upload

    created = await _enroll(api, name="kiosk-7")
    dm = _client(api, created)
    await dm.session()
    data = b"firmware-ish payload " * 4000
    pkg = await upload(api, cpkg(tmp_path / "tool-1.cpkg", "1.0", tmp_path / "t.bin", data))
    r = await api.post(
        "/api/v1/deployments", json={"package": "tool", "targets": {"devices": ["kiosk-7"]}}
    )
    assert r.status_code == 201, r.text
    dep = r.json()
    await api.services.software.tick()
    # the device accepts DownloadInstall (202) and reports the outcome in its next session
    dm.async_nodes.add("*/Operations/DownloadInstall")
    dm.session_id = "30"
    await dm.session()
    node = "Custos" + pkg["id"][:16]
    assert dm.tree[f"./SCOMO/Download/{node}/PkgID"] == pkg["id"]
    assert dm.downloads[node] == (tmp_path / "tool-1.cpkg").read_bytes()
    show = (await api.get(f"/api/v1/deployments/{dep['id']}")).json()
    assert show["devices"][0]["state"] == "installing", show
    dm.session_id = "31"
    await dm.session()
    show = (await api.get(f"/api/v1/deployments/{dep['id']}")).json()
    assert show["devices"][0]["state"] == "installed", show
    # the download link is for this device and package only, and cannot be forged
    url = dm.tree[f"./SCOMO/Download/{node}/PkgURL"]
    token = url.rsplit("/", 1)[1]
    device_id, package_id, expires, mac = token.split(".")
    for bad in (
        f"{device_id}.{package_id}.{int(expires) + 1}.{mac}",
        f"{'0' * 32}.{package_id}.{expires}.{mac}",
        "garbage",
        f"{device_id}.{package_id}.{expires}.{'0' * 40}",
    ):
        r = await api.http.get(f"/omadm/pkg/{bad}")
        assert r.status_code == 404, bad


async def test_a_retired_devid_can_be_registered_again(api: Any) -> None:
    first = await _enroll(api, name="reused")
    r = await api.post(f"/api/v1/devices/{first['device_id']}/retire")
    assert r.status_code == 200, r.text
    second = await _enroll(api, name="reused-2")
    assert second["device_id"] != first["device_id"]
    dm = _client(api, second)
    replies = await dm.session()
    assert DmClient.header_status(replies[0]).data == "212"
    r = await api.get(f"/api/v1/devices/{first['device_id']}")
    assert r.json()["status"] == "retired"


async def test_user_interaction_alerts(api: Any) -> None:
    created = await _enroll(api)
    device = created["device_id"]
    dm = _client(api, created)
    await dm.session()
    dm.user = {"1101": (304, []), "1102": (200, ["blue"]), "1103": (200, ["2"])}
    qs = []
    for body in (
        {"kind": "display", "text": "Your phone is managed by IT", "min_display_s": 5},
        {"kind": "confirm", "text": "Reboot now?"},
        {"kind": "input", "text": "Favourite colour?"},
        {"kind": "single", "text": "Pick a site", "choices": ["Paris", "Lyon"]},
    ):
        r = await api.post(f"/api/v1/omadm/devices/{device}/alert", json=body)
        assert r.status_code == 201, r.text
        qs.append(r.json()["command_id"])
    dm.session_id = "40"
    await dm.session()
    assert dm.shown[0] == ["MINDT=5", "Your phone is managed by IT"]
    assert dm.shown[3] == ["", "Pick a site", "Paris", "Lyon"]
    display, confirm, text, single = [await _run(api, q) for q in qs]
    assert display["state"] == "succeeded"
    assert confirm["state"] == "failed" and confirm["result"]["ops"][0]["status"] == 304
    assert text["result"]["ops"][0]["data"] == "blue"
    assert single["result"]["ops"][0]["data"] == "2"
    for bad in (
        {"kind": "single", "text": "x", "choices": ["only"]},
        {"kind": "confirm", "text": "x", "choices": ["a", "b"]},
        {"kind": "shout", "text": "x"},
        {"kind": "display", "text": ""},
    ):
        r = await api.post(f"/api/v1/omadm/devices/{device}/alert", json=bad)
        assert r.status_code == 422, bad


async def test_large_objects_are_split_and_joined_with_moredata(api: Any) -> None:
    created = await _enroll(api)
    device = created["device_id"]
    dm = _client(api, created, max_msg_size=3000)
    await dm.session()
    # server → device: a 20 kB value in pieces under the device's MaxMsgSize, Size first
    blob = "".join(f"line {i:05d} é\n" for i in range(1500))
    q = await _queue(
        api, device, [{"verb": "Replace", "target": "./Vendor/Acme/Config", "data": blob}]
    )
    dm.session_id = "50"
    replies = await dm.session(max_messages=60)
    assert dm.tree["./Vendor/Acme/Config"] == blob
    assert len(replies) > 8
    for _msg, reply in dm.log[-len(replies) :]:
        assert len(codec.to_xml(m.build(reply))) <= 3000
    assert (await _run(api, q["command_id"]))["state"] == "succeeded"
    # a value that could never be split for this run (with other ops) is refused clearly
    q = await _queue(
        api,
        device,
        [
            {"verb": "Replace", "target": "./Vendor/Acme/Config", "data": blob},
            {"verb": "Exec", "target": "./Vendor/Acme/Reload"},
        ],
    )
    dm.session_id = "51"
    await dm.session()
    run = await _run(api, q["command_id"])
    assert run["state"] == "failed" and "MoreData" in run["error"]
    # device → server: Results in pieces are joined (213 per piece), a wrong Size is 424
    dm2 = _client(api, created, client_nonce=dm.client_nonce)
    dm2.session_id = "52"
    dm2.msg_id = 0
    first = dm2.package1()
    big = "x" * 5000
    first.commands.append(
        m.Command(
            name="Replace",
            cmd_id="90",
            meta=m.Meta(size=len(big)),
            items=[m.Item(source="./DevDetail/Ext/Big", data=big[:3000], more_data=True)],
        )
    )
    first.final = False  # the package goes on until the object's last piece
    reply = await dm2.send(first)
    assert {c.cmd_ref: c.data for c in reply.commands if c.name == "Status"}["90"] == "213"
    assert not reply.final and [c.data for c in reply.commands if c.name == "Alert"] == ["1222"]
    second = m.Message(
        header=dm2.header(cred=False),
        commands=[
            m.Command(
                name="Replace",
                cmd_id="91",
                items=[m.Item(source="./DevDetail/Ext/Big", data=big[3000:])],
            )
        ],
    )
    reply = await dm2.send(second)
    assert {c.cmd_ref: c.data for c in reply.commands if c.name == "Status"}["91"] == "200"
    r = await api.get(f"/api/v1/devices/{device}")
    assert r.json()["inventory"]["dm/DevDetail/Ext/Big"] == big[:4096]
    third = m.Message(
        header=dm2.header(cred=False),
        commands=[
            m.Command(
                name="Replace",
                cmd_id="92",
                meta=m.Meta(size=10),
                items=[m.Item(source="./DevDetail/Ext/Odd", data="abc", more_data=True)],
            ),
            m.Command(
                name="Replace", cmd_id="93", items=[m.Item(source="./DevDetail/Ext/Odd", data="de")]
            ),
        ],
    )
    reply = await dm2.send(third)
    assert {c.cmd_ref: c.data for c in reply.commands if c.name == "Status"}["93"] == "424"


async def test_sequence_stops_at_the_first_failure(api: Any) -> None:
    created = await _enroll(api)
    dm = _client(api, created)
    await dm.session()
    dm.fail_nodes.add("./Vendor/Acme/Broken")
    q = await _queue(
        api,
        created["device_id"],
        [
            {"verb": "Replace", "target": "./Vendor/Acme/A", "data": "1"},
            {"verb": "Replace", "target": "./Vendor/Acme/Broken", "data": "2"},
            {"verb": "Replace", "target": "./Vendor/Acme/C", "data": "3"},
        ],
        sequence=True,
    )
    dm.session_id = "60"
    await dm.session()
    assert dm.tree["./Vendor/Acme/A"] == "1" and "./Vendor/Acme/C" not in dm.tree
    run = await _run(api, q["command_id"])
    assert run["state"] == "failed"
    assert [o["status"] for o in run["result"]["ops"]] == [200, 500, 215]
    r = await api.post(
        f"/api/v1/omadm/devices/{created['device_id']}/ops",
        json={"ops": [{"verb": "Get", "target": "./A"}], "atomic": True, "sequence": True},
    )
    assert r.status_code == 422


async def test_firmware_images_reach_omadm_devices_through_fumo(api: Any, tmp_path: Any) -> None:
    created = await _enroll(api, name="router-3")
    dm = _client(api, created)
    await dm.session()
    image = tmp_path / "router-fw-2.4.bin"
    image.write_bytes(b"\x7fFW" + bytes(range(256)) * 64)
    r = await api.http.post(
        "/api/v1/packages",
        params={
            "filename": image.name,
            "name": "router-fw",
            "version": "2.4",
            "destination": "/lib/firmware/router.bin",
        },
        content=image.read_bytes(),
        headers={**api.auth, "content-type": "application/octet-stream"},
    )
    assert r.status_code == 201, r.text
    r = await api.post(
        "/api/v1/deployments", json={"package": "router-fw", "targets": {"devices": ["router-3"]}}
    )
    assert r.status_code == 201, r.text
    dep = r.json()
    await api.services.software.tick()
    dm.async_nodes.add("*/DownloadAndUpdate")
    dm.alert_result = "200"  # FUMO's success code
    dm.session_id = "61"
    await dm.session()
    assert dm.tree["./FUMO/Custos/PkgName"] == "router-fw"
    assert dm.tree["./FUMO/Custos/PkgVersion"] == "2.4"
    assert dm.downloads["Custos"] == image.read_bytes()
    show = (await api.get(f"/api/v1/deployments/{dep['id']}")).json()
    assert show["devices"][0]["state"] == "installing", show
    dm.session_id = "62"
    await dm.session()
    show = (await api.get(f"/api/v1/deployments/{dep['id']}")).json()
    assert show["devices"][0]["state"] == "installed", show


async def test_lawmo_nodes_need_the_lock_and_wipe_permissions(api: Any) -> None:
    created = await _enroll(api)
    r = await api.post(
        "/api/v1/users",
        json={"username": "hd", "password": "helpdesk-pw-12", "roles": ["helpdesk"]},
    )
    assert r.status_code == 201, r.text
    r = await api.http.post(
        "/api/v1/auth/login", json={"username": "hd", "password": "helpdesk-pw-12"}
    )
    helpdesk = {"authorization": f"Bearer {r.json()['token']}"}
    url = f"/api/v1/omadm/devices/{created['device_id']}/ops"
    wipe = {"ops": [{"verb": "Exec", "target": "./LAWMO/Operations/FactoryReset"}]}
    r = await api.http.post(url, json=wipe, headers=helpdesk)
    assert r.status_code == 403 and "devices.wipe" in r.text
    r = await api.http.post(
        url, json={"ops": [{"verb": "Get", "target": "./DevInfo/Man"}]}, headers=helpdesk
    )
    assert r.status_code == 201, r.text
    r = await api.post(url, json=wipe)
    assert r.status_code == 201, r.text
    # the DM account (its address and server secret move the device to another server) needs
    # devices.manage, whichever way it is reached; the same for Windows' wipe and lock CSPs
    for ops, needs in (
        ([{"verb": "Replace", "target": "./DMAcc/srv1/AppAuth/s/AAuthSecret", "data": "x"}],
         "devices.manage"),
        ([{"verb": "Get", "target": "./DMAcc"}], "devices.manage"),
        ([{"verb": "Get", "target": "./SyncML/dmacc/x/Addr"}], "devices.manage"),
        ([{"verb": "Replace", "target": "./Vendor/MSFT/DMClient/Provider/P/x", "data": "1"}],
         "devices.manage"),
        ([{"verb": "Copy", "target": "./Tmp/x", "source": "./DMAcc/srv1/AppAuth/c/AAuthSecret"}],
         "devices.manage"),
        ([{"verb": "Exec", "target": "./Vendor/MSFT/RemoteWipe/doWipe"}], "devices.wipe"),
        ([{"verb": "Get", "target": "./DevInfo/Man"},
          {"verb": "Exec", "target": "./Vendor/MSFT/RemoteLock/Lock"}], "devices.lock"),
    ):  # fmt: skip
        r = await api.http.post(url, json={"ops": ops}, headers=helpdesk)
        assert r.status_code == 403 and needs in r.text, (ops, r.text)
        r = await api.post(url, json={"ops": ops})
        assert r.status_code == 201, (ops, r.text)
    # names that merely contain the words are not guarded, nor reading the DM client's ids
    for target in ("./Vendor/DMAccount/x", "./Vendor/MyLAWMOx", "./Vendor/MSFT/DMClient/HWDevID"):
        r = await api.http.post(
            url, json={"ops": [{"verb": "Get", "target": target}]}, headers=helpdesk
        )
        assert r.status_code == 201, (target, r.text)


async def test_odd_digits_and_forged_tokens_get_no_500(api: Any) -> None:
    for token in ("a.b.\u00b2.c", "a.b.12.c", "x" * 300):
        r = await api.http.get(f"/omadm/pkg/{token}")
        assert r.status_code == 404, token
    created = await _enroll(api)
    dm = _client(api, created)
    await dm.session()  # the inventory read is out of the way
    q = await _queue(api, created["device_id"], [{"verb": "Get", "target": "./DevInfo/Man"}])
    dm.session_id = "70"
    dm.msg_id = 0
    dm.url = URL
    reply = await dm.send(dm.package1())
    nxt = dm.respond(reply)
    assert nxt is not None
    for c in nxt.commands:
        if c.name == "Status" and c.cmd != "SyncHdr":
            c.data = "\u00b2"  # isdigit() but not int()
    reply = await dm.send(nxt)
    assert DmClient.header_status(reply).data in ("200", "212")
    run = await _run(api, q["command_id"])
    assert run["state"] == "failed"


async def test_devdetail_gets_the_client_did_not_run_are_asked_again(api: Any) -> None:
    created = await _enroll(api)
    dm = _client(api, created)
    reply = await dm.send(dm.package1())
    gets = [c for c in reply.commands if c.name == "Get"]
    assert gets
    # the client answers only its header status (as libdmclient does while it still
    # challenges the server's credentials): the Gets are sent again, and then read
    hdr = m.Command(
        name="Status",
        cmd_id="1",
        msg_ref=reply.header.msg_id,
        cmd_ref="0",
        cmd="SyncHdr",
        data="212",
    )
    dm.url = reply.header.resp_uri or URL
    reply = await dm.send(m.Message(header=dm.header(cred=False), commands=[hdr]))
    assert {c.items[0].target for c in reply.commands if c.name == "Get"} == {
        c.items[0].target for c in gets
    }
    while (nxt := dm.respond(reply)) is not None:
        reply = await dm.send(nxt)
    r = await api.get(f"/api/v1/devices/{created['device_id']}")
    assert r.json()["inventory"]["os.version"] == "4.2.1"
