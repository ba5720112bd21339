"""The console's OMA DM pages over HTTP (no browser): registration, node operations, roles.

A test DM client (tests/omadm_client.py) holds the credentials the registration page showed
and runs real sessions against the app, so queued operations come back with their results.
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from test_console_policies import (
    audit_entries,
    group_with,
    new_user,
    page_csrf,
    signed_in,
)

from custos.omadm.models import OmadmAccount
from omadm_client import DmClient, account_client
from webhook_receiver import Receiver

Api = Any
URL = "http://test/omadm"
DEV_ID = "IMEI:356938035643809"


@pytest.fixture
async def console(api: Api) -> AsyncIterator[httpx.AsyncClient]:
    """The admin, signed in to the console."""
    password = api.services.settings.admin_password.get_secret_value()
    async with signed_in(api, "admin", password) as http:
        yield http


def field(text: str, element_id: str) -> str:
    """The value of the read-only input with this id on a page."""
    m = re.search(rf'<input id="{re.escape(element_id)}"[^>]*\bvalue="([^"]*)"', text)
    assert m, f"no input #{element_id}"
    return html.unescape(m.group(1))


def shown_account(text: str) -> dict[str, str]:
    """The DMAcc as the registration page shows it, in the enrolment answer's shape."""
    return {
        "dev_id": field(text, "c-devid"),
        "client_name": field(text, "c-client-name"),
        "client_password": field(text, "c-client-password"),
        "server_id": field(text, "c-server-id"),
        "server_password": field(text, "c-server-password"),
        "client_nonce": field(text, "c-client-nonce"),
        "server_nonce": field(text, "c-server-nonce"),
        "auth": re.search(r"Authentication: <strong>([^<]+)</strong>", text).group(1),  # type: ignore[union-attr]
    }


def download(text: str, element_id: str) -> tuple[str, str]:
    """(file name, content) of a download link (a data: URI) on the page."""
    m = re.search(
        rf'id="{element_id}" href="data:application/x-pem-file;base64,([^"]+)" download="([^"]+)"',
        text,
    )
    assert m, f"no download link #{element_id}"
    return m.group(2), base64.b64decode(m.group(1)).decode()


async def register(
    http: httpx.AsyncClient, csrf: str, **form: str
) -> tuple[httpx.Response, dict[str, str]]:
    r = await http.post("/console/omadm", data={"csrf": csrf, "dev_id": DEV_ID, **form})
    assert r.status_code == 201, r.text[:3000]
    return r, shown_account(r.text)


