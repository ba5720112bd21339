"""The services one server process holds, built from Settings in the lifespan."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

from custos.accounts.service import AccountService
from custos.audit.service import AuditService
from custos.commands.index import WorkIndex
from custos.commands.service import CommandService
from custos.db.engine import Database
from custos.devices.ca import CertificateAuthority
from custos.devices.checkin import DeviceCheckin
from custos.devices.identity import DeviceAuthenticator
from custos.devices.service import DeviceService, EnrollmentService
from custos.diagnostics.service import DIAGNOSE_KIND, DiagnosticsService
from custos.omadm.service import OmadmService
from custos.policies.service import PolicyService
from custos.push.hub import Event, PushHub
from custos.push.wire import PushSockets
from custos.reports.service import ReportService
from custos.settings import Settings
from custos.software.service import SoftwareService
from custos.software.store import LocalArtifactStore
from custos.software.transfer import TransferPlanner
from custos.tasks.service import TaskService
from custos.webhooks.service import WebhookService

log = logging.getLogger(__name__)
_background_tasks: set[asyncio.Task[object]] = set()


def _background(coro: Coroutine[Any, Any, object], name: str) -> None:
    async def run() -> None:
        try:
            await coro
        except Exception:
            log.exception("%s failed", name)

    task = asyncio.get_running_loop().create_task(run(), name=name)
    _background_tasks.add(task)
    task.add_done_callback(_background_tasks.discard)


# how often the server pings idle push sockets; a peer silent for two rounds is dropped
PUSH_PING_INTERVAL_S = 20.0


def _directory(settings: Settings) -> object | None:
    """The LDAP / AD sign-in, when a directory is configured (connections open on use)."""
    config = settings.ldap_config()
    if config is None:
        return None
    from custos.accounts.directory import LdapDirectory
    from custos.accounts.sync import DirectoryLogin

    return DirectoryLogin(LdapDirectory(config), settings.ldap_role_map)


@dataclass
class Services:
    """Everything a request handler may need; one instance per process."""

    settings: Settings
    db: Database
    ca: CertificateAuthority
    authenticator: DeviceAuthenticator
    accounts: AccountService
    enrollment: EnrollmentService
    devices: DeviceService
    commands: CommandService
    checkin: DeviceCheckin
    push: PushHub
    work: WorkIndex
    tasks: TaskService
    software: SoftwareService
    push_sockets: PushSockets
    reports: ReportService
    audit: AuditService
    policies: PolicyService
    webhooks: WebhookService
    omadm: OmadmService
    diagnostics: DiagnosticsService

    @classmethod
    def build(
        cls, settings: Settings, db: Database, ca: CertificateAuthority, push: PushHub
    ) -> Services:
        """Wire the services together (the push hub is started by the caller)."""
        auth = DeviceAuthenticator(
            db,
            skew_s=settings.signature_skew_s,
            session_secret=ca.derive_secret("device-sessions"),
            session_ttl_s=settings.session_ttl_s,
        )

        def on_event(event: Event) -> None:
            if event.kind == "status":
                auth.forget(event.device_ids)

        push.listen(on_event)
        # events may have been missed: statuses are re-read (the work index reloads itself)
        push.on_resync(lambda: _background(auth.refresh_statuses(), "refresh-statuses"))
        work = WorkIndex(db, push)
        commands = CommandService(
            db, settings.data_dir / "uploads", settings.max_output_bytes, push=push
        )
        diagnostics = DiagnosticsService(db, settings)
        # a diagnose run's result becomes a diagnostics report in the transaction recording it
        commands.on_result(DIAGNOSE_KIND, diagnostics.on_results, diagnostics.wants)
        store = LocalArtifactStore(settings.artifact_dir or settings.data_dir / "artifacts")
        software = SoftwareService(
            db,
            store,
            TransferPlanner(store),
            ca,
            commands,
            tmp_dir=settings.data_dir / "tmp",
            refresh_s=settings.software_refresh_s,
            default_limit_bps=settings.software_limit_bps,
            group_limit_bps=settings.software_group_limit_bps,
        )
        checkin = DeviceCheckin(
            db,
            commands,
            work,
            interval=settings.checkin_interval_s,
            max_commands=settings.max_commands_per_checkin,
            push=push.descriptor(),
        )
        return cls(
            settings=settings,
            db=db,
            ca=ca,
            authenticator=auth,
            accounts=AccountService(
                db,
                settings.api_token_ttl_s,
                session_ttl_s=settings.console_session_ttl_s,
                secret=ca.derive_secret("account-secrets"),
                directory=_directory(settings),
            ),
            enrollment=EnrollmentService(db, ca, settings.checkin_interval_s),
            devices=DeviceService(db, auth, push=push),
            commands=commands,
            checkin=checkin,
            push=push,
            work=work,
            tasks=TaskService(db, commands),
            software=software,
            push_sockets=PushSockets(PUSH_PING_INTERVAL_S),
            reports=ReportService(db),
            audit=AuditService(db),
            policies=PolicyService(
                db,
                commands,
                push,
                default_limit_bps=settings.software_limit_bps,
                refresh_s=settings.policy_refresh_s,
            ),
            webhooks=WebhookService(db, ca.derive_secret("webhook-secrets")),
            omadm=OmadmService(
                db,
                ca,
                commands,
                settings,
                ca.derive_secret("omadm-secrets"),
                push=push,
                software=software,
                work=work,
                seen=checkin.note_seen,
            ),
            diagnostics=diagnostics,
        )

    async def resync_caches(self) -> None:
        """Rebuild the work index and re-read non-active statuses (start, then periodically)."""
        await self.work.load()
        await self.authenticator.refresh_statuses()
