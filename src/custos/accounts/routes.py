"""Admin API: log in, who am I, users, roles and grants, API tokens, TOTP."""

from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter, Depends, Path, Request, Response

from custos.accounts.permissions import PERMISSIONS, SCOPABLE
from custos.accounts.schemas import (
    ApiTokenCreate,
    ApiTokenCreated,
    ApiTokenOut,
    DirectorySyncOut,
    GrantIn,
    LoginRequest,
    LoginResponse,
    Me,
    OwnPasswordChange,
    PasswordSet,
    PermissionOut,
    RoleCreate,
    RoleOut,
    TotpBegin,
    TotpConfirm,
    UserCreate,
    UserOut,
)
from custos.accounts.service import Principal
from custos.audit.middleware import audited_login
from custos.server.container import Services
from custos.server.http import admin, client_address, require_everywhere, services

router = APIRouter(prefix="/api/v1", tags=["accounts"])
_USERS = require_everywhere("users.manage")


@router.post("/auth/login", response_model=LoginResponse)
async def login(
    body: LoginRequest, request: Request, svc: Services = Depends(services)
) -> LoginResponse:
    """Exchange a username and password (and TOTP code) for an API token."""
    remote = client_address(request)
    async with audited_login(svc, request, body.username, remote, via="token"):
        token, expires = await svc.accounts.login(body.username, body.password, body.otp, remote)
    return LoginResponse(token=token, expires_at=expires, username=body.username)


@router.get("/auth/me", response_model=Me)
async def me(who: Principal = Depends(admin)) -> Me:
    """The account behind the token and its permissions."""
    return Me(
        username=who.username,
        role=who.role,
        permissions=sorted(who.permissions),
        scoped={p: sorted(g) for p, g in who.scoped.items()},
    )


@router.get("/auth/tokens", response_model=list[ApiTokenOut])
async def my_tokens(who: Principal = Depends(admin), svc: Services = Depends(services)) -> list:
    """The caller's unexpired API tokens."""
    return [t for t in await svc.accounts.list_tokens(who.username)]


@router.post("/auth/tokens", response_model=ApiTokenCreated, status_code=201)
async def create_token(
    body: ApiTokenCreate, who: Principal = Depends(admin), svc: Services = Depends(services)
) -> ApiTokenCreated:
    """A named API token of the caller, with the caller's rights (the secret is shown once)."""
    secret, out = await svc.accounts.create_token(who, body.name, body.days)
    return ApiTokenCreated(**out.model_dump(), token=secret)


@router.delete("/auth/tokens/{token_id}", status_code=204)
async def revoke_token(
    token_id: int = Path(ge=1, le=2**31 - 1),
    who: Principal = Depends(admin),
    svc: Services = Depends(services),
) -> Response:
    """Revoke an API token (your own; anybody's with users.manage)."""
    await svc.accounts.revoke_token(who, token_id)
    return Response(status_code=204)


@router.put("/auth/password", status_code=204)
async def change_own_password(
    body: OwnPasswordChange, who: Principal = Depends(admin), svc: Services = Depends(services)
) -> Response:
    """Change your own password (local accounts); your API tokens end."""
    await svc.accounts.change_own_password(who, body.current, body.new)
    return Response(status_code=204)


@router.post("/auth/totp", response_model=TotpBegin)
async def totp_begin(
    who: Principal = Depends(admin), svc: Services = Depends(services)
) -> TotpBegin:
    """Start turning on TOTP for the caller: a secret for the authenticator app."""
    secret, uri = await svc.accounts.totp_begin(who)
    return TotpBegin(secret=secret, uri=uri)


@router.post("/auth/totp/confirm", status_code=204)
async def totp_confirm(
    body: TotpConfirm, who: Principal = Depends(admin), svc: Services = Depends(services)
) -> Response:
    """Turn TOTP on with the first code; later logins need a code."""
    await svc.accounts.totp_confirm(who, body.code)
    return Response(status_code=204)


@router.get("/users", response_model=list[UserOut])
async def list_users(_who: Principal = Depends(_USERS), svc: Services = Depends(services)) -> list:
    """Every user with their grants."""
    return await svc.accounts.list_users()


