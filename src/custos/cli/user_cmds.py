"""Admin commands for users, roles, grants and personal API tokens (over the admin API)."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer

from custos.cli.admin_cmds import (
    JsonOpt,
    _client,
    _err,
    _esc,
    _out,
    _seg,
    _table,
    print_json,
    relative_time,
)
from custos.cli.client import fail


def _grants(user: dict[str, Any]) -> str:
    parts = []
    for g in user["grants"]:
        where = f"@{','.join(g['groups'])}" if g["groups"] else ""
        ldap = " (ldap)" if g["source"] == "ldap" else ""
        parts.append(f"{g['role']}{where}{ldap}")
    return ", ".join(parts) or "-"


def _read_password(stdin: bool, username: str) -> str:
    if stdin:
        pw = sys.stdin.readline().rstrip("\r\n")
    else:
        pw = str(
            typer.prompt(f"Password for {username}", hide_input=True, confirmation_prompt=True)
        )
    if not pw:
        fail("empty password", code=2)
    return pw


def _groups_option(value: str | None) -> list[str]:
    return [g.strip() for g in (value or "").split(",") if g.strip()]


def user_create(
    username: Annotated[str, typer.Argument(help="login name")],
    role: Annotated[
        list[str] | None,
        typer.Option("--role", "-r", help="role to grant (repeatable; default helpdesk)"),
    ] = None,
    groups: Annotated[
        str | None,
        typer.Option("--groups", help="limit the roles to these device groups (comma-separated)"),
    ] = None,
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="read the password from one line of stdin")
    ] = False,
    display_name: Annotated[str, typer.Option("--name", help="display name")] = "",
    email: Annotated[str, typer.Option("--email")] = "",
    json_out: JsonOpt = False,
) -> None:
    """Create a local user with one or more roles."""
    roles = role or ["helpdesk"]
    password = _read_password(password_stdin, username)
    with _client() as c:
        user = c.post(
            "/api/v1/users",
            {
                "username": username,
                "password": password,
                "roles": roles,
                "groups": _groups_option(groups),
                "display_name": display_name,
                "email": email,
            },
        )
    if json_out:
        print_json(user)
        return
    _err().print(f"Created user [bold]{_esc(username)}[/]: {_esc(_grants(user))}")


def user_ls(json_out: JsonOpt = False) -> None:
    """List users with their roles."""
    with _client() as c:
        users = c.get("/api/v1/users")
    if json_out:
        print_json(users)
        return
    t = _table("USER", "NAME", "SOURCE", "STATE", "2FA", "ROLES", "LAST LOGIN", wrap=("ROLES",))
    for u in users:
        t.add_row(
            _esc(u["username"]),
            _esc(u["display_name"]) or "-",
            u["source"],
            "active" if u["is_active"] else "[red]disabled[/]",
            "totp" if u["totp"] else "-",
            _esc(_grants(u)),
            relative_time(u["last_login_at"]),
        )
    _out().print(t)


def user_disable(username: Annotated[str, typer.Argument()]) -> None:
    """Disable a user: their tokens and console sessions end at once."""
    with _client() as c:
        c.post(f"/api/v1/users/{_seg(username)}/disable")
    _err().print(f"Disabled [bold]{_esc(username)}[/]; their tokens and sessions ended.")


def user_enable(username: Annotated[str, typer.Argument()]) -> None:
    """Enable a disabled user again."""
    with _client() as c:
        c.post(f"/api/v1/users/{_seg(username)}/enable")
    _err().print(f"Enabled [bold]{_esc(username)}[/].")


def user_passwd(
    username: Annotated[str, typer.Argument()],
    password_stdin: Annotated[bool, typer.Option("--password-stdin")] = False,
) -> None:
    """Set a local user's password (their sessions and tokens end)."""
    password = _read_password(password_stdin, username)
    with _client() as c:
        c.request("PUT", f"/api/v1/users/{_seg(username)}/password", json={"password": password})
    _err().print(f"Password of [bold]{_esc(username)}[/] changed.")


def user_sync(json_out: JsonOpt = False) -> None:
    """Sync LDAP / AD users now (the server also does it every ldap_sync_interval_s)."""
    with _client() as c:
        report = c.post("/api/v1/users/sync")
    if json_out:
        print_json(report)
        return
    _err().print(
        f"Directory: {report['seen']} entries; {report['created']} new, "
        f"{report['updated']} updated, {report['disabled']} disabled."
    )


def role_ls(json_out: JsonOpt = False) -> None:
    """List roles and their permissions."""
    with _client() as c:
        roles = c.get("/api/v1/roles")
    if json_out:
        print_json(roles)
        return
    t = _table("ROLE", "USERS", "KIND", "PERMISSIONS", wrap=("PERMISSIONS",))
    for r in roles:
        t.add_row(
            _esc(r["name"]),
            str(r["users"]),
            "built-in" if r["builtin"] else "custom",
            _esc(" ".join(r["permissions"])),
        )
    _out().print(t)


