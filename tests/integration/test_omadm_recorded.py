"""Messages recorded from intel/libdmclient's test client (docs/omadm.md), replayed.

tests/data/omadm/ holds its package 1 as it went over the wire — XML and WBXML, with basic
and md5 credentials (name dev1, password devpwd, an empty initial nonce, DevId DMCtest) —
so that the codec and the session are checked against bytes another implementation wrote.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update

from custos.omadm import auth, codec
from custos.omadm import message as m
from custos.omadm.models import OmadmAccount

DATA = Path(__file__).parent.parent / "data" / "omadm"
XML = "application/vnd.syncml+xml"  # what libdmclient sends
WBXML = "application/vnd.syncml+wbxml"


def _load(name: str) -> tuple[bytes, str]:
    body = (DATA / f"libdmclient-pkg1-{name}").read_bytes()
    return body, WBXML if name.endswith("wbxml") else XML


@pytest.mark.parametrize("name", ["md5.xml", "md5.wbxml", "basic.xml", "basic.wbxml"])
def test_recorded_package1_parses(name: str) -> None:
    body, ctype = _load(name)
    tree, kind = codec.decode(body, ctype)
    assert kind == ctype  # answered in the client's own type
    msg = m.parse(tree)
    assert msg.header.source == "DMCtest" and msg.header.session_id == "1"
    assert msg.header.meta is not None and msg.header.meta.max_msg_size == 16384
    assert msg.header.cred is not None
    assert msg.header.cred.type == (auth.AUTH_MD5 if name.startswith("md5") else auth.AUTH_BASIC)
    assert [c.name for c in msg.commands] == ["Alert", "Replace"] and msg.final
    assert msg.commands[0].data == "1201"
    values = {i.source: i.data for i in msg.commands[1].items}
    assert values["./DevInfo/Man"] == "test manufacturer"
    assert values["./DevInfo/DevId"] == "DMCtest"
    if name.startswith("basic"):
        assert auth.parse_basic(msg.header.cred.data) == ("dev1", "devpwd")


def test_recorded_xml_and_wbxml_say_the_same() -> None:
    for cred in ("md5", "basic"):
        x = m.parse(codec.decode(*_load(f"{cred}.xml"))[0])
        w = m.parse(codec.decode(*_load(f"{cred}.wbxml"))[0])
        assert x.commands == w.commands and x.header == w.header


async def _as_recorded(api: Any, method: str) -> dict[str, Any]:
    """An account matching the recording: dev1/devpwd, an empty client nonce."""
    r = await api.post("/api/v1/omadm/devices", json={"dev_id": "DMCtest", "auth": method})
    assert r.status_code == 201, r.text
    created = r.json()
    svc = api.services.omadm
    async with api.services.db.transaction() as uow:
        await uow.session.execute(
            update(OmadmAccount)
            .where(OmadmAccount.dev_id == "DMCtest")
            .values(
                client_name="dev1",
                client_ha1_sealed=svc._seal(auth.ha1("dev1", "devpwd")),
                client_nonce="",
            )
        )
    return created  # type: ignore[no-any-return]


@pytest.mark.parametrize("name", ["md5.xml", "md5.wbxml", "basic.xml", "basic.wbxml"])
async def test_recorded_package1_opens_a_session(api: Any, name: str) -> None:
    created = await _as_recorded(api, name.split(".")[0])
    body, ctype = _load(name)
    r = await api.http.post("/omadm", content=body, headers={"content-type": ctype})
    assert r.status_code == 200 and r.headers["content-type"].startswith(ctype)
    reply = m.parse(codec.decode(r.content, r.headers["content-type"])[0])
    statuses = {c.cmd_ref: c for c in reply.commands if c.name == "Status"}
    assert statuses["0"].data == "212"
    assert statuses["1"].data == "200" and statuses["2"].data == "200"
    # the server's own credentials, for a client that checks them
    assert reply.header.cred is not None
    # DevDetail is read in the same package
    assert {c.items[0].target for c in reply.commands if c.name == "Get"} >= {"./DevDetail/SwV"}
    r = await api.get(f"/api/v1/devices/{created['device_id']}")
    assert r.json()["inventory"]["hw.model"] == "test model"
