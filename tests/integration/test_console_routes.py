"""The console's pages over HTTP (no browser): sessions, CSRF, permissions, escaping, charts."""

from __future__ import annotations

import html
import re
from typing import Any

import httpx
import pytest

Api = Any
CSRF_INPUT = re.compile(r'name="csrf" value="([^"]+)"')


async def console_login(
    http: httpx.AsyncClient, username: str, password: str, *, expect: int = 303
) -> httpx.Response:
    """Sign in through the login form (its double-submit token included)."""
    page = await http.get("/console/login")
    assert page.status_code == 200, page.text
    token = CSRF_INPUT.search(page.text)
    assert token, "no CSRF field on the login form"
    r = await http.post(
        "/console/login",
        data={"username": username, "password": password, "csrf": token.group(1)},
    )
    assert r.status_code == expect, r.text[:2000]
    return r


def page_csrf(text: str) -> str:
    """The session's CSRF token as a page carries it (body hx-headers)."""
    m = re.search(r"hx-headers='([^']+)'", text)
    assert m, "no hx-headers on <body>"
    return str(html.unescape(m.group(1)).split('"X-CSRF-Token": "')[1].split('"')[0])


@pytest.fixture
async def console(api: Api) -> Any:
    """A second client on the same app, signed in to the console as admin."""
    password = api.services.settings.admin_password.get_secret_value()
    transport = httpx.ASGITransport(app=api.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        await console_login(http, "admin", password)
        yield http


async def test_pages_need_a_session_and_root_redirects(api: Api) -> None:
    r = await api.http.get("/console/devices?q=x")
    assert r.status_code == 303
    assert r.headers["location"] == "/console/login?next=%2Fconsole%2Fdevices%3Fq%3Dx"
    r = await api.http.get("/console/devices", headers={"hx-request": "true"})
    assert r.status_code == 204 and r.headers["hx-redirect"].startswith("/console/login")
    r = await api.http.get("/")
    assert r.status_code == 307 and r.headers["location"] == "/console/"
    login = await api.http.get("/console/login")
    assert login.status_code == 200
    assert "content-security-policy" in login.headers
    assert '<label for="password">Password</label>' in login.text
    # a forged session cookie is a redirect too, never a 500
    api.http.cookies.set("custos_session", "forged", path="/console")
    assert (await api.http.get("/console/")).status_code == 303


async def test_login_errors_and_logout(api: Api) -> None:
    http = api.http
    password = api.services.settings.admin_password.get_secret_value()
    bad = await console_login(http, "admin", "wrong-password", expect=401)
    assert "wrong username or password" in bad.text.lower()
    assert "custos_session" not in http.cookies
    # a login post without the form's token is refused
    r = await http.post("/console/login", data={"username": "admin", "password": password})
    assert r.status_code == 403
    ok = await console_login(http, "admin", password)
    assert ok.headers["location"] == "/console/"
    cookie = ok.headers["set-cookie"]
    assert "custos_session=" in cookie and "HttpOnly" in cookie
    assert "Path=/console" in cookie and "SameSite=lax" in cookie.replace("Lax", "lax")
    dash = await http.get("/console/")
    assert dash.status_code == 200 and "Dashboard" in dash.text
    # an open redirect through ?next= goes to the dashboard instead
    assert (await http.get("/console/login?next=//evil.example/")).status_code == 200
    out = await http.post("/console/logout", data={"csrf": page_csrf(dash.text)})
    assert out.status_code == 303
    assert (await http.get("/console/")).status_code == 303


async def test_csrf_is_required_for_every_post(api: Api, console: httpx.AsyncClient) -> None:
    page = await console.get("/console/tokens")
    assert page.status_code == 200
    csrf = page_csrf(page.text)
    assert (await console.post("/console/tokens", data={"uses": "1"})).status_code == 403
    bad = await console.post("/console/tokens", data={"uses": "1", "csrf": csrf[:-2] + "xx"})
    assert bad.status_code == 403
    cross = await console.post(
        "/console/tokens",
        data={"uses": "1", "csrf": csrf},
        headers={"origin": "https://evil.example"},
    )
    assert cross.status_code == 403
    assert not await api.services.enrollment.list_tokens()
    made = await console.post("/console/tokens", data={"uses": "3", "note": "lab", "csrf": csrf})
    assert made.status_code == 201, made.text
    assert "custos agent enroll http://test --token cet_" in made.text
    assert '<svg role="img" aria-label="QR code' in made.text
    # the header form (htmx) works as well as the field
    (tok,) = await api.services.enrollment.list_tokens()
    r = await console.post(f"/console/tokens/{tok.id}/revoke", headers={"x-csrf-token": csrf})
    assert r.status_code == 303
    assert (await api.services.enrollment.list_tokens())[0].state == "revoked"


async def test_device_names_are_escaped(api: Api, console: httpx.AsyncClient) -> None:
    evil = "<script>alert(1)</script>"
    dev = await api.new_device(evil, facts={"hw.model": '"><img src=x onerror=alert(2)>'})
    listing = await console.get("/console/devices", params={"q": "script"})
    assert listing.status_code == 200
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in listing.text
    assert evil not in listing.text
    detail = await console.get(f"/console/devices/{dev.device_id}")
    assert detail.status_code == 200
    assert evil not in detail.text and "<img src=x" not in detail.text
    dash = await console.get("/console/")
    assert "<img src=x" not in dash.text and evil not in dash.text


async def test_dashboard_charts_and_device_search(api: Api, console: httpx.AsyncClient) -> None:
    await api.new_device("alpha-1", facts={"os.name": "Debian", "hw.model": "X1"})
    await api.new_device("beta-2", facts={"os.name": "Windows", "hw.model": "T14"})
    dash = await console.get("/console/")
    assert dash.status_code == 200
    assert dash.text.count('<svg class="chart-svg" role="img"') >= 4
    assert "Debian: 1 devices" in dash.text  # the chart's <desc> names every value
    found = await console.get(
        "/console/devices",
        params={"q": "alpha"},
        headers={"hx-request": "true", "hx-target": "device-results"},
    )
    assert found.status_code == 200
    assert found.text.lstrip().startswith('<section id="device-results"')
    assert "alpha-1" in found.text and "beta-2" not in found.text
    by_os = await console.get("/console/devices", params={"os": "Windows", "sort": "last_seen"})
    assert "beta-2" in by_os.text and "alpha-1" not in by_os.text
    bad = await console.get("/console/devices", params={"sort": "password"})
    assert bad.status_code == 422 and "text/html" in bad.headers["content-type"]


async def test_command_from_the_console(api: Api, console: httpx.AsyncClient) -> None:
    dev = await api.new_device("cmd-1")
    page = await console.get(f"/console/devices/{dev.device_id}")
    csrf = page_csrf(page.text)
    assert 'action="/console/devices/' in page.text and "Retire device" in page.text
    r = await console.post(
        "/console/commands",
        data={"target": dev.device_id, "kind": "exec", "command": "echo 'a b'", "csrf": csrf},
    )
    assert r.status_code == 303, r.text
    cmd_id = r.headers["location"].rsplit("/", 1)[1]
    shown = await api.services.commands.show(cmd_id)
    assert shown.payload["argv"] == ["echo", "a b"]
    runs = await console.get(f"/console/commands/{cmd_id}/runs")
    assert runs.status_code == 200 and 'hx-trigger="every 2s"' in runs.text
    bad = await console.post(
        "/console/commands",
        data={"target": dev.device_id, "kind": "exec", "command": "echo 'open", "csrf": csrf},
    )
    assert bad.status_code == 422 and "command line" in bad.text


async def test_helpdesk_sees_no_admin_actions(api: Api) -> None:
    r = await api.post(
        "/api/v1/users",
        json={"username": "help", "password": "helpdesk-pw-1", "roles": ["helpdesk"]},
    )
    assert r.status_code == 201, r.text
    dev = await api.new_device("hd-1")
    transport = httpx.ASGITransport(app=api.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        await console_login(http, "help", "helpdesk-pw-1")
        dash = await http.get("/console/")
        assert ">Devices<" in dash.text
        for label in (">Enrolment<", ">Users<", ">Audit log<"):
            assert label not in dash.text
        detail = await http.get(f"/console/devices/{dev.device_id}")
        assert "Retire device" not in detail.text and 'id="run-command"' in detail.text
        csrf = page_csrf(detail.text)
        assert (await http.get("/console/tokens")).status_code == 403
        forced = await http.post("/console/tokens", data={"uses": "1", "csrf": csrf})
        assert forced.status_code == 403 and "devices.enroll" in forced.text
        retire = await http.post(f"/console/devices/{dev.device_id}/retire", data={"csrf": csrf})
        assert retire.status_code == 403
        assert (await api.services.devices.show(dev.device_id)).status == "active"
        assert (await http.post("/console/users", data={"csrf": csrf})).status_code == 403


async def test_operator_scoped_to_a_group_sees_only_its_devices(api: Api) -> None:
    inside = await api.new_device("lyon-1")
    outside = await api.new_device("oslo-1")
    for name, dev in (("lyon", inside), ("oslo", outside)):
        assert (await api.post("/api/v1/groups", json={"name": name})).status_code == 201
        r = await api.post(f"/api/v1/groups/{name}/devices", json={"devices": [dev.device_id]})
        assert r.status_code == 200
    await api.command(f"{inside.device_id},{outside.device_id}", kind="exec", argv=["id"])
    r = await api.post(
        "/api/v1/users",
        json={"username": "op", "password": "operator-pw-1", "roles": ["operator"],
              "groups": ["lyon"]},
    )  # fmt: skip
    assert r.status_code == 201, r.text
    transport = httpx.ASGITransport(app=api.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        await console_login(http, "op", "operator-pw-1")
        listing = await http.get("/console/devices")
        assert "lyon-1" in listing.text and "oslo-1" not in listing.text
        assert (await http.get(f"/console/devices/{inside.device_id}")).status_code == 200
        assert (await http.get(f"/console/devices/{outside.device_id}")).status_code == 404
        page = await http.get("/console/commands")
        csrf = page_csrf(page.text)
        # the shared command is listed with only the run in scope
        assert "id" in page.text
        form = {"kind": "exec", "command": "true", "csrf": csrf}
        r = await http.post("/console/commands", data={"target": outside.device_id, **form})
        assert r.status_code == 404
        r = await http.post("/console/commands", data={"target": "group:oslo", **form})
        assert r.status_code == 404
        r = await http.post("/console/commands", data={"target": "group:lyon", **form})
        assert r.status_code == 303
        shown = await http.get(r.headers["location"])
        assert "lyon-1" in shown.text and "oslo-1" not in shown.text
        r = await http.post(f"/console/devices/{outside.device_id}/retire", data={"csrf": csrf})
        assert r.status_code == 404
    r = await api.get(f"/api/v1/devices/{outside.device_id}")
    assert r.json()["status"] == "active"
