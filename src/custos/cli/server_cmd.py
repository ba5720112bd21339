"""`custos server` and `custos db upgrade`."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from custos.settings import Settings

err = Console(stderr=True, soft_wrap=True)


def build_settings(**overrides: Any) -> Settings:
    """Settings from flags (when given), the environment and the config file."""
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except Exception as exc:  # pydantic's ValidationError or a bad config file
        err.print(f"[red]error:[/] invalid settings: {exc}")
        raise typer.Exit(2) from None


def export_settings(settings: Settings) -> None:
    """Put the resolved settings into CUSTOS_* variables for uvicorn's app factory."""
    data = settings.model_dump(mode="json")
    for key, value in data.items():
        if value is None:
            continue
        if key in ("admin_password", "ca_passphrase"):
            secret = getattr(settings, key)
            value = secret.get_secret_value()
        elif isinstance(value, (list, dict)):
            import json

            value = json.dumps(value)
        os.environ[f"CUSTOS_{key.upper()}"] = str(value)
    os.environ["CUSTOS_DATA_DIR"] = str(settings.data_dir.resolve())


def serve(settings: Settings, *, announce: bool = True) -> None:
    """Prepare the data directory and database, then serve until SIGINT/SIGTERM."""
    import uvicorn

    if settings.workers > 1 and settings.is_sqlite:
        err.print(
            "[red]error:[/] --workers > 1 needs PostgreSQL (--db postgresql+asyncpg://…); "
            "the embedded SQLite database is for one server process"
        )
        raise typer.Exit(2)

    from custos.server.bootstrap import bootstrap, write_server_certificate

    try:
        boot = asyncio.run(bootstrap(settings))
    except Exception as exc:
        err.print(f"[red]error:[/] cannot prepare the server: {exc}")
        raise typer.Exit(1) from None
    if boot.generated_admin_password:
        err.print(
            "[bold]First start:[/] created user [bold]admin[/] with password "
            f"[bold yellow]{boot.generated_admin_password}[/] (shown once; "
            "set CUSTOS_ADMIN_PASSWORD to choose it)"
        )
    ssl: dict[str, Any] = {}
    scheme = "http"
    if not settings.insecure_http:
        cert, key = write_server_certificate(settings, boot.ca)
        ssl = {"ssl_certfile": str(cert), "ssl_keyfile": str(key)}
        if settings.omadm_client_certs:
            import ssl as ssl_mod

            # asked for, not required: agents and browsers carry on without one; a client
            # certificate must come from the Custos CA (OMA DM clients identify with one)
            ca_path = cert.parent / "client-ca.pem"
            ca_path.write_text(boot.ca.cert_pem)
            ssl |= {"ssl_cert_reqs": ssl_mod.CERT_OPTIONAL, "ssl_ca_certs": str(ca_path)}
        scheme = "https"
    if announce:
        host = settings.host if ":" not in settings.host else f"[{settings.host}]"
        err.print(f"Custos listening on {scheme}://{host}:{settings.port}")
        err.print(f"CA fingerprint: {boot.ca.fingerprint}")
    from custos.push.wire import PushWireProtocol
    from custos.server.protocols import DrainingHttpProtocol

    export_settings(settings)
    uvicorn.run(
        "custos.server.app:app_from_env",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers if settings.workers > 1 else None,
        loop="uvloop",
        http=DrainingHttpProtocol,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=10,
        # longer than the 5 s for which httpx (agents, CLI, simulator) keeps an idle
        # connection: with equal limits the server could close one just as the client reuses
        # it ("Server disconnected without sending a response", seen in B3)
        timeout_keep_alive=settings.keep_alive_s,
        # the push socket without ASGI: a few hundred bytes per idle device (B4)
        ws=PushWireProtocol,
        **ssl,
    )


def register(app: typer.Typer) -> None:
    """Add the server and db commands."""

    @app.command("server")
    def server(
        data_dir: Path = typer.Option(None, "--data-dir", help="state directory (default ./var)"),
        db: str = typer.Option(None, "--db", help="postgresql+asyncpg://… (default: SQLite)"),
        host: str = typer.Option(None, "--host"),
        port: int = typer.Option(None, "--port"),
        insecure_http: bool = typer.Option(
            None, "--insecure-http", help="plain HTTP, for use behind a TLS-terminating proxy"
        ),
        workers: int = typer.Option(None, "--workers", min=1, max=64),
    ) -> None:
        """Run the Custos server (HTTPS with the built-in CA by default)."""
        serve(
            build_settings(
                data_dir=data_dir,
                db=db,
                host=host,
                port=port,
                insecure_http=insecure_http,
                workers=workers,
            )
        )

    dbapp = typer.Typer(help="Database schema.", no_args_is_help=True)
    app.add_typer(dbapp, name="db")

    @dbapp.command("upgrade")
    def db_upgrade(
        data_dir: Path = typer.Option(None, "--data-dir"),
        db: str = typer.Option(None, "--db"),
    ) -> None:
        """Apply migrations up to the newest schema."""
        from custos.db.migrate import current, upgrade

        settings = build_settings(data_dir=data_dir, db=db)
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        try:
            upgrade(settings.database_url)
            err.print(f"database at revision {current(settings.database_url)}")
        except Exception as exc:
            err.print(f"[red]error:[/] migration failed: {exc}")
            raise typer.Exit(1) from None