async def test_register_a_device_and_its_credentials_are_shown_once(
    api: Api, console: httpx.AsyncClient
) -> None:
    await api.post("/api/v1/groups", json={"name": "phones"})
    page = await console.get("/console/omadm")
    assert page.status_code == 200, page.text
    assert 'href="/console/omadm" aria-current="page"' in page.text
    assert "No OMA DM device yet." in page.text and 'id="omadm-register"' in page.text
    assert "<option>phones</option>" in page.text
    csrf = page_csrf(page.text)

    # no CSRF token: refused before anything is parsed
    r = await console.post("/console/omadm", data={"dev_id": DEV_ID})
    assert r.status_code == 403
    # bad input comes back in the form with the reason, never a 500
    r = await console.post("/console/omadm", data={"csrf": csrf, "dev_id": "  ", "name": "p1"})
    assert r.status_code == 422, r.text
    assert "enter the device&#39;s DevId" in r.text and 'id="page-error"' in r.text
    assert 'value="p1"' in r.text and 'aria-invalid="true"' in r.text
    r = await console.post("/console/omadm", data={"csrf": csrf, "dev_id": "x", "auth": "krb5"})
    assert r.status_code == 422 and "auth:" in r.text and 'id="omadm-register"' in r.text
    r = await console.post(
        "/console/omadm", data={"csrf": csrf, "dev_id": "x", "notify_url": "ftp://gw/sms"}
    )
    assert r.status_code == 422 and "must start with http" in r.text
    r = await console.post("/console/omadm", data={"csrf": csrf, "dev_id": "x", "group": "nope"})
    assert r.status_code == 404 and "no group named" in r.text and 'value="x"' in r.text
    r = await console.post("/console/omadm", data={"csrf": csrf, "dev_id": "a\x00b"})
    assert r.status_code == 422 and "text/html" in r.headers["content-type"]
    r = await console.post("/console/omadm", data={"csrf": csrf, "dev_id": "x" * 256})
    assert r.status_code == 422 and "text/html" in r.headers["content-type"]
    assert await api.services.omadm.list_accounts() == []

    r, acct = await register(console, csrf, name="phone-1", auth="md5", group="phones")
    assert "Shown once" in r.text and r.headers["cache-control"] == "no-store"
    assert field(r.text, "c-url") == URL
    assert acct["dev_id"] == DEV_ID and acct["auth"] == "md5" and acct["server_id"] == "custos"
    assert len(acct["client_password"]) >= 16 and len(acct["server_password"]) >= 16
    name, bundle = download(r.text, "download-bundle")
    assert name == "IMEI_356938035643809.pem"
    assert bundle.startswith("-----BEGIN PRIVATE KEY-----")
    assert bundle.count("-----BEGIN CERTIFICATE-----") == 2
    ca_name, ca = download(r.text, "download-ca")
    assert ca_name == "custos-ca.pem" and ca == api.services.ca.cert_pem
    device_id = re.search(r'href="/console/devices/([0-9a-f]{32})"', r.text).group(1)  # type: ignore[union-attr]

    # the same DevId again is a conflict, shown on the form
    r = await console.post("/console/omadm", data={"csrf": csrf, "dev_id": DEV_ID})
    assert r.status_code == 409 and "exists" in r.text

    # what the page showed is what the server checks: a DM session with it succeeds
    dm = account_client(api.http, acct, URL)
    replies = await dm.session()
    assert DmClient.header_status(replies[0]).data == "212" and dm.server_auth_ok is True

    # the secrets are nowhere to be read again: not in pages, the database or the audit log
    secrets = (acct["client_password"], acct["server_password"], bundle.split("-----")[2])
    listing = await console.get("/console/omadm")
    device_page = await console.get(f"/console/devices/{device_id}")
    async with api.services.db.read() as s:
        row = await s.scalar(select(OmadmAccount).where(OmadmAccount.device_id == device_id))
    stored = " ".join(str(v) for v in vars(row).values())
    audit = str(await audit_entries(api, "admin"))
    for secret in secrets:
        for where in (listing.text, device_page.text, stored, audit):
            assert secret not in where

    # the list: DevId, auth, and the session just held
    row_html = listing.text.split(f'href="/console/devices/{device_id}"')[1].split("</tr>")[0]
    assert DEV_ID in row_html and "<td>md5</td>" in row_html
    assert "s ago" in row_html  # last session and inventory read
    # the device list shows it beside agents, marked as an OMA DM device
    await api.new_device("laptop-1")
    devices = await console.get("/console/devices")
    phone = devices.text.split(">phone-1</a>")[1].split("</th>")[0]
    assert ">OMA DM</span>" in phone and "omadm/1.2" in phone
    laptop = devices.text.split(">laptop-1</a>")[1].split("</th>")[0]
    assert "OMA DM" not in laptop
    assert "phones" in device_page.text and "Acme" in device_page.text


