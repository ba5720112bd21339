"""The services one server process holds, built from Settings in the lifespan."""

from __future__ import annotations

from dataclasses import dataclass

from custos.accounts.service import AccountService
from custos.commands.service import CommandService
from custos.db.engine import Database
from custos.devices.ca import CertificateAuthority
from custos.devices.checkin import DeviceCheckin
from custos.devices.identity import DeviceAuthenticator
from custos.devices.service import DeviceService, EnrollmentService
from custos.push.hub import PushHub
from custos.settings import Settings


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

    @classmethod
    def build(
        cls, settings: Settings, db: Database, ca: CertificateAuthority, push: PushHub
    ) -> Services:
        """Wire the services together (the push hub is started by the caller)."""
        auth = DeviceAuthenticator(db, skew_s=settings.signature_skew_s)
        commands = CommandService(
            db, settings.data_dir / "uploads", settings.max_output_bytes, push=push
        )
        return cls(
            settings=settings,
            db=db,
            ca=ca,
            authenticator=auth,
            accounts=AccountService(db, settings.api_token_ttl_s),
            enrollment=EnrollmentService(db, ca, settings.checkin_interval_s),
            devices=DeviceService(db, auth),
            commands=commands,
            checkin=DeviceCheckin(
                db,
                commands,
                interval=settings.checkin_interval_s,
                max_commands=settings.max_commands_per_checkin,
            ),
            push=push,
        )
