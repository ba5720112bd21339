"""`custos sim` (simulated devices against a server) and `custos demo` (a server and a fleet)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import IO, TYPE_CHECKING, Annotated, Any, TypeVar

import typer

if TYPE_CHECKING:
    import httpx
    from rich.console import Console, RenderableType

    from custos.sim.fleet import SimFleet

T = TypeVar("T")

DEMO_SEED = 1
DEMO_GROUP = "demo"
PASSWORD_FILE = "demo-admin-password"  # noqa: S105 - a file name
STATE_FILE = "demo.json"
FLEET_FILE = "sim-fleet.json"
SERVER_LOG = "demo-server.log"
STARTUP_TIMEOUT_S = 120.0
SERVER_STOP_TIMEOUT_S = 10.0


def _console() -> Console:
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def _esc(text: object) -> str:
    from rich.markup import escape

    return escape(str(text))


# --------------------------------------------------------------------------- shared


def _install_signals(stop: asyncio.Event) -> None:
    """SIGINT, SIGTERM and SIGHUP (a closed terminal) set `stop`; the caller shuts down in order."""
    loop = asyncio.get_running_loop()
    sigs = [signal.SIGINT, signal.SIGTERM]
    if hasattr(signal, "SIGHUP"):
        sigs.append(signal.SIGHUP)
    for sig in sigs:
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # Windows: no loop signal handlers
            signal.signal(sig, lambda *_: loop.call_soon_threadsafe(stop.set))


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep; True as soon as stop is set."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
    return stop.is_set()


async def _unless_stopped(stop: asyncio.Event, coro: Coroutine[Any, Any, T]) -> T | None:
    """Run coro; cancel it and return None if stop is set first."""
    task = asyncio.create_task(coro)
    waiter = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait((task, waiter), return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return None


class _StatusLine:
    """A live status line for the fleet (or a plain line every few seconds without a terminal)."""

    def __init__(self, console: Console, fleet: SimFleet, title: str) -> None:
        from rich.spinner import Spinner

        self.console = console
        self.fleet = fleet
        self.title = title
        self.phase = "starting"
        self._spinner = Spinner("dots", style="cyan")

    def text(self) -> str:
        s = self.fleet.stats()
        line = (
            f"[bold]{_esc(self.title)}[/] [dim]{self.phase}[/] · "
            f"enrolled [bold]{s.enrolled}[/]/{s.devices} · active [green]{s.active}[/] · "
            + (f"push-connected [green]{s.push_connected}[/] · " if self.fleet.push else "")
            + f"[bold]{s.checkins_per_s:.1f}[/] check-ins/s · "
            f"commands done [bold]{s.commands_done}[/] · "
            f"errors [{'red' if s.errors else 'dim'}]{s.errors}[/]"
        )
        if s.refused:
            line += f" · refused [yellow]{s.refused}[/]"
        if s.last_error and s.errors:
            line += f"\n[dim]last error: {_esc(s.last_error[:160])}[/]"
        return line

    def _render(self) -> RenderableType:
        from rich.table import Table

        grid = Table.grid(padding=(0, 1))
        grid.add_row(self._spinner, self.text())
        return grid

    async def show(self, stop: asyncio.Event) -> None:
        """Keep the line up to date until stop is set."""
        if not self.console.is_terminal:
            while not await _sleep_or_stop(stop, 10.0):
                self.console.print(self.text(), soft_wrap=True)
            return
        from rich.live import Live

        with Live(
            get_renderable=self._render,
            console=self.console,
            refresh_per_second=4,
            transient=True,
        ):
            await stop.wait()


async def _drive_fleet(
    fleet: SimFleet,
    stop: asyncio.Event,
    status: _StatusLine,
    state_file: Path | None,
) -> None:
    """Enrol what is missing (saving identities), then check in until stop is set."""
    from custos.sim.fleet import FleetError

    status.phase = "enrolling"
    try:
        await _unless_stopped(stop, fleet.enroll_all())
    finally:
        if state_file is not None:
            fleet.save(state_file)
    if stop.is_set():
        return
    if fleet.stats().enrolled == 0:
        raise FleetError("no device could enrol; see the last error")
    status.phase = "running"
    await fleet.run(stop)
    status.phase = "stopping"


# --------------------------------------------------------------------------- custos sim


async def _sim_main(
    *,
    server: str,
    token: str,
    devices: int,
    ca_fingerprint: str | None,
    interval: float | None,
    seed: int,
    duration: float | None,
    concurrency: int,
    change_rate: float,
    state_file: Path | None,
    push: bool = True,
) -> int:
    from custos.agent.identity import EnrollError
    from custos.sim.fleet import FleetError, SimFleet, raise_fd_limit

    err = _console()
    if push:
        # one socket per device, plus the check-in pool and some slack
        limit = raise_fd_limit()
        if limit < devices + concurrency + 64:
            err.print(
                f"[yellow]warning:[/] the open-file limit is {limit}: not every one of "
                f"{devices} devices can hold a push connection (raise `ulimit -n`)"
            )
    stop = asyncio.Event()
    _install_signals(stop)
    if duration is not None:
        asyncio.get_running_loop().call_later(duration, stop.set)
    fleet = SimFleet(
        server,
        token,
        count=devices,
        ca_fingerprint=ca_fingerprint,
        seed=seed,
        interval=interval,
        concurrency=concurrency,
        inventory_change_rate=change_rate,
        push=push,
    )
    status = _StatusLine(err, fleet, "custos sim")
    shown = asyncio.create_task(status.show(stop))
    code = 0
    try:
        if state_file is not None:
            fleet.load(state_file)
        await _drive_fleet(fleet, stop, status, state_file)
    except (FleetError, EnrollError) as exc:
        err.print(f"[bold red]error:[/] [red]{_esc(exc)}[/]")
        code = 1
    finally:
        stop.set()
        await asyncio.gather(shown, return_exceptions=True)  # the terminal may be gone
        await fleet.aclose()
    err.print(fleet.stats().summary(), soft_wrap=True)
    return code


# --------------------------------------------------------------------------- custos demo


def _write_private(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def demo_password(data_dir: Path) -> str:
    """The demo admin password: made on the first run, then read from DATA_DIR."""
    path = data_dir / PASSWORD_FILE
    try:
        existing = path.read_text().strip()
    except FileNotFoundError:
        existing = ""
    if existing:
        return existing
    password = secrets.token_urlsafe(12)
    _write_private(path, password + "\n")
    return password


def _load_state(data_dir: Path) -> dict[str, Any]:
    import json

    try:
        data = json.loads((data_dir / STATE_FILE).read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _save_state(data_dir: Path, state: dict[str, Any]) -> None:
    import json

    _write_private(data_dir / STATE_FILE, json.dumps(state, indent=2) + "\n")


def _port_in_use(host: str, port: int) -> str | None:
    """Why the port cannot be bound, or None if it is free."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


