"""`custos task …`: scheduled tasks that agents run on their own, online or not."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from custos.cli.admin_cmds import (
    INTERPRETERS,
    MAX_SCRIPT_BYTES,
    JsonOpt,
    _client,
    _err,
    _esc,
    _kv_grid,
    _out,
    _seg,
    _table,
    guess_interpreter,
    parse_duration,
    payload_summary,
    print_json,
    relative_time,
)
from custos.cli.client import fail


def build_task_body(
    name: str,
    target: str,
    argv: list[str],
    *,
    cron: str | None,
    every: str | None,
    tz: str,
    window: str | None,
    grace: str | None,
    timeout: float,
    script: tuple[str, str] | None,
    disabled: bool,
) -> dict[str, Any]:
    """The POST /api/v1/tasks body; ValueError for a contradictory or incomplete request."""
    if (cron is None) == (every is None):
        raise ValueError("give exactly one of --cron and --every")
    if script is None and not argv:
        raise ValueError("nothing to run: give a command after --, or --script FILE")
    if timeout <= 0:
        raise ValueError("--timeout must be positive")
    body: dict[str, Any] = {"name": name, "target": target, "timeout_s": timeout, "timezone": tz}
    if script is not None:
        body.update(kind="script", interpreter=script[0], script=script[1], args=list(argv))
    else:
        body.update(kind="exec", argv=list(argv))
    if cron is not None:
        body["cron"] = cron
    else:
        assert every is not None
        body["every_s"] = parse_duration(every)
    if window is not None:
        body["window"] = window  # the server parses and checks it
    if grace is not None:
        body["misfire_grace_s"] = 0 if grace.strip() == "0" else parse_duration(grace)
    if disabled:
        body["enabled"] = False
    return body


def _read_script(path: str, interpreter: str | None) -> tuple[str, str]:
    try:
        raw = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    except OSError as exc:
        fail(f"cannot read the script: {exc}", code=2)
    if len(raw) > MAX_SCRIPT_BYTES:
        fail(f"the script is larger than {MAX_SCRIPT_BYTES} bytes", code=2)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        fail("the script is not UTF-8 text", code=2)
    return interpreter or guess_interpreter(path), text


def task_create(
    name: Annotated[str, typer.Argument(metavar="NAME", help="a unique task name")],
    argv: Annotated[
        list[str] | None,
        typer.Argument(metavar="ARGV", help="after --: the command line (or script arguments)"),
    ] = None,
    target: Annotated[
        str,
        typer.Option("--target", "-t", help="device id or name, comma-separated list, group:NAME"),
    ] = "",
    cron: Annotated[
        str | None, typer.Option("--cron", help="5-field cron expression, e.g. '0 3 * * *'")
    ] = None,
    every: Annotated[
        str | None, typer.Option("--every", help="fixed interval instead: 90, 30m, 12h, 1d")
    ] = None,
    tz: Annotated[str, typer.Option("--tz", help="IANA time zone of the cron")] = "UTC",
    window: Annotated[
        str | None,
        typer.Option("--window", help="maintenance window: 'mon-fri 01:00-05:00 Europe/Paris'"),
    ] = None,
    grace: Annotated[
        str | None,
        typer.Option("--grace", help="run a missed occurrence this late at most (0: never)"),
    ] = None,
    timeout: Annotated[float, typer.Option("--timeout", help="seconds one run may take")] = 3600,
    script: Annotated[
        str | None, typer.Option("--script", help="run this script file ('-' for stdin)")
    ] = None,
    interpreter: Annotated[
        str | None,
        typer.Option("--interpreter", help="sh, python or powershell (default: from extension)"),
    ] = None,
    disabled: Annotated[bool, typer.Option("--disabled", help="create it switched off")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Create a scheduled task; agents run it from their local queue, even offline."""
    if not target:
        fail("--target is required", code=2)
    if interpreter is not None and interpreter not in INTERPRETERS:
        fail(f"--interpreter is one of {', '.join(INTERPRETERS)}", code=2)
    if interpreter is not None and script is None:
        fail("--interpreter only applies to --script", code=2)
    script_arg = _read_script(script, interpreter) if script is not None else None
    try:
        body = build_task_body(
            name,
            target,
            argv or [],
            cron=cron,
            every=every,
            tz=tz,
            window=window,
            grace=grace,
            timeout=timeout,
            script=script_arg,
            disabled=disabled,
        )
    except ValueError as exc:
        fail(str(exc), code=2)
    with _client() as c:
        created = c.post("/api/v1/tasks", body)
    if json_out:
        print_json(created)
        return
    sys.stdout.write(str(created["id"]) + "\n")
    nxt = created.get("next_runs") or []
    when = f"; next run {nxt[0]}" if nxt else ""
    _err().print(f"[dim]handed to {created.get('devices')} device(s){_esc(when)}[/]")


def task_ls(
    limit: Annotated[int, typer.Option("--limit", min=1, max=1000)] = 100,
    json_out: JsonOpt = False,
) -> None:
    """List scheduled tasks."""
    with _client() as c:
        tasks = c.get("/api/v1/tasks", {"limit": limit})
    if json_out:
        print_json(tasks)
        return
    if not tasks:
        _err().print("No tasks.")
        return
    t = _table("NAME", "SCHEDULE", "TARGET", "WHAT", "ON", "REV", "DEVICES", wrap=("SCHEDULE",))
    for task in tasks:
        what = payload_summary(str(task.get("kind")), task.get("action") or {})
        t.add_row(
            _esc(task.get("name")),
            _esc(task.get("describe")),
            _esc(task.get("target")),
            _esc(what[:50] + ("…" if len(what) > 50 else "")),
            "yes" if task.get("enabled") else "[yellow]no[/]",
            str(task.get("revision")),
            str(task.get("devices")),
        )
    _out().print(t)


