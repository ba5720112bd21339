"""Console pages under /console: thin handlers that call the services and render templates.

Every page needs a console session (else the browser is sent to the login page), every
unsafe request the session's CSRF token, and every page and action its permission, checked
here on the server whatever the page showed. Errors become HTML pages (or, for htmx, a
fragment swapped into the page's message area) rather than the API's JSON.
"""

from __future__ import annotations

import contextlib
import math
import shlex
from collections.abc import Callable, Coroutine
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote, urlencode

import segno
from fastapi import APIRouter, Depends, FastAPI, Form, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, PackageLoader, select_autoescape
from markupsafe import Markup
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from custos import __version__
from custos.accounts.permissions import PERMISSIONS, SCOPABLE
from custos.accounts.service import MAX_TOKEN_DAYS, UserOut
from custos.commands.schemas import CommandCreate
from custos.commands.service import TERMINAL as RUN_TERMINAL
from custos.console import charts, queries
from custos.console.auth import (
    CSRF_FIELD,
    LOGIN_CSRF_COOKIE,
    ConsoleUser,
    LoginRequired,
    clear_session_cookie,
    current_user,
    login_csrf,
    need,
    set_login_csrf,
    set_session_cookie,
    tokens_match,
)
from custos.db.base import utcnow
from custos.devices.schemas import TokenCreate
from custos.errors import Conflict, DomainError, Forbidden, Invalid, NotFound
from custos.omadm.schemas import NodeOp, OpsQueued
from custos.policies.schemas import AssignmentIn, LockIn, LostIn, PolicyAdd, WipeIn
from custos.server.container import Services
from custos.software.schemas import DeploymentCreate

PREFIX = "/console"
UPLOAD_PATH = PREFIX + "/software/upload"
STATIC_DIR = Path(__file__).parent / "static"
PAGE_SIZES = (25, 50, 100)
DEVICE_SORTS = ("name", "os", "model", "last_seen", "enrolled_at", "status")
# deployment device states after which nothing more happens
DEPLOY_DONE = frozenset({"installed", "removed", "failed", "cancelled"})
# states in which a device works on its own, whatever the deployment's state: pausing or
# aborting stops new sends, not a device that already has its command
DEPLOY_MOVING = frozenset({"queued", "downloading", "downloaded", "installing", "removing"})
RUN_DONE = frozenset(RUN_TERMINAL)
HISTORY_LIMIT = 500
# OMA DM runs listed with their nodes in the device page's OMA DM section
OMADM_RUNS = 5
# the node operations the device page's form sends (Copy needs a source node: API and CLI)
OMADM_VERBS = ("Get", "Replace", "Add", "Delete", "Exec")
OMADM_FORMATS = ("chr", "int", "bool", "float", "b64", "bin", "xml", "node", "date", "time")

# the console's own pages allow nothing from elsewhere and no inline script or style
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'; "
    "object-src 'none'"
)
SECURITY_HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
    "x-frame-options": "DENY",
    "cache-control": "no-store",
}

NAV: tuple[tuple[str, str, str, str | None], ...] = (
    ("dashboard", "Dashboard", PREFIX + "/", None),
    ("devices", "Devices", PREFIX + "/devices", "devices.view"),
    ("omadm", "OMA DM", PREFIX + "/omadm", "devices.view"),
    ("commands", "Commands", PREFIX + "/commands", "commands.view"),
    ("software", "Software", PREFIX + "/software", "software.view"),
    ("policies", "Policies", PREFIX + "/policies", "policies.view"),
    ("compliance", "Compliance", PREFIX + "/compliance", "devices.view"),
    ("tokens", "Enrolment", PREFIX + "/tokens", "devices.enroll"),
    ("reports", "Reports", PREFIX + "/reports", "reports.view"),
    ("audit", "Audit log", PREFIX + "/audit", "audit.view"),
    ("users", "Users", PREFIX + "/users", "users.manage"),
)


# --- rendering ------------------------------------------------------------------------------


def _environment(app: Any) -> Environment:
    """The app's Jinja2 environment, made on first use (nothing is built at import time)."""
    env: Environment | None = getattr(app.state, "console_env", None)
    if env is None:
        env = Environment(
            loader=PackageLoader("custos.console", "templates"),
            autoescape=select_autoescape(default=True, default_for_string=True),
            trim_blocks=True,
            lstrip_blocks=True,
        )
        env.filters["dt"] = _fmt_dt
        env.filters["ago"] = _ago
        env.filters["size"] = _fmt_size
        env.globals["version"] = __version__
        env.globals["static"] = lambda p: f"{PREFIX}/static/{p}?v={__version__}"
        app.state.console_env = env
    return env


def _fmt_dt(v: datetime | None) -> str:
    return v.strftime("%Y-%m-%d %H:%M UTC") if v else "—"


def _ago(v: datetime | None) -> str:
    if v is None:
        return "never"
    s = (utcnow() - v).total_seconds()
    if s < 0:
        return "just now"
    for size, unit in ((86400, "d"), (3600, "h"), (60, "min")):
        if s >= size:
            return f"{int(s // size)} {unit} ago"
    return f"{int(s)} s ago"


def _fmt_size(n: int | None) -> str:
    if n is None:
        return "—"
    v = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if v < 1024 or unit == "GiB":
            return f"{v:.0f} {unit}" if unit == "B" else f"{v:.1f} {unit}"
        v /= 1024
    return f"{v:.1f} GiB"


def _is_htmx(request: Request) -> bool:
    return request.headers.get("hx-request") == "true"


def render(
    request: Request,
    template: str,
    user: ConsoleUser | None,
    *,
    status: int = 200,
    active: str = "",
    **ctx: Any,
) -> HTMLResponse:
    """A page (or fragment) with the layout's context: user, permissions, nav, CSRF token."""
    nav = []
    if user is not None:
        nav = [
            {"key": k, "label": label, "url": url, "current": k == active}
            for k, label, url, perm in NAV
            if perm is None or user.can(perm)
        ]
    html = (
        _environment(request.app)
        .get_template(template)
        .render(
            request=request,
            user=user,
            can=user.can if user is not None else (lambda _p: False),
            csrf=user.csrf if user is not None else "",
            csrf_field=CSRF_FIELD,
            nav=nav,
            active=active,
            **ctx,
        )
    )
    return HTMLResponse(html, status_code=status)


def _error(request: Request, status: int, code: str, detail: Any) -> HTMLResponse:
    user = getattr(request.state, "console_user", None)
    text = detail if isinstance(detail, str) else "; ".join(_validation_lines(detail))
    if _is_htmx(request):
        resp = render(request, "_error.html", user, status=status, code=code, detail=text)
        # swapped into the page's message area whatever element asked
        resp.headers["hx-retarget"] = "#messages"
        resp.headers["hx-reswap"] = "innerHTML"
        return resp
    return render(request, "error.html", user, status=status, code=code, detail=text)


def _validation_lines(errors: Any) -> list[str]:
    out = []
    for e in errors if isinstance(errors, list) else []:
        loc = [str(x) for x in e.get("loc", ()) if x not in ("body", "query", "path")]
        out.append(f"{'.'.join(loc) or 'form'}: {e.get('msg', '')}")
    return out or ["the form is not valid"]


class ConsoleRoute(APIRoute):
    """Turns login redirects and domain errors into browser answers; adds security headers."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        """Wrap FastAPI's handler."""
        handler = super().get_route_handler()

        async def wrapped(request: Request) -> Response:
            response: Response
            try:
                response = await handler(request)
            except LoginRequired:
                target = request.url.path
                if request.url.query:
                    target += "?" + request.url.query
                login = f"{PREFIX}/login?" + urlencode({"next": target})
                if _is_htmx(request):
                    response = Response(status_code=204, headers={"hx-redirect": login})
                else:
                    response = RedirectResponse(login, status_code=303)
            except DomainError as exc:
                response = _error(request, exc.status, exc.code, exc.detail)
            except (RequestValidationError, ValidationError) as exc:
                response = _error(request, 422, "invalid", exc.errors())
            for k, v in SECURITY_HEADERS.items():
                response.headers.setdefault(k, v)
            return response

        return wrapped


router = APIRouter(prefix=PREFIX, route_class=ConsoleRoute, include_in_schema=False)
root_router = APIRouter(include_in_schema=False)


def install(app: FastAPI) -> None:
    """Mount the console on an app: its pages, its static files, and `/` pointing at it."""
    # before the pages: the pages' catch-all 404 route would shadow it
    app.mount(PREFIX + "/static", StaticFiles(directory=STATIC_DIR), name="console-static")
    # the OMA DM pages import this module's helpers, hence the import here; before the
    # pages for the same reason as the static files
    from custos.console.omadm import router as omadm_router

    app.include_router(omadm_router)
    app.include_router(router)
    app.include_router(root_router)


@root_router.get("/")
async def root() -> RedirectResponse:
    """The server's front page is the console."""
    return RedirectResponse(PREFIX + "/", status_code=307)


