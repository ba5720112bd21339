"""The console's pages over HTTP (no browser): sessions, CSRF, permissions, escaping, charts."""

from __future__ import annotations

import html
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
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
