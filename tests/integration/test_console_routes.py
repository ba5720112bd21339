"""The console's pages over HTTP (no browser): sessions, CSRF, permissions, escaping, charts."""

from __future__ import annotations

import hashlib
import html
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pyotp
import pytest
from sqlalchemy import select, update

from custos.accounts.models import RoleGrant, User

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
    assert "No snapshots yet" in dash.text
    assert await api.services.reports.snapshot_fleet(online_within_s=300, period_s=60)
    dash = await console.get("/console/")
    assert "Online and offline, last 7 days" in dash.text and "No snapshots yet" not in dash.text
    assert "Online: from 0 on" in dash.text and "Offline: from 2 on" in dash.text  # never seen
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


# --- account, users and roles pages ---------------------------------------------------------

SECRET_INPUT = re.compile(r'id="totp-secret" class="mono" readonly value="([A-Z2-7]+)"')
TOKEN_INPUT = re.compile(r'id="api-token-secret" class="mono" readonly value="(cst_[^"]+)"')


@asynccontextmanager
async def signed_in(api: Api, username: str, password: str) -> AsyncIterator[httpx.AsyncClient]:
    """Another browser-like client on the app, signed in to the console as `username`."""
    transport = httpx.ASGITransport(app=api.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        await console_login(http, username, password)
        yield http


async def new_user(api: Api, username: str, password: str, roles: list[str]) -> None:
    r = await api.post(
        "/api/v1/users", json={"username": username, "password": password, "roles": roles}
    )
    assert r.status_code == 201, r.text


async def audit_entries(api: Api, actor: str) -> list[tuple[str, str, str]]:
    """(action, target, result) of the actor's audit entries, oldest first."""
    r = await api.get("/api/v1/audit", params={"actor": actor, "limit": 500})
    assert r.status_code == 200, r.text
    return [(e["action"], e["target"], e["result"]) for e in reversed(r.json()["entries"])]


def wrong_code(secret: str) -> str:
    """A 6-digit code that no time step near now accepts."""
    totp = pyotp.TOTP(secret)
    now = time.time()
    near = {totp.at(now + d) for d in (-60, -30, 0, 30, 60)}
    return next(
        c for c in (f"{n:06d}" for n in range(100_000, 1_000_000, 111_111)) if c not in near
    )


async def test_totp_enrolment_through_the_console(api: Api) -> None:
    await new_user(api, "tara", "tara-password-1", ["operator"])
    async with signed_in(api, "tara", "tara-password-1") as http:
        page = await http.get("/console/account")
        assert page.status_code == 200, page.text
        # the account page is reachable from every page's header, and marked as current here
        assert 'href="/console/account" aria-current="page"' in page.text
        assert "Set up two-factor sign-in" in page.text
        csrf = page_csrf(page.text)
        assert (await http.post("/console/account/totp")).status_code == 403  # no CSRF token
        begun = await http.post("/console/account/totp", data={"csrf": csrf})
        assert begun.status_code == 200, begun.text
        m = SECRET_INPUT.search(begun.text)
        assert m, "the page shows no TOTP key"
        secret = m.group(1)
        assert '<svg role="img" aria-label="QR code for your authenticator app"' in begun.text
        assert 'for="totp-code"' in begun.text
        bad = await http.post(
            "/console/account/totp/confirm", data={"code": wrong_code(secret), "csrf": csrf}
        )
        assert bad.status_code == 422 and "wrong TOTP code" in bad.text
        assert not (await api.services.accounts.show_user("tara")).totp
        ok = await http.post(
            "/console/account/totp/confirm",
            data={"code": pyotp.TOTP(secret).now(), "csrf": csrf},
        )
        assert ok.status_code == 303, ok.text
        assert ok.headers["location"] == "/console/account?done=totp"
        after = await http.get(ok.headers["location"])
        assert "Two-factor sign-in is on" in after.text
        assert 'class="badge badge-active">on<' in after.text
        assert (await api.services.accounts.show_user("tara")).totp
        # starting again would switch the running TOTP off: refused
        again = await http.post("/console/account/totp", data={"csrf": csrf})
        assert again.status_code == 409 and "already on" in again.text
        assert (await api.services.accounts.show_user("tara")).totp
    # signing in now needs the code: the login page asks for it
    transport = httpx.ASGITransport(app=api.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        need = await console_login(http, "tara", "tara-password-1", expect=401)
        assert "authenticator app" in need.text
        assert re.search(r'<input id="otp" name="otp"[^>]* required', need.text)
        assert "custos_session" not in http.cookies
        token = CSRF_INPUT.search(need.text)
        assert token
        form = {"username": "tara", "password": "tara-password-1", "csrf": token.group(1)}
        wrong = await http.post("/console/login", data={**form, "otp": wrong_code(secret)})
        assert wrong.status_code == 401 and "one-time code was wrong" in wrong.text
        good = await http.post("/console/login", data={**form, "otp": pyotp.TOTP(secret).now()})
        assert good.status_code == 303, good.text
        assert (await http.get("/console/account")).status_code == 200
    actions = [(a, r) for a, _t, r in await audit_entries(api, "tara")]
    assert ("auth.totp_begin", "ok") in actions
    assert ("auth.totp_confirm", "failed") in actions
    assert ("auth.totp_confirm", "ok") in actions
    assert ("auth.totp_begin", "failed") in actions  # the refused second start


async def test_own_password_change(api: Api) -> None:
    await new_user(api, "pat", "pat-password-1", ["helpdesk"])
    async with signed_in(api, "pat", "pat-password-1") as http:
        page = await http.get("/console/account")
        assert '<label for="pw-current">Current password</label>' in page.text
        csrf = page_csrf(page.text)
        url = "/console/account/password"
        form = {"current": "pat-password-1", "new": "pat-password-2", "confirm": "pat-password-2"}
        r = await http.post(url, data={**form, "current": "not-it-at-all", "csrf": csrf})
        assert r.status_code == 422 and "current password is wrong" in r.text
        assert 'role="alert"' in r.text and "Change password" in r.text  # still the form
        r = await http.post(url, data={**form, "confirm": "pat-password-3", "csrf": csrf})
        assert r.status_code == 422 and "confirmation differ" in r.text
        r = await http.post(url, data={**form, "new": "short", "confirm": "short", "csrf": csrf})
        assert r.status_code == 422 and "at least 8 characters" in r.text
        r = await http.post(url, data={**form, "csrf": csrf})
        assert r.status_code == 303 and r.headers["location"] == "/console/account?done=password"
        assert "Your password was changed" in (await http.get(r.headers["location"])).text
        # this browser's session goes on
        assert (await http.get("/console/account")).status_code == 200
    transport = httpx.ASGITransport(app=api.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        await console_login(http, "pat", "pat-password-1", expect=401)
        await console_login(http, "pat", "pat-password-2")
    results = [r for a, _t, r in await audit_entries(api, "pat") if a == "auth.change_password"]
    assert results == ["failed", "failed", "failed", "ok"]


async def test_own_api_tokens(api: Api) -> None:
    await new_user(api, "tom", "tom-password-1", ["auditor"])
    async with signed_in(api, "tom", "tom-password-1") as http:
        page = await http.get("/console/account")
        assert "You have no API tokens" in page.text
        csrf = page_csrf(page.text)
        made = await http.post(
            "/console/account/tokens", data={"name": "nightly export", "days": "30", "csrf": csrf}
        )
        assert made.status_code == 201, made.text
        m = TOKEN_INPUT.search(made.text)
        assert m, "the new token is not on the page"
        secret = m.group(1)
        assert 'data-copy="api-token-secret"' in made.text
        me = await api.http.get("/api/v1/auth/me", headers={"authorization": f"Bearer {secret}"})
        assert me.status_code == 200 and me.json()["username"] == "tom"
        (tok,) = await api.services.accounts.list_tokens("tom")
        listing = await http.get("/console/account")
        assert "nightly export" in listing.text and f"{tok.prefix}…" in listing.text
        assert secret not in listing.text  # shown once only
        bad = await http.post(
            "/console/account/tokens", data={"name": "x", "days": "0", "csrf": csrf}
        )
        assert bad.status_code == 422 and "1 to 3650 days" in bad.text
        # somebody else's token is not reachable from one's own account page
        (admin_tok, *_) = await api.services.accounts.list_tokens("admin")
        r = await http.post(f"/console/account/tokens/{admin_tok.id}/revoke", data={"csrf": csrf})
        assert r.status_code == 404
        assert (await api.get("/api/v1/auth/me")).status_code == 200
        r = await http.post(f"/console/account/tokens/{tok.id}/revoke", data={"csrf": csrf})
        assert r.status_code == 303, r.text
        assert r.headers["location"] == "/console/account?done=token_revoked"
        me = await api.http.get("/api/v1/auth/me", headers={"authorization": f"Bearer {secret}"})
        assert me.status_code == 401
    entries = await audit_entries(api, "tom")
    assert ("api_token.create", "", "ok") in entries
    assert ("api_token.revoke", f"api_token:{tok.id}", "ok") in entries
    assert ("api_token.revoke", f"api_token:{admin_tok.id}", "failed") in entries


async def test_grant_revoke_and_resets_on_a_user_page(api: Api, console: httpx.AsyncClient) -> None:
    assert (await api.post("/api/v1/groups", json={"name": "lyon"})).status_code == 201
    await new_user(api, "gina", "gina-password-1", ["helpdesk"])
    listing = await console.get("/console/users")
    assert 'href="/console/users/gina"' in listing.text
    page = await console.get("/console/users/gina")
    assert page.status_code == 200, page.text
    assert '<label for="g-role">Role</label>' in page.text and 'value="lyon"' in page.text
    csrf = page_csrf(page.text)
    r = await console.post(
        "/console/users/gina/grants", data={"role": "operator", "groups": ["lyon"], "csrf": csrf}
    )
    assert r.status_code == 303 and r.headers["location"] == "/console/users/gina?done=granted"
    gina = await api.services.accounts.show_user("gina")
    grant = next(g for g in gina.grants if g.role == "operator")
    assert grant.groups == ["lyon"]
    shown = await console.get(r.headers["location"])
    assert "The role was granted." in shown.text and "on lyon" in shown.text
    assert f'action="/console/users/gina/grants/{grant.id}/revoke"' in shown.text
    # the service's refusals come back as the page with the reason, never a 500
    r = await console.post("/console/users/gina/grants", data={"role": "pilot", "csrf": csrf})
    assert r.status_code == 404 and "no role" in r.text and "Grant a role" in r.text
    r = await console.post(
        "/console/users/gina/grants", data={"role": "operator", "groups": ["oslo"], "csrf": csrf}
    )
    assert r.status_code == 404 and "no group(s): oslo" in r.text
    r = await console.post(f"/console/users/gina/grants/{grant.id}/revoke", data={"csrf": csrf})
    assert r.status_code == 303, r.text
    assert [g.role for g in (await api.services.accounts.show_user("gina")).grants] == ["helpdesk"]
    r = await console.post(f"/console/users/gina/grants/{grant.id}/revoke", data={"csrf": csrf})
    assert r.status_code == 404
    # reset password: the admin sets a new one
    url = "/console/users/gina/password"
    r = await console.post(url, data={"password": "weak", "confirm": "weak", "csrf": csrf})
    assert r.status_code == 422 and "at least 8 characters" in r.text
    r = await console.post(url, data={"password": "gina-new-pw-1", "confirm": "x", "csrf": csrf})
    assert r.status_code == 422 and "confirmation differ" in r.text
    new = {"password": "gina-new-pw-1", "confirm": "gina-new-pw-1", "csrf": csrf}
    r = await console.post(url, data=new)
    assert r.status_code == 303 and r.headers["location"].endswith("done=password_set")
    async with signed_in(api, "gina", "gina-new-pw-1") as http:
        assert (await http.get("/console/account")).status_code == 200
    # reset TOTP: gina turned it on (through the service), the admin turns it off
    who = await api.services.accounts.principal_for("gina")
    secret, _uri = await api.services.accounts.totp_begin(who)
    await api.services.accounts.totp_confirm(who, pyotp.TOTP(secret).now())
    page = await console.get("/console/users/gina")
    assert "Turn off two-factor sign-in" in page.text
    r = await console.post("/console/users/gina/totp/reset", data={"csrf": csrf})
    assert r.status_code == 303 and r.headers["location"].endswith("done=totp_reset")
    assert not (await api.services.accounts.show_user("gina")).totp
    entries = await audit_entries(api, "admin")
    assert ("user.grant", "user:gina", "ok") in entries
    assert ("user.grant", "user:gina", "failed") in entries
    assert ("user.revoke_grant", f"user:gina grant:{grant.id}", "ok") in entries
    assert ("user.set_password", "user:gina", "ok") in entries
    assert ("user.reset_totp", "user:gina", "ok") in entries


async def test_directory_grants_are_read_only(api: Api, console: httpx.AsyncClient) -> None:
    await new_user(api, "dora", "dora-password-1", ["helpdesk"])
    # as the LDAP sync leaves it: a directory user whose grant comes from its groups
    async with api.services.db.transaction() as uow:
        await uow.session.execute(
            update(User).where(User.username == "dora").values(source="ldap", password_hash="")
        )
        dora = select(User.id).where(User.username == "dora").scalar_subquery()
        await uow.session.execute(
            update(RoleGrant).where(RoleGrant.user_id == dora).values(source="ldap")
        )
    (grant,) = (await api.services.accounts.show_user("dora")).grants
    page = await console.get("/console/users/dora")
    assert '<span class="badge badge-ldap">ldap</span>' in page.text
    assert "/revoke" not in page.text and "Set a new password" not in page.text
    assert "Turn off two-factor" not in page.text
    csrf = page_csrf(page.text)
    r = await console.post(f"/console/users/dora/grants/{grant.id}/revoke", data={"csrf": csrf})
    assert r.status_code == 409 and "comes from the directory" in r.text
    pw = {"password": "dora-new-pw-1", "confirm": "dora-new-pw-1", "csrf": csrf}
    r = await console.post("/console/users/dora/password", data=pw)
    assert r.status_code == 409 and "through the directory" in r.text
    r = await console.post("/console/users/dora/totp/reset", data={"csrf": csrf})
    assert r.status_code == 409
    # a local grant can still be added to a directory user, and taken away again
    r = await console.post("/console/users/dora/grants", data={"role": "auditor", "csrf": csrf})
    assert r.status_code == 303
    assert len((await api.services.accounts.show_user("dora")).grants) == 2


async def test_last_admin_cannot_lose_the_role(api: Api, console: httpx.AsyncClient) -> None:
    admin = await api.services.accounts.show_user("admin")
    (grant,) = admin.grants
    page = await console.get("/console/users/admin")
    csrf = page_csrf(page.text)
    r = await console.post(f"/console/users/admin/grants/{grant.id}/revoke", data={"csrf": csrf})
    assert r.status_code == 409, r.text
    assert "text/html" in r.headers["content-type"]
    assert "no active administrator" in r.text and 'role="alert"' in r.text
    assert (await api.services.accounts.show_user("admin")).grants == [grant]
    entries = await audit_entries(api, "admin")
    assert ("user.revoke_grant", f"user:admin grant:{grant.id}", "failed") in entries


async def test_custom_roles(api: Api, console: httpx.AsyncClient) -> None:
    page = await console.get("/console/users")
    csrf = page_csrf(page.text)
    # every permission is offered with its description; the scopable ones are marked
    assert 'value="devices.view"' in page.text and "see devices, their inventory" in page.text
    devices_row = page.text.split('value="devices.view"')[1].split("</li>")[0]
    users_row = page.text.split('value="users.manage"')[1].split("</li>")[0]
    assert "scopable" in devices_row and "scopable" not in users_row
    form = {"name": "lyon-viewer", "description": "looks at Lyon", "csrf": csrf}
    r = await console.post(
        "/console/roles", data={**form, "permissions": ["devices.view", "devices.fly"]}
    )
    assert r.status_code == 422 and "unknown permission(s): devices.fly" in r.text
    assert 'value="lyon-viewer"' in r.text  # the form comes back filled in
    assert re.search(r'value="devices.view" checked', r.text)
    r = await console.post("/console/roles", data=form)
    assert r.status_code == 422 and "at least one permission" in r.text
    perms = ["devices.view", "reports.view"]
    r = await console.post("/console/roles", data={**form, "permissions": perms})
    assert r.status_code == 303 and r.headers["location"] == "/console/users?done=role_created"
    roles = {x.name: x for x in await api.services.accounts.list_roles()}
    assert roles["lyon-viewer"].permissions == perms and not roles["lyon-viewer"].builtin
    r = await console.post("/console/roles", data={**form, "permissions": perms})
    assert r.status_code == 409 and "exists" in r.text
    shown = await console.get("/console/users")
    assert 'action="/console/roles/lyon-viewer/delete"' in shown.text
    assert 'action="/console/roles/admin/delete"' not in shown.text
    r = await console.post("/console/roles/admin/delete", data={"csrf": csrf})
    assert r.status_code == 409 and "built-in role" in r.text
    r = await console.post("/console/roles/lyon-viewer/delete", data={"csrf": csrf})
    assert r.status_code == 303 and r.headers["location"].endswith("done=role_deleted")
    assert "lyon-viewer" not in {x.name for x in await api.services.accounts.list_roles()}
    entries = await audit_entries(api, "admin")
    assert ("role.create", "", "ok") in entries and ("role.create", "", "failed") in entries
    assert ("role.delete", "role:lyon-viewer", "ok") in entries
    assert ("role.delete", "role:admin", "failed") in entries


async def test_helpdesk_cannot_post_to_the_users_pages(api: Api) -> None:
    await new_user(api, "hal", "hal-password-1", ["helpdesk"])
    admin_grant = (await api.services.accounts.show_user("admin")).grants[0]
    async with signed_in(api, "hal", "hal-password-1") as http:
        page = await http.get("/console/account")  # every user has an account page
        assert page.status_code == 200
        csrf = page_csrf(page.text)
        assert (await http.get("/console/users/admin")).status_code == 403
        posts: dict[str, dict[str, Any]] = {
            "/console/users": {"username": "x", "password": "x-password-1", "roles": "admin"},
            "/console/users/admin/grants": {"role": "helpdesk"},
            "/console/users/hal/grants": {"role": "admin"},
            f"/console/users/admin/grants/{admin_grant.id}/revoke": {},
            "/console/users/admin/password": {"password": "p" * 12, "confirm": "p" * 12},
            "/console/users/admin/totp/reset": {},
            "/console/users/admin/disable": {},
            "/console/roles": {"name": "mine", "permissions": "users.manage"},
            "/console/roles/helpdesk/delete": {},
        }
        for url, body in posts.items():
            r = await http.post(url, data={**body, "csrf": csrf})
            assert r.status_code == 403, (url, r.status_code)
            assert "users.manage" in r.text
    hal = await api.services.accounts.show_user("hal")
    assert [g.role for g in hal.grants] == ["helpdesk"]
    assert "mine" not in {x.name for x in await api.services.accounts.list_roles()}
    assert (await api.services.accounts.show_user("admin")).grants == [admin_grant]
    denied = {a for a, _t, r in await audit_entries(api, "hal") if r == "denied"}
    assert {
        "user.create", "user.grant", "user.revoke_grant", "user.set_password",
        "user.reset_totp", "user.disable", "role.create", "role.delete",
    } <= denied  # fmt: skip


async def test_own_password_change_keeps_only_this_session(api: Api) -> None:
    r = await api.post(
        "/api/v1/users", json={"username": "pw", "password": "first-pass-1", "roles": ["auditor"]}
    )
    assert r.status_code == 201
    transport = httpx.ASGITransport(app=api.app)
    async with (
        httpx.AsyncClient(transport=transport, base_url="http://test") as a,
        httpx.AsyncClient(transport=transport, base_url="http://test") as b,
    ):
        await console_login(a, "pw", "first-pass-1")
        await console_login(b, "pw", "first-pass-1")
        page = await a.get("/console/account")
        r = await a.post(
            "/console/account/password",
            data={
                "current": "first-pass-1",
                "new": "second-pass-2",
                "confirm": "second-pass-2",
                "csrf": page_csrf(page.text),
            },
        )
        assert r.status_code == 303, r.text[:500]
        assert (await a.get("/console/account")).status_code == 200  # still signed in
        assert (await b.get("/console/account")).status_code == 303  # the other browser is out


# --- software pages: upload, packages, deployments ------------------------------------------

UPLOAD = "/console/software/upload"


async def console_upload(
    http: httpx.AsyncClient, csrf: str, filename: str, body: bytes, **params: str
) -> httpx.Response:
    """Post a file as the software page's script does: raw body, CSRF header, HX-Request."""
    return await http.post(
        UPLOAD,
        params={"filename": filename, **params},
        content=body,
        headers={
            "x-csrf-token": csrf,
            "content-type": "application/octet-stream",
            "hx-request": "true",
        },
    )


def stored_files(data_dir: Path) -> set[Path]:
    """Files under the upload temp directory and the artifact store."""
    out: set[Path] = set()
    for sub in ("tmp", "artifacts"):
        root = Path(data_dir) / sub
        if root.exists():
            out.update(p for p in root.rglob("*") if p.is_file())
    return out


async def packages_of(api: Api) -> list[Any]:
    return list(await api.services.software.list_packages(name=None, limit=100, offset=0))


async def software_csrf(http: httpx.AsyncClient) -> tuple[str, str]:
    """The software page's text and the session's CSRF token."""
    page = await http.get("/console/software")
    assert page.status_code == 200, page.text[:2000]
    return page.text, page_csrf(page.text)


async def test_upload_a_package_from_the_console(
    api: Api, console: httpx.AsyncClient, tmp_path: Path
) -> None:
    from test_software import cpkg

    text, csrf = await software_csrf(console)
    assert f'data-upload="{UPLOAD}"' in text and "No packages yet" in text
    path = cpkg(tmp_path / "tool-1.0.cpkg", "1.0", tmp_path / "tool.bin", b"payload " * 5000)
    body = path.read_bytes()
    # without the session's token nothing is stored
    r = await console.post(
        UPLOAD,
        params={"filename": path.name},
        content=body,
        headers={"content-type": "application/octet-stream"},
    )
    assert r.status_code == 403 and "CSRF" in r.text
    assert await packages_of(api) == []
    r = await console_upload(console, csrf, path.name, body)
    assert r.status_code == 201, r.text
    (pkg,) = await packages_of(api)
    detail = await api.services.software.show_package(pkg.id)
    assert f'href="/console/software/packages/{pkg.id}"' in r.text and "tool 1.0" in r.text
    assert detail.sha256 == hashlib.sha256(body).hexdigest()
    assert detail.created_by == "admin" and detail.filename == path.name
    listing = await console.get("/console/software")
    assert f'<a href="/console/software/packages/{pkg.id}">tool</a>' in listing.text
    assert "No packages yet" not in listing.text
    # the deploy form offers the new package
    assert f'<option value="{pkg.id}">tool 1.0</option>' in listing.text
    shown = await console.get(f"/console/software/packages/{pkg.id}")
    assert shown.status_code == 200, shown.text[:2000]
    assert "<h1>tool <span" in shown.text
    assert detail.sha256 in shown.text
    assert detail.signature and detail.signature in shown.text
    assert "version_file" in html.unescape(shown.text)  # the detection rule
    # NAME==VERSION and NAME reach the same page; a missing one is a 404 page
    by_name = await console.get("/console/software/packages/tool==1.0")
    assert by_name.status_code == 200 and detail.sha256 in by_name.text
    gone = await console.get("/console/software/packages/nothing==1")
    assert gone.status_code == 404 and "Not found" in gone.text
    # the same name and version again: a message for the page, not a second package
    again = await console_upload(console, csrf, path.name, body)
    assert again.status_code == 409, again.text
    assert 'role="alert"' in again.text and "tool 1.0 exists" in again.text
    assert "<html" not in again.text  # a fragment for the page's message area
    assert len(await packages_of(api)) == 1
    # a plain file carries no name or version: the form's optional fields give them
    extra = {"name": "motd", "version": "2", "destination": "/etc/motd"}
    r = await console_upload(console, csrf, "motd.txt", b"welcome\n", **extra)
    assert r.status_code == 201, r.text
    motd = await api.services.software.show_package("motd==2")
    assert motd.format == "file" and motd.descriptor["destination"] == "/etc/motd"
    uploads = [(t, r) for a, t, r in await audit_entries(api, "admin") if a == "package.upload"]
    assert uploads == [("", "denied"), ("", "ok"), ("", "failed"), ("", "ok")]


async def test_bad_uploads_are_clear_refusals_that_leave_nothing(
    api: Api, console: httpx.AsyncClient
) -> None:
    _text, csrf = await software_csrf(console)
    data_dir = api.services.settings.data_dir
    before = stored_files(data_dir)
    cases: list[tuple[str, bytes, dict[str, str], int, str]] = [
        ("junk.cpkg", b"\x00not a tar archive\xff" * 300, {}, 422, "cpkg"),
        ("empty.cpkg", b"", {}, 422, "empty"),
        ("notes.txt", b"just some text\n" * 100, {}, 422, "give one"),
        ("setup.msi", b"MZ not an msi" * 100, {}, 422, "not an msi"),
        ("..", b"x" * 100, {}, 422, "file name"),
        ("tool.cpkg", b"x" * 100, {"name": "bad name!"}, 422, "name"),
    ]
    for filename, body, params, status, reason in cases:
        r = await console_upload(console, csrf, filename, body, **params)
        assert r.status_code == status, (filename, r.status_code, r.text[:500])
        assert "text/html" in r.headers["content-type"], filename
        assert 'role="alert"' in r.text and reason in html.unescape(r.text), (filename, r.text)
    # without the script (no HX-Request) the refusal is a whole page
    r = await console.post(
        UPLOAD,
        params={"filename": "junk.cpkg"},
        content=b"\x00" * 1000,
        headers={"x-csrf-token": csrf, "content-type": "application/octet-stream"},
    )
    assert r.status_code == 422 and "<h1>Something went wrong</h1>" in r.text
    # a missing file name is a validation message, not a 500
    r = await console.post(
        UPLOAD, content=b"x", headers={"x-csrf-token": csrf, "hx-request": "true"}
    )
    assert r.status_code == 422 and "filename" in r.text
    assert await packages_of(api) == []
    assert stored_files(data_dir) == before
    results = [r for a, _t, r in await audit_entries(api, "admin") if a == "package.upload"]
    assert results == ["failed"] * (len(cases) + 2)


async def test_oversized_upload_is_refused_before_anything_is_stored(
    settings: Any, tmp_path: Path
) -> None:
    from custos.server.app import create_app

    limit = 64 * 1024
    app = create_app(settings.model_copy(update={"max_package_bytes": limit}))
    password = settings.admin_password.get_secret_value()
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            await console_login(http, "admin", password)
            page = await http.get("/console/software")
            # the page tells its script the limit, so a browser refuses before sending
            assert f'data-max-bytes="{limit}"' in page.text
            csrf = page_csrf(page.text)
            before = stored_files(settings.data_dir)
            big = b"y" * (limit + 1)
            r = await console_upload(http, csrf, "big.cpkg", big)
            assert r.status_code == 413, r.text
            assert str(limit) in r.text

            async def chunks() -> AsyncIterator[bytes]:
                for _ in range(4):
                    yield b"z" * (limit // 2)

            # a body without a length is cut off as soon as it passes the limit
            r = await http.post(
                UPLOAD,
                params={"filename": "big.cpkg"},
                content=chunks(),
                headers={"x-csrf-token": csrf, "content-type": "application/octet-stream"},
            )
            assert r.status_code == 413, r.text
            assert stored_files(settings.data_dir) == before
            assert (
                await app.state.services.software.list_packages(name=None, limit=10, offset=0) == []
            )
            # the cut-off upload is in the audit log as a refused request, not a server error
            page = await app.state.services.audit.query(action_prefix="package.upload", limit=5)
            results = [(e.result, e.status) for e in page.entries]
            assert results and results[0] == ("failed", 413)


async def make_group(api: Api, name: str, devices: list[Any]) -> None:
    assert (await api.post("/api/v1/groups", json={"name": name})).status_code == 201
    r = await api.post(
        f"/api/v1/groups/{name}/devices", json={"devices": [d.device_id for d in devices]}
    )
    assert r.status_code == 200, r.text


async def report_state(dev: Any, dep: Any, state: str, progress: int = 0) -> None:
    """The device tells the server how far it got (the device protocol's status call)."""
    from custos import protocol
    from custos.agent.client import encode_json

    body = {
        "deployment_id": dep.id,
        "package_id": dep.package_id,
        "state": state,
        "progress": progress,
        "detail": f"{state} <b>{progress}%</b>",
    }
    await dev.request("POST", protocol.DEVICE_API + "/software/status", body=encode_json(body))


async def test_deploy_to_a_group_from_the_console_and_watch_it_finish(
    api: Api, console: httpx.AsyncClient, tmp_path: Path
) -> None:
    from test_software import cpkg, manager, take_software

    lab = [await api.new_device("lab-1"), await api.new_device("lab-2")]
    await api.new_device("elsewhere")
    await make_group(api, "lab", lab)
    text, csrf = await software_csrf(console)
    assert "No packages yet" in text and 'id="dep-package"' not in text
    path = cpkg(tmp_path / "tool-1.0.cpkg", "1.0", tmp_path / "installed.bin", b"t" * 20_000)
    assert (await console_upload(console, csrf, path.name, path.read_bytes())).status_code == 201
    (pkg,) = await packages_of(api)
    text, _ = await software_csrf(console)
    assert '<input type="checkbox" name="groups" value="lab">' in text
    form = {"package": pkg.id, "devices": "", "action": "install", "mode": "required"}
    # refusals come back as pages with the reason, never a 500
    for extra, status, reason in (
        ({"waves": "100"}, 422, "at least one device, group or label"),
        ({"groups": "lab", "waves": "ten"}, 422, "waves are percentages"),
        ({"groups": "lab", "waves": "50, 20"}, 422, "rise strictly"),
        ({"groups": "nowhere", "waves": "100"}, 404, "no group named"),
        ({"groups": "lab", "waves": "100", "action": "reboot"}, 422, "action"),
    ):
        r = await console.post(
            "/console/software/deployments", data={**form, **extra, "csrf": csrf}
        )
        assert r.status_code == status, (extra, r.text[:1000])
        assert reason in html.unescape(r.text), (extra, r.text[:3000])
    assert await api.services.software.list_deployments(limit=10, offset=0) == []
    r = await console.post(
        "/console/software/deployments",
        data={**form, "groups": "lab", "waves": "100", "csrf": csrf},
    )
    assert r.status_code == 303, r.text[:2000]
    dep_id = r.headers["location"].rsplit("/", 1)[1]
    assert r.headers["location"] == f"/console/software/deployments/{dep_id}"
    dep = await api.services.software.show_deployment(dep_id)
    assert dep.targets["groups"] == ["lab"] and dep.created_by == "admin"
    assert sorted(d.hostname for d in dep.devices) == ["lab-1", "lab-2"]
    assert {d.state for d in dep.devices} == {"queued"}  # the first wave was sent at once
    page = await console.get(r.headers["location"])
    assert page.status_code == 200, page.text[:2000]
    assert "Deployment tool-1.0-install" in page.text and "groups: lab" in page.text
    assert 'hx-trigger="every 2s"' in page.text and "elsewhere" not in page.text
    assert page.text.count('<span class="badge badge-queued">queued</span>') == 2
    url = f"/console/software/deployments/{dep_id}/progress"
    frag = await console.get(url, headers={"hx-request": "true"})
    assert frag.status_code == 200
    assert frag.text.startswith('<section id="progress"') and "<html" not in frag.text
    assert 'hx-trigger="every 2s"' in frag.text and "0 of 2 devices finished" in frag.text

    # the devices' real agent code installs the package, one device after the other
    await take_software(api, lab[0], manager(lab[0], tmp_path))
    frag = await console.get(url, headers={"hx-request": "true"})
    assert "1 of 2 devices finished" in frag.text and 'hx-trigger="every 2s"' in frag.text
    row = frag.text.split(">lab-1</a>")[1].split("</tr>")[0]
    assert '<span class="badge badge-installed">installed</span>' in row and "100%" in row
    row = frag.text.split(">lab-2</a>")[1].split("</tr>")[0]
    assert '<span class="badge badge-queued">queued</span>' in row
    await take_software(api, lab[1], manager(lab[1], tmp_path))
    frag = await console.get(url, headers={"hx-request": "true"})
    assert "2 of 2 devices finished" in frag.text
    assert "hx-trigger" not in frag.text and 'aria-busy="false"' in frag.text
    assert frag.text.count('<span class="badge badge-installed">installed</span>') == 2
    page = await console.get(f"/console/software/deployments/{dep_id}")
    assert "hx-trigger" not in page.text.split('<section id="progress"')[1]
    listing = await console.get("/console/software")
    assert (
        "2/2" in listing.text and f'href="/console/software/deployments/{dep_id}"' in listing.text
    )
    results = [r for a, _t, r in await audit_entries(api, "admin") if a == "deployment.create"]
    assert results == ["failed"] * 5 + ["ok"]


async def test_pause_resume_and_abort_from_the_console(
    api: Api, console: httpx.AsyncClient, tmp_path: Path
) -> None:
    from test_software import cpkg, upload

    devs = [await api.new_device(f"wave-{i}") for i in range(4)]
    await make_group(api, "waves", devs)
    await upload(api, cpkg(tmp_path / "tool.cpkg", "1.0", tmp_path / "t.bin", b"w" * 1000))
    _text, csrf = await software_csrf(console)
    r = await console.post(
        "/console/software/deployments",
        data={"package": "tool", "groups": "waves", "waves": "25, 100", "csrf": csrf},
    )
    assert r.status_code == 303, r.text[:2000]
    dep_url = r.headers["location"]
    dep_id = dep_url.rsplit("/", 1)[1]
    dep = await api.services.software.show_deployment(dep_id)
    assert sorted(d.state for d in dep.devices) == ["pending", "pending", "pending", "queued"]
    first = next(
        d for d in devs if d.device_id in {x.device_id for x in dep.devices if x.state == "queued"}
    )
    page = await console.get(dep_url)
    assert (
        f'action="{dep_url}/pause"' in page.text and f'action="{dep_url}/resume"' not in page.text
    )

    r = await console.post(f"{dep_url}/pause", data={"csrf": csrf})
    assert r.status_code == 303 and r.headers["location"] == dep_url
    assert (await api.services.software.show_deployment(dep_id)).state == "paused"
    page = await console.get(dep_url)
    assert (
        f'action="{dep_url}/resume"' in page.text and f'action="{dep_url}/pause"' not in page.text
    )
    assert "paused by an administrator" in page.text
    # paused, the device already sent the package goes on; its page keeps up with it
    await report_state(first, dep, "downloading", 40)
    frag = await console.get(f"{dep_url}/progress", headers={"hx-request": "true"})
    assert 'hx-trigger="every 2s"' in frag.text, frag.text
    assert '<span class="badge badge-downloading">downloading</span>' in frag.text
    assert "40%" in frag.text and "downloading &lt;b&gt;40%&lt;/b&gt;" in frag.text

    r = await console.post(f"{dep_url}/resume", data={"csrf": csrf})
    assert r.status_code == 303
    assert (await api.services.software.show_deployment(dep_id)).state == "active"
    r = await console.post(f"{dep_url}/abort", data={"csrf": csrf})
    assert r.status_code == 303
    dep = await api.services.software.show_deployment(dep_id)
    assert dep.state == "aborted"
    assert sorted(d.state for d in dep.devices) == ["cancelled"] * 3 + ["downloading"]
    page = await console.get(dep_url)
    assert "aborted by an administrator" in page.text and f'action="{dep_url}/' not in page.text
    assert 'hx-trigger="every 2s"' in page.text  # the one device still downloading
    await report_state(first, dep, "failed")
    frag = await console.get(f"{dep_url}/progress", headers={"hx-request": "true"})
    assert "hx-trigger" not in frag.text and "4 of 4 devices finished" in frag.text
    # an aborted deployment stays aborted; unknown actions are not found
    r = await console.post(f"{dep_url}/resume", data={"csrf": csrf})
    assert r.status_code == 409 and "aborted" in r.text
    r = await console.post(f"{dep_url}/explode", data={"csrf": csrf})
    assert r.status_code == 404
    assert (await api.services.software.show_deployment(dep_id)).state == "aborted"
    target = f"deployment:{dep_id}"
    entries = [(a, t, r) for a, t, r in await audit_entries(api, "admin") if t == target]
    assert entries == [
        ("deployment.pause", target, "ok"),
        ("deployment.resume", target, "ok"),
        ("deployment.abort", target, "ok"),
        ("deployment.resume", target, "failed"),
        ("deployment.change", target, "failed"),
    ]


async def test_helpdesk_cannot_upload_or_deploy(api: Api, tmp_path: Path) -> None:
    from test_software import cpkg, upload

    dev = await api.new_device("hd-sw-1")
    await make_group(api, "desk", [dev])
    path = cpkg(tmp_path / "tool.cpkg", "1.0", tmp_path / "t.bin", b"h" * 1000)
    await upload(api, path)
    r = await api.post(
        "/api/v1/deployments", json={"package": "tool", "targets": {"groups": ["desk"]}}
    )
    assert r.status_code == 201, r.text
    dep_id = r.json()["id"]
    await new_user(api, "hdsw", "hdsw-password-1", ["helpdesk"])
    other = cpkg(tmp_path / "tool-2.cpkg", "2.0", tmp_path / "t.bin", b"h" * 1000)
    async with signed_in(api, "hdsw", "hdsw-password-1") as http:
        text, csrf = await software_csrf(http)
        # the pages are there to look at, without the forms
        assert "tool" in text and "data-upload" not in text and 'id="dep-package"' not in text
        page = await http.get(f"/console/software/deployments/{dep_id}")
        assert page.status_code == 200 and "/pause" not in page.text and "/abort" not in page.text
        r = await console_upload(http, csrf, other.name, other.read_bytes())
        assert r.status_code == 403 and "software.manage" in r.text
        r = await http.post(
            "/console/software/deployments",
            data={"package": "tool", "groups": "desk", "csrf": csrf},
        )
        assert r.status_code == 403 and "software.deploy" in r.text
        for act in ("pause", "abort"):
            r = await http.post(
                f"/console/software/deployments/{dep_id}/{act}", data={"csrf": csrf}
            )
            assert r.status_code == 403 and "software.deploy" in r.text
    assert [p.version for p in await packages_of(api)] == ["1.0"]
    deps = await api.services.software.list_deployments(limit=10, offset=0)
    assert [(d.id, d.state) for d in deps] == [(dep_id, "active")]
    denied = [(a, r) for a, _t, r in await audit_entries(api, "hdsw")]
    assert denied == [
        ("package.upload", "denied"),
        ("deployment.create", "denied"),
        ("deployment.pause", "denied"),
        ("deployment.abort", "denied"),
    ]