def _svc(request: Request) -> Services:
    svc: Services = request.app.state.services
    return svc


def _needs(perm: str) -> Any:
    return Depends(need(perm))


User = Annotated[ConsoleUser, Depends(current_user)]


def _safe_next(value: str | None) -> str:
    """Only a path inside the console: never an open redirect to another site."""
    if (
        value
        and value.startswith(PREFIX + "/")
        and not value.startswith("//")
        and "\\" not in value
    ):
        return value
    return PREFIX + "/"


# --- login / logout -------------------------------------------------------------------------


@router.get("/login")
async def login_page(
    request: Request, next_url: Annotated[str, Query(alias="next", max_length=2000)] = ""
) -> Response:
    """The sign-in form."""
    token, fresh = login_csrf(request)
    page = render(request, "login.html", None, next=_safe_next(next_url), login_token=token)
    if fresh:
        set_login_csrf(page, request, token)
    return page


@router.post("/login")
async def login(
    request: Request,
    username: Annotated[str, Form(max_length=150)] = "",
    password: Annotated[str, Form(max_length=1024)] = "",
    otp: Annotated[str, Form(max_length=16)] = "",
    next_url: Annotated[str, Form(alias="next", max_length=2000)] = "",
    csrf: Annotated[str, Form(max_length=200)] = "",
) -> Response:
    """Check the credentials, open a session and set its cookie."""
    token, fresh = login_csrf(request)
    target = _safe_next(next_url)

    def again(message: str, status: int, *, otp_needed: bool = False) -> Response:
        page = render(
            request, "login.html", None, status=status, next=target, error=message,
            username=username, login_token=token, otp_needed=otp_needed,
        )  # fmt: skip
        if fresh:
            set_login_csrf(page, request, token)
        return page

    if fresh or not tokens_match(token, csrf):
        return again("Your sign-in form had expired. Please sign in again.", 403)
    if not username or not password:
        return again("Enter your username and password.", 422)
    remote = request.client.host if request.client else ""
    try:
        grant = await _svc(request).accounts.open_session(
            username, password, otp.strip() or None, remote
        )
    except DomainError as exc:
        if exc.code in ("otp_required", "bad_otp"):
            # the password was right (it is checked first); ask again, with the code this time
            hint = (
                "This account uses two-factor sign-in: enter your password again and the "
                "6-digit code from your authenticator app."
                if exc.code == "otp_required"
                else "The one-time code was wrong or has expired; enter your password and "
                "a new code."
            )
            return again(hint, exc.status, otp_needed=True)
        return again(str(exc.detail) or "Sign-in failed.", exc.status)
    response = RedirectResponse(target, status_code=303)
    max_age = max(60, int((grant.expires_at - utcnow()).total_seconds()))
    set_session_cookie(response, request, grant.secret, max_age)
    response.delete_cookie(LOGIN_CSRF_COOKIE, path=PREFIX)
    return response


@router.post("/logout")
async def logout(request: Request, user: User) -> Response:
    """End the session everywhere (the server forgets it) and drop the cookie."""
    with contextlib.suppress(DomainError):
        await _svc(request).accounts.close_session(user.secret)
    response = RedirectResponse(PREFIX + "/login", status_code=303)
    clear_session_cookie(response, request)
    return response


# --- dashboard ------------------------------------------------------------------------------


@router.get("/")
async def dashboard(request: Request, user: User) -> Response:
    """Charts: devices by OS and model, contact, enrolment over time, deployments running."""
    svc = _svc(request)
    ctx: dict[str, Any] = {"summary": None}
    if user.can("devices.view"):
        interval = svc.settings.checkin_interval_s
        scope = user.principal.device_scope("devices.view")
        summary = await queries.fleet_summary(
            svc.db, fact=svc.reports.fact, online_within_s=max(3 * interval, 120), scope=scope
        )
        models = await svc.reports.hardware(scope)
        labels, values = queries.cumulative_by_day(summary)
        ctx["summary"] = summary
        ctx["os_chart"] = charts.donut_chart(
            "Devices by operating system", charts.top_n(summary.by_os, 6)
        )
        ctx["model_chart"] = charts.bar_chart(
            "Devices by model (top 8)",
            charts.top_n(
                [(" ".join(x for x in (m.manufacturer, m.model) if x) or "(unknown)", m.devices)
                 for m in models],
                8,
            ),
        )  # fmt: skip
        offline = summary.active - summary.online
        ctx["online_chart"] = charts.donut_chart(
            "Online now", [("Online", summary.online), ("Offline", offline)]
        )
        ctx["contact_chart"] = charts.bar_chart(
            "Last contact of active devices",
            [
                ("Within 1 hour", summary.seen_1h),
                ("Within 24 hours", summary.seen_24h),
                ("Within 7 days", summary.seen_7d),
                ("Older than 7 days", summary.active - summary.seen_7d - summary.never_seen),
                ("Never", summary.never_seen),
            ],
        )
        comp = await queries.compliance_summary(svc.db, scope)
        ctx["compliance_chart"] = charts.donut_chart(
            "Policy compliance",
            [
                ("Compliant", comp.compliant),
                ("Non-compliant", comp.noncompliant),
                ("Pending", comp.pending),
                ("No policy", max(0, summary.active - comp.compliant - comp.noncompliant
                                  - comp.pending)),
            ],
            empty="No active devices yet.",
        )  # fmt: skip
        ctx["enrol_chart"] = charts.line_chart(
            "Enrolled devices, last 30 days", labels, [("Enrolled devices", values)]
        )
        if scope is None:  # the snapshots count the whole fleet
            points = await svc.reports.fleet_history(7)
            # at most ~84 points (one per 2 h over a week), the newest always kept
            stride = max(1, math.ceil(len(points) / 84))
            points = points[::-1][::stride][::-1]
            ctx["history_chart"] = charts.line_chart(
                "Online and offline, last 7 days",
                [f"{p.at.astimezone():%a %H:%M}" for p in points],
                [
                    ("Online", [p.online for p in points]),
                    ("Offline", [p.offline for p in points]),
                ],
                empty="No snapshots yet: one is taken every "
                f"{svc.settings.fleet_snapshot_s // 60} minutes.",
            )
    if user.can("software.view"):
        deps = await svc.software.list_deployments(limit=50, offset=0)
        running = [d for d in deps if d.state in ("active", "paused")][:8]
        keys = ["installed", "removed", "downloading", "installing", "queued", "pending", "failed"]
        ctx["deploy_chart"] = charts.stacked_bar(
            "Deployments in progress",
            [(f"{d.name} ({d.state})", d.counts) for d in running],
            keys,
        )
    return render(request, "dashboard.html", user, active="dashboard", **ctx)


# --- devices --------------------------------------------------------------------------------


@router.get("/devices")
async def devices(
    request: Request,
    user: Annotated[ConsoleUser, _needs("devices.view")],
    q: Annotated[str, Query(max_length=200)] = "",
    os: Annotated[str, Query(max_length=100)] = "",
    model: Annotated[str, Query(max_length=100)] = "",
    group: Annotated[str, Query(max_length=100)] = "",
    status: Annotated[str, Query(pattern="^(|active|retired)$")] = "",
    sort: Annotated[str, Query(pattern="^(" + "|".join(DEVICE_SORTS) + ")$")] = "name",
    order: Annotated[str, Query(pattern="^(asc|desc)$")] = "asc",
    page: Annotated[int, Query(ge=1, le=100_000)] = 1,
    per_page: Annotated[int, Query(ge=1, le=100)] = 50,
) -> Response:
    """Devices, filtered, sorted and paginated in the database (fast at 100,000 devices)."""
    svc = _svc(request)
    per_page = min(PAGE_SIZES, key=lambda n: abs(n - per_page))
    offset = (page - 1) * per_page
    scope = user.principal.device_scope("devices.view")
    result = await svc.reports.devices_page(
        scope, q=q or None, os=os or None, model=model or None, group=group or None,
        status=status or None, sort=sort, order=order, limit=per_page, offset=offset,
    )  # fmt: skip
    rows, total = result.items, result.total
    has_next = offset + len(rows) < total
    groups = await svc.devices.list_groups()
    params = {
        "q": q, "os": os, "model": model, "group": group, "status": status,
        "sort": sort, "order": order, "per_page": per_page,
    }  # fmt: skip

    def url(**over: Any) -> str:
        merged = {**params, "page": page, **over}
        return (
            PREFIX
            + "/devices?"
            + urlencode({k: v for k, v in merged.items() if v not in ("", None)})
        )

    ctx: dict[str, Any] = {
        "rows": rows, "total": total, "page": page, "has_next": has_next, "params": params,
        "url": url, "groups": groups, "sorts": DEVICE_SORTS, "page_sizes": PAGE_SIZES,
        "pages": math.ceil(total / per_page) if total else None,
        "estimate": result.total_is_estimate,
    }  # fmt: skip
    if _is_htmx(request) and request.headers.get("hx-target") == "device-results":
        return render(request, "_device_results.html", user, **ctx)
    return render(request, "devices.html", user, active="devices", **ctx)


