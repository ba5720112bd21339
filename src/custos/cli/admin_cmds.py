"""Admin commands: login, enrolment tokens, devices, groups and remote commands."""

from __future__ import annotations

import json
import re
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import quote

import typer

from custos.cli.client import fail, parse_datetime

if TYPE_CHECKING:
    from rich.console import Console

    from custos.cli.client import AdminClient

TERMINAL_STATES = ("succeeded", "failed", "interrupted", "expired", "rejected", "cancelled")
POLL_INTERVAL_S = 0.5
MAX_SCRIPT_BYTES = 1_048_576
PIPE_WIDTH = 160
INTERPRETERS = ("sh", "python", "powershell")

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION_PART = re.compile(r"(\d+)\s*([smhdw])")
_DURATION = re.compile(r"(?:\d+\s*[smhdw]\s*)+")

JsonOpt = Annotated[bool, typer.Option("--json", help="print machine-readable JSON")]


# --------------------------------------------------------------------------- pure helpers


def parse_duration(value: str) -> int:
    """Seconds from '30m', '12h', '7d', '2w', '1h30m' or plain seconds; ValueError otherwise."""
    v = value.strip().lower()
    if v.isdigit():
        seconds = int(v)
    elif _DURATION.fullmatch(v):
        seconds = sum(int(n) * _UNITS[u] for n, u in _DURATION_PART.findall(v))
    else:
        raise ValueError(f"{value!r} is not a duration (use e.g. 90, 30m, 12h, 7d or 2w)")
    if seconds <= 0:
        raise ValueError("a duration must be longer than zero")
    return seconds


def parse_when(value: str, now: datetime | None = None) -> datetime:
    """An aware datetime from '+10m' (relative to now) or ISO 8601 (naive means local time)."""
    v = value.strip()
    if v.startswith("+"):
        base = now or datetime.now(UTC)
        return base + timedelta(seconds=parse_duration(v[1:]))
    try:
        dt = datetime.fromisoformat(v.replace("Z", "+00:00") if v.endswith("Z") else v)
    except ValueError:
        raise ValueError(
            f"{value!r} is neither +DURATION (e.g. +10m) nor an ISO time "
            "(e.g. 2030-01-31T18:00 or 2030-01-31T18:00+01:00)"
        ) from None
    return dt if dt.tzinfo else dt.astimezone()


