"""Records every admin action at the HTTP edge, so no route has to remember to.

`AuditMiddleware` wraps the app (inside the check-in fast path, which never reaches it) and
appends one audit entry per admin request that may change something: any method but GET,
HEAD and OPTIONS under `/api/v1/`, and POSTs under `/console/`. Device traffic has its own
prefix (`/api/device/v1/`: enrolment, check-ins, uploads, transfers) and is not recorded.

The entry is written after the route has finished (its transaction committed or rolled
back) and before the last part of the response is sent, so a client that has its answer
can already see the entry. The action name comes from the matched route's endpoint name
through `ACTIONS`; unknown routes are recorded as `METHOD /path/{template}`.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from custos import protocol
from custos.errors import DomainError

if TYPE_CHECKING:
    from starlette.requests import Request

    from custos.server.container import Services

log = logging.getLogger(__name__)

READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
ADMIN_API = "/api/v1/"
CONSOLE = "/console/"
# agent traffic, should an agent path ever appear under the admin prefix
DEVICE_PREFIXES = (protocol.DEVICE_API + "/", "/api/v1/device/")
# response bodies read for an error code or a created object's id; larger ones are not parsed
MAX_CAPTURE = 65_536
# a route that wrote its own audit entry (e.g. a login with the attempted username) sets
# `request.state.audit_recorded = True` and the middleware adds none
SELF_RECORDED = "audit_recorded"


@dataclass(frozen=True)
class Action:
    """How a route is written in the log.

    `target` is a template over the path parameters (`device:{ref}`); a route that creates
    something has no path parameter naming it, so `created` gives the kind and the target
    becomes `kind:<value>` of the first of `keys` found in the JSON response.
    """

    name: str
    target: str = ""
    created: str = ""
    keys: tuple[str, ...] = ("id", "name", "username")
    # routes with an {action} parameter: a known verb replaces the name's last part
    verbs: frozenset[str] = frozenset()


_DEPLOYMENT_VERBS = frozenset({"pause", "resume", "abort"})

# "<package>.<endpoint function name>" -> Action. Endpoint names repeat across packages
# (accounts and devices both have create_token), hence the package; custos.X.routes is "X".
ACTIONS: dict[str, Action] = {
    # accounts
    "accounts.login": Action("auth.login", created="user", keys=("username",)),
    "accounts.create_token": Action("api_token.create", created="api_token", keys=("id",)),
    "accounts.revoke_token": Action("api_token.revoke", "api_token:{token_id}"),
    "accounts.totp_begin": Action("auth.totp_begin"),
    "accounts.change_own_password": Action("auth.change_password"),
    "accounts.totp_confirm": Action("auth.totp_confirm"),
    "accounts.create_user": Action("user.create", created="user", keys=("username",)),
    "accounts.disable_user": Action("user.disable", "user:{username}"),
    "accounts.enable_user": Action("user.enable", "user:{username}"),
    "accounts.set_password": Action("user.set_password", "user:{username}"),
    "accounts.reset_totp": Action("user.reset_totp", "user:{username}"),
    "accounts.grant_role": Action("user.grant", "user:{username}"),
    "accounts.revoke_grant": Action("user.revoke_grant", "user:{username} grant:{grant_id}"),
    "accounts.create_role": Action("role.create", created="role", keys=("name",)),
    "accounts.delete_role": Action("role.delete", "role:{name}"),
    "accounts.sync_directory": Action("user.sync_directory"),
    # devices
    "devices.create_token": Action("enrollment_token.create", created="enrollment_token"),
    "devices.revoke_token": Action("enrollment_token.revoke", "enrollment_token:{token_id}"),
    "devices.retire_device": Action("device.retire", "device:{ref}"),
    "devices.create_group": Action("group.create", created="group", keys=("name", "id")),
    "devices.add_group_members": Action("group.add_devices", "group:{name}"),
    # commands, tasks
    "commands.create_command": Action("command.create", created="command"),
    "tasks.create_task": Action("task.create", created="task"),
    "tasks.enable_task": Action("task.enable", "task:{ref}"),
    "tasks.disable_task": Action("task.disable", "task:{ref}"),
    "tasks.delete_task": Action("task.delete", "task:{ref}"),
    # software
    "software.upload_package": Action("package.upload", created="package"),
    "software.remove_package": Action("package.delete", "package:{ref}"),
    "software.create_label": Action("label.create", created="label", keys=("name", "id")),
    "software.remove_label": Action("label.delete", "label:{name}"),
    "software.create_deployment": Action("deployment.create", created="deployment"),
    "software.change_deployment": Action(
        "deployment.change", "deployment:{ref}", verbs=_DEPLOYMENT_VERBS
    ),
    # webhooks
    "webhooks.create_webhook": Action("webhook.create", created="webhook", keys=("name",)),
    "webhooks.delete_webhook": Action("webhook.delete", "webhook:{name}"),
    "webhooks.test_webhook": Action("webhook.test", "webhook:{name}"),
    "webhooks.redeliver": Action("webhook.redeliver", "webhook_delivery:{delivery_id}"),
    # policies, lost devices, lock and wipe
    "policies.add_policy": Action("policy.add", created="policy", keys=("name",)),
    "policies.remove_policy": Action("policy.delete", "policy:{ref}"),
    "policies.assign_policy": Action("policy.assign", "policy:{ref}"),
    "policies.unassign_policy": Action("policy.unassign", "policy:{ref}"),
    "policies.mark_lost": Action("device.lost", "device:{ref}"),
    "policies.mark_found": Action("device.found", "device:{ref}"),
    "policies.lock_device": Action("device.lock", "device:{ref}"),
    "policies.wipe_device": Action("device.wipe", "device:{ref}"),
    # OMA DM
    "omadm.enroll": Action("omadm.enroll", created="device", keys=("device_id", "dev_id")),
    "omadm.queue_ops": Action("omadm.ops", "device:{ref}"),
    "omadm.user_alert": Action("omadm.alert", "device:{ref}"),
    "omadm.notify": Action("omadm.notify", "device:{ref}"),
    "omadm.rotate_credentials": Action("omadm.rotate", "device:{ref}"),
    "console.omadm_register": Action("omadm.enroll"),
    "console.omadm_node_op": Action("omadm.ops", "device:{device_id}"),
    "console.omadm_notify": Action("omadm.notify", "device:{device_id}"),
    # the web console's form posts: the same actions as the API's
    "console.login": Action("auth.login"),
    "console.logout": Action("auth.logout"),
    "console.device_retire": Action("device.retire", "device:{device_id}"),
    "console.send_command": Action("command.create"),
    "console.upload_package": Action("package.upload"),
    "console.create_deployment": Action("deployment.create"),
    "console.deployment_action": Action(
        "deployment.change", "deployment:{ref}", verbs=_DEPLOYMENT_VERBS
    ),
    "console.create_token": Action("enrollment_token.create"),
    "console.revoke_token": Action("enrollment_token.revoke", "enrollment_token:{token_id}"),
    "console.create_user": Action("user.create"),
    "console.user_action": Action(
        "user.change", "user:{username}", verbs=frozenset({"enable", "disable"})
    ),
    "console.change_own_password": Action("auth.change_password"),
    "console.totp_begin": Action("auth.totp_begin"),
    "console.totp_confirm": Action("auth.totp_confirm"),
    "console.create_api_token": Action("api_token.create"),
    "console.revoke_api_token": Action("api_token.revoke", "api_token:{token_id}"),
    "console.grant_role": Action("user.grant", "user:{username}"),
    "console.revoke_grant": Action("user.revoke_grant", "user:{username} grant:{grant_id}"),
    "console.set_password": Action("user.set_password", "user:{username}"),
    "console.reset_totp": Action("user.reset_totp", "user:{username}"),
    "console.create_role": Action("role.create"),
    "console.delete_role": Action("role.delete", "role:{name}"),
    "console.add_policy": Action("policy.add"),
    "console.assign_policy": Action("policy.assign", "policy:{ref}"),
    "console.unassign_policy": Action("policy.unassign", "policy:{ref}"),
    "console.remove_policy": Action("policy.delete", "policy:{ref}"),
    "console.device_lost": Action("device.lost", "device:{device_id}"),
    "console.device_found": Action("device.found", "device:{device_id}"),
    "console.device_lock": Action("device.lock", "device:{device_id}"),
    "console.device_wipe": Action("device.wipe", "device:{device_id}"),
}


def is_audited(method: str, path: str) -> bool:
    """Whether a request is an admin action that the log records."""
    if path.startswith(ADMIN_API):
        return method not in READ_METHODS and not path.startswith(DEVICE_PREFIXES)
    return path.startswith(CONSOLE) and method == "POST"


def result_of(status: int) -> str:
    """ok (2xx, 3xx), denied (401, 403), failed (other 4xx) or error (5xx)."""
    if status in (401, 403):
        return "denied"
    if 400 <= status < 500:
        return "failed"
    if status >= 500:
        return "error"
    return "ok"


def in_networks(peer: str, proxies: Iterable[str]) -> bool:
    """Whether an address lies in one of the CIDR networks (an unparsable one: never)."""
    try:
        ip = ipaddress.ip_address(peer)
    except ValueError:
        return False
    for p in proxies:
        try:
            if ip in ipaddress.ip_network(p, strict=False):
                return True
        except ValueError:
            continue
    return False


def client_address(scope: Scope, trusted_proxies: Iterable[str] = ()) -> str:
    """The client's address: the peer, or, when the peer is a trusted proxy, the address
    X-Forwarded-For names (the rightmost one that is not itself a trusted proxy)."""
    client = scope.get("client")
    peer = str(client[0]) if client else ""
    proxies = tuple(trusted_proxies)
    if not proxies or not in_networks(peer, proxies):
        return peer
    hops: list[str] = []
    for k, v in scope.get("headers", ()):
        if k == b"x-forwarded-for":
            hops.extend(h.strip() for h in v.decode("latin-1").split(","))
    # walk back from the nearest hop; the first one we do not trust is the client
    for hop in reversed([h for h in hops if h]):
        if not in_networks(hop, proxies):
            try:
                return str(ipaddress.ip_address(hop))
            except ValueError:
                return peer  # a forged or garbled header: keep what we know
    return peer


def action_key(route: Any) -> str:
    """The ACTIONS key of a matched route: '<package>.<endpoint name>'."""
    endpoint = getattr(route, "endpoint", None)
    module = str(getattr(endpoint, "__module__", "") or "")
    parts = module.split(".")
    area = parts[1] if len(parts) > 2 and parts[0] == "custos" else module
    return f"{area}.{getattr(route, 'name', '')}"


def describe_route(scope: Scope) -> tuple[str, str, Action | None]:
    """(action, target, table entry) for a request the router has matched (or not)."""
    route = scope.get("route")
    params: Mapping[str, Any] = scope.get("path_params") or {}
    act = ACTIONS.get(action_key(route)) if route is not None else None
    generic = " ".join(f"{k}={v}" for k, v in sorted(params.items()))
    if act is None:
        template = getattr(route, "path", None) or scope["path"]
        return f"{scope['method']} {template}", generic, None
    action = act.name
    verb = params.get("action")
    if isinstance(verb, str) and verb in act.verbs:
        action = f"{act.name.rsplit('.', 1)[0]}.{verb}"
    try:
        target = act.target.format_map(params) if act.target else generic
    except (KeyError, IndexError, ValueError):
        target = generic  # a path parameter of another name (a route was renamed)
    return action, target, act


def _created_target(act: Action, body: Any) -> str:
    if not act.created or not isinstance(body, dict):
        return ""
    for key in act.keys:
        value = body.get(key)
        if isinstance(value, str | int) and not isinstance(value, bool):
            return f"{act.created}:{value}"
    return ""


class AuditMiddleware:
    """ASGI middleware: one audit entry per admin request that may change something."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not is_audited(scope["method"], scope["path"]):
            await self.app(scope, receive, send)
            return
        # the auth dependency puts the principal into this dict (request.state)
        state = scope.setdefault("state", {})
        status = 0
        json_body = False
        captured = bytearray()
        overflow = False
        recorded = False

        async def audited_send(msg: Message) -> None:
            nonlocal status, json_body, overflow, recorded
            if msg["type"] == "http.response.start":
                status = int(msg["status"])
                for k, v in msg.get("headers", ()):
                    if k.lower() == b"content-type":
                        json_body = v.split(b";")[0].strip().lower() == b"application/json"
            elif msg["type"] == "http.response.body":
                chunk = msg.get("body", b"")
                if json_body and not overflow:
                    if len(captured) + len(chunk) > MAX_CAPTURE:
                        overflow = True
                    else:
                        captured.extend(chunk)
                if not msg.get("more_body") and not recorded:
                    recorded = True
                    body = None if overflow or not json_body else bytes(captured)
                    await self._record(scope, state, status, body)
            await send(msg)

        try:
            await self.app(scope, receive, audited_send)
        except Exception as exc:
            if not recorded:
                from custos.server.http import BodyTooLarge

                recorded = True
                # the body guard outside this layer has answered 413 itself
                failed = 413 if isinstance(exc, BodyTooLarge) else 500
                await self._record(scope, state, failed, None)
            raise
        if not recorded and status:
            # the response never finished (the client went away); the action still ran
            await self._record(scope, state, status, None)

    async def _record(
        self, scope: Scope, state: dict[str, Any], status: int, body: bytes | None
    ) -> None:
        if state.get(SELF_RECORDED):
            return
        try:
            services = scope["app"].state.services
            parsed: Any = None
            if body:
                try:
                    parsed = orjson.loads(body)
                except orjson.JSONDecodeError:
                    parsed = None
            action, target, act = describe_route(scope)
            if not target and act is not None and 200 <= status < 300:
                target = _created_target(act, parsed)
            detail: dict[str, Any] = {"status": status}
            if status >= 400 and isinstance(parsed, dict) and isinstance(parsed.get("error"), str):
                detail["error"] = parsed["error"]
            principal = state.get("principal")
            if principal is not None:
                actor, actor_id = str(principal.username), principal.user_id
                via = str(getattr(principal, "via", "token"))
            else:
                actor, actor_id, via = "", None, "anonymous"
            proxies = getattr(services.settings, "trusted_proxies", None) or ()
            await services.audit.record(
                action,
                result=result_of(status),
                actor=actor,
                actor_id=actor_id,
                via=via,
                target=target,
                remote=client_address(scope, proxies),
                status=status,
                detail=detail,
            )
        except Exception:
            # the action has happened and cannot be undone; make the gap loud
            log.exception(
                "could not write the audit entry for %s %s", scope["method"], scope["path"]
            )


@asynccontextmanager
async def audited_login(
    svc: Services, request: Request, username: str, remote: str, *, via: str
) -> AsyncIterator[None]:
    """Record a login attempt with the username tried (the middleware cannot read bodies).

    A refusal is recorded with its error code and re-raised; the middleware then adds nothing.
    """
    request.state.audit_recorded = True
    try:
        yield
    except DomainError as exc:
        await svc.audit.record(
            "auth.login",
            result=result_of(exc.status),
            actor=username,
            via="anonymous",
            target=f"user:{username}",
            remote=remote,
            status=exc.status,
            detail={"status": exc.status, "error": exc.code, "channel": via},
        )
        raise
    await svc.audit.record(
        "auth.login",
        result="ok",
        actor=username,
        via=via,
        target=f"user:{username}",
        remote=remote,
        status=200,
        detail={"status": 200, "channel": via},
    )