def _split_inventory(inv: dict[str, str]) -> dict[str, Any]:
    """Inventory keys grouped for display: os, hw, software (source, name, version), other."""
    groups: dict[str, list[tuple[str, str]]] = {"os": [], "hw": [], "other": []}
    software: list[tuple[str, str, str]] = []
    for k in sorted(inv):
        v = inv[k]
        if k.startswith("sw."):
            _, _, rest = k.partition(".")
            source, _, name = rest.partition(".")
            software.append((source, name, v))
        elif k.startswith("os."):
            groups["os"].append((k[3:], v))
        elif k.startswith("hw."):
            groups["hw"].append((k[3:], v))
        else:
            groups["other"].append((k, v))
    return {"groups": groups, "software": software}


@router.get("/devices/{device_id}")
async def device_detail(
    request: Request,
    device_id: str,
    user: Annotated[ConsoleUser, _needs("devices.view")],
) -> Response:
    """One device: inventory by area, history as a diff, commands with output, software."""
    return await _device_page(request, user, device_id)


async def _device_page(
    request: Request,
    user: ConsoleUser,
    device_id: str,
    *,
    status: int = 200,
    error: DomainError | None = None,
    lost_form: dict[str, Any] | None = None,
    omadm_form: dict[str, str] | None = None,
    omadm_queued: OpsQueued | None = None,
    omadm_op: NodeOp | None = None,
    omadm_notified: tuple[bool, str] | None = None,
    omadm_alert_form: dict[str, str] | None = None,
    canonical_url: str = "",
) -> Response:
    svc = _svc(request)
    if len(device_id) > 255:
        raise NotFound("no such device")
    view_scope = user.principal.device_scope("devices.view")
    dev = await svc.devices.show(device_id, view_scope)
    history = await svc.devices.history(dev.id, key_prefix=None, limit=HISTORY_LIMIT)
    versions: dict[int, dict[str, Any]] = {}
    for ch in history:
        v = versions.setdefault(ch.version, {"version": ch.version, "at": ch.at, "changes": []})
        v["changes"].append(ch)
    runs = []
    if user.can("commands.view"):
        runs = await queries.device_runs(svc.db, dev.id)
    inv = _split_inventory(dev.inventory)
    can_run = user.can("commands.run") and dev.status == "active"
    can_retire = user.can("devices.manage") and dev.status == "active"
    compliance = await svc.policies.device_compliance(dev.id, view_scope)
    lost = compliance.lost or {}
    diagnostics = await svc.diagnostics.latest(dev.id)
    omadm = None
    omadm_runs: list[queries.DeviceRun] = []
    if dev.agent_version.startswith("omadm"):
        omadm = await svc.omadm.account(dev.id)
        if omadm is not None and user.can("commands.view"):
            omadm_runs = await queries.device_runs(svc.db, dev.id, kind="omadm", limit=OMADM_RUNS)
    return render(
        request, "device.html", user, status=status, active="devices", dev=dev, inv=inv,
        versions=list(versions.values()), runs=runs, can_run=can_run, can_retire=can_retire,
        history_limited=len(history) >= HISTORY_LIMIT, compliance=compliance,
        can_lock=user.can("devices.lock") and dev.status == "active",
        can_wipe=user.can("devices.wipe") and dev.status == "active",
        is_lost=lost.get("state") == "lost", error=error.detail if error else "",
        notice="" if error else _notice(request),
        lost_form=lost_form or {"lock": True, "wipe": "none", "auto_wipe_days": "",
                                "dry_run": False, "message": ""},
        omadm=omadm, omadm_runs=omadm_runs, omadm_queued=omadm_queued, omadm_op=omadm_op,
        omadm_notified=omadm_notified,
        omadm_form=omadm_form or {"verb": "Get", "target": "", "value": "", "format": ""},
        omadm_alert_form=omadm_alert_form or {"kind": "display", "text": "", "choices": "",
                                              "default": ""},
        omadm_verbs=OMADM_VERBS, omadm_formats=OMADM_FORMATS, canonical_url=canonical_url,
        diagnostics=diagnostics,
    )  # fmt: skip


@router.post("/devices/{device_id}/retire")
async def device_retire(
    request: Request,
    device_id: str,
    user: Annotated[ConsoleUser, _needs("devices.manage")],
) -> Response:
    """Retire a device (after the page's confirmation)."""
    svc = _svc(request)
    dev = await svc.devices.retire(device_id, user.principal.device_scope("devices.manage"))
    return RedirectResponse(f"{PREFIX}/devices/{dev.id}?retired=1", status_code=303)


# --- lost devices, lock and wipe ------------------------------------------------------------


def _checked(value: str) -> bool:
    """An HTML checkbox: present (any value but empty) means ticked."""
    return bool(value) and value not in ("0", "false", "off")


@router.post("/devices/{device_id}/lost")
async def device_lost(
    request: Request,
    device_id: str,
    user: Annotated[ConsoleUser, _needs("devices.lock")],
    lock: Annotated[str, Form(max_length=10)] = "",
    wipe: Annotated[str, Form(max_length=20)] = "none",
    auto_wipe_days: Annotated[str, Form(max_length=10)] = "",
    dry_run: Annotated[str, Form(max_length=10)] = "",
    message: Annotated[str, Form(max_length=500)] = "",
    confirm: Annotated[str, Form(max_length=255)] = "",
) -> Response:
    """Mark a device lost: lock it, and (with devices.wipe) wipe it now or after silent days."""
    days, locks, dry = auto_wipe_days.strip(), _checked(lock), _checked(dry_run)
    form: dict[str, Any] = {"lock": locks, "wipe": wipe, "auto_wipe_days": days,
                            "dry_run": dry, "message": message}  # fmt: skip
    try:
        try:
            req = LostIn.model_validate(
                {"lock": locks, "wipe": wipe, "dry_run": dry, "message": message,
                 "auto_wipe_days": int(days) if days else None, "confirm": confirm}
            )  # fmt: skip
        except ValidationError as exc:
            raise Invalid("; ".join(_validation_lines(exc.errors()))) from None
        except ValueError:
            raise Invalid("auto-wipe after is a whole number of days (empty: never)") from None
        wipes = req.wipe != "none" or req.auto_wipe_days is not None
        scope = user.principal.device_scope("devices.wipe" if wipes else "devices.lock")
        out = await _svc(request).policies.mark_lost(
            device_id, req, user.principal.username, scope=scope, may_wipe=user.can("devices.wipe")
        )
    except DomainError as exc:
        return await _device_page(
            request, user, device_id, status=exc.status, error=exc, lost_form=form
        )
    return _done(f"{PREFIX}/devices/{out.device_id}", "lost")


@router.post("/devices/{device_id}/found")
async def device_found(
    request: Request,
    device_id: str,
    user: Annotated[ConsoleUser, _needs("devices.lock")],
) -> Response:
    """A lost device is back: its pending lock and wipe are cancelled, a lock is undone."""
    try:
        out = await _svc(request).policies.found(
            device_id, user.principal.username, scope=user.principal.device_scope("devices.lock")
        )
    except DomainError as exc:
        return await _device_page(request, user, device_id, status=exc.status, error=exc)
    return _done(f"{PREFIX}/devices/{out.device_id}", "found")


@router.post("/devices/{device_id}/lock")
async def device_lock(
    request: Request,
    device_id: str,
    user: Annotated[ConsoleUser, _needs("devices.lock")],
    message: Annotated[str, Form(max_length=500)] = "",
) -> Response:
    """Lock a device at its next contact."""
    try:
        try:
            req = LockIn(message=message)
        except ValidationError as exc:
            raise Invalid("; ".join(_validation_lines(exc.errors()))) from None
        out = await _svc(request).policies.lock(
            device_id, req, user.principal.username,
            scope=user.principal.device_scope("devices.lock"),
        )  # fmt: skip
    except DomainError as exc:
        return await _device_page(request, user, device_id, status=exc.status, error=exc)
    return _done(f"{PREFIX}/devices/{out['device_id']}", "locked")


@router.post("/devices/{device_id}/wipe")
async def device_wipe(
    request: Request,
    device_id: str,
    user: Annotated[ConsoleUser, _needs("devices.wipe")],
    mode: Annotated[str, Form(max_length=20)] = "selective",
    dry_run: Annotated[str, Form(max_length=10)] = "",
    confirm: Annotated[str, Form(max_length=255)] = "",
) -> Response:
    """Wipe a device at its next contact; unless a dry run, its name must be typed to confirm."""
    try:
        try:
            req = WipeIn.model_validate(
                {"mode": mode, "dry_run": _checked(dry_run), "confirm": confirm}
            )
        except ValidationError as exc:
            raise Invalid("; ".join(_validation_lines(exc.errors()))) from None
        out = await _svc(request).policies.wipe(
            device_id, req, user.principal.username,
            scope=user.principal.device_scope("devices.wipe"),
        )  # fmt: skip
    except DomainError as exc:
        return await _device_page(request, user, device_id, status=exc.status, error=exc)
    return _done(f"{PREFIX}/devices/{out.device_id}", "wipe_dry_run" if out.dry_run else "wipe")