def _span(seconds: float, nearest: bool = False) -> str:
    s = int(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            n = round(seconds / size) if nearest else s // size
            return f"{n}{unit}"
    return f"{s}s"


def relative_time(value: Any, now: datetime | None = None) -> str:
    """'12s ago', '3h ago', 'in 6d' or 'never' for an API timestamp."""
    dt = parse_datetime(value)
    if dt is None:
        return "never"
    now = now or datetime.now(UTC)
    delta = (now - dt).total_seconds()
    if delta > -5:  # a little clock skew is not "in the future"
        delta = max(delta, 0.0)
        if delta >= 60 * 86400:
            return f"{dt:%Y-%m-%d}"
        return f"{_span(delta)} ago"
    return f"in {_span(-delta, nearest=True)}"


def format_bytes(value: Any) -> str:
    """'16.0 GiB' from a byte count (the input unchanged when it is not a number)."""
    try:
        n = float(value)
    except (TypeError, ValueError):
        return str(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(value)  # pragma: no cover


def format_counts(counts: dict[str, int]) -> str:
    """'2 succeeded, 1 queued' in a stable order."""
    order = {s: i for i, s in enumerate(("queued", "sent", "acked", *TERMINAL_STATES))}
    items = sorted(counts.items(), key=lambda kv: (order.get(kv[0], 99), kv[0]))
    return ", ".join(f"{n} {state}" for state, n in items if n) or "-"


def software_counts(inventory: dict[str, str]) -> dict[str, list[str]]:
    """Package names per software source ('dpkg', 'pip', …) from sw.<source>.<name> keys."""
    out: dict[str, list[str]] = {}
    for key in inventory:
        if key.startswith("sw."):
            source, _, name = key[3:].partition(".")
            out.setdefault(source, []).append(name)
    for names in out.values():
        names.sort()
    return dict(sorted(out.items()))


def build_command_body(
    target: str,
    argv: list[str],
    *,
    timeout: float,
    script: tuple[str, str] | None = None,
    reboot: bool = False,
    ping: bool = False,
    set_interval: int | None = None,
    collect: str | None = None,
    max_bytes: int | None = None,
    not_before: datetime | None = None,
    expires_at: datetime | None = None,
) -> dict[str, Any]:
    """The POST /api/v1/commands body; ValueError when not exactly one kind is asked for.

    `script` is (interpreter, text); with it, argv are the script's arguments.
    """
    kinds = []
    if script is not None:
        kinds.append("--script")
    if reboot:
        kinds.append("--reboot")
    if ping:
        kinds.append("--ping")
    if set_interval is not None:
        kinds.append("--set-interval")
    if collect is not None:
        kinds.append("--collect")
    if argv and script is None:
        kinds.append("a command line after --")
    if not kinds:
        raise ValueError(
            "nothing to run: give a command after --, or one of --script, --reboot, --ping, "
            "--set-interval, --collect"
        )
    if len(kinds) > 1:
        raise ValueError(f"choose one kind of command, not {' and '.join(kinds)}")
    if max_bytes is not None and collect is None:
        raise ValueError("--max-bytes only applies to --collect")
    if timeout <= 0:
        raise ValueError("--timeout must be positive")
    body: dict[str, Any] = {"target": target}
    if script is not None:
        body.update(kind="script", interpreter=script[0], script=script[1], args=list(argv))
        body["timeout_s"] = timeout
    elif reboot:
        body["kind"] = "reboot"
    elif ping:
        body["kind"] = "ping"
    elif set_interval is not None:
        body.update(kind="settings", checkin_interval=set_interval)
    elif collect is not None:
        body.update(kind="collect_file", path=collect)
        if max_bytes is not None:
            body["max_bytes"] = max_bytes
    else:
        body.update(kind="exec", argv=list(argv), timeout_s=timeout)
    if not_before is not None:
        body["not_before"] = not_before.isoformat()
    if expires_at is not None:
        body["expires_at"] = expires_at.isoformat()
    if not_before and expires_at and expires_at <= not_before:
        raise ValueError("--expires must be later than --not-before")
    return body


def _single_target(target: str) -> bool:
    return not target.startswith("group:") and "," not in target


def guess_interpreter(path: str) -> str:
    """The interpreter a script file name suggests (sh unless .py or .ps1)."""
    lower = path.lower()
    if lower.endswith(".py"):
        return "python"
    if lower.endswith(".ps1"):
        return "powershell"
    return "sh"


def exit_code_for(kind: str, runs: list[dict[str, Any]], finished: bool) -> int:
    """The CLI's exit status after waiting: the remote one for a single exec, else 0 or 1."""
    if not finished or not runs:
        return 1
    if len(runs) == 1 and kind in ("exec", "script"):
        run = runs[0]
        code = run.get("exit_code")
        if (
            run.get("state") in ("succeeded", "failed")
            and isinstance(code, int)
            and 0 <= code <= 255
        ):
            return code
        return 0 if run.get("state") == "succeeded" else 1
    return 0 if all(r.get("state") == "succeeded" for r in runs) else 1


def payload_summary(kind: str, payload: dict[str, Any]) -> str:
    """One short line saying what a command does."""
    import shlex

    if kind == "exec":
        return shlex.join(str(a) for a in payload.get("argv") or [])
    if kind == "script":
        text = str(payload.get("script") or "")
        args = shlex.join(str(a) for a in payload.get("args") or [])
        return f"{payload.get('interpreter')} script ({len(text)} chars) {args}".rstrip()
    if kind == "collect_file":
        return f"{payload.get('path')} (max {format_bytes(payload.get('max_bytes'))})"
    if kind == "omadm":
        ops = payload.get("ops") or []
        return ", ".join(f"{o.get('verb')} {o.get('target')}" for o in ops)
    if kind == "settings":
        return f"check-in every {payload.get('checkin_interval')} s"
    return ""


# --------------------------------------------------------------------------- output helpers


def _out() -> Console:
    import os

    from rich.console import Console

    # Piped output is not squeezed into 80 columns (scripts should use --json anyway).
    wide = not sys.stdout.isatty() and not os.environ.get("COLUMNS")
    return Console(highlight=False, width=PIPE_WIDTH if wide else None)


def _heading(name: Any, status: str, colour: str = "white") -> str:
    """Markup for a per-device heading inside command output."""
    return f"[bold]== {_esc(name)}[/] [{colour}]{_esc(status)}[/]"


def _err() -> Console:
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True)


def print_json(data: Any) -> None:
    """Machine-readable output on stdout."""
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()


def _esc(value: Any) -> str:
    from rich.markup import escape

    return escape("" if value is None else str(value))


def _client() -> AdminClient:
    from custos.cli.client import AdminClient

    return AdminClient.from_config()


def _seg(ref: str) -> str:
    return quote(ref, safe="")


def _table(*columns: str, wrap: tuple[str, ...] = ()) -> Any:
    """A borderless table; columns not in `wrap` keep to one line (ids stay whole)."""
    from rich.table import Table

    t = Table(box=None, header_style="bold")
    for col in columns:
        if col in wrap:
            t.add_column(col, overflow="fold", min_width=len(col))
        else:
            t.add_column(col, no_wrap=True, min_width=len(col))
    return t


def _kv_grid(rows: list[tuple[str, Any]]) -> Any:
    from rich.table import Table

    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column(overflow="fold")
    for k, v in rows:
        grid.add_row(k, _esc(v) if v not in (None, "") else "[dim]-[/]")
    return grid


def _duration_option(value: str | None, option: str) -> int | None:
    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError as exc:
        fail(f"{option}: {exc}", code=2)


def _when_option(value: str | None, option: str) -> datetime | None:
    if value is None:
        return None
    try:
        return parse_when(value)
    except ValueError as exc:
        fail(f"{option}: {exc}", code=2)


# --------------------------------------------------------------------------- login


def login_cmd(
    url: Annotated[str, typer.Argument(help="server URL, e.g. https://mdm.example.com:8443")],
    user: Annotated[str, typer.Option("--user", "-u", help="admin user name")],
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="read the password from one line of stdin")
    ] = False,
    ca_fingerprint: Annotated[
        str | None,
        typer.Option("--ca-fingerprint", help="expected SHA-256 of the server's CA (pinning)"),
    ] = None,
) -> None:
    """Log in to a Custos server and remember the token and its CA."""
    from custos.cli.client import login

    def ask() -> str:
        if password_stdin:
            return sys.stdin.readline().rstrip("\r\n")
        return str(typer.prompt(f"Password for {user}", hide_input=True))

    def ask_otp() -> str:
        if password_stdin:
            line = sys.stdin.readline().rstrip("\r\n")
            if line:
                return line
            fail("this account needs a TOTP code: give it on the line after the password", code=2)
        return str(typer.prompt("TOTP code"))

    stored = login(url, user, ask, ca_fingerprint, otp=ask_otp)
    expires = parse_datetime(stored.expires_at)
    until = f" until {expires.astimezone():%Y-%m-%d %H:%M}" if expires else ""
    _err().print(
        f"Logged in to [bold]{_esc(stored.url)}[/] as [bold]{_esc(stored.username)}[/]{until}."
    )


