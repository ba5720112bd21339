"""HTTP plumbing shared by the feature routers: error mapping, body limits, auth dependencies."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from custos import protocol
from custos.accounts.permissions import PERMISSIONS
from custos.accounts.service import Principal
from custos.devices.identity import DeviceAuth
from custos.errors import (
    DomainError,
    Forbidden,
    Invalid,
    TooManyRequests,
    Unauthorized,
    Unavailable,
)
from custos.server.container import Services

log = logging.getLogger(__name__)
M = TypeVar("M", bound=BaseModel)


def error_response(status: int, error: str, detail: Any) -> JSONResponse:
    """The one error shape: {"error": code, "detail": reason}."""
    return JSONResponse({"error": error, "detail": detail}, status_code=status)


def install_error_handlers(app: Any) -> None:
    """Map domain errors, validation errors and HTTP errors to the JSON error shape."""

    @app.exception_handler(DomainError)
    async def _domain(_req: Request, exc: DomainError) -> JSONResponse:
        resp = error_response(exc.status, exc.code, exc.detail)
        if exc.status == 401:
            # lets an agent with a wrong clock correct itself and retry
            resp.headers[protocol.H_SERVER_TIME] = f"{time.time():.3f}"
        elif isinstance(exc, Unavailable | TooManyRequests):
            resp.headers["retry-after"] = str(exc.retry_after)
        return resp

    @app.exception_handler(RequestValidationError)
    async def _validation(_req: Request, exc: RequestValidationError) -> JSONResponse:
        errors = _clean_errors(exc.errors())
        if errors and errors[0]["type"] == "json_invalid":
            return error_response(422, "malformed_json", f"malformed JSON: {errors[0]['msg']}")
        return error_response(422, "invalid_request", errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_req: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and "parsing the body" in str(exc.detail):
            # FastAPI's own body decoding failed (e.g. not UTF-8): same answer as bad JSON
            return error_response(422, "malformed_json", "request body is not valid UTF-8 JSON")
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, exc.detail)

    @app.exception_handler(Exception)
    async def _unexpected(_req: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(500, "internal", "internal server error")


def _clean_errors(errors: Any) -> list[dict[str, Any]]:
    out = []
    for e in errors:
        out.append(
            {
                "loc": [str(x) for x in e.get("loc", ())],
                "msg": str(e.get("msg", "")),
                "type": str(e.get("type", "")),
            }
        )
    return out


def parse_body(model: type[M], raw: bytes) -> M:
    """Validate a raw JSON body, turning any problem into a 422 with the reason."""
    if not raw:
        raise Invalid("request body is empty; JSON expected", code="invalid_request")
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        errors = _clean_errors(exc.errors())
        if errors and errors[0]["type"] == "json_invalid":
            raise Invalid(f"malformed JSON: {errors[0]['msg']}", code="malformed_json") from None
        raise Invalid(
            "; ".join(f"{'.'.join(e['loc']) or 'body'}: {e['msg']}" for e in errors[:10]),
            code="invalid_request",
        ) from None


class RequestGuard:
    """Refuses URLs with NUL characters (422) and bodies over the limit (413, announced or not)."""

    def __init__(self, app: ASGIApp, limit: int, larger: Sequence[tuple[str, int]] = ()) -> None:
        self.app = app
        self.default_limit = limit
        # (path prefix, limit): uploads that stream to disk (packages) may be larger
        self.larger = tuple(larger)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        limit = next((n for p, n in self.larger if path.startswith(p)), self.default_limit)
        await self._guard(scope, receive, send, limit)

    async def _guard(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        if "\x00" in scope["path"] or b"%00" in scope.get("query_string", b""):
            await _send_error(
                send, 422, "invalid_request", "NUL characters are not allowed in URLs"
            )
            return
        for k, v in scope["headers"]:
            if k == b"content-length":
                try:
                    too_big = int(v) > limit
                except ValueError:
                    too_big = False
                if too_big:
                    await _send_413(send, limit)
                    return
        seen = 0
        started = False
        refused = False

        async def counting_receive() -> Message:
            nonlocal seen, refused
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > limit:
                    # answer now: frameworks turn errors raised while reading into their own 400
                    if not started and not refused:
                        refused = True
                        await _send_413(send, limit)
                    raise BodyTooLarge
            return msg

        async def tracking_send(msg: Message) -> None:
            nonlocal started
            if refused:
                return
            if msg["type"] == "http.response.start":
                started = True
            await send(msg)

        with contextlib.suppress(BodyTooLarge):
            await self.app(scope, counting_receive, tracking_send)


class BodyTooLarge(Exception):
    """Raised into the app when a streamed body passes the limit (the 413 is already sent)."""


async def _send_413(send: Send, limit: int) -> None:
    await _send_error(send, 413, "too_large", f"request body is larger than {limit} bytes")


async def _send_error(send: Send, status: int, error: str, detail: str) -> None:
    body = json.dumps({"error": error, "detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"connection", b"close")],
        }
    )
    await send({"type": "http.response.body", "body": body})


def body_schema(model: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI for a body that a route reads raw (signed device requests verify the bytes)."""
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": model.model_json_schema()}},
        }
    }


