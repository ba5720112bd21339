"""Users, roles, scopes, API tokens, lockout and TOTP through the real admin API."""

from __future__ import annotations

from typing import Any

import httpx
import pyotp
import pytest

PW = "correct-horse-9"


async def login(api: Any, username: str, password: str = PW, **extra: Any) -> httpx.Response:
    return await api.http.post(
        "/api/v1/auth/login", json={"username": username, "password": password, **extra}
    )


async def user_client(api: Any, username: str, roles: list[str], **body: Any) -> dict[str, str]:
    """Create a user through the API and return the auth header of a fresh login."""
    r = await api.post(
        "/api/v1/users", json={"username": username, "password": PW, "roles": roles, **body}
    )
    assert r.status_code == 201, r.text
    r = await login(api, username)
    assert r.status_code == 200, r.text
    return {"authorization": f"Bearer {r.json()['token']}"}


async def test_helpdesk_is_refused_admin_actions(api: Any) -> None:
    dev = await api.new_device("desk-1")
    helpdesk = await user_client(api, "hd", ["helpdesk"])
    http = api.http

    # what helpdesk may do
    r = await http.get("/api/v1/devices", headers=helpdesk)
    assert r.status_code == 200 and [d["name"] for d in r.json()] == ["desk-1"]
    r = await http.post(
        "/api/v1/commands",
        json={"target": dev.device_id, "kind": "exec", "argv": ["true"]},
        headers=helpdesk,
    )
    assert r.status_code == 201, r.text

    # what it may not: every refusal is a 403 with the permission named, and nothing changed
    refusals = [
        ("post", "/api/v1/enrollment-tokens", {}),
        ("post", f"/api/v1/devices/{dev.device_id}/retire", None),
        ("post", "/api/v1/groups", {"name": "g1"}),
        ("post", "/api/v1/users", {"username": "x", "password": PW, "roles": ["admin"]}),
        ("post", "/api/v1/roles", {"name": "r", "permissions": ["devices.view"]}),
        ("post", "/api/v1/users/hd/grants", {"role": "admin"}),
        ("get", "/api/v1/users", None),
        ("post", "/api/v1/tasks", {"name": "t", "target": dev.device_id}),
        ("delete", "/api/v1/packages/whatever", None),
    ]
    for method, path, body in refusals:
        kw: dict[str, Any] = {"headers": helpdesk}
        if body is not None:
            kw["json"] = body
        r = await http.request(method.upper(), path, **kw)
        assert r.status_code == 403, (path, r.status_code, r.text)
        assert r.json()["error"] == "forbidden"
        assert "permission" in r.json()["detail"]
    r = await api.get(f"/api/v1/devices/{dev.device_id}")
    assert r.json()["status"] == "active"
    r = await api.get("/api/v1/users/hd")
    assert [g["role"] for g in r.json()["grants"]] == ["helpdesk"]

    me = (await http.get("/api/v1/auth/me", headers=helpdesk)).json()
    assert me["role"] == "helpdesk"
    assert "users.manage" not in me["permissions"] and "commands.run" in me["permissions"]