# --------------------------------------------------------------------------- tokens


def token_create(
    group: Annotated[str | None, typer.Option("--group", help="put enrolled devices in it")] = None,
    uses: Annotated[int | None, typer.Option("--uses", min=1, help="how many enrolments")] = None,
    unlimited: Annotated[bool, typer.Option("--unlimited", help="no limit on uses")] = False,
    expires: Annotated[
        str, typer.Option("--expires", help="lifetime: 30m, 12h, 7d, 2w, seconds, or never")
    ] = "7d",
    note: Annotated[str, typer.Option("--note", help="free text shown in `token ls`")] = "",
    json_out: JsonOpt = False,
) -> None:
    """Create an enrolment token (the secret is shown only now)."""
    if unlimited and uses is not None:
        fail("--uses and --unlimited exclude each other", code=2)
    expires_in = (
        None
        if expires.strip().lower() in ("never", "none")
        else _duration_option(expires, "--expires")
    )
    body = {
        "group": group,
        "uses": None if unlimited else (uses or 1),
        "expires_in_s": expires_in,
        "note": note,
    }
    with _client() as c:
        tok = c.post("/api/v1/enrollment-tokens", body)
    if json_out:
        print_json(tok)
        return
    out = _out()
    max_uses = tok.get("max_uses")
    facts = [
        f"id {tok.get('id')}",
        "unlimited uses" if max_uses is None else f"{max_uses} use{'s' if max_uses != 1 else ''}",
        f"expires {relative_time(tok.get('expires_at'))}" if tok.get("expires_at") else "no expiry",
    ]
    if tok.get("group"):
        facts.append(f"group {tok['group']}")
    out.print(f"[green]Enrolment token created[/] ({_esc(', '.join(facts))})\n")
    out.print(
        _kv_grid([("Token", tok.get("token")), ("CA fingerprint", tok.get("ca_fingerprint"))])
    )
    out.print("\nEnrol a device with:\n")
    out.print(f"  [bold cyan]{_esc(tok.get('enroll_command'))}[/]", soft_wrap=True)
    out.print("\n[dim]The token is not shown again.[/]")


def token_ls(json_out: JsonOpt = False) -> None:
    """List enrolment tokens."""
    with _client() as c:
        tokens = c.get("/api/v1/enrollment-tokens")
    if json_out:
        print_json(tokens)
        return
    if not tokens:
        _err().print("No enrolment tokens.")
        return
    styles = {"active": "green", "revoked": "red", "expired": "dim", "used_up": "yellow"}
    t = _table("ID", "PREFIX", "STATE", "USES", "EXPIRES", "GROUP", "NOTE", wrap=("GROUP", "NOTE"))
    for tok in tokens:
        state = str(tok.get("state"))
        max_uses = tok.get("max_uses")
        t.add_row(
            str(tok.get("id")),
            _esc(tok.get("prefix")) + "…",
            f"[{styles.get(state, 'white')}]{_esc(state)}[/]",
            f"{tok.get('uses')}/{'∞' if max_uses is None else max_uses}",
            relative_time(tok["expires_at"]) if tok.get("expires_at") else "never",
            _esc(tok.get("group") or "-"),
            _esc(tok.get("note") or ""),
        )
    _out().print(t)