async def services(request: Request) -> Services:
    """The services built in the lifespan (async: a sync dependency would cost a thread hop)."""
    return request.app.state.services


async def admin(request: Request) -> Principal:
    """The user behind the bearer token (any permissions); kept on request.state for the audit."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("an API token is required (Authorization: Bearer …)", code="no_token")
    svc: Services = request.app.state.services
    who = await svc.accounts.authenticate(token.strip())
    request.state.principal = who
    return who


def require(perm: str) -> Callable[[Request], Awaitable[Principal]]:
    """A dependency: the caller, who must hold `perm` (everywhere or on some device groups).

    Scoped holders pass here; the service then limits them to their groups' devices.
    """
    if perm not in PERMISSIONS:
        raise ValueError(f"unknown permission {perm!r}")

    async def dependency(request: Request) -> Principal:
        who = await admin(request)
        if not who.can(perm):
            raise Forbidden(f"this needs the {perm!r} permission", code="forbidden")
        return who

    dependency.__name__ = f"require_{perm.replace('.', '_')}"
    return dependency


def require_everywhere(perm: str) -> Callable[[Request], Awaitable[Principal]]:
    """A dependency: the caller, who must hold `perm` without a group scope."""
    if perm not in PERMISSIONS:
        raise ValueError(f"unknown permission {perm!r}")

    async def dependency(request: Request) -> Principal:
        who = await admin(request)
        if not who.can_everywhere(perm):
            detail = f"this needs the {perm!r} permission on every device, not only some groups"
            raise Forbidden(detail if who.can(perm) else f"this needs the {perm!r} permission")
        return who

    dependency.__name__ = f"require_all_{perm.replace('.', '_')}"
    return dependency


async def signed_device(
    request: Request, *, check_status: bool = True, allow_session: bool = True
) -> tuple[DeviceAuth, bytes]:
    """The device that signed this request, and the raw body it signed."""
    body = await request.body()
    raw_path = request.scope.get("raw_path") or request.url.path.encode()
    qs = request.scope.get("query_string", b"")
    path_qs = raw_path.decode("latin-1") + (("?" + qs.decode("latin-1")) if qs else "")
    svc: Services = request.app.state.services
    auth = await svc.authenticator.verify(
        request.method,
        path_qs,
        request.headers,
        body,
        check_status=check_status,
        allow_session=allow_session,
    )
    return auth, body


def client_address(request: Request) -> str:
    """The client's address: the peer, or X-Forwarded-For's when the peer is a trusted proxy."""
    from custos.audit.middleware import client_address as from_scope

    svc: Services = request.app.state.services
    return from_scope(request.scope, svc.settings.trusted_proxies)
