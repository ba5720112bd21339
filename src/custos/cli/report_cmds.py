"""Admin commands for reports: a table on the terminal, JSON, or the server's CSV export."""

from __future__ import annotations

import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode

import typer

from custos.cli.admin_cmds import JsonOpt, _client, _err, _esc, _out, _table, print_json
from custos.cli.client import fail

CsvOpt = Annotated[
    Path | None,
    typer.Option("--csv", help="write the server's CSV export to this file ('-': stdout)"),
]
LimitOpt = Annotated[int, typer.Option("--limit", min=1, max=1000, help="rows per page")]
OffsetOpt = Annotated[int, typer.Option("--offset", min=0, help="rows to skip")]
SourceOpt = Annotated[str | None, typer.Option("--source", help="dpkg, rpm, pip, winreg or macapp")]


def _run(path: str, params: dict[str, Any], csv: Path | None, json_out: bool, title: str) -> None:
    """Fetch one report and show it: CSV file, JSON, or a table of its rows."""
    clean = {k: v for k, v in params.items() if v is not None}
    with _client() as c:
        if csv is not None:
            url = f"/api/v1/reports/{path}.csv"
            if clean:
                url += "?" + urlencode(clean)
            if str(csv) == "-":
                with c.stream(url) as resp:
                    for chunk in resp.iter_bytes(1 << 16):
                        sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
                return
            dest, size = c.download(url, csv, overwrite=True)
            _err().print(f"Wrote {size:,} bytes to [bold]{_esc(dest)}[/].")
            return
        data = c.get(f"/api/v1/reports/{path}", clean)
    if json_out:
        print_json(data)
        return
    rows = data["items"] if isinstance(data, dict) else data
    _print_rows(rows, title)
    if isinstance(data, dict):
        if "total" in data:
            shown = f"{data['offset'] + 1}-{data['offset'] + len(rows)}" if rows else "none"
            about = "about " if data.get("total_is_estimate") else ""
            _err().print(f"[dim]{shown} of {about}{data['total']:,}[/]")
        elif "as_of" in data:
            how = "counted now" if data.get("live") else f"summary of {data.get('as_of')}"
            _err().print(f"[dim]{how}[/]")


def _print_rows(rows: list[dict[str, Any]], title: str) -> None:
    if not rows:
        _err().print(f"{title}: nothing to report.")
        return
    columns = [k for k in rows[0] if not k.endswith("_id") and k != "id"] or list(rows[0])
    t = _table(*(c.upper().replace("_", " ") for c in columns))
    for r in rows:
        t.add_row(*(_cell(r.get(c)) for c in columns))
    _out().print(t)


def _cell(value: Any) -> str:
    if value is None:
        return "[dim]-[/]"
    if isinstance(value, float):
        return f"{value:.1f}"
    return _esc(value)


def who_has(
    name: Annotated[str, typer.Argument(help="software name as inventoried, e.g. openssl")],
    source: SourceOpt = None,
    version: Annotated[str | None, typer.Option("--version", help="exact version")] = None,
    prefix: Annotated[str | None, typer.Option("--prefix", help="version prefix, e.g. 3.")] = None,
    limit: LimitOpt = 50,
    offset: OffsetOpt = 0,
    csv: CsvOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Devices that have NAME (optionally a version or version prefix)."""
    params = {"name": name, "source": source, "version": version, "version_prefix": prefix}
    _run("software/who-has", {**params, "limit": limit, "offset": offset}, csv, json_out, name)


def versions(
    name: Annotated[str, typer.Argument()],
    source: SourceOpt = None,
    csv: CsvOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """How many devices run each version of NAME."""
    _run("software/versions", {"name": name, "source": source}, csv, json_out, name)


def lacks(
    name: Annotated[str, typer.Argument()],
    source: SourceOpt = None,
    min_version: Annotated[
        str | None, typer.Option("--min-version", help="also list devices below this version")
    ] = None,
    limit: LimitOpt = 50,
    offset: OffsetOpt = 0,
    csv: CsvOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Active devices without NAME (or with a version below --min-version)."""
    params = {"name": name, "source": source, "min_version": min_version}
    _run("software/lacks", {**params, "limit": limit, "offset": offset}, csv, json_out, name)


def top(
    limit: Annotated[int, typer.Option("--limit", min=1, max=1000)] = 20,
    live: Annotated[bool, typer.Option("--live", help="count now, not from the summary")] = False,
    csv: CsvOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """The most installed software by number of devices."""
    _run("software/top", {"limit": limit, "live": live or None}, csv, json_out, "top software")


def not_seen(
    days: Annotated[float, typer.Option("--days", min=0, help="not seen for this long")] = 30,
    limit: LimitOpt = 50,
    offset: OffsetOpt = 0,
    csv: CsvOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Devices not seen for DAYS days (or never)."""
    params = {"days": days, "limit": limit, "offset": offset}
    _run("not-seen", params, csv, json_out, f"not seen for {days:g} days")


def hardware(csv: CsvOpt = None, json_out: JsonOpt = False) -> None:
    """Active devices by manufacturer and model, with their age."""
    _run("hardware", {}, csv, json_out, "hardware")


def errors(
    kind: Annotated[str, typer.Option("--kind", help="commands or installs")] = "commands",
    days: Annotated[float, typer.Option("--days", min=0, max=3650, help="how far back")] = 7,
    limit: LimitOpt = 50,
    offset: OffsetOpt = 0,
    csv: CsvOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Failed command runs or failed installs."""
    if kind not in ("commands", "installs"):
        fail("--kind is commands or installs", code=2)
    since = (datetime.now(UTC) - timedelta(days=days)).isoformat()
    params = {"kind": kind, "since": since, "limit": limit, "offset": offset}
    _run("errors", params, csv, json_out, f"{kind} errors")


def register(app: typer.Typer) -> None:
    """Add the report command group."""
    report = typer.Typer(help="Reports over the fleet (table, --json or --csv FILE).")
    report.command("who-has")(who_has)
    report.command("versions")(versions)
    report.command("lacks")(lacks)
    report.command("top")(top)
    report.command("not-seen")(not_seen)
    report.command("hardware")(hardware)
    report.command("errors")(errors)
    app.add_typer(report, name="report", no_args_is_help=True)