def token_revoke(
    token_id: Annotated[int, typer.Argument(help="token id (see `token ls`)")],
) -> None:
    """Revoke an enrolment token (devices enrolled with it stay enrolled)."""
    with _client() as c:
        tok = c.post(f"/api/v1/enrollment-tokens/{token_id}/revoke")
    _err().print(f"Token {tok.get('id')} ({_esc(tok.get('prefix'))}…) is [red]revoked[/].")


# --------------------------------------------------------------------------- devices


def device_ls(
    search: Annotated[
        str | None, typer.Option("--search", "-s", help="name or id contains")
    ] = None,
    group: Annotated[str | None, typer.Option("--group", help="only members of this group")] = None,
    status: Annotated[str | None, typer.Option("--status", help="active or retired")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=1000)] = 100,
    json_out: JsonOpt = False,
) -> None:
    """List devices."""

    if status is not None and status not in ("active", "retired"):
        fail("--status is active or retired", code=2)
    with _client() as c:
        devices = c.get(
            "/api/v1/devices", {"q": search, "group": group, "status": status, "limit": limit}
        )
    if json_out:
        print_json(devices)
        return
    if not devices:
        _err().print("No devices.")
        return
    t = _table(
        "ID",
        "NAME",
        "STATUS",
        "OS",
        "MODEL",
        "LAST SEEN",
        "GROUPS",
        wrap=("NAME", "OS", "MODEL", "GROUPS"),
    )
    for d in devices:
        status_s = str(d.get("status"))
        t.add_row(
            _esc(d.get("id")),
            _esc(d.get("name")),
            f"[{'green' if status_s == 'active' else 'dim'}]{_esc(status_s)}[/]",
            _esc(d.get("os")),
            _esc(d.get("model")),
            relative_time(d.get("last_seen")),
            _esc(", ".join(d.get("groups") or [])),
        )
    _out().print(t)
    if len(devices) >= limit:
        _err().print(f"[dim]showing the first {limit}; use --limit or --search for more[/]")


def _inventory_sections(inv: dict[str, str]) -> list[tuple[str, list[tuple[str, Any]]]]:
    """Inventory grouped for reading: OS, hardware, disks, network, battery, software, other."""
    os_rows = [(k[3:], v) for k, v in sorted(inv.items()) if k.startswith("os.")]
    hw: list[tuple[str, Any]] = []
    disks: dict[str, dict[str, str]] = {}
    nets: dict[str, dict[str, str]] = {}
    for k, v in sorted(inv.items()):
        if k.startswith("hw.disk."):
            mount, _, field = k[len("hw.disk.") :].rpartition(".")
            disks.setdefault(mount, {})[field] = v
        elif k.startswith("hw.net."):
            iface, _, field = k[len("hw.net.") :].rpartition(".")
            nets.setdefault(iface, {})[field] = v
        elif k.startswith("hw."):
            name = k[3:]
            if name.endswith("bytes"):
                name, v = name.removesuffix("_bytes").removesuffix(".total"), format_bytes(v)
            hw.append((name, v))
    disk_rows = [
        (
            mount,
            " ".join(
                x
                for x in (
                    format_bytes(f["total_bytes"]) if "total_bytes" in f else "",
                    f.get("fstype", ""),
                    f.get("device", ""),
                )
                if x
            ),
        )
        for mount, f in disks.items()
    ]
    net_rows = [
        (iface, "  ".join(f"{k} {v}" for k, v in sorted(f.items()) if v))
        for iface, f in nets.items()
    ]
    sw_rows: list[tuple[str, Any]] = []
    for source, names in software_counts(inv).items():
        sample = ", ".join(names[:5]) + (", …" if len(names) > 5 else "")
        sw_rows.append((source, f"{len(names)} package{'s' if len(names) != 1 else ''} ({sample})"))
    other = [(k, v) for k, v in sorted(inv.items()) if not k.startswith(("os.", "hw.", "sw."))]
    sections = [
        ("Operating system", os_rows),
        ("Hardware", hw),
        ("Disks", disk_rows),
        ("Network", net_rows),
        ("Software", sw_rows),
        ("Other", other),
    ]
    return [(title, rows) for title, rows in sections if rows]