# --- commands -------------------------------------------------------------------------------


def _command_request(
    target: str, kind: str, command: str, interpreter: str, script: str, timeout_s: float
) -> CommandCreate:
    """A CommandCreate from the console's form fields (argv is split like a shell would)."""
    body: dict[str, Any] = {"target": target.strip(), "kind": kind, "timeout_s": timeout_s}
    if kind == "exec":
        try:
            argv = shlex.split(command)
        except ValueError as exc:
            raise Invalid(f"command line: {exc}") from None
        if not argv:
            raise Invalid("enter a command to run")
        body["argv"] = argv
    elif kind == "script":
        body["interpreter"] = interpreter or "sh"
        body["script"] = script
    elif kind not in ("ping", "reboot", "diagnose"):
        raise Invalid("the console sends exec, script, ping, reboot and diagnose commands")
    try:
        return CommandCreate(**body)
    except ValidationError as exc:
        raise Invalid("; ".join(_validation_lines(exc.errors()))) from None


CommandForm = tuple[str, str, str, str, float]


@router.get("/commands")
async def commands(
    request: Request,
    user: Annotated[ConsoleUser, _needs("commands.view")],
    page: Annotated[int, Query(ge=1, le=100_000)] = 1,
) -> Response:
    """Recent commands with their run counts, and the form to send one."""
    svc = _svc(request)
    per_page = 50
    scope = user.principal.device_scope("commands.view")
    scoped = scope is not None
    # a scoped user sees the commands with a run in its groups, counting only those runs
    rows = await svc.commands.list_commands(
        limit=per_page + 1, offset=(page - 1) * per_page, scope=scope
    )
    groups = await svc.devices.list_groups() if user.can("commands.run") else []
    return render(
        request, "commands.html", user, active="commands", rows=rows[:per_page],
        has_next=len(rows) > per_page, page=page, scoped=scoped, groups=groups,
        target=request.query_params.get("target", "")[:300],
    )  # fmt: skip


@router.post("/commands")
async def send_command(
    request: Request,
    user: Annotated[ConsoleUser, _needs("commands.run")],
    target: Annotated[str, Form(max_length=300)],
    kind: Annotated[str, Form(pattern="^(exec|script|ping|reboot|diagnose)$")],
    command: Annotated[str, Form(max_length=32_768)] = "",
    interpreter: Annotated[str, Form(pattern="^(|sh|python|powershell)$")] = "",
    script: Annotated[str, Form(max_length=1_048_576)] = "",
    timeout_s: Annotated[float, Form(gt=0, le=86_400)] = 300,
) -> Response:
    """Queue a command for a device, a list of devices or group:NAME; then follow it."""
    svc = _svc(request)
    req = _command_request(target, kind, command, interpreter, script, timeout_s)
    created = await svc.commands.create(
        req, user.principal.username, user.principal.device_scope("commands.run")
    )
    return RedirectResponse(f"{PREFIX}/commands/{created.id}", status_code=303)


async def _command_view(svc: Services, user: ConsoleUser, command_id: str) -> dict[str, Any]:
    if len(command_id) != 32:
        raise NotFound("no such command")
    cmd = await svc.commands.show(command_id, scope=user.principal.device_scope("commands.view"))
    runs = cmd.runs
    done = all(r.state in RUN_DONE for r in runs)
    return {"cmd": cmd, "runs": runs, "done": done}


@router.get("/commands/{command_id}")
async def command_detail(
    request: Request, command_id: str, user: Annotated[ConsoleUser, _needs("commands.view")]
) -> Response:
    """A command and each device's run; output appears as devices report it."""
    view = await _command_view(_svc(request), user, command_id)
    return render(request, "command.html", user, active="commands", **view)


@router.get("/commands/{command_id}/runs")
async def command_runs(
    request: Request, command_id: str, user: Annotated[ConsoleUser, _needs("commands.view")]
) -> Response:
    """The runs fragment the command page polls every 2 s until every run has finished."""
    view = await _command_view(_svc(request), user, command_id)
    return render(request, "_runs.html", user, **view)


# --- software -------------------------------------------------------------------------------


@router.get("/software")
async def software(
    request: Request, user: Annotated[ConsoleUser, _needs("software.view")]
) -> Response:
    """Packages, deployments, the upload form and the deploy form."""
    svc = _svc(request)
    packages = await svc.software.list_packages(name=None, limit=100, offset=0)
    deployments = await svc.software.list_deployments(limit=50, offset=0)
    groups = await svc.devices.list_groups() if user.can("software.deploy") else []
    return render(
        request, "software.html", user, active="software", packages=packages,
        deployments=deployments, groups=groups, upload_path=UPLOAD_PATH,
        max_bytes=svc.settings.max_package_bytes,
    )  # fmt: skip


def _optional(value: str | None) -> str | None:
    """An empty form field (the script sends every field) means "not given"."""
    value = (value or "").strip()
    return value or None


@router.post(UPLOAD_PATH[len(PREFIX) :])
async def upload_package(
    request: Request,
    user: Annotated[ConsoleUser, _needs("software.manage")],
    filename: Annotated[str, Query(min_length=1, max_length=255)],
    name: Annotated[str | None, Query(max_length=100)] = None,
    version: Annotated[str | None, Query(max_length=100)] = None,
    destination: Annotated[str | None, Query(max_length=4096)] = None,
) -> Response:
    """A package file as the raw request body (the page's script shows upload progress).

    Name and version are for formats that do not carry them (msi, plain files); a plain
    file also needs its destination path on the devices.
    """
    from custos.software.routes import receive_file

    svc = _svc(request)
    tmp = await receive_file(request, svc)
    try:
        pkg = await svc.software.add_package(
            tmp,
            filename=filename,
            name=_optional(name),
            version=_optional(version),
            destination=_optional(destination),
            created_by=user.principal.username,
        )
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return render(request, "_uploaded.html", user, status=201, pkg=pkg)


@router.get("/software/packages/{ref}")
async def package_detail(
    request: Request, ref: str, user: Annotated[ConsoleUser, _needs("software.view")]
) -> Response:
    """One package version: descriptor, detection, deployments using it."""
    if len(ref) > 210:
        raise NotFound("no such package")
    pkg = await _svc(request).software.show_package(ref)
    return render(request, "package.html", user, active="software", pkg=pkg)


def _names(text: str) -> list[str]:
    return [p.strip() for p in text.replace("\n", ",").split(",") if p.strip()]


@router.post("/software/deployments")
async def create_deployment(
    request: Request,
    user: Annotated[ConsoleUser, _needs("software.deploy")],
    package: Annotated[str, Form(min_length=1, max_length=210)],
    devices: Annotated[str, Form(max_length=100_000)] = "",
    groups: Annotated[list[str], Form()] = [],  # noqa: B006 - FastAPI copies defaults
    action: Annotated[str, Form(pattern="^(install|uninstall)$")] = "install",
    mode: Annotated[str, Form(pattern="^(required|available)$")] = "required",
    waves: Annotated[str, Form(max_length=200)] = "100",
) -> Response:
    """Deploy a package to devices and groups, in waves."""
    svc = _svc(request)
    scope = user.principal.device_scope("software.deploy")
    if scope is not None:
        raise Forbidden(
            "deployments from the console need the software.deploy permission everywhere"
        )
    try:
        wave_list = [int(w) for w in waves.replace(" ", "").split(",") if w]
        req = DeploymentCreate(
            package=package,
            targets={"devices": _names(devices), "groups": [g for g in groups if g]},
            action=action,
            mode=mode,
            waves=wave_list or [100],
        )
    except ValueError as exc:
        if isinstance(exc, ValidationError):
            raise Invalid("; ".join(_validation_lines(exc.errors()))) from None
        raise Invalid("waves are percentages separated by commas, e.g. 10, 50, 100") from None
    dep = await svc.software.create_deployment(req, user.principal.username)
    return RedirectResponse(f"{PREFIX}/software/deployments/{dep.id}", status_code=303)


async def _deployment_view(svc: Services, ref: str) -> dict[str, Any]:
    if len(ref) > 100:
        raise NotFound("no such deployment")
    dep = await svc.software.show_deployment(ref)
    total = sum(dep.counts.values())
    finished = sum(n for s, n in dep.counts.items() if s in DEPLOY_DONE)
    # a paused or aborted deployment still has devices reporting until they are done
    moving = any(dep.counts.get(s) for s in DEPLOY_MOVING)
    live = moving or (dep.state == "active" and finished < total)
    return {"dep": dep, "total": total, "finished": finished, "live": live}


@router.get("/software/deployments/{ref}")
async def deployment_detail(
    request: Request, ref: str, user: Annotated[ConsoleUser, _needs("software.view")]
) -> Response:
    """A deployment with per-device progress (updated live while it runs)."""
    view = await _deployment_view(_svc(request), ref)
    return render(request, "deployment.html", user, active="software", **view)