async def test_node_operations_from_the_device_page(api: Api, console: httpx.AsyncClient) -> None:
    page = await console.get("/console/omadm")
    csrf = page_csrf(page.text)
    _r, acct = await register(console, csrf, name="phone-2")
    device_id = (await api.services.omadm.list_accounts())[0].device_id
    dm = account_client(api.http, acct, URL)
    dm.tree["./Vendor/Acme/Volume"] = "3"
    await dm.session()  # the inventory read is out of the way

    url = f"/console/devices/{device_id}"
    page = await console.get(url)
    assert page.status_code == 200
    section = page.text.split('id="omadm"')[1].split("</section>")[0]
    assert "OMA DM nodes" in section and DEV_ID in section and 'id="omadm-form"' in section
    assert 'id="omadm-notify"' in section and "No node operation yet." in section
    # an OMA DM device cannot run commands: the exec form is not offered
    assert 'id="run-command"' not in page.text
    assert "<dd>OMA DM" in page.text

    # bad input: the form comes back with the reason and what was typed
    ops_url = f"{url}/omadm"
    for form, reason in (
        ({"verb": "Get", "target": "DevInfo/Man"}, "starts with ./"),
        ({"verb": "Get", "target": ""}, "enter the node URI"),
        ({"verb": "Get", "target": "./A", "value": "x"}, "Get takes no value"),
        ({"verb": "Format", "target": "./A"}, "the operation is one of"),
        ({"verb": "Replace", "target": "./A", "format": "jpeg"}, "the format is one of"),
        ({"verb": "Get", "target": "./" + "x" * 300}, "starts with ./"),
        ({"verb": "Get", "target": "./A\x01B"}, "starts with ./"),
    ):
        r = await console.post(ops_url, data={"csrf": csrf, **form})
        assert r.status_code == 422, (form, r.status_code)
        assert reason in html.unescape(r.text), (form, reason)
        assert 'id="page-error"' in r.text and 'id="omadm-form"' in r.text
    r = await console.post(ops_url, data={"csrf": csrf, "verb": "Get", "target": "DevInfo/Man"})
    assert 'value="DevInfo/Man"' in r.text and 'aria-invalid="true"' in r.text
    r = await console.post(ops_url, data={"verb": "Get", "target": "./DevInfo/Man"})
    assert r.status_code == 403  # no CSRF token
    assert await api.services.commands.list_commands(limit=10, offset=0) == []

    r = await console.post(ops_url, data={"csrf": csrf, "verb": "Get", "target": "./DevDetail/SwV"})
    assert r.status_code == 201, r.text[:3000]
    queued = r.text.split('id="omadm-queued"')[1].split("</div>")[0]
    command_id = re.search(r"/console/commands/([0-9a-f]{32})", queued).group(1)  # type: ignore[union-attr]
    assert "Get ./DevDetail/SwV</code> was queued" in queued
    assert "not notified: no notification hook" in queued
    r = await console.post(
        ops_url,
        data={"csrf": csrf, "verb": "Replace", "target": "./Vendor/Acme/Volume", "value": "7",
              "format": "int"},
    )  # fmt: skip
    assert r.status_code == 201
    r = await console.post(ops_url, data={"csrf": csrf, "verb": "Delete", "target": "./Gone"})
    assert r.status_code == 201
    # queued and waiting, listed in the section
    section = r.text.split('id="omadm"')[1].split("</section>")[0]
    assert section.count('class="omadm-run"') == 3 and "waiting" in section

    dm.session_id = "2"
    await dm.session()
    assert dm.tree["./Vendor/Acme/Volume"] == "7"
    page = await console.get(url)
    section = page.text.split('id="omadm"')[1].split("</section>")[0]
    runs = section.split('class="omadm-run"')[1:]
    # newest first: the Delete found nothing, the Replace and the Get succeeded
    assert "badge-failed" in runs[0] and ">404</span>" in runs[0] and "not found" in runs[0]
    assert ">succeeded<" in runs[1] and 'sent</span> <code class="wrap">7</code>' in runs[1]
    assert ">int</span>" in runs[1]
    assert ">succeeded<" in runs[2] and ">200</span>" in runs[2] and ">4.2.1</code>" in runs[2]
    assert f'data-command="{command_id}"' in runs[2]
    # the command page names the node operation
    cmd = await console.get(f"/console/commands/{command_id}")
    assert "Node operations" in cmd.text and "Get ./DevDetail/SwV" in cmd.text
    assert "Get ./DevDetail/SwV: 200 = 4.2.1" in cmd.text
    # the generic command history says which node too
    assert "omadm Get ./DevDetail/SwV" in page.text

    # package #0 without a hook: the reason, not an error page
    r = await console.post(f"{url}/omadm/notify", data={"csrf": csrf})
    assert r.status_code == 200
    assert "Package #0 was not sent: no notification hook" in r.text

    # an agent's device is not an OMA DM device
    agent = await api.new_device("laptop-2")
    r = await console.post(
        f"/console/devices/{agent.device_id}/omadm",
        data={"csrf": csrf, "verb": "Get", "target": "./DevInfo/Man"},
    )
    assert r.status_code == 422 and "is not an OMA DM device" in r.text
    r = await console.post(f"/console/devices/{agent.device_id}/omadm/notify", data={"csrf": csrf})
    assert r.status_code == 422 and "is not an OMA DM device" in r.text
    agent_page = await console.get(f"/console/devices/{agent.device_id}")
    assert 'id="omadm"' not in agent_page.text and 'id="run-command"' in agent_page.text
    r = await console.post(
        "/console/devices/nope/omadm", data={"csrf": csrf, "verb": "Get", "target": "./A"}
    )
    assert r.status_code == 404

    # a retired device takes no more operations
    await api.services.devices.retire(device_id)
    r = await console.post(ops_url, data={"csrf": csrf, "verb": "Get", "target": "./DevInfo/Man"})
    assert r.status_code == 422 and "is retired" in r.text
    assert 'id="omadm-form"' not in r.text

    actions = {(a, res) for a, _t, res in await audit_entries(api, "admin") if "omadm" in a}
    assert any(res == "ok" for _a, res in actions) and any(res == "failed" for _a, res in actions)


