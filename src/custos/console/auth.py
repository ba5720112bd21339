"""Console sessions: the session cookie, the CSRF check and permission dependencies.

A browser holds one HttpOnly cookie with the session secret (AccountService keeps only its
hash); every page resolves it to a Principal and the session's CSRF token. Every unsafe request
(POST/PUT/PATCH/DELETE) must carry that token, in the form field `csrf` or the X-CSRF-Token
header that htmx sends, and the comparison runs in constant time. The login form, which has no
session yet, is protected by a double-submit cookie instead.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from fastapi import Request
from starlette.responses import Response

from custos.accounts.service import Principal
from custos.errors import Forbidden, Unauthorized

SESSION_COOKIE = "custos_session"
LOGIN_CSRF_COOKIE = "custos_login_csrf"
CSRF_FIELD = "csrf"
CSRF_HEADER = "x-csrf-token"
COOKIE_PATH = "/console"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
MAX_SECRET_LEN = 200


class LoginRequired(Exception):
    """No valid console session: the route class sends the browser to the login page."""


@dataclass(frozen=True)
class ConsoleUser:
    """The signed-in administrator of one console request."""

    principal: Principal
    csrf: str
    secret: str

    def can(self, perm: str) -> bool:
        """Whether the user holds `perm` anywhere (globally or on some groups)."""
        return bool(self.principal.can(perm))


def is_https(request: Request) -> bool:
    """Whether the browser reached us over HTTPS (cookies are then marked Secure)."""
    return request.url.scheme == "https"


def set_session_cookie(
    response: Response, request: Request, secret: str, max_age: int | None
) -> None:
    """The session cookie: HttpOnly, SameSite=Lax, Secure over HTTPS, only for /console."""
    response.set_cookie(
        SESSION_COOKIE,
        secret,
        max_age=max_age,
        path=COOKIE_PATH,
        httponly=True,
        secure=is_https(request),
        samesite="lax",
    )


def clear_session_cookie(response: Response, request: Request) -> None:
    """Remove the session cookie from the browser."""
    response.delete_cookie(
        SESSION_COOKIE, path=COOKIE_PATH, httponly=True, secure=is_https(request), samesite="lax"
    )


def login_csrf(request: Request) -> tuple[str, bool]:
    """The login form's double-submit token: (token, whether it is new and must be set)."""
    token = request.cookies.get(LOGIN_CSRF_COOKIE, "")
    if 20 <= len(token) <= 100:
        return token, False
    return secrets.token_urlsafe(24), True


def set_login_csrf(response: Response, request: Request, token: str) -> None:
    """Set the login form's double-submit cookie."""
    response.set_cookie(
        LOGIN_CSRF_COOKIE,
        token,
        path=COOKIE_PATH,
        httponly=True,
        secure=is_https(request),
        samesite="strict",
    )


def tokens_match(expected: str, given: str | None) -> bool:
    """Constant-time comparison of a CSRF token; empty never matches."""
    if not expected or not given:
        return False
    return hmac.compare_digest(expected.encode(), given.encode())


async def submitted_csrf(request: Request) -> str | None:
    """The CSRF token a request carries: the X-CSRF-Token header, else the form field."""
    header = request.headers.get(CSRF_HEADER)
    if header:
        return header
    ctype = request.headers.get("content-type", "")
    if ctype.startswith(("application/x-www-form-urlencoded", "multipart/form-data")):
        # Starlette caches the parsed form, so the route's Form() parameters reuse it
        form = await request.form()
        value = form.get(CSRF_FIELD)
        return value if isinstance(value, str) else None
    return None


def check_origin(request: Request) -> None:
    """Refuse a cross-site unsafe request outright when the browser names its origin."""
    origin = request.headers.get("origin")
    if origin and origin != "null":
        parts = urlsplit(origin)
        host = request.headers.get("host", "")
        if parts.netloc.lower() != host.lower():
            raise Forbidden("cross-site request refused", code="bad_origin")


async def current_user(request: Request) -> ConsoleUser:
    """The session's user; unsafe methods must also carry the session's CSRF token."""
    secret = request.cookies.get(SESSION_COOKIE, "")
    if not secret or len(secret) > MAX_SECRET_LEN:
        raise LoginRequired
    accounts = request.app.state.services.accounts
    try:
        principal, csrf = await accounts.session_principal(secret)
    except Unauthorized:
        raise LoginRequired from None
    request.state.principal = principal
    if request.method not in SAFE_METHODS:
        check_origin(request)
        if not tokens_match(csrf, await submitted_csrf(request)):
            raise Forbidden("missing or wrong CSRF token; reload the page", code="csrf")
    user = ConsoleUser(principal=principal, csrf=csrf, secret=secret)
    # the error pages of this request show the user's navigation
    request.state.console_user = user
    return user


def need(perm: str) -> Callable[[Request], Awaitable[ConsoleUser]]:
    """A dependency: the signed-in user, who must hold `perm` (403 page otherwise)."""

    async def dependency(request: Request) -> ConsoleUser:
        user = await current_user(request)
        if not user.can(perm):
            raise Forbidden(f"you do not have the {perm} permission", code="forbidden")
        return user

    dependency.__name__ = f"need_{perm.replace('.', '_')}"
    return dependency