@router.get("/software/deployments/{ref}/progress")
async def deployment_progress(
    request: Request, ref: str, user: Annotated[ConsoleUser, _needs("software.view")]
) -> Response:
    """The progress fragment the deployment page polls while the rollout runs."""
    view = await _deployment_view(_svc(request), ref)
    return render(request, "_deployment_progress.html", user, **view)


@router.post("/software/deployments/{ref}/{action}")
async def deployment_action(
    request: Request,
    ref: str,
    action: str,
    user: Annotated[ConsoleUser, _needs("software.deploy")],
) -> Response:
    """Pause, resume or abort a deployment."""
    if action not in ("pause", "resume", "abort"):
        raise NotFound("unknown action")
    dep = await _svc(request).software.set_state(ref, action)
    return RedirectResponse(f"{PREFIX}/software/deployments/{dep.id}", status_code=303)


# --- policies and compliance ----------------------------------------------------------------

POLICY_MAX_BYTES = 512 * 1024
COMPLIANCE_PAGE = 100
COMPLIANCE_STATUSES = ("noncompliant", "pending", "compliant")


def _needs_everywhere(perm: str) -> Any:
    """The signed-in user, holding `perm` on every device (as the policies API asks)."""

    async def dependency(request: Request) -> ConsoleUser:
        user = await current_user(request)
        if not user.principal.can_everywhere(perm):
            raise Forbidden(
                f"you do not have the {perm} permission"
                + (" on every device" if user.can(perm) else ""),
                code="forbidden",
            )
        return user

    dependency.__name__ = f"need_all_{perm.replace('.', '_')}"
    return Depends(dependency)


def _policy_url(ref: str) -> str:
    return f"{PREFIX}/policies/{quote(ref, safe='')}"


def _check_ref(ref: str) -> None:
    if not ref or len(ref) > 100:
        raise NotFound("no such policy")


async def _policies_page(
    request: Request,
    user: ConsoleUser,
    *,
    status: int = 200,
    error: DomainError | None = None,
    document: str = "",
) -> Response:
    policies = await _svc(request).policies.list_policies()
    return render(
        request, "policies.html", user, status=status, active="policies", policies=policies,
        error=error.detail if error else "", notice="" if error else _notice(request),
        document=document, max_bytes=POLICY_MAX_BYTES,
    )  # fmt: skip


@router.get("/policies")
async def policies(
    request: Request, user: Annotated[ConsoleUser, _needs_everywhere("policies.view")]
) -> Response:
    """Policies with their assignments and compliance, and the form to add a profile."""
    return await _policies_page(request, user)


async def _profile_text(request: Request, document: str) -> str:
    """The profile from the form: the uploaded file if one was chosen, else the textarea."""
    form = await request.form()
    upload = form.get("file")
    if isinstance(upload, UploadFile) and upload.filename:
        raw = await upload.read(POLICY_MAX_BYTES + 1)
        if len(raw) > POLICY_MAX_BYTES:
            raise Invalid(f"a profile is at most {POLICY_MAX_BYTES // 1024} KiB")
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise Invalid(f"{upload.filename} is not UTF-8 text (YAML or JSON)") from None
    return document


@router.post("/policies")
async def add_policy(
    request: Request,
    user: Annotated[ConsoleUser, _needs_everywhere("policies.manage")],
    document: Annotated[str, Form(max_length=2 * POLICY_MAX_BYTES)] = "",
) -> Response:
    """Add a profile (YAML or JSON, typed or uploaded); a new version if its name exists."""
    text = document
    try:
        text = await _profile_text(request, document)
        if not text.strip():
            raise Invalid("paste a profile or choose a file (YAML or JSON)")
        try:
            body = PolicyAdd(document=text)
        except ValidationError as exc:
            raise Invalid("; ".join(_validation_lines(exc.errors()))) from None
        out = await _svc(request).policies.add(
            body.document,
            user.principal.username,
            may_lock=user.principal.can_everywhere("devices.lock"),
            may_wipe=user.principal.can_everywhere("devices.wipe"),
        )
    except DomainError as exc:
        # the text comes back in the form, so one mistake does not cost the whole profile
        return await _policies_page(
            request, user, status=exc.status, error=exc, document=text[:POLICY_MAX_BYTES]
        )
    key = "policy_added" if out.created else ("policy_version" if out.changed else "policy_same")
    return _done(_policy_url(out.name), key)


async def _policy_page(
    request: Request,
    user: ConsoleUser,
    ref: str,
    *,
    version: int | None = None,
    status: int = 200,
    error: DomainError | None = None,
) -> Response:
    _check_ref(ref)
    svc = _svc(request)
    pol = await svc.policies.show(ref, version)
    manage = user.principal.can_everywhere("policies.manage")
    groups = await svc.devices.list_groups() if manage else []
    labels = await svc.software.list_labels() if manage else []
    return render(
        request, "policy.html", user, status=status, active="policies", pol=pol,
        chosen=version or pol.version, groups=groups, labels=labels, can_manage=manage,
        url=_policy_url(pol.name), error=error.detail if error else "",
        notice="" if error else _notice(request),
        noncompliant_url=PREFIX + "/compliance?"
        + urlencode({"policy": pol.name, "status": "noncompliant"}),
    )  # fmt: skip


@router.get("/policies/{ref}")
async def policy_detail(
    request: Request,
    ref: str,
    user: Annotated[ConsoleUser, _needs_everywhere("policies.view")],
    version: Annotated[int | None, Query(ge=1, le=2**31 - 1)] = None,
) -> Response:
    """One policy: assignments, versions, the source of the current or a chosen version."""
    return await _policy_page(request, user, ref, version=version)


@router.post("/policies/{ref}/assignments")
async def assign_policy(
    request: Request,
    ref: str,
    user: Annotated[ConsoleUser, _needs_everywhere("policies.manage")],
    kind: Annotated[str, Form(max_length=10)] = "",
    target: Annotated[str, Form(max_length=200)] = "",
    priority: Annotated[str, Form(max_length=10)] = "0",
) -> Response:
    """Assign the policy to all devices, a group or a label (with a priority)."""
    _check_ref(ref)
    try:
        try:
            req = AssignmentIn.model_validate(
                {
                    "kind": kind,
                    "target": "" if kind == "all" else target.strip(),
                    "priority": int(priority.strip() or "0"),
                }
            )
        except ValidationError as exc:
            raise Invalid("; ".join(_validation_lines(exc.errors()))) from None
        except ValueError:
            raise Invalid("the priority is a whole number from -1000 to 1000") from None
        out = await _svc(request).policies.assign(
            ref,
            req,
            user.principal.username,
            may_lock=user.principal.can_everywhere("devices.lock"),
            may_wipe=user.principal.can_everywhere("devices.wipe"),
        )
    except DomainError as exc:
        return await _policy_page(request, user, ref, status=exc.status, error=exc)
    return _done(_policy_url(out.name), "assigned")


@router.post("/policies/{ref}/assignments/remove")
async def unassign_policy(
    request: Request,
    ref: str,
    user: Annotated[ConsoleUser, _needs_everywhere("policies.manage")],
    kind: Annotated[str, Form(max_length=10)] = "",
    target: Annotated[str, Form(max_length=200)] = "",
) -> Response:
    """Remove one assignment of the policy."""
    _check_ref(ref)
    try:
        if kind not in ("all", "group", "label"):
            raise Invalid("the assignment kind is all, group or label")
        out = await _svc(request).policies.unassign(ref, kind, target)
    except DomainError as exc:
        return await _policy_page(request, user, ref, status=exc.status, error=exc)
    return _done(_policy_url(out.name), "unassigned")


@router.post("/policies/{ref}/delete")
async def remove_policy(
    request: Request,
    ref: str,
    user: Annotated[ConsoleUser, _needs_everywhere("policies.manage")],
) -> Response:
    """Delete a policy (after the page's confirmation); its devices stop enforcing it."""
    _check_ref(ref)
    try:
        await _svc(request).policies.remove(ref)
    except DomainError as exc:
        return await _policies_page(request, user, status=exc.status, error=exc)
    return _done(PREFIX + "/policies", "policy_removed")


@router.get("/compliance")
async def compliance_page(
    request: Request,
    user: Annotated[ConsoleUser, _needs("devices.view")],
    status: Annotated[str, Query(pattern="^(|all|noncompliant|pending|compliant)$")] = "",
    policy: Annotated[str, Query(max_length=100)] = "",
    page: Annotated[int, Query(ge=1, le=100_000)] = 1,
) -> Response:
    """Devices under a policy and their compliance, filtered by status and policy."""
    svc = _svc(request)
    status = "" if status == "all" else status
    offset = (page - 1) * COMPLIANCE_PAGE
    rows = await svc.policies.compliance(
        status=status or None, policy=policy or None, limit=COMPLIANCE_PAGE + 1, offset=offset,
        scope=user.principal.device_scope("devices.view"),
    )  # fmt: skip
    names: list[str] = []
    if user.principal.can_everywhere("policies.view"):
        names = [p.name for p in await svc.policies.list_policies()]
    params = {"status": status, "policy": policy}

    def url(n: int) -> str:
        query = {k: v for k, v in {**params, "page": n}.items() if v not in ("", 1)}
        return PREFIX + "/compliance" + ("?" + urlencode(query) if query else "")

    return render(
        request, "compliance.html", user, active="compliance", rows=rows[:COMPLIANCE_PAGE],
        has_next=len(rows) > COMPLIANCE_PAGE, page=page, page_url=url, params=params,
        statuses=COMPLIANCE_STATUSES, policy_names=names,
    )  # fmt: skip


