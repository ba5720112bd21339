"""The app factory: one FastAPI app from one Settings object; everything built in the lifespan."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from custos import __version__
from custos.accounts import routes as account_routes
from custos.audit import routes as audit_routes
from custos.audit.middleware import AuditMiddleware
from custos.commands import routes as command_routes
from custos.console import routes as console_routes
from custos.db.engine import Database
from custos.devices import routes as device_routes
from custos.diagnostics import routes as diagnostics_routes
from custos.omadm import routes as omadm_routes
from custos.policies import routes as policy_routes
from custos.push import routes as push_routes
from custos.push.hub import build_push
from custos.reports import routes as report_routes
from custos.server.bootstrap import bootstrap
from custos.server.container import Services
from custos.server.fastpath import CheckinFastPath
from custos.server.http import RequestGuard, install_error_handlers
from custos.server.jobs import JobRunner
from custos.settings import Settings
from custos.software import routes as software_routes
from custos.tasks import routes as task_routes
from custos.webhooks import routes as webhook_routes

log = logging.getLogger(__name__)


def create_app(settings: Settings) -> FastAPI:
    """Build the ASGI app; the database, CA and jobs start in the lifespan."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        db = Database(settings.database_url, pool_size=settings.db_pool_size)
        boot = await bootstrap(settings, db)
        push = build_push(settings)
        svc = Services.build(settings, db, boot.ca, push)
        app.state.services = svc
        jobs = JobRunner()
        jobs.every(settings.last_seen_flush_s, "flush-last-seen", svc.checkin.flush_last_seen)
        jobs.every(30, "expire-commands", svc.commands.expire_overdue)
        jobs.every(1, "wake-deferred-work", svc.work.tick)
        jobs.every(settings.cache_resync_s, "resync-caches", svc.resync_caches)
        jobs.every(settings.software_tick_s, "advance-rollouts", svc.software.tick)
        jobs.every(svc.push_sockets.ping_interval_s, "push-keepalive", svc.push_sockets.sweep)
        if svc.accounts.directory is not None:
            jobs.every(settings.ldap_sync_interval_s, "directory-sync", svc.accounts.sync_directory)
        jobs.every(60, "refresh-report-summary", svc.reports.tick)
        jobs.every(settings.policy_tick_s, "policies", svc.policies.tick)
        jobs.every(2, "deliver-webhooks", svc.webhooks.deliver_due)
        jobs.every(600, "omadm-sessions", svc.omadm.prune_sessions)
        online_within = max(3 * settings.checkin_interval_s, 120)
        jobs.every(
            min(60, settings.fleet_snapshot_s),
            "fleet-snapshot",
            lambda: svc.reports.snapshot_fleet(
                online_within_s=online_within, period_s=settings.fleet_snapshot_s
            ),
        )
        await push.start()
        await svc.authenticator.preload(settings.auth_preload_devices)
        await svc.resync_caches()
        # everything built so far (settings, services, preloaded identities, caches) lives as
        # long as the process: moved out of the collector's view, full collections stop
        # re-scanning it (they cost ~130 ms every second under check-in load, the p99 tail)
        if settings.gc_freeze_at_start:
            gc.collect()
            gc.freeze()
        jobs.start()
        try:
            # the lifespan state reaches uvicorn's protocols too: the bare push socket
            # protocol (custos.push.wire) finds the services there
            yield {"services": svc}
        finally:
            await jobs.stop()
            await svc.checkin.stop()
            try:
                await svc.checkin.flush_last_seen()
            except Exception:
                log.exception("final last-seen flush failed")
            await push.stop()
            await db.dispose()

    app = FastAPI(
        title="Custos",
        version=__version__,
        openapi_url="/api/openapi.json",
        docs_url="/api/docs",
        redoc_url=None,
        lifespan=lifespan,
        # FastAPI's built-in OpenTelemetry bridge reads environment variables on every
        # request to see whether it is configured; Custos does not use it
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    install_error_handlers(app)
    logging.getLogger("uvicorn.error").addFilter(push_routes.DENIAL_LOG_FILTER)
    # the last added is the outermost: the guard's URL and body limits apply to the fast path;
    # the audit layer sits inside the fast path, so check-ins never reach it
    app.add_middleware(AuditMiddleware)
    app.add_middleware(CheckinFastPath)
    app.add_middleware(
        RequestGuard,
        limit=settings.max_body_bytes,
        larger=[
            (software_routes.PACKAGES_PATH, settings.max_package_bytes),
            (console_routes.UPLOAD_PATH, settings.max_package_bytes),
        ],
    )

    @app.get("/healthz", include_in_schema=False)
    async def healthz(request: Request) -> JSONResponse:
        """For load balancers: 200 when this process can reach the database, else 503."""
        try:
            await asyncio.wait_for(request.app.state.services.db.ping(), timeout=2)
        except Exception as exc:
            return JSONResponse(
                {"status": "unavailable", "detail": f"database: {type(exc).__name__}"}, 503
            )
        return JSONResponse({"status": "ok"})

    # the SyncML endpoint first: device traffic, matched before the admin API's many routes
    omadm_routes.install(app, settings.omadm_path)
    for r in (
        account_routes.router,
        device_routes.admin_router,
        device_routes.device_router,
        diagnostics_routes.router,
        command_routes.admin_router,
        command_routes.device_router,
        task_routes.admin_router,
        software_routes.admin_router,
        software_routes.device_router,
        push_routes.device_router,
        report_routes.router,
        audit_routes.router,
        webhook_routes.router,
        omadm_routes.admin_router,
        policy_routes.admin_router,
        policy_routes.device_router,
    ):
        app.include_router(r)
    # the web console: its pages, /console/static and `/` redirecting to it
    console_routes.install(app)
    return app


def app_from_env() -> FastAPI:
    """Factory for uvicorn (workers > 1 re-import it): settings from CUSTOS_* variables."""
    return create_app(Settings())
