"""Console pages for OMA DM devices: the list, registration, and raw node operations.

Registration answers with the device's DMAcc credentials, certificate and private key on
that one page (nothing of it is kept here; the page is `no-store` like every console page).
Node operations are queued through OmadmService.queue_ops, so they are ordinary command
runs: the device page lists them with each node's status and value.
"""

from __future__ import annotations

import base64
import re
from typing import Annotated, Any, get_args
from urllib.parse import quote

from fastapi import APIRouter, Form, Request
from fastapi.responses import Response
from pydantic import ValidationError

from custos.console.auth import ConsoleUser
from custos.console.routes import (
    OMADM_FORMATS,
    OMADM_VERBS,
    PREFIX,
    ConsoleRoute,
    _device_page,
    _needs,
    _needs_everywhere,
    _svc,
    _validation_lines,
    render,
)
from custos.errors import DomainError, Invalid
from custos.omadm.schemas import AccountCreate, AccountCreated, NodeOp, OpsRequest, UserAlert

router = APIRouter(prefix=PREFIX, route_class=ConsoleRoute, include_in_schema=False)

AUTH_CHOICES = (
    ("md5", "MD5 digest (syncml:auth-md5)"),
    ("hmac", "HMAC-MD5 (x-syncml-hmac)"),
    ("basic", "Basic (syncml:auth-basic)"),
    ("cert", "TLS client certificate"),
)
NO_DATA_VERBS = ("Get", "Delete")
MAX_VALUE = 1024 * 1024
URI_HELP = (
    "the node URI starts with ./ and names up to 31 segments of at most 255 characters "
    "(e.g. ./DevInfo/Man)"
)


def _register_form(**values: str) -> dict[str, str]:
    return {"dev_id": "", "name": "", "auth": "md5", "group": "", "notify_url": "", **values}


async def _omadm_page(
    request: Request,
    user: ConsoleUser,
    *,
    status: int = 200,
    error: DomainError | None = None,
    form: dict[str, str] | None = None,
) -> Response:
    svc = _svc(request)
    accounts = await svc.omadm.list_accounts(user.principal.device_scope("devices.view"))
    can_register = user.principal.can_everywhere("devices.enroll")
    groups = await svc.devices.list_groups() if can_register else []
    return render(
        request, "omadm.html", user, status=status, active="omadm", accounts=accounts,
        can_register=can_register, groups=groups, auth_choices=AUTH_CHOICES,
        form=form or _register_form(), error=error.detail if error else "",
    )  # fmt: skip


@router.get("/omadm")
async def omadm_devices(
    request: Request, user: Annotated[ConsoleUser, _needs("devices.view")]
) -> Response:
    """OMA DM devices with their DM identity and sessions, and the form to register one."""
    return await _omadm_page(request, user)


def _data_uri(text: str) -> str:
    return "data:application/x-pem-file;base64," + base64.b64encode(text.encode()).decode()