# --- enrolment tokens -----------------------------------------------------------------------

EXPIRY_CHOICES = (
    ("3600", "1 hour"),
    ("86400", "1 day"),
    ("604800", "7 days"),
    ("2592000", "30 days"),
    ("31536000", "1 year"),
    ("", "Never"),
)


def qr_svg(text: str, label: str) -> Markup:
    """A QR code of `text` as inline SVG (dark on white, so it scans in dark mode too)."""
    qr = segno.make(text, error="m")
    svg = qr.svg_inline(scale=4, dark="#000", light="#fff", omitsize=True, svgclass="qr")
    # segno's SVG holds only path data; the label is escaped
    return Markup(  # noqa: S704
        svg.replace("<svg ", f'<svg role="img" aria-label="{Markup.escape(label)}" ', 1)
    )


async def _tokens_page(
    request: Request, user: ConsoleUser, *, created: Any = None, status: int = 200
) -> Response:
    svc = _svc(request)
    tokens = await svc.enrollment.list_tokens()
    groups = await svc.devices.list_groups()
    qr = None
    if created is not None:
        qr = qr_svg(created.enroll_command, "QR code of the enrolment command")
    return render(
        request, "tokens.html", user, status=status, active="tokens", tokens=tokens,
        groups=groups, created=created, qr=qr, expiry_choices=EXPIRY_CHOICES,
    )  # fmt: skip


@router.get("/tokens")
async def tokens(
    request: Request, user: Annotated[ConsoleUser, _needs("devices.enroll")]
) -> Response:
    """Enrolment tokens and the form to create one."""
    return await _tokens_page(request, user)


@router.post("/tokens")
async def create_token(
    request: Request,
    user: Annotated[ConsoleUser, _needs("devices.enroll")],
    uses: Annotated[str, Form(max_length=10)] = "1",
    expires_in_s: Annotated[str, Form(max_length=12)] = "604800",
    group: Annotated[str, Form(max_length=100)] = "",
    note: Annotated[str, Form(max_length=500)] = "",
) -> Response:
    """Create a token; its secret, command and QR code are shown on this answer only."""
    svc = _svc(request)
    try:
        req = TokenCreate(
            uses=int(uses) if uses.strip() else None,
            expires_in_s=int(expires_in_s) if expires_in_s.strip() else None,
            group=group or None,
            note=note,
        )
    except ValidationError as exc:
        raise Invalid("; ".join(_validation_lines(exc.errors()))) from None
    except ValueError:
        raise Invalid("uses is a whole number (empty: unlimited)") from None
    server_url = svc.settings.public_url or str(request.base_url).rstrip("/")
    created = await svc.enrollment.create_token(req, user.principal.username, server_url)
    return await _tokens_page(request, user, created=created, status=201)


@router.post("/tokens/{token_id}/revoke")
async def revoke_token(
    request: Request,
    token_id: int,
    user: Annotated[ConsoleUser, _needs("devices.enroll")],
) -> Response:
    """Revoke a token; devices that used it stay enrolled."""
    if not 1 <= token_id < 2**31:
        raise NotFound("no such token")
    await _svc(request).enrollment.revoke_token(token_id)
    return RedirectResponse(f"{PREFIX}/tokens", status_code=303)


# --- reports --------------------------------------------------------------------------------

REPORTS = (
    ("who_has", "Who has software X"),
    ("lacks", "Who lacks software X"),
    ("top", "Most installed software"),
    ("not_seen", "Devices not seen"),
    ("hardware", "Hardware models"),
    ("errors", "Errors"),
)
REPORT_COLUMNS: dict[str, tuple[tuple[str, str], ...]] = {
    "who_has": (("device_name", "Device"), ("source", "Source"), ("name", "Software"),
                ("version", "Version"), ("last_seen", "Last seen")),
    "lacks": (("device_name", "Device"), ("installed_version", "Installed version"),
              ("last_seen", "Last seen")),
    "top": (("name", "Software"), ("source", "Source"), ("devices", "Devices"),
            ("versions", "Versions")),
    "not_seen": (("device_name", "Device"), ("last_seen", "Last seen"),
                 ("days_since", "Days silent"), ("os_name", "OS"), ("model", "Model")),
    "hardware": (("manufacturer", "Manufacturer"), ("model", "Model"), ("devices", "Devices"),
                 ("mean_days", "Mean age (days)"), ("oldest_days", "Oldest (days)")),
    "errors_commands": (("device_name", "Device"), ("kind", "Command"), ("state", "State"),
                        ("exit_code", "Exit code"), ("error", "Error"),
                        ("finished_at", "Finished")),
    "errors_installs": (("device_name", "Device"), ("deployment_name", "Deployment"),
                        ("package_name", "Package"), ("state", "State"), ("detail", "Detail"),
                        ("updated_at", "When")),
}  # fmt: skip
REPORT_PAGE = 50


@router.get("/reports")
async def reports(
    request: Request,
    user: Annotated[ConsoleUser, _needs("reports.view")],
    report: Annotated[str, Query(pattern="^(|who_has|lacks|top|not_seen|hardware|errors)$")] = "",
    name: Annotated[str, Query(max_length=200)] = "",
    min_version: Annotated[str, Query(max_length=100)] = "",
    days: Annotated[float, Query(ge=0, le=3650)] = 7,
    kind: Annotated[str, Query(pattern="^(commands|installs)$")] = "commands",
    page: Annotated[int, Query(ge=1, le=100_000)] = 1,
) -> Response:
    """Canned reports as tables, paged in the database, each with its CSV export."""
    svc = _svc(request)
    rep = svc.reports
    scope = user.principal.device_scope("reports.view")
    offset = (page - 1) * REPORT_PAGE
    rows: list[Any] = []
    total: int | None = None
    note = ""
    columns_key = report
    if report in ("who_has", "lacks") and not name:
        note = "Enter the software name (as inventories report it, e.g. openssl)."
    elif report == "who_has":
        res = await rep.who_has(scope, name, limit=REPORT_PAGE, offset=offset)
        rows, total = res.items, res.total
    elif report == "lacks":
        res2 = await rep.lacks(
            scope, name, min_version=min_version or None, limit=REPORT_PAGE, offset=offset
        )
        rows, total = res2.items, res2.total
    elif report == "top":
        top = await rep.top_software(scope, limit=100)
        rows = top.items
        if top.as_of:
            note = ("Counted now." if top.live else "Counts as of ") + (
                "" if top.live else _fmt_dt(top.as_of)
            )
    elif report == "not_seen":
        res3 = await rep.not_seen(scope, days, limit=REPORT_PAGE, offset=offset)
        rows, total = res3.items, res3.total
    elif report == "hardware":
        rows = await rep.hardware(scope)
    elif report == "errors":
        since = utcnow() - timedelta(days=days or 7)
        res4 = await rep.errors(scope, since, kind, limit=REPORT_PAGE, offset=offset)  # type: ignore[arg-type]
        rows, total = list(res4.items), res4.total
        columns_key = f"errors_{kind}"
    params = {"report": report, "name": name, "min_version": min_version, "days": days,
              "kind": kind}  # fmt: skip
    csv_url = ""
    if report in ("not_seen", "errors") or (report in ("who_has", "lacks") and name):
        csv_url = PREFIX + "/reports.csv?" + urlencode(params)
    return render(
        request, "reports.html", user, active="reports", reports=REPORTS, params=params,
        rows=[r.model_dump() for r in rows], columns=REPORT_COLUMNS.get(columns_key, ()),
        total=total, page=page, has_next=total is not None and offset + len(rows) < total,
        page_url=lambda n: PREFIX + "/reports?" + urlencode({**params, "page": n}),
        csv_url=csv_url, note=note,
    )  # fmt: skip


