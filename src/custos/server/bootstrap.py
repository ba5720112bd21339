"""What must exist before serving: schema at head, the CA, the first admin, the TLS certificate."""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass
from pathlib import Path

from custos.accounts.service import AccountService
from custos.db.engine import Database
from custos.db.migrate import upgrade
from custos.devices.ca import CertificateAuthority
from custos.devices.identity import load_or_create_ca
from custos.settings import Settings


@dataclass
class Bootstrapped:
    """The result of preparing a data directory and database."""

    ca: CertificateAuthority
    generated_admin_password: str | None


async def bootstrap(settings: Settings, db: Database | None = None) -> Bootstrapped:
    """Migrate, load or create the CA and the admin account; idempotent."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    await asyncio.to_thread(upgrade, settings.database_url)
    own = db is None
    db = db or Database(settings.database_url)
    try:
        passphrase = settings.ca_passphrase.get_secret_value() if settings.ca_passphrase else None
        ca = await load_or_create_ca(db, settings.data_dir, passphrase)
        admin_pw = settings.admin_password.get_secret_value() if settings.admin_password else None
        generated = await AccountService(db, settings.api_token_ttl_s).ensure_admin(admin_pw)
    finally:
        if own:
            await db.dispose()
    return Bootstrapped(ca=ca, generated_admin_password=generated)


def write_server_certificate(settings: Settings, ca: CertificateAuthority) -> tuple[Path, Path]:
    """Issue the TLS certificate for this host from the CA; returns (cert, key) paths."""
    names = ["localhost", "127.0.0.1", "::1", socket.gethostname(), *settings.tls_hostnames]
    if settings.host not in ("0.0.0.0", "::", ""):  # noqa: S104 - comparing, not binding
        names.append(settings.host)
    cert_pem, key_pem = ca.issue_server_cert(names)
    tls_dir = settings.data_dir / "tls"
    tls_dir.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = tls_dir / "server.pem", tls_dir / "server.key"
    cert_path.write_text(cert_pem + ca.cert_pem)
    key_path.touch(mode=0o600, exist_ok=True)
    key_path.chmod(0o600)
    key_path.write_text(key_pem)
    return cert_path, key_path