async def test_queued_operation_and_button_send_package0_to_the_hook(
    api: Api, console: httpx.AsyncClient
) -> None:
    csrf = page_csrf((await console.get("/console/omadm")).text)
    with Receiver() as gateway:
        _r, acct = await register(console, csrf, name="phone-3", notify_url=gateway.url + "/sms")
        device_id = (await api.services.omadm.list_accounts())[0].device_id
        url = f"/console/devices/{device_id}"
        r = await console.post(
            f"{url}/omadm", data={"csrf": csrf, "verb": "Get", "target": "./DevInfo/Man"}
        )
        assert r.status_code == 201
        assert "The device was notified: package #0 delivered" in r.text
        assert len(gateway.requests) == 1
        assert gateway.requests[0].headers["x-omadm-devid"] == DEV_ID
        r = await console.post(f"{url}/omadm/notify", data={"csrf": csrf})
        assert r.status_code == 200 and "The device was notified (package #0 delivered" in r.text
        assert len(gateway.requests) == 2
        page = await console.get(url)
        section = page.text.split('id="omadm"')[1].split("</section>")[0]
        assert "<dt>Notified</dt><dd><time" in section
        gateway.default.status = 500
        r = await console.post(f"{url}/omadm/notify", data={"csrf": csrf})
        assert r.status_code == 200 and "answered HTTP 500" in r.text and 'role="alert"' in r.text
    dm = account_client(api.http, acct, URL)
    await dm.session()
    page = await console.get(url)
    assert ">Acme</code>" in page.text.split('id="omadm"')[1].split("</section>")[0]


async def test_roles_without_the_permissions(api: Api, console: httpx.AsyncClient) -> None:
    csrf = page_csrf((await console.get("/console/omadm")).text)
    _r, _acct = await register(console, csrf, name="phone-4")
    device_id = (await api.services.omadm.list_accounts())[0].device_id
    url = f"/console/devices/{device_id}"
    op = {"verb": "Get", "target": "./DevInfo/Man"}

    # helpdesk: sees OMA DM devices and may run node operations, may not register
    await new_user(api, "help", "helpdesk-pw-1", ["helpdesk"])
    async with signed_in(api, "help", "helpdesk-pw-1") as http:
        page = await http.get("/console/omadm")
        assert page.status_code == 200 and "phone-4" in page.text
        assert 'id="omadm-register"' not in page.text
        h_csrf = page_csrf(page.text)
        r = await http.post("/console/omadm", data={"csrf": h_csrf, "dev_id": "IMEI:2"})
        assert r.status_code == 403 and "devices.enroll" in r.text
        device_page = await http.get(url)
        assert 'id="omadm-form"' in device_page.text
        r = await http.post(f"{url}/omadm", data={"csrf": h_csrf, **op})
        assert r.status_code == 201
        # but not wipe the phone or touch its DM account: the service's rule, as in the API
        for verb, target, needs in (
            ("Exec", "./LAWMO/Operations/FactoryReset", "devices.wipe"),
            ("Replace", "./DMAcc/srv/AppAuth/s/AAuthSecret", "devices.manage"),
        ):
            r = await http.post(
                f"{url}/omadm",
                data={"csrf": h_csrf, "verb": verb, "target": target, "value": "x"},
            )
            assert r.status_code == 403 and needs in r.text, (target, r.status_code)

    # auditor: reads everything, changes nothing
    await new_user(api, "audi", "auditor-pw-1", ["auditor"])
    async with signed_in(api, "audi", "auditor-pw-1") as http:
        page = await http.get("/console/omadm")
        assert page.status_code == 200 and 'id="omadm-register"' not in page.text
        a_csrf = page_csrf(page.text)
        device_page = await http.get(url)
        section = device_page.text.split('id="omadm"')[1].split("</section>")[0]
        assert 'id="omadm-form"' not in section and 'id="omadm-notify"' not in section
        assert 'class="omadm-run"' in section  # the helpdesk's Get, readable
        for path, body in (
            ("/console/omadm", {"dev_id": "IMEI:3"}),
            (f"{url}/omadm", op),
            (f"{url}/omadm/notify", {}),
        ):
            r = await http.post(path, data={"csrf": a_csrf, **body})
            assert r.status_code == 403, path

    # an operator scoped to one group: registers nothing, reaches only its group's devices
    await group_with(api, "lab", (await api.new_device("lab-1")).device_id)
    r = await api.post(
        "/api/v1/users",
        json={"username": "ops", "password": "operator-pw-1", "roles": ["operator"],
              "groups": ["lab"]},
    )  # fmt: skip
    assert r.status_code == 201, r.text
    async with signed_in(api, "ops", "operator-pw-1") as http:
        page = await http.get("/console/omadm")
        assert page.status_code == 200 and "phone-4" not in page.text
        assert 'id="omadm-register"' not in page.text
        o_csrf = page_csrf(page.text)
        r = await http.post("/console/omadm", data={"csrf": o_csrf, "dev_id": "IMEI:4"})
        assert r.status_code == 403 and "devices.enroll" in r.text
        r = await http.post(f"{url}/omadm", data={"csrf": o_csrf, **op})
        assert r.status_code == 404
        r = await http.post(f"{url}/omadm/notify", data={"csrf": o_csrf})
        assert r.status_code == 404
    assert len(await api.services.omadm.list_accounts()) == 1