def device_show(
    ref: Annotated[str, typer.Argument(metavar="ID_OR_NAME")],
    json_out: JsonOpt = False,
    history: Annotated[bool, typer.Option("--history", help="also show inventory changes")] = False,
) -> None:
    """Show a device: identity, inventory (and its change history)."""
    with _client() as c:
        dev = c.get(f"/api/v1/devices/{_seg(ref)}")
        changes = c.get(f"/api/v1/devices/{_seg(dev['id'])}/history") if history else None
    if json_out:
        print_json({**dev, "history": changes} if history else dev)
        return
    out = _out()
    skew = dev.get("clock_skew_s")
    out.print(f"[bold]{_esc(dev.get('name'))}[/]  [dim]{_esc(dev.get('id'))}[/]")
    out.print(
        _kv_grid(
            [
                ("Status", dev.get("status")),
                ("OS", dev.get("os")),
                ("Model", dev.get("model")),
                ("Groups", ", ".join(dev.get("groups") or [])),
                ("Last seen", relative_time(dev.get("last_seen"))),
                ("Enrolled", dev.get("enrolled_at")),
                ("Agent", dev.get("agent_version")),
                (
                    "Certificate",
                    f"serial {dev.get('cert_serial')}, valid until {dev.get('cert_not_after')}",
                ),
                ("Clock skew", None if skew is None else f"{skew:+.1f} s"),
                (
                    "Inventory",
                    f"version {dev.get('inventory_version')}, updated "
                    f"{relative_time(dev.get('inventory_updated_at'))}",
                ),
                *([("Retired", dev.get("retired_at"))] if dev.get("retired_at") else []),
            ]
        )
    )
    inv = dev.get("inventory") or {}
    if not inv:
        out.print("\n[dim]No inventory reported yet.[/]")
    for title, rows in _inventory_sections(inv):
        out.print(f"\n[bold underline]{title}[/]")
        out.print(_kv_grid(rows))
    if history:
        out.print("\n[bold underline]Inventory changes[/] (newest first)")
        if not changes:
            out.print("[dim]none[/]")
        else:
            t = _table("VERSION", "WHEN", "KEY", "OLD", "NEW", wrap=("KEY", "OLD", "NEW"))
            for ch in changes:
                t.add_row(
                    str(ch.get("version")),
                    relative_time(ch.get("at")),
                    _esc(ch.get("key")),
                    "[dim]-[/]" if ch.get("old") is None else _esc(ch.get("old")),
                    "[dim]-[/]" if ch.get("new") is None else _esc(ch.get("new")),
                )
            out.print(t)


def device_retire(
    ref: Annotated[str, typer.Argument(metavar="ID_OR_NAME")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="do not ask for confirmation")] = False,
) -> None:
    """Retire a device: revoke its certificate and cancel its queued commands."""
    with _client() as c:
        dev = c.get(f"/api/v1/devices/{_seg(ref)}")
        label = f"{dev.get('name')} ({dev.get('id')})"
        if dev.get("status") == "retired":
            _err().print(f"{_esc(label)} is already retired.")
            return
        if not yes:
            if not sys.stdin.isatty():
                fail("refusing to retire without confirmation; pass --yes", code=2)
            typer.confirm(
                f"Retire {label}? Its certificate is revoked and it can no longer check in",
                abort=True,
            )
        c.post(f"/api/v1/devices/{_seg(dev['id'])}/retire")
    _err().print(f"Retired {_esc(label)}.")


# --------------------------------------------------------------------------- groups


def group_create(
    name: Annotated[str, typer.Argument()],
    description: Annotated[str, typer.Option("--description", "-d")] = "",
) -> None:
    """Create a device group."""
    with _client() as c:
        g = c.post("/api/v1/groups", {"name": name, "description": description})
    _err().print(f"Created group [bold]{_esc(g.get('name'))}[/].")


def group_ls(json_out: JsonOpt = False) -> None:
    """List groups with their sizes."""
    with _client() as c:
        groups = c.get("/api/v1/groups")
    if json_out:
        print_json(groups)
        return
    if not groups:
        _err().print("No groups.")
        return
    t = _table("NAME", "DEVICES", "DESCRIPTION", wrap=("NAME", "DESCRIPTION"))
    for g in groups:
        t.add_row(_esc(g.get("name")), str(g.get("devices")), _esc(g.get("description")))
    _out().print(t)


def group_add(
    name: Annotated[str, typer.Argument(help="group name")],
    devices: Annotated[list[str], typer.Argument(metavar="DEVICE...", help="device ids or names")],
) -> None:
    """Add devices to a group."""
    with _client() as c:
        g = c.post(f"/api/v1/groups/{_seg(name)}/devices", {"devices": devices})
    _err().print(f"Group [bold]{_esc(g.get('name'))}[/] now has {g.get('devices')} device(s).")


