"""Entry point of the `custos` command."""

from __future__ import annotations

import typer

from custos import __version__


def build_app() -> typer.Typer:
    """The Typer application with every command group registered."""
    from custos.cli import (
        admin_cmds,
        agent_cmd,
        audit_cmds,
        demo_cmd,
        diag_cmd,
        omadm_cmd,
        policy_cmds,
        report_cmds,
        server_cmd,
        software_cmds,
        task_cmds,
        user_cmds,
        webhook_cmds,
    )

    app = typer.Typer(
        help="Custos device management: server, agent and admin commands.",
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        add_completion=False,
    )

    @app.command("version")
    def version() -> None:
        """Print the version."""
        typer.echo(__version__)

    server_cmd.register(app)
    admin_cmds.register(app)
    task_cmds.register(app)
    software_cmds.register(app)
    audit_cmds.register(app)
    user_cmds.register(app)
    report_cmds.register(app)
    policy_cmds.register(app)
    webhook_cmds.register(app)
    omadm_cmd.register(app)
    diag_cmd.register(app)
    agent_cmd.register(app)
    demo_cmd.register(app)
    return app


def main() -> None:
    """Run the CLI."""
    build_app()()