async def test_operator_scoped_to_a_group_sees_and_acts_only_there(api: Any) -> None:
    inside = await api.new_device("berlin-1")
    outside = await api.new_device("paris-1")
    for name, dev in (("berlin", inside), ("paris", outside)):
        assert (await api.post("/api/v1/groups", json={"name": name})).status_code == 201
        r = await api.post(f"/api/v1/groups/{name}/devices", json={"devices": [dev.device_id]})
        assert r.status_code == 200, r.text
    # a command the admin sent to both, before the operator exists
    both = await api.command(f"{inside.device_id},{outside.device_id}", kind="exec", argv=["id"])

    op = await user_client(api, "op-berlin", ["operator"], groups=["berlin"])
    http = api.http

    r = await http.get("/api/v1/devices", headers=op)
    assert [d["name"] for d in r.json()] == ["berlin-1"]
    assert (await http.get(f"/api/v1/devices/{inside.device_id}", headers=op)).status_code == 200
    for path in (f"/api/v1/devices/{outside.device_id}", "/api/v1/devices/paris-1/history"):
        r = await http.get(path, headers=op)
        assert r.status_code == 404, r.text  # not even its existence is shown
    r = await http.post(f"/api/v1/devices/{outside.device_id}/retire", headers=op)
    assert r.status_code == 404

    run = {"kind": "exec", "argv": ["true"]}
    r = await http.post("/api/v1/commands", json={"target": outside.device_id, **run}, headers=op)
    assert r.status_code == 404
    r = await http.post("/api/v1/commands", json={"target": "group:paris", **run}, headers=op)
    assert r.status_code == 404
    r = await http.post(
        "/api/v1/commands",
        json={"target": f"{inside.device_id},{outside.device_id}", **run},
        headers=op,
    )
    assert r.status_code == 404
    r = await http.post("/api/v1/commands", json={"target": "group:berlin", **run}, headers=op)
    assert r.status_code == 201, r.text
    mine = r.json()["id"]

    # the shared command shows only the run in scope
    r = await http.get(f"/api/v1/commands/{both['id']}", headers=op)
    assert [x["device_name"] for x in r.json()["runs"]] == ["berlin-1"]
    assert r.json()["runs_total"] == 1
    listed = {c["id"]: c for c in (await http.get("/api/v1/commands", headers=op)).json()}
    assert set(listed) == {mine, both["id"]}
    assert sum(listed[both["id"]]["counts"].values()) == 1
    # a command only on the other group is invisible
    other = await api.command("group:paris", kind="exec", argv=["id"])
    assert (await http.get(f"/api/v1/commands/{other['id']}", headers=op)).status_code == 404

    # group-wide management needs the permission everywhere
    r = await http.post(
        "/api/v1/groups/berlin/devices", json={"devices": [outside.device_id]}, headers=op
    )
    assert r.status_code == 403
    assert "every device" in r.json()["detail"]
    # and an operator retires inside its group
    r = await http.post(f"/api/v1/devices/{inside.device_id}/retire", headers=op)
    assert r.status_code == 200 and r.json()["status"] == "retired"


async def test_custom_role_and_grants(api: Any) -> None:
    r = await api.post("/api/v1/roles", json={"name": "viewer", "permissions": ["devices.fly"]})
    assert r.status_code == 422 and r.json()["error"] == "unknown_permission"
    r = await api.post("/api/v1/roles", json={"name": "viewer", "permissions": ["devices.view"]})
    assert r.status_code == 201, r.text
    r = await api.post("/api/v1/roles", json={"name": "viewer", "permissions": ["devices.view"]})
    assert r.status_code == 409
    viewer = await user_client(api, "vic", ["viewer"])
    assert (await api.http.get("/api/v1/devices", headers=viewer)).status_code == 200
    assert (await api.http.get("/api/v1/commands", headers=viewer)).status_code == 403

    # granting a second role widens the rights at once (same token)
    r = await api.post("/api/v1/users/vic/grants", json={"role": "auditor"})
    assert r.status_code == 201
    assert (await api.http.get("/api/v1/commands", headers=viewer)).status_code == 200
    grant = next(g for g in r.json()["grants"] if g["role"] == "auditor")
    r = await api.http.delete(f"/api/v1/users/vic/grants/{grant['id']}", headers=api.auth)
    assert r.status_code == 200
    assert (await api.http.get("/api/v1/commands", headers=viewer)).status_code == 403

    roles = {x["name"]: x for x in (await api.get("/api/v1/roles")).json()}
    assert roles["viewer"]["users"] == 1 and roles["admin"]["builtin"]
    assert (await api.http.delete("/api/v1/roles/admin", headers=api.auth)).status_code == 409
    assert (await api.http.delete("/api/v1/roles/viewer", headers=api.auth)).status_code == 204
    assert (await api.http.get("/api/v1/devices", headers=viewer)).status_code == 403

    r = await api.post("/api/v1/users/vic/grants", json={"role": "operator", "groups": ["nope"]})
    assert r.status_code == 404 and r.json()["error"] == "unknown_group"