# --------------------------------------------------------------------------- commands


def _wait(client: AdminClient, command_id: str, limit_s: float) -> tuple[dict[str, Any], bool]:
    """Poll a command until every run is final or the limit passes: (detail, finished)."""
    import time

    deadline = time.monotonic() + limit_s
    err = _err()
    with err.status(f"waiting for {command_id}…") as status:
        while True:
            # poll without outputs; fetch them once at the end
            path = f"/api/v1/commands/{_seg(command_id)}"
            detail: dict[str, Any] = client.get(path, params={"output": "false"})
            runs = detail.get("runs") or []
            done = sum(1 for r in runs if r.get("state") in TERMINAL_STATES)
            status.update(f"{done}/{len(runs)} done  [dim]({format_counts(detail['counts'])})[/]")
            if done == len(runs):
                return client.get(path), True
            if time.monotonic() >= deadline:
                return client.get(path), False
            time.sleep(POLL_INTERVAL_S)


def _write_raw(stream: Any, text: str) -> None:
    if text:
        stream.write(text if text.endswith("\n") else text + "\n")
        stream.flush()


def _run_status(run: dict[str, Any]) -> str:
    parts = [str(run.get("state"))]
    if run.get("exit_code") is not None:
        parts.append(f"exit {run['exit_code']}")
    if run.get("error"):
        parts.append(str(run["error"]))
    if run.get("truncated"):
        parts.append("output truncated")
    return ", ".join(parts)


def _report_runs(kind: str, runs: list[dict[str, Any]]) -> None:
    """Each run's result; a single run's output goes raw to stdout/stderr."""
    err = _err()
    if len(runs) == 1:
        run = runs[0]
        _write_raw(sys.stdout, run.get("stdout") or "")
        _write_raw(sys.stderr, run.get("stderr") or "")
        if run.get("result") and kind not in ("exec", "script"):
            print_json(run["result"])
        if (
            kind not in ("exec", "script")
            or run.get("state") != "succeeded"
            or run.get("truncated")
        ):
            colour = "green" if run.get("state") == "succeeded" else "red"
            err.print(f"[{colour}]{_esc(run.get('device_name'))}: {_esc(_run_status(run))}[/]")
        return
    out = _out()
    for run in runs:
        colour = (
            "green"
            if run.get("state") == "succeeded"
            else ("red" if run.get("state") in TERMINAL_STATES else "yellow")
        )
        out.print(_heading(run.get("device_name"), _run_status(run), colour))
        sys.stdout.flush()
        _write_raw(sys.stdout, run.get("stdout") or "")
        if run.get("stderr"):
            out.print("[dim]--- stderr ---[/]")
            sys.stdout.flush()
            _write_raw(sys.stdout, run["stderr"])
        if run.get("result") and kind not in ("exec", "script"):
            print_json(run["result"])


def _collect_downloads(
    client: AdminClient, runs: list[dict[str, Any]], source: str, output: Path | None
) -> bool:
    """Download every collected file after a --collect --wait; False if one was not saved."""
    from custos.cli.client import safe_filename

    base = safe_filename(source, "collected")
    ok = [r for r in runs if r.get("state") == "succeeded"]
    err = _err()
    if len(runs) == 1:
        targets = [(r, output or Path(base), output is not None) for r in ok]
    else:
        folder = output or Path()
        folder.mkdir(parents=True, exist_ok=True)
        targets = [
            (r, folder / f"{safe_filename(r.get('device_name'), r['device_id'])}-{base}", False)
            for r in ok
        ]
    saved = True
    for run, dest, overwrite in targets:
        if dest.exists() and not dest.is_dir() and not overwrite:
            err.print(
                f"[red]{_esc(run.get('device_name'))}: not saved: {_esc(dest)} already exists[/]; "
                f"fetch it with `custos cmd fetch {run['id']} -o PATH`"
            )
            saved = False
            continue
        path, size = client.download(
            f"/api/v1/runs/{_seg(run['id'])}/file", dest, overwrite=overwrite
        )
        err.print(f"{_esc(run.get('device_name'))}: saved {format_bytes(size)} to {_esc(path)}")
    return saved and len(ok) == len(runs)