@router.get("/reports.csv")
async def reports_csv(
    request: Request,
    user: Annotated[ConsoleUser, _needs("reports.view")],
    report: Annotated[str, Query(pattern="^(who_has|lacks|not_seen|errors)$")],
    name: Annotated[str, Query(max_length=200)] = "",
    min_version: Annotated[str, Query(max_length=100)] = "",
    days: Annotated[float, Query(ge=0, le=3650)] = 7,
    kind: Annotated[str, Query(pattern="^(commands|installs)$")] = "commands",
) -> Response:
    """A report as a CSV download (streamed; every row, not just one page)."""
    rep = _svc(request).reports
    scope = user.principal.device_scope("reports.view")
    if report in ("who_has", "lacks") and not name:
        raise Invalid("the software name is missing")
    if report == "who_has":
        lines = rep.who_has_csv(scope, name)
    elif report == "lacks":
        lines = rep.lacks_csv(scope, name, min_version=min_version or None)
    elif report == "not_seen":
        lines = rep.not_seen_csv(scope, days)
    else:
        lines = rep.errors_csv(scope, utcnow() - timedelta(days=days or 7), kind)  # type: ignore[arg-type]
    return StreamingResponse(
        lines,
        media_type="text/csv; charset=utf-8",
        headers={"content-disposition": f'attachment; filename="custos-{report}.csv"'},
    )


# --- audit log ------------------------------------------------------------------------------

AUDIT_RESULTS = ("ok", "denied", "failed", "error")


@router.get("/audit")
async def audit(
    request: Request,
    user: Annotated[ConsoleUser, _needs("audit.view")],
    actor: Annotated[str, Query(max_length=150)] = "",
    action: Annotated[str, Query(max_length=100)] = "",
    target: Annotated[str, Query(max_length=300)] = "",
    result: Annotated[str, Query(pattern="^(|ok|denied|failed|error)$")] = "",
    before: Annotated[int | None, Query(ge=1, le=2**62)] = None,
) -> Response:
    """The audit log, newest first, filtered; older pages by id (keyset)."""
    filters = {"actor": actor, "action": action, "target": target, "result": result}
    page = await _svc(request).audit.query(
        actor=actor or None, action_prefix=action or None, target=target or None,
        result=result or None, limit=100, before_id=before,
    )  # fmt: skip
    query = {k: v for k, v in filters.items() if v}
    return render(
        request, "audit.html", user, active="audit", page=page, filters=filters,
        results=AUDIT_RESULTS,
        older_url=(PREFIX + "/audit?" + urlencode({**query, "before": page.next_before_id}))
        if page.next_before_id else "",
        csv_url=PREFIX + "/audit.csv?" + urlencode(query),
    )  # fmt: skip


@router.get("/audit.csv")
async def audit_csv(
    request: Request,
    user: Annotated[ConsoleUser, _needs("audit.view")],
    actor: Annotated[str, Query(max_length=150)] = "",
    action: Annotated[str, Query(max_length=100)] = "",
    target: Annotated[str, Query(max_length=300)] = "",
    result: Annotated[str, Query(pattern="^(|ok|denied|failed|error)$")] = "",
) -> Response:
    """The matching audit entries as CSV, in chain order (each row's hash can be checked)."""
    lines = _svc(request).audit.export_csv(
        actor=actor or None, action_prefix=action or None, target=target or None,
        result=result or None,
    )  # fmt: skip
    return StreamingResponse(
        lines,
        media_type="text/csv; charset=utf-8",
        headers={"content-disposition": 'attachment; filename="custos-audit.csv"'},
    )


# --- the signed-in user's own account -------------------------------------------------------

# what a redirect after a successful POST says (?done=KEY): fixed texts, nothing reflected
NOTICES = {
    "password": "Your password was changed. Your API tokens were revoked: make new ones "
    "for scripts that need them.",
    "totp": "Two-factor sign-in is on: from now on, signing in needs a code from your "
    "authenticator app.",
    "token_revoked": "The API token was revoked.",
    "granted": "The role was granted.",
    "grant_revoked": "The grant was revoked.",
    "password_set": "The password was set. The user's sessions and API tokens have ended.",
    "totp_reset": "Two-factor sign-in was turned off for this user; they can set it up again.",
    "role_created": "The role was created.",
    "role_deleted": "The role was deleted, and every grant of it with it.",
    "policy_added": "The policy was added. Assign it to devices to enforce it.",
    "policy_version": "A new version of the policy was saved; its devices get it now.",
    "policy_same": "The profile is the same as the current version: nothing changed.",
    "policy_removed": "The policy was deleted; its devices stop enforcing it.",
    "assigned": "The policy was assigned; the devices it reaches get it now.",
    "unassigned": "The assignment was removed.",
    "lost": "The device is marked lost; what you chose happens at its next contact.",
    "found": "The device is marked found; its pending lock and wipe were cancelled.",
    "locked": "The device will be locked at its next contact.",
    "wipe": "The device will be wiped at its next contact.",
    "wipe_dry_run": "A dry-run wipe was sent: the device reports what it would remove.",
}
TOKEN_DAYS_DEFAULT = 90


def _notice(request: Request) -> str:
    return NOTICES.get(request.query_params.get("done", ""), "")


def _done(url: str, key: str) -> RedirectResponse:
    """Redirect after a successful POST; the next page shows NOTICES[key]."""
    return RedirectResponse(f"{url}?{urlencode({'done': key})}", status_code=303)


async def _account_page(
    request: Request,
    user: ConsoleUser,
    *,
    status: int = 200,
    error: DomainError | None = None,
    totp_setup: tuple[str, str] | None = None,
    created: tuple[str, Any] | None = None,
) -> Response:
    accounts = _svc(request).accounts
    me = await accounts.show_user(user.principal.username)
    tokens = await accounts.list_tokens(user.principal.username)
    setup = None
    if totp_setup is not None:
        secret, uri = totp_setup
        setup = {
            "secret": secret,
            "uri": uri,
            "qr": qr_svg(uri, "QR code for your authenticator app"),
        }
    return render(
        request, "account.html", user, status=status, active="account", me=me, tokens=tokens,
        setup=setup, created=created, error=error.detail if error else "",
        notice="" if error or setup or created else _notice(request),
        max_days=MAX_TOKEN_DAYS, default_days=TOKEN_DAYS_DEFAULT,
    )  # fmt: skip


async def _local_user(request: Request, user: ConsoleUser) -> UserOut:
    """The signed-in user's UserOut; refused for directory users (no password or TOTP here)."""
    me = await _svc(request).accounts.show_user(user.principal.username)
    if me.source != "local":
        raise Conflict(
            "your account comes from the directory: its password and sign-in rules are "
            "managed there",
            code="directory_user",
        )
    return me


@router.get("/account")
async def account(request: Request, user: User) -> Response:
    """Your own account: password, two-factor sign-in and API tokens."""
    return await _account_page(request, user)


@router.post("/account/password")
async def change_own_password(
    request: Request,
    user: User,
    current: Annotated[str, Form(max_length=1024)] = "",
    new: Annotated[str, Form(max_length=1024)] = "",
    confirm: Annotated[str, Form(max_length=1024)] = "",
) -> Response:
    """Change your own password (local accounts): the current one, then the new one twice."""
    try:
        await _local_user(request, user)
        if not current:
            raise Invalid("enter your current password", code="bad_credentials")
        if new != confirm:
            raise Invalid("the new password and its confirmation differ", code="mismatch")
        await _svc(request).accounts.change_own_password(
            user.principal, current, new, keep_session=user.secret
        )
    except DomainError as exc:
        return await _account_page(request, user, status=exc.status, error=exc)
    return _done(PREFIX + "/account", "password")


@router.post("/account/totp")
async def totp_begin(request: Request, user: User) -> Response:
    """Start two-factor enrolment: the secret and its QR code, shown on this answer only."""
    accounts = _svc(request).accounts
    try:
        if (await _local_user(request, user)).totp:
            # starting again would switch the running TOTP off until confirmed
            raise Conflict(
                "two-factor sign-in is already on; an administrator can reset it",
                code="totp_on",
            )
        secret, uri = await accounts.totp_begin(user.principal)
    except DomainError as exc:
        return await _account_page(request, user, status=exc.status, error=exc)
    return await _account_page(request, user, totp_setup=(secret, uri))


@router.post("/account/totp/confirm")
async def totp_confirm(
    request: Request,
    user: User,
    code: Annotated[str, Form(max_length=16)] = "",
) -> Response:
    """Turn two-factor sign-in on with the first code from the authenticator app."""
    try:
        await _local_user(request, user)
        digits = code.replace(" ", "")
        if not (digits.isdigit() and 6 <= len(digits) <= 8):
            raise Invalid("enter the 6-digit code your authenticator app shows", code="bad_otp")
        await _svc(request).accounts.totp_confirm(user.principal, digits)
    except DomainError as exc:
        return await _account_page(request, user, status=exc.status, error=exc)
    return _done(PREFIX + "/account", "totp")


@router.post("/account/tokens")
async def create_api_token(
    request: Request,
    user: User,
    name: Annotated[str, Form(max_length=100)] = "",
    days: Annotated[str, Form(max_length=10)] = str(TOKEN_DAYS_DEFAULT),
) -> Response:
    """A named API token with your rights; its secret is shown on this answer only."""
    try:
        try:
            n_days = int(days)
        except ValueError:
            raise Invalid(f"days is a whole number from 1 to {MAX_TOKEN_DAYS}") from None
        created = await _svc(request).accounts.create_token(user.principal, name.strip(), n_days)
    except DomainError as exc:
        return await _account_page(request, user, status=exc.status, error=exc)
    return await _account_page(request, user, status=201, created=created)