async def test_disable_ends_access_and_the_last_admin_stays(api: Any) -> None:
    hd = await user_client(api, "temp", ["helpdesk"])
    assert (await api.http.get("/api/v1/devices", headers=hd)).status_code == 200
    r = await api.post("/api/v1/users/temp/disable")
    assert r.status_code == 200 and r.json()["is_active"] is False
    assert (await api.http.get("/api/v1/devices", headers=hd)).status_code == 401
    assert (await login(api, "temp")).status_code == 401

    r = await api.post("/api/v1/users/admin/disable")
    assert r.status_code == 409 and r.json()["error"] == "self_disable"
    users = {u["username"]: u for u in (await api.get("/api/v1/users")).json()}
    admin_grant = users["admin"]["grants"][0]["id"]
    r = await api.http.delete(f"/api/v1/users/admin/grants/{admin_grant}", headers=api.auth)
    assert r.status_code == 409 and r.json()["error"] == "last_admin"


async def test_named_api_tokens(api: Any) -> None:
    hd = await user_client(api, "scripts", ["helpdesk"])
    r = await api.http.post("/api/v1/auth/tokens", json={"name": "cron", "days": 30}, headers=hd)
    assert r.status_code == 201, r.text
    created = r.json()
    token = {"authorization": f"Bearer {created['token']}"}
    assert (await api.http.get("/api/v1/devices", headers=token)).status_code == 200
    # the token carries its user's rights, not more
    assert (await api.http.get("/api/v1/users", headers=token)).status_code == 403
    listed = (await api.http.get("/api/v1/auth/tokens", headers=hd)).json()
    assert created["id"] in [t["id"] for t in listed]
    assert all("token" not in t for t in listed)
    r = await api.http.delete(f"/api/v1/auth/tokens/{created['id']}", headers=hd)
    assert r.status_code == 204
    assert (await api.http.get("/api/v1/devices", headers=token)).status_code == 401
    r = await api.http.post("/api/v1/auth/tokens", json={"name": "x", "days": 99999}, headers=hd)
    assert r.status_code == 422


async def test_repeated_failures_lock_the_account(api: Any) -> None:
    await user_client(api, "target", ["helpdesk"])
    for _ in range(5):
        assert (await login(api, "target", "wrong-password")).status_code == 401
    r = await login(api, "target")  # even the right password waits now
    assert r.status_code == 429, r.text
    assert r.json()["error"] == "rate_limited"
    assert 1 <= int(r.headers["retry-after"]) <= 61
    # the lock is an account state, so every server process sees it
    from sqlalchemy import update

    from custos.accounts.models import User

    async with api.services.db.transaction() as uow:
        await uow.session.execute(update(User).values(locked_until=None))
    assert (await login(api, "target")).status_code == 200


async def test_weak_password_and_bad_names(api: Any) -> None:
    r = await api.post("/api/v1/users", json={"username": "a", "password": "short", "roles": []})
    assert r.status_code == 422
    r = await api.post("/api/v1/users", json={"username": "a", "password": "short"})
    assert r.status_code == 422 and r.json()["error"] == "weak_password"
    r = await api.post("/api/v1/users", json={"username": "a b", "password": PW})
    assert r.status_code == 422
    r = await api.post("/api/v1/users", json={"username": "ok", "password": PW, "roles": ["x"]})
    assert r.status_code == 404 and r.json()["error"] == "unknown_role"
    # nothing half-written
    assert "ok" not in [u["username"] for u in (await api.get("/api/v1/users")).json()]