def cmd_run(
    target: Annotated[
        str,
        typer.Argument(
            metavar="TARGET", help="device id or name, comma-separated list, or group:NAME"
        ),
    ],
    argv: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="ARGV", help="after --: the command line (or the script's arguments)"
        ),
    ] = None,
    wait: Annotated[bool, typer.Option("--wait", "-w", help="wait for the results")] = False,
    timeout: Annotated[
        float, typer.Option("--timeout", help="seconds the command may run on the device")
    ] = 300.0,
    wait_timeout: Annotated[
        float | None,
        typer.Option("--wait-timeout", help="seconds to wait for results (default timeout+60)"),
    ] = None,
    not_before: Annotated[
        str | None, typer.Option("--not-before", help="do not start before: ISO time or +10m")
    ] = None,
    expires: Annotated[
        str | None, typer.Option("--expires", help="give up after: ISO time or +1h")
    ] = None,
    script: Annotated[
        str | None, typer.Option("--script", help="run this script file ('-' for stdin)")
    ] = None,
    interpreter: Annotated[
        str | None,
        typer.Option("--interpreter", help="sh, python or powershell (default: from extension)"),
    ] = None,
    reboot: Annotated[bool, typer.Option("--reboot", help="reboot the device")] = False,
    ping: Annotated[bool, typer.Option("--ping", help="check the agent answers")] = False,
    set_interval: Annotated[
        int | None,
        typer.Option("--set-interval", metavar="SECONDS", help="change the check-in interval"),
    ] = None,
    collect: Annotated[
        str | None, typer.Option("--collect", metavar="PATH", help="fetch this file")
    ] = None,
    max_bytes: Annotated[
        int | None, typer.Option("--max-bytes", help="size limit for --collect")
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="where --collect --wait saves (a dir for several)"),
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Queue a command on devices (exec by default) and optionally wait for the results."""
    argv = argv or []
    script_arg: tuple[str, str] | None = None
    if interpreter is not None and interpreter not in INTERPRETERS:
        fail(f"--interpreter is one of {', '.join(INTERPRETERS)}", code=2)
    if interpreter is not None and script is None:
        fail("--interpreter only applies to --script", code=2)
    if output is not None and collect is None:
        fail("--output only applies to --collect", code=2)
    if script is not None:
        try:
            raw = sys.stdin.buffer.read() if script == "-" else Path(script).read_bytes()
        except OSError as exc:
            fail(f"cannot read the script: {exc}", code=2)
        if len(raw) > MAX_SCRIPT_BYTES:
            fail(f"the script is larger than {MAX_SCRIPT_BYTES} bytes", code=2)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            fail("the script is not UTF-8 text", code=2)
        script_arg = (interpreter or guess_interpreter(script), text)
    if collect is not None and wait and output is None and _single_target(target):
        from custos.cli.client import safe_filename

        dest = Path(safe_filename(collect, "collected"))
        if dest.exists():
            fail(f"{dest} already exists; choose where to save with -o", code=2)
    nb = _when_option(not_before, "--not-before")
    exp = _when_option(expires, "--expires")
    try:
        body = build_command_body(
            target,
            argv,
            timeout=timeout,
            script=script_arg,
            reboot=reboot,
            ping=ping,
            set_interval=set_interval,
            collect=collect,
            max_bytes=max_bytes,
            not_before=nb,
            expires_at=exp,
        )
    except ValueError as exc:
        fail(str(exc), code=2)
    with _client() as c:
        created = c.post("/api/v1/commands", body)
        cid = str(created["id"])
        if not wait:
            if json_out:
                print_json(created)
            else:
                sys.stdout.write(cid + "\n")
                n = len(created.get("runs") or [])
                _err().print(f"[dim]queued for {n} device(s); see `custos cmd show {cid}`[/]")
            return
        _err().print(f"[dim]command {cid}[/]")
        limit = wait_timeout if wait_timeout is not None else timeout + 60
        if nb is not None:
            limit += max(0.0, (nb - datetime.now(UTC)).total_seconds())
        try:
            detail, finished = _wait(c, cid, limit)
        except KeyboardInterrupt:
            _err().print(f"\nStopped waiting; the command continues: `custos cmd show {cid}`")
            raise typer.Exit(130) from None
        runs = detail.get("runs") or []
        if json_out:
            print_json(detail)
        else:
            _report_runs(body["kind"], runs)
        saved = True
        if collect is not None:
            saved = _collect_downloads(c, runs, collect, output)
    if not finished:
        pending = [r.get("device_name") for r in runs if r.get("state") not in TERMINAL_STATES]
        _err().print(
            f"[yellow]gave up waiting after {limit:g} s; still pending on "
            f"{_esc(', '.join(str(p) for p in pending))}[/]; see `custos cmd show {cid}`"
        )
    elif len(runs) > 1 and not json_out:
        _err().print(format_counts(detail.get("counts") or {}))
    code = exit_code_for(body["kind"], runs, finished)
    raise typer.Exit(code if saved or code else 1)


def cmd_ls(
    limit: Annotated[int, typer.Option("--limit", min=1, max=1000)] = 50,
    json_out: JsonOpt = False,
) -> None:
    """List commands, newest first."""
    with _client() as c:
        cmds = c.get("/api/v1/commands", {"limit": limit})
    if json_out:
        print_json(cmds)
        return
    if not cmds:
        _err().print("No commands.")
        return
    t = _table(
        "ID", "KIND", "TARGET", "WHAT", "CREATED", "BY", "RUNS", wrap=("TARGET", "WHAT", "RUNS")
    )
    for cmd in cmds:
        summary = payload_summary(str(cmd.get("kind")), cmd.get("payload") or {})
        t.add_row(
            _esc(cmd.get("id")),
            _esc(cmd.get("kind")),
            _esc(cmd.get("target")),
            _esc(summary[:60] + ("…" if len(summary) > 60 else "")),
            relative_time(cmd.get("created_at")),
            _esc(cmd.get("created_by")),
            _esc(format_counts(cmd.get("counts") or {})),
        )
    _out().print(t)


def cmd_show(
    command_id: Annotated[str, typer.Argument(metavar="ID")],
    json_out: JsonOpt = False,
) -> None:
    """Show a command with every device's run and output."""
    with _client() as c:
        cmd = c.get(f"/api/v1/commands/{_seg(command_id)}")
    if json_out:
        print_json(cmd)
        return
    out = _out()
    kind = str(cmd.get("kind"))
    out.print(f"[bold]{_esc(kind)}[/] command [dim]{_esc(cmd.get('id'))}[/]")
    out.print(
        _kv_grid(
            [
                ("What", payload_summary(kind, cmd.get("payload") or {})),
                ("Target", cmd.get("target")),
                ("Created", f"{relative_time(cmd.get('created_at'))} by {cmd.get('created_by')}"),
                *([("Not before", cmd["not_before"])] if cmd.get("not_before") else []),
                *([("Expires", cmd["expires_at"])] if cmd.get("expires_at") else []),
                ("Runs", format_counts(cmd.get("counts") or {})),
            ]
        )
    )
    runs = cmd.get("runs") or []
    if runs:
        t = _table(
            "RUN", "DEVICE", "STATE", "EXIT", "SENT", "FINISHED", "ERROR", wrap=("DEVICE", "ERROR")
        )
        for r in runs:
            t.add_row(
                _esc(r.get("id")),
                _esc(r.get("device_name")),
                _esc(r.get("state")),
                "" if r.get("exit_code") is None else str(r["exit_code"]),
                str(r.get("deliveries")),
                relative_time(r.get("finished_at")) if r.get("finished_at") else "",
                _esc(r.get("error") or ""),
            )
        out.print()
        out.print(t)
    from rich.text import Text

    for r in runs:
        if not (r.get("stdout") or r.get("stderr") or r.get("result")):
            continue
        out.print()
        out.print(_heading(r.get("device_name"), _run_status(r)))
        if r.get("stdout"):
            out.print(Text(r["stdout"].rstrip("\n")))
        if r.get("stderr"):
            out.print("[dim]--- stderr ---[/]")
            out.print(Text(r["stderr"].rstrip("\n"), style="red"))
        if r.get("result"):
            out.print(Text(json.dumps(r["result"], indent=2, default=str)))
        if r.get("truncated"):
            out.print("[yellow](output truncated)[/]")