def role_create(
    name: Annotated[str, typer.Argument()],
    permissions: Annotated[
        str, typer.Option("--permissions", "-p", help="comma-separated, e.g. devices.view,cmd…")
    ],
    description: Annotated[str, typer.Option("--description", "-d")] = "",
    json_out: JsonOpt = False,
) -> None:
    """Create a custom role from permissions (see `custos role permissions`)."""
    perms = [p.strip() for p in permissions.split(",") if p.strip()]
    with _client() as c:
        role = c.post(
            "/api/v1/roles", {"name": name, "permissions": perms, "description": description}
        )
    if json_out:
        print_json(role)
        return
    _err().print(f"Created role [bold]{_esc(name)}[/]: {_esc(' '.join(role['permissions']))}")


def role_rm(name: Annotated[str, typer.Argument()]) -> None:
    """Delete a custom role (users lose the grants of it)."""
    with _client() as c:
        c.request("DELETE", f"/api/v1/roles/{_seg(name)}")
    _err().print(f"Deleted role [bold]{_esc(name)}[/].")


def role_permissions(json_out: JsonOpt = False) -> None:
    """List every permission a role can contain."""
    with _client() as c:
        perms = c.get("/api/v1/permissions")
    if json_out:
        print_json(perms)
        return
    t = _table("PERMISSION", "SCOPABLE", "ALLOWS", wrap=("ALLOWS",))
    for p in perms:
        t.add_row(p["name"], "yes" if p["scopable"] else "-", _esc(p["description"]))
    _out().print(t)


def role_grant(
    role: Annotated[str, typer.Argument()],
    username: Annotated[str, typer.Argument()],
    groups: Annotated[
        str | None,
        typer.Option("--groups", help="only on these device groups (comma-separated)"),
    ] = None,
) -> None:
    """Give USERNAME the ROLE, everywhere or only on device groups."""
    with _client() as c:
        user = c.post(
            f"/api/v1/users/{_seg(username)}/grants",
            {"role": role, "groups": _groups_option(groups)},
        )
    _err().print(f"[bold]{_esc(username)}[/] now holds: {_esc(_grants(user))}")


def role_revoke(
    role: Annotated[str, typer.Argument()],
    username: Annotated[str, typer.Argument()],
) -> None:
    """Take every grant of ROLE away from USERNAME."""
    with _client() as c:
        user = c.get(f"/api/v1/users/{_seg(username)}")
        ids = [g["id"] for g in user["grants"] if g["role"] == role]
        if not ids:
            fail(f"{username} does not hold {role}")
        for gid in ids:
            user = c.request("DELETE", f"/api/v1/users/{_seg(username)}/grants/{gid}")
    _err().print(f"[bold]{_esc(username)}[/] now holds: {_esc(_grants(user))}")


def apitoken_create(
    name: Annotated[str, typer.Argument(help="what the token is for")],
    days: Annotated[int, typer.Option("--days", min=1, max=3650)] = 90,
    json_out: JsonOpt = False,
) -> None:
    """Create a personal API token for scripts (printed once)."""
    with _client() as c:
        tok = c.post("/api/v1/auth/tokens", {"name": name, "days": days})
    if json_out:
        print_json(tok)
        return
    _err().print(f"API token [bold]{_esc(name)}[/] (id {tok['id']}), shown only now:")
    sys.stdout.write(tok["token"] + "\n")


def apitoken_ls(json_out: JsonOpt = False) -> None:
    """List your API tokens."""
    with _client() as c:
        toks = c.get("/api/v1/auth/tokens")
    if json_out:
        print_json(toks)
        return
    t = _table("ID", "NAME", "KIND", "PREFIX", "EXPIRES")
    for x in toks:
        t.add_row(
            str(x["id"]),
            _esc(x["name"]) or "-",
            x["kind"],
            x["prefix"],
            relative_time(x["expires_at"]),
        )
    _out().print(t)


def apitoken_revoke(token_id: Annotated[int, typer.Argument()]) -> None:
    """Revoke one of your API tokens."""
    with _client() as c:
        c.request("DELETE", f"/api/v1/auth/tokens/{token_id}")
    _err().print(f"Revoked API token {token_id}.")


def register(app: typer.Typer) -> None:
    """Add the user, role and apitoken command groups."""
    user = typer.Typer(help="Console and API users.", no_args_is_help=True)
    user.command("create")(user_create)
    user.command("ls")(user_ls)
    user.command("disable")(user_disable)
    user.command("enable")(user_enable)
    user.command("passwd")(user_passwd)
    user.command("sync")(user_sync)
    app.add_typer(user, name="user")

    role = typer.Typer(help="Roles, permissions and grants.", no_args_is_help=True)
    role.command("ls")(role_ls)
    role.command("create")(role_create)
    role.command("rm")(role_rm)
    role.command("permissions")(role_permissions)
    role.command("grant")(role_grant)
    role.command("revoke")(role_revoke)
    app.add_typer(role, name="role")

    tok = typer.Typer(help="Personal API tokens for scripts.", no_args_is_help=True)
    tok.command("create")(apitoken_create)
    tok.command("ls")(apitoken_ls)
    tok.command("revoke")(apitoken_revoke)
    app.add_typer(tok, name="apitoken")