async def test_totp_second_factor(api: Any) -> None:
    hd = await user_client(api, "otp-user", ["helpdesk"])
    r = await api.http.post("/api/v1/auth/totp", headers=hd)
    assert r.status_code == 200
    secret = r.json()["secret"]
    assert r.json()["uri"].startswith("otpauth://totp/")
    # pending until confirmed: logging in still needs no code
    assert (await login(api, "otp-user")).status_code == 200
    r = await api.http.post("/api/v1/auth/totp/confirm", json={"code": "000000"}, headers=hd)
    assert r.status_code == 422 and r.json()["error"] == "bad_otp"
    code = pyotp.TOTP(secret).now()
    r = await api.http.post("/api/v1/auth/totp/confirm", json={"code": code}, headers=hd)
    assert r.status_code == 204

    r = await login(api, "otp-user")
    assert r.status_code == 401 and r.json()["error"] == "otp_required"
    r = await login(api, "otp-user", otp="123456" if code != "123456" else "654321")
    assert r.status_code == 401 and r.json()["error"] == "bad_otp"
    assert (await login(api, "otp-user", otp=pyotp.TOTP(secret).now())).status_code == 200
    # the same code again is a replay: refused even though it is still "current"
    r = await login(api, "otp-user", otp=pyotp.TOTP(secret).now())
    assert r.status_code == 401 and r.json()["error"] == "bad_otp"
    # while two-factor is on, starting a new enrolment cannot switch it off
    r = await api.http.post("/api/v1/auth/totp", headers=hd)
    assert r.status_code == 409 and r.json()["error"] == "totp_on"

    # stored encrypted, never the secret itself
    from sqlalchemy import select

    from custos.accounts.models import User

    async with api.services.db.read() as s:
        stored = await s.scalar(select(User.totp_secret).where(User.username == "otp-user"))
    assert stored and secret not in stored

    users = {u["username"]: u for u in (await api.get("/api/v1/users")).json()}
    assert users["otp-user"]["totp"] is True
    assert (
        await api.http.delete("/api/v1/users/otp-user/totp", headers=api.auth)
    ).status_code == 204
    assert (await login(api, "otp-user")).status_code == 200


async def test_console_sessions(api: Any) -> None:
    from custos.errors import Unauthorized

    accounts = api.services.accounts
    await user_client(api, "web", ["auditor"])
    grant = await accounts.open_session("web", PW, None, "127.0.0.1")
    who, csrf = await accounts.session_principal(grant.secret)
    assert who.username == "web" and who.via == "session" and csrf == grant.csrf
    assert who.can("audit.view") and not who.can("commands.run")
    await accounts.close_session(grant.secret)
    with pytest.raises(Unauthorized):
        await accounts.session_principal(grant.secret)
    with pytest.raises(Unauthorized):
        await accounts.open_session("web", "nope-nope-nope", None, "127.0.0.1")


async def test_logins_and_refusals_are_audited_with_the_user(api: Any) -> None:
    hd = await user_client(api, "audited", ["helpdesk"])
    assert (await login(api, "audited", "wrong-password")).status_code == 401
    assert (await api.http.post("/api/v1/users", json={}, headers=hd)).status_code == 403

    page = (await api.get("/api/v1/audit", params={"action": "auth.login"})).json()
    logins = [(e["actor"], e["result"], e["detail"].get("error")) for e in page["entries"]]
    assert ("audited", "denied", "bad_credentials") in logins
    assert ("audited", "ok", None) in logins
    # one entry per attempt: the middleware does not add an anonymous twin
    assert all(actor for actor, _, _ in logins)
    denied = (await api.get("/api/v1/audit", params={"actor": "audited"})).json()["entries"]
    assert any(e["result"] == "denied" and e["status"] == 403 for e in denied)
    assert all("wrong-password" not in str(e) for e in denied)


async def test_change_own_password(api: Any) -> None:
    hd = await user_client(api, "self", ["helpdesk"])
    body = {"current": "not-it-at-all", "new": "new-password-2"}
    r = await api.http.put("/api/v1/auth/password", json=body, headers=hd)
    assert r.status_code == 422 and r.json()["error"] == "bad_credentials"
    r = await api.http.put("/api/v1/auth/password", json={**body, "current": PW}, headers=hd)
    assert r.status_code == 204
    assert (await api.http.get("/api/v1/devices", headers=hd)).status_code == 401
    assert (await login(api, "self")).status_code == 401
    assert (await login(api, "self", "new-password-2")).status_code == 200