async def test_ask_the_devices_user_from_the_device_page(
    api: Api, console: httpx.AsyncClient
) -> None:
    csrf = page_csrf((await console.get("/console/omadm")).text)
    _r, acct = await register(console, csrf, name="phone-5")
    device_id = (await api.services.omadm.list_accounts())[0].device_id
    dm = account_client(api.http, acct, URL)
    await dm.session()
    url = f"/console/devices/{device_id}"
    page = await console.get(url)
    assert 'id="omadm-alert-form"' in page.text

    for form, reason in (
        ({"kind": "shout", "text": "x"}, "the question is one of"),
        ({"kind": "display", "text": "  "}, "enter the text"),
        ({"kind": "single", "text": "Site?", "choices": "Paris\n\n"}, "at least two choices"),
        ({"kind": "confirm", "text": "Sure?", "choices": "a\nb"}, "takes no choices"),
        ({"kind": "input", "text": "Name?", "choices": ("x" * 201 + "\ny")}, "choices"),
    ):
        r = await console.post(f"{url}/omadm/alert", data={"csrf": csrf, **form})
        assert r.status_code == 422, (form, r.status_code)
        assert reason in html.unescape(r.text), (form, html.unescape(r.text)[-3000:])
        # what was typed comes back, with the form open
        assert 'id="omadm-alert" open' in r.text or not form["text"].strip()
    assert await api.services.commands.list_commands(limit=10, offset=0) == []

    r = await console.post(
        f"{url}/omadm/alert",
        data={"csrf": csrf, "kind": "single", "text": "Pick a site",
              "choices": "Paris\n Lyon \n", "default": "1"},
    )  # fmt: skip
    assert r.status_code == 201, r.text[:3000]
    assert "was queued" in r.text.split('id="omadm-queued"')[1]
    dm.user = {"1103": (200, ["2"])}
    dm.session_id = "2"
    await dm.session()
    assert dm.shown[-1] == ["DR=1", "Pick a site", "Paris", "Lyon"]
    page = await console.get(url)
    run = page.text.split('id="omadm"')[1].split('class="omadm-run"')[1]
    assert ">succeeded<" in run and ">Alert<" in run and '<code class="wrap">2</code>' in run
    actions = [a for a, _t, res in await audit_entries(api, "admin") if res == "ok"]
    assert any("omadm" in a for a in actions)

    # the auditor may not ask
    await new_user(api, "audi2", "auditor-pw-1", ["auditor"])
    async with signed_in(api, "audi2", "auditor-pw-1") as http:
        page = await http.get(url)
        assert 'id="omadm-alert-form"' not in page.text
        a_csrf = page_csrf(page.text)
        r = await http.post(
            f"{url}/omadm/alert", data={"csrf": a_csrf, "kind": "display", "text": "hi"}
        )
        assert r.status_code == 403
