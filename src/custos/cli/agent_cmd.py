"""`custos agent enroll|run|status`: the on-device side."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

err = Console(stderr=True, soft_wrap=True)


def default_state_dir() -> Path:
    """/var/lib/custos-agent as root, the user's data dir otherwise."""
    if os.environ.get("CUSTOS_AGENT_STATE_DIR"):
        return Path(os.environ["CUSTOS_AGENT_STATE_DIR"])
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        return Path("/var/lib/custos-agent")
    import platformdirs

    return Path(platformdirs.user_data_dir("custos-agent"))


def _setup_logging(state_dir: Path, verbose: bool) -> None:
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    fh = logging.FileHandler(state_dir / "agent.log")
    fh.setFormatter(fmt)
    sh = logging.StreamHandler(sys.stderr)
    sh.setFormatter(fmt)
    root.handlers[:] = [fh, sh]
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
    logging.getLogger("websockets").setLevel(logging.WARNING)  # frame dumps at DEBUG


def register(app: typer.Typer) -> None:
    """Add the agent commands."""
    agent = typer.Typer(help="The on-device agent.", no_args_is_help=True)
    app.add_typer(agent, name="agent")

    @agent.command("enroll")
    def enroll_cmd(
        url: str = typer.Argument(..., help="server URL, e.g. https://mdm.example.org:8443"),
        token: str = typer.Option(
            ..., "--token", help="enrolment token from `custos token create`"
        ),
        ca_fingerprint: str = typer.Option(
            None, "--ca-fingerprint", help="SHA-256 of the server CA (pins it from first contact)"
        ),
        state_dir: Path = typer.Option(None, "--state-dir"),
        name: str = typer.Option(None, "--name", help="device name (default: hostname)"),
    ) -> None:
        """Enrol this machine: make a key pair, get a device certificate."""
        from custos.agent.identity import EnrollError, enroll
        from custos.agent.inventory import collect_facts
        from custos.agent.state import AgentState

        if not url.startswith(("https://", "http://")):
            err.print("[red]error:[/] the URL must start with https:// (or http:// behind a proxy)")
            raise typer.Exit(2)
        if ca_fingerprint is None and url.startswith("https://"):
            err.print(
                "[yellow]warning:[/] no --ca-fingerprint: trusting the server's CA on first use"
            )
        state = AgentState(state_dir or default_state_dir())
        try:
            ident = asyncio.run(
                enroll(state, url, token, ca_fingerprint, facts=collect_facts(), name=name)
            )
        except EnrollError as exc:
            err.print(f"[red]error:[/] {exc}")
            raise typer.Exit(1) from None
        finally:
            state.close()
        err.print(f"enrolled as device [bold]{ident.device_id}[/] with {url}")

    @agent.command("run")
    def run_cmd(
        state_dir: Path = typer.Option(None, "--state-dir"),
        once: bool = typer.Option(False, "--once", help="one check-in cycle, then exit"),
        inventory_interval: float = typer.Option(3600, "--inventory-interval", min=1),
        verbose: bool = typer.Option(False, "--verbose", "-v"),
        push: bool = typer.Option(
            True,
            "--push/--no-push",
            envvar="CUSTOS_AGENT_PUSH",
            help="keep a push connection (WebSocket, or MQTT when the server says so) open "
            "so new work arrives at once (CUSTOS_AGENT_PUSH=0: off)",
        ),
        mqtt_ca: Path = typer.Option(
            None,
            "--mqtt-ca",
            envvar="CUSTOS_AGENT_MQTT_CA",
            help="CA (PEM) of the MQTT broker, when the server names one; default: the Custos CA",
        ),
        root: Path = typer.Option(
            Path("/"),
            "--root",
            envvar="CUSTOS_AGENT_ROOT",
            help="directory that policy paths (files, settings, wipes) are resolved under",
        ),
    ) -> None:
        """Check in, run commands, report inventory; until stopped (SIGTERM/SIGINT)."""
        from custos.agent.client import ServerRefused
        from custos.agent.identity import EnrollError, load_identity
        from custos.agent.policy.lockwipe import is_wiped
        from custos.agent.runtime import AgentRuntime, DeviceWiped
        from custos.agent.state import AgentState

        sd = state_dir or default_state_dir()
        _setup_logging(sd, verbose)
        if not root.is_dir():
            err.print(f"[red]error:[/] --root {root} is not a directory")
            raise typer.Exit(2)
        state = AgentState(sd)
        if is_wiped(state):
            state.close()
            err.print("[red]error:[/] this device was wiped")
            raise typer.Exit(5)
        try:
            ident = load_identity(state)
        except EnrollError as exc:
            err.print(f"[red]error:[/] {exc}")
            raise typer.Exit(1) from None
        reboot = os.environ.get("CUSTOS_AGENT_REBOOT_COMMAND")
        try:
            mqtt_ca_pem = mqtt_ca.read_text() if mqtt_ca else None
        except (OSError, UnicodeDecodeError) as exc:
            err.print(f"[red]error:[/] cannot read --mqtt-ca {mqtt_ca}: {exc}")
            raise typer.Exit(2) from None
        runtime = AgentRuntime(
            state,
            ident,
            inventory_interval_s=inventory_interval,
            reboot_argv=json.loads(reboot) if reboot else None,
            push=push and not once,
            mqtt_ca_pem=mqtt_ca_pem,
            root=root,
        )

        async def main() -> None:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            try:
                if once:
                    await runtime.run_once()
                else:
                    await runtime.run_forever(stop)
            finally:
                await runtime.client.aclose()

        try:
            asyncio.run(main())
        except ServerRefused as exc:
            logging.getLogger("custos.agent").error("the server refused this device: %s", exc)
            err.print(f"[red]error:[/] the server refused this device: {exc.detail}")
            raise typer.Exit(3) from None
        except DeviceWiped:
            err.print("[red]error:[/] this device was wiped")
            raise typer.Exit(5) from None
        except Exception as exc:
            if once:
                err.print(f"[red]error:[/] check-in failed: {exc}")
                raise typer.Exit(1) from None
            raise
        finally:
            state.close()

    def _device_call(state_dir: Path | None, method: str, path: str, body: bytes = b"") -> Any:
        from custos.agent.client import DeviceClient, RequestRejected, ServerError, ServerRefused
        from custos.agent.identity import EnrollError, load_identity
        from custos.agent.state import AgentState

        sd = state_dir or default_state_dir()
        if not (sd / "agent.db").exists():
            err.print(f"[red]error:[/] no agent state in {sd}; run `custos agent enroll` first")
            raise typer.Exit(1)
        state = AgentState(sd)
        try:
            ident = load_identity(state)
        except EnrollError as exc:
            err.print(f"[red]error:[/] {exc}")
            raise typer.Exit(1) from None
        finally:
            state.close()

        async def call() -> Any:
            client = DeviceClient(ident.server_url, ident.device_id, ident.key, ca_pem=ident.ca_pem)
            try:
                return await client.request(method, path, body=body)
            finally:
                await client.aclose()

        try:
            return asyncio.run(call())
        except (RequestRejected, ServerRefused) as exc:
            err.print(f"[red]error:[/] {exc.detail}")
            raise typer.Exit(1) from None
        except ServerError as exc:
            err.print(f"[red]error:[/] cannot reach the server: {exc}")
            raise typer.Exit(1) from None

    @agent.command("catalog")
    def catalog_cmd(
        state_dir: Path = typer.Option(None, "--state-dir"),
        as_json: bool = typer.Option(False, "--json"),
    ) -> None:
        """Packages offered to this device (self-service)."""
        from rich.table import Table

        data = _device_call(state_dir, "GET", "/api/device/v1/software/catalog")
        pkgs = data.get("packages") or []
        if as_json:
            typer.echo(json.dumps(pkgs, indent=2))
            return
        if not pkgs:
            err.print("Nothing is offered to this device.")
            return
        t = Table("NAME", "VERSION", "FORMAT", "SIZE", "STATE", "DESCRIPTION")
        for p in pkgs:
            t.add_row(
                str(p["name"]), str(p["version"]), str(p["format"]),
                f"{int(p['size']) / 1024:.0f} KiB", str(p["state"]), str(p["description"])[:60],
            )  # fmt: skip
        Console(soft_wrap=True).print(t)

    @agent.command("install")
    def install_cmd(
        name: str = typer.Argument(..., metavar="NAME"),
        state_dir: Path = typer.Option(None, "--state-dir"),
        wait: float = typer.Option(
            0,
            "--wait",
            min=0,
            max=86400,
            help="seconds to wait for the running agent to install it",
        ),
    ) -> None:
        """Ask for a catalogue package; the running agent downloads and installs it."""
        import time

        from custos.agent.software import SoftwareStore
        from custos.agent.state import AgentState

        body = json.dumps({"name": name}).encode()
        res = _device_call(state_dir, "POST", "/api/device/v1/software/install", body)
        err.print(f"queued {res['package']}; the agent installs it when it has it")
        if not wait:
            return
        sd = state_dir or default_state_dir()
        version = str(res["package"]).rsplit(" ", 1)[-1]
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            state = AgentState(sd)
            try:
                held = SoftwareStore(state._db).installed(name)
            finally:
                state.close()
            if held and held["version"] == version:
                err.print(f"[green]installed[/] {name} {version}")
                return
            time.sleep(1)
        err.print(f"[red]error:[/] {name} {version} was not installed within {wait:g}s")
        raise typer.Exit(1)

    @agent.command("status")
    def status_cmd(
        state_dir: Path = typer.Option(None, "--state-dir"),
        as_json: bool = typer.Option(False, "--json"),
    ) -> None:
        """Show this agent's identity, last check-in, queue and outbox."""
        from custos.agent.policy.store import PolicyStore
        from custos.agent.state import AgentState
        from custos.agent.tasks import TaskStore

        sd = state_dir or default_state_dir()
        if not (sd / "agent.db").exists():
            err.print(f"[red]error:[/] no agent state in {sd}; run `custos agent enroll` first")
            raise typer.Exit(1)
        state = AgentState(sd)
        try:
            info = {
                "state_dir": str(sd),
                "device_id": state.get("device_id"),
                "server_url": state.get("server_url"),
                "ca_fingerprint": state.get("ca_fingerprint"),
                "last_checkin": state.get("last_checkin"),
                "checkin_interval": state.get("interval_override") or state.get("checkin_interval"),
                "inventory_version": state.get("inventory_version"),
                "clock_offset_s": state.get("clock_offset"),
                **state.counts(),
                **TaskStore(state._db).counts(),  # scheduled tasks held, results waiting
                **PolicyStore(state._db).summary(),  # bundle sha, last evaluation, drift
            }
        finally:
            state.close()
        if as_json:
            typer.echo(json.dumps(info, indent=2))
            return
        for k, v in info.items():
            typer.echo(f"{k:>18}: {v if v is not None else '-'}")