def task_show(
    ref: Annotated[str, typer.Argument(metavar="NAME_OR_ID")],
    json_out: JsonOpt = False,
) -> None:
    """Show a task, its next runs and each device's last report."""
    with _client() as c:
        task = c.get(f"/api/v1/tasks/{_seg(ref)}")
    if json_out:
        print_json(task)
        return
    out = _out()
    out.print(f"[bold]{_esc(task.get('name'))}[/] task [dim]{_esc(task.get('id'))}[/]")
    nxt = task.get("next_runs") or []
    out.print(
        _kv_grid(
            [
                ("What", payload_summary(str(task.get("kind")), task.get("action") or {})),
                ("Schedule", task.get("describe")),
                ("Misfire grace", f"{task.get('misfire_grace_s')} s"),
                ("Timeout", f"{task.get('timeout_s')} s"),
                ("Target", task.get("target")),
                ("Enabled", "yes" if task.get("enabled") else "no"),
                ("Revision", task.get("revision")),
                ("Next runs", ", ".join(str(x) for x in nxt[:3]) or "-"),
                ("Created", f"{relative_time(task.get('created_at'))} by {task.get('created_by')}"),
            ]
        )
    )
    targets = task.get("targets") or []
    if targets:
        t = _table("DEVICE", "RUNS", "LAST", "STATE", "SCHEDULED", "RECEIVED", "SKEW", "GAPS")
        for d in targets:
            skew = d.get("last_clock_offset_s")
            if skew is None:
                skew = d.get("clock_skew_s")
            t.add_row(
                _esc(d.get("device_name")),
                str(d.get("runs")),
                "" if d.get("last_seq") is None else f"#{d['last_seq']}",
                _esc(d.get("last_state") or "-"),
                _esc(d.get("last_scheduled_at") or ""),
                relative_time(d.get("last_received_at")) if d.get("last_received_at") else "",
                "" if skew is None else f"{skew:+.1f}s",
                str(d.get("missing_seqs") or ""),
            )
        out.print()
        out.print(t)


def task_runs(
    ref: Annotated[str, typer.Argument(metavar="NAME_OR_ID")],
    device: Annotated[str | None, typer.Option("--device", "-d", help="only this device")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=1000)] = 50,
    output: Annotated[bool, typer.Option("--output", help="print each run's output")] = False,
    json_out: JsonOpt = False,
) -> None:
    """A task's reported runs, newest first, with agent and server-corrected times."""
    params: dict[str, Any] = {"limit": limit}
    if device is not None:
        params["device"] = device
    with _client() as c:
        runs = c.get(f"/api/v1/tasks/{_seg(ref)}/runs", params)
    if json_out:
        print_json(runs)
        return
    if not runs:
        _err().print("No runs reported yet.")
        return
    t = _table(
        "SEQ", "DEVICE", "STATE", "EXIT", "SCHEDULED", "STARTED (SERVER)", "OFFSET", "DELAY",
        "RECEIVED", "NOTE", wrap=("NOTE",),
    )  # fmt: skip
    for r in runs:
        note = r.get("error") or ""
        if r.get("missed_count", 0) > 1:
            note = f"{r['missed_count']} missed; {note}"
        offset = r.get("clock_offset_s")
        t.add_row(
            str(r.get("seq")),
            _esc(r.get("device_name")),
            _esc(r.get("state")),
            "" if r.get("exit_code") is None else str(r["exit_code"]),
            _esc(r.get("scheduled_at") or ""),
            _esc(r.get("started_at") or ""),
            "" if offset is None else f"{offset:+.1f}s",
            "" if r.get("delay_s") is None else f"{r['delay_s']:.1f}s",
            relative_time(r.get("received_at")),
            _esc(note),
        )
    out = _out()
    out.print(t)
    if output:
        from rich.text import Text

        for r in runs:
            if r.get("stdout") or r.get("stderr"):
                out.print(f"\n[bold]== #{r.get('seq')} {_esc(r.get('device_name'))}[/]")
                if r.get("stdout"):
                    out.print(Text(str(r["stdout"]).rstrip("\n")))
                if r.get("stderr"):
                    out.print(Text(str(r["stderr"]).rstrip("\n"), style="red"))


def _toggle(ref: str, enabled: bool) -> None:
    with _client() as c:
        task = c.post(f"/api/v1/tasks/{_seg(ref)}/{'enable' if enabled else 'disable'}")
    _err().print(
        f"{_esc(task.get('name'))}: {'enabled' if enabled else 'disabled'} "
        f"(revision {task.get('revision')})"
    )


def task_enable(ref: Annotated[str, typer.Argument(metavar="NAME_OR_ID")]) -> None:
    """Switch a task on."""
    _toggle(ref, True)


def task_disable(ref: Annotated[str, typer.Argument(metavar="NAME_OR_ID")]) -> None:
    """Switch a task off (agents keep it but do not run it)."""
    _toggle(ref, False)


def task_rm(ref: Annotated[str, typer.Argument(metavar="NAME_OR_ID")]) -> None:
    """Delete a task and its recorded runs; agents forget it."""
    with _client() as c:
        c.request("DELETE", f"/api/v1/tasks/{_seg(ref)}")
    _err().print(f"Deleted {_esc(ref)}.")


def register(app: typer.Typer) -> None:
    """Add the task command group."""
    task = typer.Typer(help="Scheduled tasks (run by agents, also offline).", no_args_is_help=True)
    task.command("create")(task_create)
    task.command("ls")(task_ls)
    task.command("show")(task_show)
    task.command("runs")(task_runs)
    task.command("enable")(task_enable)
    task.command("disable")(task_disable)
    task.command("rm")(task_rm)
    app.add_typer(task, name="task")