def _file_stem(dev_id: str) -> str:
    """A file name made of the DevId (IMEI:35… -> IMEI_35…), never a path."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", dev_id).strip("._")[:60] or "omadm-device"


def _created_view(request: Request, created: AccountCreated) -> dict[str, Any]:
    settings = _svc(request).settings
    base = (settings.public_url or str(request.base_url)).rstrip("/")
    url = created.server_url
    server_url = url if url.startswith(("http://", "https://")) else base + url
    stem = _file_stem(created.dev_id)
    bundle = created.private_key + created.certificate + created.ca_certificate
    return {
        "created": created,
        "server_url": server_url,
        "bundle_href": _data_uri(bundle),
        "bundle_name": f"{stem}.pem",
        "ca_href": _data_uri(created.ca_certificate),
        "ca_name": "custos-ca.pem",
        "bundle": bundle,
    }


@router.post("/omadm")
async def omadm_register(
    request: Request,
    user: Annotated[ConsoleUser, _needs_everywhere("devices.enroll")],
    dev_id: Annotated[str, Form(max_length=255)] = "",
    name: Annotated[str, Form(max_length=255)] = "",
    auth: Annotated[str, Form(max_length=10)] = "md5",
    group: Annotated[str, Form(max_length=100)] = "",
    notify_url: Annotated[str, Form(max_length=500)] = "",
) -> Response:
    """Register an OMA DM device; its credentials and key are shown on this answer only."""
    form = _register_form(dev_id=dev_id, name=name, auth=auth, group=group, notify_url=notify_url)
    try:
        if not dev_id.strip():
            raise Invalid(
                "enter the device's DevId (its ./DevInfo/DevId, e.g. IMEI:356938035643809)"
            )
        try:
            req = AccountCreate.model_validate(
                {
                    "dev_id": dev_id.strip(),
                    "name": name.strip() or None,
                    "auth": auth,
                    "group": group.strip() or None,
                    "notify_url": notify_url.strip(),
                }
            )
        except ValidationError as exc:
            raise Invalid("; ".join(_validation_lines(exc.errors()))) from None
        created = await _svc(request).omadm.enroll(req, user.principal.username)
    except DomainError as exc:
        return await _omadm_page(request, user, status=exc.status, error=exc, form=form)
    # a reload shows the list: the credentials are not shown a second time
    return render(
        request, "omadm_created.html", user, status=201, active="omadm",
        canonical_url=PREFIX + "/omadm", **_created_view(request, created),
    )  # fmt: skip


def _device_url(device_id: str) -> str:
    return f"{PREFIX}/devices/{quote(device_id, safe='')}"


def _op_errors(exc: ValidationError) -> str:
    out = []
    for e in exc.errors():
        field = ".".join(str(x) for x in e.get("loc", ()))
        if field in ("target", "source") and e.get("type") == "string_pattern_mismatch":
            out.append(URI_HELP)
        else:
            msg = str(e.get("msg", "")).removeprefix("Value error, ")
            out.append(f"{field}: {msg}" if field else msg)
    return "; ".join(out) or "the node operation is not valid"


def _node_request(verb: str, target: str, value: str, fmt: str) -> OpsRequest:
    """One node operation from the form (an empty value is no data where data is optional)."""
    target = target.strip()
    if verb not in OMADM_VERBS:
        raise Invalid(f"the operation is one of {', '.join(OMADM_VERBS)}")
    if not target:
        raise Invalid("enter the node URI, e.g. ./DevInfo/Man")
    if target != "." and not target.startswith("./"):
        raise Invalid(URI_HELP)
    if fmt and fmt not in OMADM_FORMATS:
        raise Invalid(f"the format is one of {', '.join(OMADM_FORMATS)} (or empty)")
    if verb in NO_DATA_VERBS and value:
        raise Invalid(f"{verb} takes no value: leave the value empty")
    data: str | None = value
    if not value and (verb in NO_DATA_VERBS or verb == "Exec" or fmt == "node"):
        data = None
    try:
        op = NodeOp.model_validate(
            {"verb": verb, "target": target, "data": data, "format": fmt or None}
        )
    except ValidationError as exc:
        raise Invalid(_op_errors(exc)) from None
    return OpsRequest(ops=[op])


@router.post("/devices/{device_id}/omadm")
async def omadm_node_op(
    request: Request,
    device_id: str,
    user: Annotated[ConsoleUser, _needs("commands.run")],
    verb: Annotated[str, Form(max_length=10)] = "Get",
    target: Annotated[str, Form(max_length=1000)] = "",
    value: Annotated[str, Form(max_length=MAX_VALUE)] = "",
    fmt: Annotated[str, Form(alias="format", max_length=10)] = "",
) -> Response:
    """Queue one node operation for the device's next session and send it package #0."""
    form = {"verb": verb, "target": target, "value": value, "format": fmt}
    try:
        req = _node_request(verb, target, value, fmt)
        queued = await _svc(request).omadm.queue_ops(device_id, req, user.principal)
    except DomainError as exc:
        return await _device_page(
            request, user, device_id, status=exc.status, error=exc, omadm_form=form
        )
    return await _device_page(
        request, user, queued.device_id, status=201, omadm_queued=queued, omadm_op=req.ops[0],
        omadm_form={**form, "value": ""}, canonical_url=_device_url(queued.device_id),
    )  # fmt: skip


# the kinds UserAlert takes (their labels: _device_omadm.html)
ALERT_KINDS: tuple[str, ...] = get_args(UserAlert.model_fields["kind"].annotation)


def _alert_request(kind: str, text: str, choices: str, default: str) -> UserAlert:
    """A user-interaction alert from the form: choices one per line, blank lines ignored."""
    if kind not in ALERT_KINDS:
        raise Invalid(f"the question is one of {', '.join(ALERT_KINDS)}")
    if not text.strip():
        raise Invalid("enter the text the device shows its user")
    listed = [c.strip() for c in choices.splitlines() if c.strip()]
    try:
        return UserAlert.model_validate(
            {"kind": kind, "text": text.strip(), "choices": listed, "default": default or None}
        )
    except ValidationError as exc:
        raise Invalid(_op_errors(exc)) from None


@router.post("/devices/{device_id}/omadm/alert")
async def omadm_user_alert(
    request: Request,
    device_id: str,
    user: Annotated[ConsoleUser, _needs("commands.run")],
    kind: Annotated[str, Form(max_length=10)] = "display",
    text: Annotated[str, Form(max_length=1000)] = "",
    choices: Annotated[str, Form(max_length=5000)] = "",
    default: Annotated[str, Form(max_length=200)] = "",
) -> Response:
    """Ask the device's user something (Alerts 1100-1104); the answer shows in the run."""
    form = {"kind": kind, "text": text, "choices": choices, "default": default}
    try:
        req = _alert_request(kind, text, choices, default)
        queued = await _svc(request).omadm.queue_alert(
            device_id, req, user.principal.username, user.principal.device_scope("commands.run")
        )
    except DomainError as exc:
        return await _device_page(
            request, user, device_id, status=exc.status, error=exc, omadm_alert_form=form
        )
    return await _device_page(
        request, user, queued.device_id, status=201, omadm_queued=queued,
        canonical_url=_device_url(queued.device_id),
    )  # fmt: skip


@router.post("/devices/{device_id}/omadm/notify")
async def omadm_notify(
    request: Request,
    device_id: str,
    user: Annotated[ConsoleUser, _needs("commands.run")],
) -> Response:
    """Send package #0 now: the device opens a session and takes its queued operations."""
    svc = _svc(request)
    try:
        dev = await svc.omadm.device_id(device_id, user.principal.device_scope("commands.run"))
    except DomainError as exc:
        return await _device_page(request, user, device_id, status=exc.status, error=exc)
    sent, detail = await svc.omadm.notify(dev)
    return await _device_page(
        request, user, dev, omadm_notified=(sent, detail), canonical_url=_device_url(dev)
    )