@router.post("/users", response_model=UserOut, status_code=201)
async def create_user(
    body: UserCreate, _who: Principal = Depends(_USERS), svc: Services = Depends(services)
) -> UserOut:
    """A new local user with roles (on groups, if given)."""
    out = await svc.accounts.create_user(
        body.username,
        body.password,
        body.roles,
        groups=body.groups,
        display_name=body.display_name,
        email=body.email,
    )
    return out


@router.post("/users/sync", response_model=DirectorySyncOut)
async def sync_directory(
    _who: Principal = Depends(_USERS), svc: Services = Depends(services)
) -> DirectorySyncOut:
    """Sync directory (LDAP) users now: new ones appear, gone or disabled ones lose access."""
    return DirectorySyncOut(**asdict(await svc.accounts.sync_directory()))


@router.get("/users/{username}", response_model=UserOut)
async def show_user(
    username: str, _who: Principal = Depends(_USERS), svc: Services = Depends(services)
) -> UserOut:
    """One user."""
    return await svc.accounts.show_user(username)


@router.post("/users/{username}/disable", response_model=UserOut)
async def disable_user(
    username: str, who: Principal = Depends(_USERS), svc: Services = Depends(services)
) -> UserOut:
    """Disable a user: their tokens and sessions end at once."""
    return await svc.accounts.set_active(username, False, actor=who)


@router.post("/users/{username}/enable", response_model=UserOut)
async def enable_user(
    username: str, who: Principal = Depends(_USERS), svc: Services = Depends(services)
) -> UserOut:
    """Enable a user again."""
    return await svc.accounts.set_active(username, True, actor=who)


@router.put("/users/{username}/password", status_code=204)
async def set_password(
    username: str,
    body: PasswordSet,
    _who: Principal = Depends(_USERS),
    svc: Services = Depends(services),
) -> Response:
    """Set a local user's password; their sessions and tokens end."""
    await svc.accounts.set_password(username, body.password)
    return Response(status_code=204)


@router.delete("/users/{username}/totp", status_code=204)
async def reset_totp(
    username: str, _who: Principal = Depends(_USERS), svc: Services = Depends(services)
) -> Response:
    """Turn a user's TOTP off (when they lost their authenticator)."""
    await svc.accounts.totp_reset(username)
    return Response(status_code=204)


@router.post("/users/{username}/grants", response_model=UserOut, status_code=201)
async def grant_role(
    username: str,
    body: GrantIn,
    _who: Principal = Depends(_USERS),
    svc: Services = Depends(services),
) -> UserOut:
    """Give a user a role, everywhere or on device groups."""
    return await svc.accounts.grant(username, body.role, body.groups)


@router.delete("/users/{username}/grants/{grant_id}", response_model=UserOut)
async def revoke_grant(
    username: str,
    grant_id: int = Path(ge=1, le=2**31 - 1),
    _who: Principal = Depends(_USERS),
    svc: Services = Depends(services),
) -> UserOut:
    """Take a grant away."""
    return await svc.accounts.revoke_grant(username, grant_id)


@router.get("/roles", response_model=list[RoleOut])
async def list_roles(_who: Principal = Depends(admin), svc: Services = Depends(services)) -> list:
    """Every role with its permissions."""
    return [r for r in await svc.accounts.list_roles()]


@router.post("/roles", response_model=RoleOut, status_code=201)
async def create_role(
    body: RoleCreate, _who: Principal = Depends(_USERS), svc: Services = Depends(services)
) -> RoleOut:
    """A custom role made of permissions."""
    out = await svc.accounts.create_role(body.name, body.permissions, body.description)
    return out


@router.delete("/roles/{name}", status_code=204)
async def delete_role(
    name: str, _who: Principal = Depends(_USERS), svc: Services = Depends(services)
) -> Response:
    """Delete a custom role and its grants."""
    await svc.accounts.delete_role(name)
    return Response(status_code=204)


@router.get("/permissions", response_model=list[PermissionOut])
async def list_permissions(_who: Principal = Depends(admin)) -> list[PermissionOut]:
    """Every permission, and whether a group-scoped grant can carry it."""
    return [
        PermissionOut(name=n, description=d, scopable=n in SCOPABLE) for n, d in PERMISSIONS.items()
    ]
