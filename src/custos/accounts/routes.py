"""Admin API: log in, who am I."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from custos.accounts.schemas import LoginRequest, LoginResponse, Me
from custos.accounts.service import Principal
from custos.server.container import Services
from custos.server.http import admin, services

router = APIRouter(prefix="/api/v1", tags=["accounts"])


@router.post("/auth/login", response_model=LoginResponse)
async def login(body: LoginRequest, svc: Services = Depends(services)) -> LoginResponse:
    """Exchange a username and password for an API token."""
    token, expires = await svc.accounts.login(body.username, body.password)
    return LoginResponse(token=token, expires_at=expires, username=body.username)


@router.get("/auth/me", response_model=Me)
async def me(who: Principal = Depends(admin)) -> Me:
    """The account behind the token."""
    return Me(username=who.username, role=who.role)