@router.post("/account/tokens/{token_id}/revoke")
async def revoke_api_token(request: Request, token_id: int, user: User) -> Response:
    """Revoke one of your own API tokens (other people's are not reachable from here)."""
    accounts = _svc(request).accounts
    try:
        mine = {t.id for t in await accounts.list_tokens(user.principal.username)}
        if token_id not in mine:
            raise NotFound("you have no such token")
        await accounts.revoke_token(user.principal, token_id)
    except DomainError as exc:
        return await _account_page(request, user, status=exc.status, error=exc)
    return _done(PREFIX + "/account", "token_revoked")


# --- users and roles ------------------------------------------------------------------------


def _permission_choices() -> list[dict[str, Any]]:
    return [
        {"name": n, "description": d, "scopable": n in SCOPABLE} for n, d in PERMISSIONS.items()
    ]


async def _users_page(
    request: Request,
    user: ConsoleUser,
    *,
    status: int = 200,
    error: DomainError | None = None,
    role_form: dict[str, Any] | None = None,
) -> Response:
    accounts = _svc(request).accounts
    users = await accounts.list_users()
    roles = await accounts.list_roles()
    groups = await _svc(request).devices.list_groups()
    return render(
        request, "users.html", user, status=status, active="users", users=users, roles=roles,
        groups=groups, permissions=_permission_choices(), error=error.detail if error else "",
        notice="" if error else _notice(request),
        role_form=role_form or {"name": "", "description": "", "permissions": []},
    )  # fmt: skip


def _user_url(username: str) -> str:
    return f"{PREFIX}/users/{quote(username, safe='')}"


def _check_username(username: str) -> None:
    if not username or len(username) > 150:
        raise NotFound("no such user")


async def _user_page(
    request: Request,
    user: ConsoleUser,
    username: str,
    *,
    status: int = 200,
    error: DomainError | None = None,
) -> Response:
    _check_username(username)
    svc = _svc(request)
    target = await svc.accounts.show_user(username)
    roles = await svc.accounts.list_roles()
    groups = await svc.devices.list_groups()
    return render(
        request, "user.html", user, status=status, active="users", target=target, roles=roles,
        groups=groups, error=error.detail if error else "",
        notice="" if error else _notice(request), url=_user_url(username),
    )  # fmt: skip


@router.get("/users")
async def users(request: Request, user: Annotated[ConsoleUser, _needs("users.manage")]) -> Response:
    """Users with their roles, and the roles with their permissions."""
    return await _users_page(request, user)


@router.post("/users")
async def create_user(
    request: Request,
    user: Annotated[ConsoleUser, _needs("users.manage")],
    username: Annotated[str, Form(min_length=1, max_length=150)],
    password: Annotated[str, Form(min_length=1, max_length=1024)],
    roles: Annotated[list[str], Form()] = [],  # noqa: B006 - FastAPI copies defaults
    groups: Annotated[list[str], Form()] = [],  # noqa: B006
) -> Response:
    """A new local user holding the chosen roles (on the chosen groups only, if any)."""
    if not roles:
        raise Invalid("choose at least one role")
    await _svc(request).accounts.create_user(
        username, password, [r for r in roles if r][:20], groups=[g for g in groups if g][:100]
    )
    return RedirectResponse(PREFIX + "/users", status_code=303)


@router.get("/users/{username}")
async def user_detail(
    request: Request, username: str, user: Annotated[ConsoleUser, _needs("users.manage")]
) -> Response:
    """One user: grants (granted, revoked here), password and two-factor resets."""
    return await _user_page(request, user, username)


# these come before user_action: its /users/{username}/{action} would take them otherwise


@router.post("/users/{username}/grants")
async def grant_role(
    request: Request,
    username: str,
    user: Annotated[ConsoleUser, _needs("users.manage")],
    role: Annotated[str, Form(max_length=100)] = "",
    groups: Annotated[list[str], Form()] = [],  # noqa: B006 - FastAPI copies defaults
) -> Response:
    """Give the user a role, everywhere or only on the chosen groups."""
    _check_username(username)
    try:
        if not role:
            raise Invalid("choose a role to grant")
        await _svc(request).accounts.grant(username, role, [g for g in groups if g][:100])
    except DomainError as exc:
        return await _user_page(request, user, username, status=exc.status, error=exc)
    return _done(_user_url(username), "granted")


@router.post("/users/{username}/grants/{grant_id}/revoke")
async def revoke_grant(
    request: Request,
    username: str,
    grant_id: int,
    user: Annotated[ConsoleUser, _needs("users.manage")],
) -> Response:
    """Take a grant away (not a directory grant, and never the last administrator's)."""
    _check_username(username)
    accounts = _svc(request).accounts
    try:
        target = await accounts.show_user(username)
        grant = next((g for g in target.grants if g.id == grant_id), None)
        if grant is None:
            raise NotFound(f"{username!r} has no such grant")
        if grant.source != "local":
            # the next directory sync would only put it back
            raise Conflict(
                "this grant comes from the directory's groups; change it in the directory",
                code="directory_grant",
            )
        await accounts.revoke_grant(username, grant_id)
    except DomainError as exc:
        return await _user_page(request, user, username, status=exc.status, error=exc)
    return _done(_user_url(username), "grant_revoked")


async def _local_target(request: Request, username: str) -> None:
    target = await _svc(request).accounts.show_user(username)
    if target.source != "local":
        raise Conflict(
            "this user signs in through the directory; its password and sign-in rules are "
            "managed there",
            code="directory_user",
        )


@router.post("/users/{username}/password")
async def set_password(
    request: Request,
    username: str,
    user: Annotated[ConsoleUser, _needs("users.manage")],
    password: Annotated[str, Form(max_length=1024)] = "",
    confirm: Annotated[str, Form(max_length=1024)] = "",
) -> Response:
    """Set a local user's password; their sessions and API tokens end."""
    _check_username(username)
    try:
        await _local_target(request, username)
        if password != confirm:
            raise Invalid("the password and its confirmation differ", code="mismatch")
        await _svc(request).accounts.set_password(username, password)
    except DomainError as exc:
        return await _user_page(request, user, username, status=exc.status, error=exc)
    if username == user.principal.username:
        # set_password ended every session of the user, this browser's included
        return RedirectResponse(PREFIX + "/login", status_code=303)
    return _done(_user_url(username), "password_set")


@router.post("/users/{username}/totp/reset")
async def reset_totp(
    request: Request,
    username: str,
    user: Annotated[ConsoleUser, _needs("users.manage")],
) -> Response:
    """Turn a user's two-factor sign-in off (they lost their authenticator)."""
    _check_username(username)
    try:
        await _local_target(request, username)
        await _svc(request).accounts.totp_reset(username)
    except DomainError as exc:
        return await _user_page(request, user, username, status=exc.status, error=exc)
    return _done(_user_url(username), "totp_reset")


@router.post("/users/{username}/{action}")
async def user_action(
    request: Request,
    username: str,
    action: str,
    user: Annotated[ConsoleUser, _needs("users.manage")],
) -> Response:
    """Disable or enable a user."""
    if action not in ("disable", "enable") or len(username) > 150:
        raise NotFound("unknown action")
    await _svc(request).accounts.set_active(username, action == "enable", actor=user.principal)
    return RedirectResponse(PREFIX + "/users", status_code=303)


@router.post("/roles")
async def create_role(
    request: Request,
    user: Annotated[ConsoleUser, _needs("users.manage")],
    name: Annotated[str, Form(max_length=100)] = "",
    description: Annotated[str, Form(max_length=500)] = "",
    permissions: Annotated[list[str], Form()] = [],  # noqa: B006 - FastAPI copies defaults
) -> Response:
    """A custom role made of the chosen permissions."""
    perms = [p for p in permissions if p][:100]
    try:
        await _svc(request).accounts.create_role(name.strip(), perms, description.strip())
    except DomainError as exc:
        # the form comes back filled in, so one mistake does not cost the whole role
        form = {"name": name, "description": description, "permissions": perms}
        return await _users_page(request, user, status=exc.status, error=exc, role_form=form)
    return _done(PREFIX + "/users", "role_created")


@router.post("/roles/{name}/delete")
async def delete_role(
    request: Request,
    name: str,
    user: Annotated[ConsoleUser, _needs("users.manage")],
) -> Response:
    """Delete a custom role (built-in ones stay); its grants go with it."""
    try:
        if len(name) > 100:
            raise NotFound("no such role")
        await _svc(request).accounts.delete_role(name)
    except DomainError as exc:
        return await _users_page(request, user, status=exc.status, error=exc)
    return _done(PREFIX + "/users", "role_deleted")


# --- everything else under /console is a 404 page -------------------------------------------


@router.get("/{path:path}")
async def not_found(request: Request, path: str, user: User) -> Response:
    """An HTML 404 for unknown console addresses."""
    raise NotFound("there is no page at this address")