def cmd_fetch(
    run_id: Annotated[str, typer.Argument(metavar="RUN_ID")],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="file or directory to save to")
    ] = None,
) -> None:
    """Download the file a collect run brought back."""
    with _client() as c:
        path, size = c.download(
            f"/api/v1/runs/{_seg(run_id)}/file", output, overwrite=output is not None
        )
    _err().print(f"Saved {format_bytes(size)} to {_esc(path)}")


# --------------------------------------------------------------------------- wiring


def register(app: typer.Typer) -> None:
    """Add login and the token, device, group and cmd command groups."""
    app.command("login")(login_cmd)

    token = typer.Typer(help="Enrolment tokens.", no_args_is_help=True)
    token.command("create")(token_create)
    token.command("ls")(token_ls)
    token.command("revoke")(token_revoke)
    app.add_typer(token, name="token")

    device = typer.Typer(help="Enrolled devices.", no_args_is_help=True)
    device.command("ls")(device_ls)
    device.command("show")(device_show)
    device.command("retire")(device_retire)
    from custos.cli.policy_cmds import register_device_verbs

    register_device_verbs(device)
    app.add_typer(device, name="device")

    group = typer.Typer(help="Device groups.", no_args_is_help=True)
    group.command("create")(group_create)
    group.command("ls")(group_ls)
    group.command("add")(group_add)
    app.add_typer(group, name="group")

    cmd = typer.Typer(help="Remote commands.", no_args_is_help=True)
    cmd.command("run")(cmd_run)
    cmd.command("ls")(cmd_ls)
    cmd.command("show")(cmd_show)
    cmd.command("fetch")(cmd_fetch)
    app.add_typer(cmd, name="cmd")
