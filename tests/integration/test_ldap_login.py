"""Directory users end to end: login by bind, group→role mapping, scoped maps, sync, lockout.

A real slapd (tests/ldap_server.py) holds alice (mdm-admins), bob (helpdesk), carol (staff
only), dave (helpdesk, locked) and erin (a same-named group outside the group base).
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ldap_server import BASE, SlapdServer

ADMIN_PASSWORD = "admin-test-pw-1"


@pytest.fixture(scope="module")
def slapd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlapdServer]:
    server = SlapdServer(tmp_path_factory.mktemp("slapd")).start()
    try:
        server.seed()
        yield server
    finally:
        server.stop()
        server.cleanup()


@pytest.fixture
async def app_client(
    settings: Any, slapd: SlapdServer
) -> AsyncIterator[tuple[Any, httpx.AsyncClient]]:
    from custos.server.app import create_app

    s = settings.model_copy(
        update={
            "ldap_url": slapd.url,
            "ldap_bind_dn": slapd.service_dn,
            "ldap_bind_password": __import__("pydantic").SecretStr(slapd.service_password),
            "ldap_user_base": f"ou=people,{BASE}",
            "ldap_group_base": f"ou=groups,{BASE}",
            "ldap_role_map": {
                f"cn=mdm-admins,ou=groups,{BASE}": "admin",
                "helpdesk": "helpdesk",
                "staff": "operator@berlin",
            },
        }
    )
    app = create_app(s)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http,
    ):
        yield app, http


async def _login(http: httpx.AsyncClient, user: str, pw: str) -> httpx.Response:
    return await http.post("/api/v1/auth/login", json={"username": user, "password": pw})


def _auth(r: httpx.Response) -> dict[str, str]:
    assert r.status_code == 200, r.text
    return {"authorization": f"Bearer {r.json()['token']}"}


async def test_directory_login_maps_groups_to_roles(
    app_client: tuple[Any, httpx.AsyncClient], slapd: SlapdServer
) -> None:
    _app, http = app_client
    pw = slapd.passwords
    admin = _auth(await _login(http, "admin", ADMIN_PASSWORD))  # local accounts still work

    # bob: helpdesk by the bare-CN key; the 'staff' map to operator@berlin is skipped
    # (no such group yet), the login still succeeds with what does exist
    bob = _auth(await _login(http, "bob", pw["bob"]))
    me = (await http.get("/api/v1/auth/me", headers=bob)).json()
    assert me["role"] == "helpdesk"
    assert (await http.post("/api/v1/enrollment-tokens", json={}, headers=bob)).status_code == 403

    # carol is only in staff: no role until the berlin group exists
    r = await _login(http, "carol", pw["carol"])
    assert r.status_code == 403 and r.json()["error"] == "no_directory_role"
    assert (
        await http.post("/api/v1/groups", json={"name": "berlin"}, headers=admin)
    ).status_code == 201
    carol = _auth(await _login(http, "carol", pw["carol"]))
    me = (await http.get("/api/v1/auth/me", headers=carol)).json()
    assert me["role"] == "operator" and "devices.view" in me["scoped"]
    assert me["permissions"] == []

    alice = _auth(await _login(http, "alice", pw["alice"]))
    assert (await http.get("/api/v1/users", headers=alice)).status_code == 200
    users = {u["username"]: u for u in (await http.get("/api/v1/users", headers=admin)).json()}
    assert users["alice"]["source"] == "ldap" and users["alice"]["display_name"] == "Alice Adams"
    assert {g["role"] for g in users["alice"]["grants"]} == {"admin", "operator"}
    assert all(g["source"] == "ldap" for g in users["alice"]["grants"])

    # wrong password, unknown user, locked account, same-named group outside the base
    assert (await _login(http, "bob", "not-his-password")).status_code == 401
    assert (await _login(http, "nobody", "whatever-pw")).status_code == 401
    assert (await _login(http, "dave", pw["dave"])).status_code == 401
    r = await _login(http, "erin", pw["erin"])
    assert r.status_code == 403 and r.json()["error"] == "no_directory_role"
    # filter metacharacters never widen the search
    assert (await _login(http, "*", pw["bob"])).status_code == 401
    assert (await _login(http, "b*)(uid=*", pw["bob"])).status_code == 401


async def test_sync_disables_users_who_left_or_lost_their_groups(
    app_client: tuple[Any, httpx.AsyncClient], slapd: SlapdServer
) -> None:
    _app, http = app_client
    pw = slapd.passwords
    admin = _auth(await _login(http, "admin", ADMIN_PASSWORD))
    r = await http.post("/api/v1/users/sync", headers=admin)
    assert r.status_code == 200, r.text
    report = r.json()
    # alice and bob are mapped; carol's only map needs the berlin group; dave is locked
    assert report["created"] == 2 and report["disabled"] == 0
    bob = _auth(await _login(http, "bob", pw["bob"]))
    assert (await http.get("/api/v1/devices", headers=bob)).status_code == 200

    # bob leaves the helpdesk group in the directory
    slapd.modify(
        f"dn: cn=helpdesk,ou=groups,{BASE}\nchangetype: modify\n"
        f"delete: member\nmember: uid=bob,ou=people,{BASE}\n"
    )
    try:
        r = await http.post("/api/v1/users/sync", headers=admin)
        assert r.json()["disabled"] == 1
        # his token stopped working at once, and he cannot log in again
        assert (await http.get("/api/v1/devices", headers=bob)).status_code == 401
        assert (await _login(http, "bob", pw["bob"])).status_code == 403
        users = {u["username"]: u for u in (await http.get("/api/v1/users", headers=admin)).json()}
        assert users["bob"]["is_active"] is False and users["bob"]["grants"] == []
        assert users["admin"]["is_active"] is True  # local accounts are never touched
    finally:
        slapd.modify(
            f"dn: cn=helpdesk,ou=groups,{BASE}\nchangetype: modify\n"
            f"add: member\nmember: uid=bob,ou=people,{BASE}\n"
        )
    # back in the group: the next login brings him back
    assert (await _login(http, "bob", pw["bob"])).status_code == 200


async def test_directory_down_is_a_clear_503(
    app_client: tuple[Any, httpx.AsyncClient], slapd: SlapdServer
) -> None:
    _app, http = app_client
    slapd.stop()
    try:
        r = await _login(http, "alice", slapd.passwords["alice"])
        assert r.status_code == 503, r.text
        assert "directory" in r.json()["detail"].lower() or "ldap" in r.json()["detail"].lower()
        # local accounts do not depend on the directory
        assert (await _login(http, "admin", ADMIN_PASSWORD)).status_code == 200
    finally:
        slapd.start()