def _connect_host(host: str) -> str:
    if host in ("", "0.0.0.0"):  # noqa: S104 - comparing, not binding
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


def _url(host: str, port: int) -> str:
    h = _connect_host(host)
    return f"https://[{h}]:{port}" if ":" in h else f"https://{h}:{port}"


def _server_argv(data_dir: Path, host: str, port: int) -> list[str]:
    """The server as a child of this Python (no console script or __main__ needed)."""
    return [
        sys.executable,
        "-c",
        "from custos.cli.main import main; main()",
        "server",
        "--data-dir",
        str(data_dir),
        "--host",
        host,
        "--port",
        str(port),
    ]


def _server_env(password: str, interval: float) -> dict[str, str]:
    # the demo is self-contained: no CUSTOS_* setting of the caller's own server leaks in
    env = {k: v for k, v in os.environ.items() if not k.startswith("CUSTOS_")}
    env["CUSTOS_ADMIN_PASSWORD"] = password
    # real agents enrolled into the demo check in as often as the simulated ones, so a
    # command sent from the tour comes back within seconds
    env["CUSTOS_CHECKIN_INTERVAL_S"] = str(max(5, round(interval)))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _spawn_server(
    data_dir: Path, host: str, port: int, password: str, log: IO[bytes], interval: float
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        _server_argv(data_dir, host, port),
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=_server_env(password, interval),
        start_new_session=True,  # Ctrl-C reaches only us; we stop the server in order
    )


def _tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.strip().splitlines()[-lines:])


