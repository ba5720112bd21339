"""`custos diag DEVICE`: a device's health (a `diagnose` run) and its diagnostics history."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from custos.cli.admin_cmds import (
    TERMINAL_STATES,
    JsonOpt,
    _client,
    _err,
    _esc,
    _kv_grid,
    _out,
    _seg,
    _table,
    _wait,
    format_bytes,
    print_json,
    relative_time,
)
from custos.cli.client import fail

HEALTH_ROWS = (
    ("Memory available", "mem_available", "mem_total"),
    ("Storage free", "storage_free", "storage_total"),
)


def _span(seconds: Any) -> str:
    if not isinstance(seconds, int | float):
        return ""
    s = int(seconds)
    days, rest = divmod(s, 86400)
    hours, minutes = rest // 3600, rest % 3600 // 60
    return f"{days}d {hours}h {minutes}m" if days else f"{hours}h {minutes}m"


def _of(part: Any, whole: Any) -> str:
    """`3.2 GiB of 16 GiB (20%)`, or what is known of it."""
    if part is None and whole is None:
        return ""
    if whole is None:
        return format_bytes(part)
    if part is None:
        return f"? of {format_bytes(whole)}"
    pct = f" ({100 * part / whole:.0f}%)" if whole else ""
    return f"{format_bytes(part)} of {format_bytes(whole)}{pct}"


def health_rows(rep: dict[str, Any]) -> list[tuple[str, Any]]:
    """The normalised health numbers of a report as label/value rows."""
    rows: list[tuple[str, Any]] = [
        (label, _of(rep.get(part), rep.get(whole))) for label, part, whole in HEALTH_ROWS
    ]
    battery = rep.get("battery_pct")
    rows.append(("Battery", f"{battery:g}%" if battery is not None else ""))
    rows.append(("Uptime", _span(rep.get("uptime_s"))))
    load = rep.get("load1")
    rows.append(("Load (1 min)", f"{load:g}" if load is not None else ""))
    return rows


def print_report(rep: dict[str, Any]) -> None:
    """A report as Rich tables: health, then disks and processes, or DiagMon nodes."""
    out = _out()
    data = rep.get("data") or {}
    run = f", run {rep['run_id']}" if rep.get("run_id") else ""
    out.print(
        f"[bold]Diagnostics report {rep.get('id')}[/] — {_esc(rep.get('source'))} "
        f"{_esc(rep.get('kind'))}, received {_esc(relative_time(rep.get('received_at')))}"
        f"{_esc(run)}"
    )
    out.print(_kv_grid(health_rows(rep)))
    if data.get("note"):
        out.print(f"[yellow]{_esc(data['note'])}[/]")
    disks = [d for d in data.get("disks") or () if isinstance(d, dict)]
    if disks:
        t = _table("Mount", "Type", "Used", "Free", "Total", "Use%")
        for d in disks:
            t.add_row(
                _esc(d.get("mount")),
                _esc(d.get("fstype")),
                format_bytes(d.get("used")),
                format_bytes(d.get("free")),
                format_bytes(d.get("total")),
                _esc(d.get("percent")),
            )
        out.print("\n[bold]Disks[/]")
        out.print(t)
    procs = [p for p in data.get("processes") or () if isinstance(p, dict)]
    if procs:
        t = _table("PID", "Name", "Resident")
        for p in procs:
            t.add_row(_esc(p.get("pid")), _esc(p.get("name")), format_bytes(p.get("rss")))
        out.print(f"\n[bold]Top processes by memory[/] (of {_esc(data.get('process_count'))})")
        out.print(t)
    nodes = data.get("nodes")
    if isinstance(nodes, dict) and nodes:
        t = _table("Node", "Value", wrap=("Value",))
        for uri, value in nodes.items():
            t.add_row(_esc(uri), _esc(value))
        out.print("\n[bold]DiagMon nodes[/]")
        out.print(t)
    if data.get("missing"):
        out.print(f"[dim]not on this device: {_esc(', '.join(map(str, data['missing'])))}[/]")
    if data.get("alert"):
        out.print(
            _kv_grid(
                [
                    ("Alert", data.get("alert")),
                    ("Node", data.get("source")),
                    ("Data", data.get("data")),
                ]
            )
        )


def _history(ref: str, limit: int, json_out: bool) -> None:
    with _client() as c:
        reports = c.get(f"/api/v1/devices/{_seg(ref)}/diagnostics", params={"limit": limit})
    if json_out:
        print_json(reports)
        return
    if not reports:
        _err().print(f"No diagnostics for {_esc(ref)} yet: `custos diag {_esc(ref)} --wait`")
        return
    t = _table("ID", "Received", "Source", "Kind", "Mem avail", "Storage free", "Battery", "Up")
    for r in reports:
        t.add_row(
            str(r["id"]),
            relative_time(r.get("received_at")),
            _esc(r.get("source")),
            _esc(r.get("kind")),
            _of(r.get("mem_available"), r.get("mem_total")),
            _of(r.get("storage_free"), r.get("storage_total")),
            f"{r['battery_pct']:g}%" if r.get("battery_pct") is not None else "",
            _span(r.get("uptime_s")),
        )
    _out().print(t)


def diag_cmd(
    device: Annotated[str, typer.Argument(help="device id or name")],
    wait: Annotated[
        bool, typer.Option("--wait", "-w", help="wait for the answer and print it")
    ] = False,
    wait_timeout: Annotated[
        float, typer.Option("--wait-timeout", help="seconds to wait for the answer")
    ] = 300.0,
    history: Annotated[
        bool, typer.Option("--history", help="list stored reports instead of asking anew")
    ] = False,
    report: Annotated[
        int | None, typer.Option("--report", min=1, help="print one stored report")
    ] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=500, help="for --history")] = 20,
    json_out: JsonOpt = False,
) -> None:
    """Ask a device for a health snapshot (memory, disks, load, top processes; DiagMon on
    OMA DM devices), or show the reports it sent before."""
    if device.startswith("group:") or "," in device:
        fail("diag takes one device; for a group use `custos cmd run group:NAME` …", code=2)
    if history and report is not None:
        fail("--history and --report exclude each other", code=2)
    if history:
        _history(device, limit, json_out)
        return
    base = f"/api/v1/devices/{_seg(device)}/diagnostics"
    if report is not None:
        with _client() as c:
            rep = c.get(f"{base}/{report}")
        _show(rep, json_out)
        return
    with _client() as c:
        created = c.post("/api/v1/commands", {"target": device, "kind": "diagnose"})
        cid = str(created["id"])
        if not wait:
            if json_out:
                print_json(created)
            else:
                _err().print(
                    f"diagnose queued (command {cid}); see `custos diag {_esc(device)} --history`"
                )
            return
        try:
            detail, finished = _wait(c, cid, wait_timeout)
        except KeyboardInterrupt:
            _err().print(f"\nStopped waiting; the command continues: `custos cmd show {cid}`")
            raise typer.Exit(130) from None
        run = (detail.get("runs") or [{}])[0]
        if not finished or run.get("state") not in TERMINAL_STATES:
            _err().print(f"[yellow]no answer after {wait_timeout:g} s[/]; `custos cmd show {cid}`")
            raise typer.Exit(1)
        if run.get("state") != "succeeded" and not (run.get("result") or {}).get("ops"):
            _err().print(
                f"[red]{_esc(run.get('device_name'))}: {_esc(run.get('state'))}"
                f"{': ' + _esc(run['error']) if run.get('error') else ''}[/]"
            )
            raise typer.Exit(1)
        listed = c.get(base, params={"limit": 50})
        mine = next((r for r in listed if r.get("run_id") == run.get("id")), None)
        if mine is None:
            fail("the run finished but left no diagnostics report", code=1)
        rep = c.get(f"{base}/{mine['id']}")
    _show(rep, json_out)


def _show(rep: dict[str, Any], json_out: bool) -> None:
    if json_out:
        print_json(rep)
    else:
        print_report(rep)


def register(app: typer.Typer) -> None:
    """Add `custos diag`."""
    app.command("diag")(diag_cmd)