async def _stop_server(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, up to ten seconds for a clean exit, then SIGKILL."""
    if proc.poll() is None:
        proc.terminate()
        try:
            await asyncio.to_thread(proc.wait, SERVER_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
    await asyncio.to_thread(proc.wait)


async def _wait_healthy(url: str, proc: subprocess.Popen[bytes], stop: asyncio.Event) -> str:
    """'ok', 'exited' (the server died), 'stopped' (Ctrl-C) or 'timeout'."""
    import httpx

    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    # only a liveness probe of the process we just started; the CA is pinned right after
    async with httpx.AsyncClient(verify=False, timeout=2.0) as http:  # noqa: S501
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return "exited"
            try:
                r = await http.get(url + "/healthz")
                if r.status_code == 200:
                    return "ok"
            except httpx.HTTPError:
                pass
            if await _sleep_or_stop(stop, 0.2):
                return "stopped"
    return "timeout"


class _DemoError(Exception):
    """Something the user must fix; the message says what."""


async def _api(
    http: httpx.AsyncClient, method: str, path: str, token: str | None, body: Any = None
) -> httpx.Response:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    return await http.request(method, path, json=body, headers=headers)


def _detail(resp: httpx.Response) -> str:
    try:
        return str(resp.json().get("detail", resp.text))
    except (ValueError, AttributeError):
        return resp.text[:200]


DEMO_POLICY = """\
name: demo-baseline
description: A sample profile for the simulated fleet (simulated agents report on it).
interval: 15m
software:
  forbidden: [{name: telnet}]
files:
  - {path: /etc/motd, content: "This device is managed by Custos.\\n", mode: "0644"}
settings:
  - {provider: sysctl, key: net.ipv4.ip_forward, value: "0"}
services:
  - {name: ufw, provider: systemd, category: firewall}
actions:
  - {after: 1h, do: notify}
"""


async def _prepare_server(
    http: httpx.AsyncClient, password: str, state: dict[str, Any], data_dir: Path
) -> str:
    """Log in, make the demo group and a reusable enrolment token (once); returns the token."""
    r = await _api(
        http, "POST", "/api/v1/auth/login", None, {"username": "admin", "password": password}
    )
    if r.status_code != 200:
        raise _DemoError(
            f"cannot log in as admin with the password in {data_dir / PASSWORD_FILE} "
            f"({_detail(r)}). The database in {data_dir} was set up with another password; "
            "remove the directory to start afresh."
        )
    api_token = str(r.json()["token"])
    r = await _api(
        http,
        "POST",
        "/api/v1/groups",
        api_token,
        {"name": DEMO_GROUP, "description": "the simulated demo fleet"},
    )
    if r.status_code not in (201, 409):
        raise _DemoError(f"cannot create the demo group: {_detail(r)}")
    # a sample policy on the demo group, so the compliance pages have something to show
    r = await _api(http, "POST", "/api/v1/policies", api_token, {"document": DEMO_POLICY})
    if r.status_code in (200, 201):
        await _api(
            http,
            "POST",
            "/api/v1/policies/demo-baseline/assignments",
            api_token,
            {"kind": "group", "target": DEMO_GROUP},
        )
    secret = state.get("enroll_token")
    if secret:
        r = await _api(http, "GET", "/api/v1/enrollment-tokens", api_token)
        usable = r.status_code == 200 and any(
            t.get("prefix") == str(secret)[:10] and t.get("state") == "active" for t in r.json()
        )
        if usable:
            return str(secret)
    r = await _api(
        http,
        "POST",
        "/api/v1/enrollment-tokens",
        api_token,
        {"uses": None, "expires_in_s": 31_536_000, "group": DEMO_GROUP, "note": "demo fleet"},
    )
    if r.status_code != 201:
        raise _DemoError(f"cannot create the demo enrolment token: {_detail(r)}")
    state["enroll_token"] = secret = str(r.json()["token"])
    return secret


def _banner(
    *, url: str, password: str, fingerprint: str, data_dir: Path, devices: int
) -> RenderableType:
    from rich.panel import Panel
    from rich.table import Table

    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="bold", no_wrap=True)
    facts.add_column(overflow="fold")
    facts.add_row("Console", f"[cyan]{_esc(url)}/console/[/]")
    facts.add_row("API", f"[cyan]{_esc(url)}/api/docs[/]")
    facts.add_row("Admin user", "admin")
    facts.add_row("Password", f"[bold yellow]{_esc(password)}[/]")
    facts.add_row("CA fingerprint", f"sha256:{fingerprint}")
    facts.add_row("Fleet", f"{devices} simulated devices in group [bold]{DEMO_GROUP}[/]")
    facts.add_row("Data", f"{_esc(data_dir)}")
    facts.add_row("Server log", f"{_esc(data_dir / SERVER_LOG)}")
    return Panel(facts, title="[bold]Custos demo[/]", border_style="green", expand=False)


def _howto(url: str, fingerprint: str, example: str) -> list[str]:
    """Commands to try, one per line (printed unwrapped so they can be copied)."""
    return [
        "",
        "[bold]Open the console[/] in a browser (accept the demo CA's certificate, or import "
        "it from /api/v1/ca); sign in as admin.",
        "",
        "[bold]Use the CLI[/] (in another terminal; the password is above):",
        f"  [cyan]custos login {_esc(url)} --user admin --ca-fingerprint sha256:{fingerprint}[/]",
        "  [cyan]custos device ls[/]",
        f"  [cyan]custos cmd run {_esc(example)} --wait -- uname -a[/]",
        f"  [cyan]custos cmd run group:{DEMO_GROUP} --wait -- uptime[/]",
        "",
        "[bold]Enrol this machine[/]: [cyan]custos token create[/], then run the "
        "[cyan]custos agent enroll …[/] command it prints.",
        "",
        "[dim]Ctrl-C stops the fleet and the server.[/]",
    ]


async def _watch_server(proc: subprocess.Popen[bytes], stop: asyncio.Event) -> bool:
    """Set stop if the server exits; True if it did."""
    while not stop.is_set():
        if proc.poll() is not None:
            stop.set()
            return True
        await _sleep_or_stop(stop, 0.5)
    return proc.poll() is not None


async def _demo_main(*, data_dir: Path, host: str, port: int, devices: int, interval: float) -> int:
    from custos.agent.identity import EnrollError

    err = _console()
    stop = asyncio.Event()
    _install_signals(stop)
    busy = _port_in_use(host, port)
    if busy:
        err.print(
            f"[bold red]error:[/] [red]port {port} on {_esc(host)} is not available ({busy}).[/] "
            "Is another server running? Choose another one with --port."
        )
        return 1
    password = demo_password(data_dir)
    url = _url(host, port)
    log_path = data_dir / SERVER_LOG
    log: IO[bytes] = log_path.open("wb")
    err.print(f"Starting the Custos server on [cyan]{_esc(url)}[/] (data in {_esc(data_dir)}) …")
    proc = _spawn_server(data_dir, host, port, password, log, interval)
    try:
        return await _demo_with_server(
            err,
            proc,
            log_path,
            stop,
            data_dir=data_dir,
            url=url,
            password=password,
            devices=devices,
            interval=interval,
        )
    except EnrollError as exc:
        err.print(f"[bold red]error:[/] [red]{_esc(exc)}[/]")
        return 1
    finally:
        await _stop_server(proc)
        log.close()


async def _demo_with_server(
    err: Console,
    proc: subprocess.Popen[bytes],
    log_path: Path,
    stop: asyncio.Event,
    *,
    data_dir: Path,
    url: str,
    password: str,
    devices: int,
    interval: float,
) -> int:
    import httpx

    from custos.agent.client import pinned_context
    from custos.agent.identity import ca_fingerprint, fetch_pinned_ca
    from custos.sim.fleet import FleetError, SimFleet, raise_fd_limit

    raise_fd_limit()  # a push socket per simulated device

    def server_failed(what: str) -> int:
        err.print(f"[bold red]error:[/] [red]{what}[/]")
        tail = _tail(log_path)
        if tail:
            err.print(f"[dim]--- last lines of {_esc(log_path)} ---[/]")
            err.print(_esc(tail), soft_wrap=True)
        return 1

    health = await _wait_healthy(url, proc, stop)
    if health == "stopped":
        return 0
    if health == "exited":
        return server_failed(f"the server exited early (exit code {proc.returncode}).")
    if health == "timeout":
        return server_failed(f"the server did not answer on {url} within {STARTUP_TIMEOUT_S:.0f}s.")
    state = _load_state(data_dir)
    ca_pem = await fetch_pinned_ca(url, None)
    fingerprint = ca_fingerprint(ca_pem)
    if state.get("ca_fingerprint") != fingerprint:
        state = {"ca_fingerprint": fingerprint}
    async with httpx.AsyncClient(base_url=url, verify=pinned_context(ca_pem), timeout=30) as http:
        try:
            token = await _prepare_server(http, password, state, data_dir)
        except _DemoError as exc:
            err.print(f"[bold red]error:[/] [red]{_esc(exc)}[/]")
            return 1
        except httpx.HTTPError as exc:
            return server_failed(f"talking to the server failed: {exc}")
    _save_state(data_dir, state)

    fleet = SimFleet(
        url,
        token,
        count=devices,
        ca_fingerprint=fingerprint,
        seed=DEMO_SEED,
        interval=interval,
        push=True,  # commands sent from the tour reach the fleet at once
    )
    fleet_file = data_dir / FLEET_FILE
    try:
        fleet.load(fleet_file)
    except FleetError as exc:
        err.print(f"[yellow]warning:[/] {_esc(exc)}; enrolling a new fleet")
    first = fleet.devices[0] if fleet.devices else None
    if first is not None:
        first.inventory()
    err.print(
        _banner(
            url=url,
            password=password,
            fingerprint=fingerprint,
            data_dir=data_dir,
            devices=devices,
        )
    )
    for line in _howto(url, fingerprint, first.hostname if first else "<name>"):
        err.print(line, soft_wrap=True)
    status = _StatusLine(err, fleet, "demo fleet")
    shown = asyncio.create_task(status.show(stop))
    watcher = asyncio.create_task(_watch_server(proc, stop))
    code = 0
    try:
        await _drive_fleet(fleet, stop, status, fleet_file)
    except FleetError as exc:
        err.print(f"[bold red]error:[/] [red]{_esc(exc)}[/]")
        code = 1
    finally:
        stop.set()
        died = await watcher
        await asyncio.gather(shown, return_exceptions=True)  # the terminal may be gone
        await fleet.aclose()
    if died and code == 0:
        return server_failed(f"the server stopped unexpectedly (exit code {proc.returncode}).")
    with contextlib.suppress(OSError):  # the terminal may be gone (SIGHUP)
        err.print(fleet.stats().summary(), soft_wrap=True)
        err.print("Stopping the server …")
    return code


# --------------------------------------------------------------------------- registration


def _run(main: Callable[[], Awaitable[int]]) -> None:
    async def wrapper() -> int:
        return await main()

    code = asyncio.run(wrapper())
    if code:
        raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    """Add the sim and demo commands."""

    @app.command("sim")
    def sim(
        server: Annotated[str, typer.Option("--server", help="server URL, e.g. https://host:8443")],
        token: Annotated[
            str,
            typer.Option("--token", envvar="CUSTOS_SIM_TOKEN", help="a multi-use enrolment token"),
        ],
        devices: Annotated[
            int, typer.Option("--devices", "-n", min=1, max=1_000_000, help="how many devices")
        ] = 100,
        ca_fingerprint: Annotated[
            str | None, typer.Option("--ca-fingerprint", help="expected SHA-256 of the server's CA")
        ] = None,
        interval: Annotated[
            float | None,
            typer.Option(
                "--interval", min=0.1, help="seconds between check-ins (default: the server's)"
            ),
        ] = None,
        seed: Annotated[int, typer.Option("--seed", help="same seed, same fake devices")] = 0,
        duration: Annotated[
            float | None, typer.Option("--duration", min=0, help="stop after this many seconds")
        ] = None,
        concurrency: Annotated[
            int, typer.Option("--concurrency", min=1, max=4096, help="requests in flight at most")
        ] = 64,
        change_rate: Annotated[
            float,
            typer.Option(
                "--inventory-changes",
                min=0,
                max=1,
                help="chance per check-in of a small inventory change",
            ),
        ] = 0.02,
        state_file: Annotated[
            Path | None,
            typer.Option("--state-file", help="keep the devices' identities here and reuse them"),
        ] = None,
        no_push: Annotated[
            bool,
            typer.Option(
                "--no-push", help="no push connections: devices only check in at their interval"
            ),
        ] = False,
    ) -> None:
        """Run simulated devices that enrol and check in like real agents (nothing is executed)."""
        _run(
            lambda: _sim_main(
                server=server,
                token=token,
                devices=devices,
                ca_fingerprint=ca_fingerprint,
                interval=interval,
                seed=seed,
                duration=duration,
                concurrency=concurrency,
                change_rate=change_rate,
                state_file=state_file,
                push=not no_push,
            )
        )

    @app.command("demo")
    def demo(
        data_dir: Annotated[
            Path, typer.Option("--data-dir", help="state of the demo server and fleet")
        ] = Path("var/demo"),
        port: Annotated[int, typer.Option("--port", min=1, max=65535)] = 8443,
        devices: Annotated[
            int, typer.Option("--devices", "-n", min=1, max=100_000, help="simulated devices")
        ] = 25,
        host: Annotated[str, typer.Option("--host", help="address the server listens on")] = (
            "127.0.0.1"
        ),
        interval: Annotated[
            float, typer.Option("--interval", min=1, help="check-in interval of the fleet")
        ] = 10.0,
    ) -> None:
        """Start a server and a simulated fleet: a working Custos in one command."""
        data_dir = data_dir.expanduser().resolve()
        data_dir.mkdir(parents=True, exist_ok=True)
        _run(
            lambda: _demo_main(
                data_dir=data_dir, host=host, port=port, devices=devices, interval=interval
            )
        )
