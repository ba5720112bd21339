"""`custos audit …`: list and export the audit log (over the API), verify it (offline)."""

from __future__ import annotations

import asyncio
import os
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode

import typer

from custos.cli.admin_cmds import (
    JsonOpt,
    _client,
    _err,
    _esc,
    _out,
    _table,
    parse_duration,
    parse_when,
    print_json,
)
from custos.cli.client import fail

PAGE = 500
MAX_LS = 10_000

ActorOpt = Annotated[str | None, typer.Option("--actor", help="exact username")]
ActionOpt = Annotated[
    str | None, typer.Option("--action", help="action or prefix: 'device' matches device.retire")
]
TargetOpt = Annotated[str | None, typer.Option("--target", help="exact target, e.g. device:ID")]
ResultOpt = Annotated[str | None, typer.Option("--result", help="ok, denied, failed or error")]
SinceOpt = Annotated[
    str | None, typer.Option("--since", help="24h / 7d (ago) or an ISO time, e.g. 2030-01-31")
]
UntilOpt = Annotated[str | None, typer.Option("--until", help="like --since; entries before it")]


def parse_since(value: str, now: datetime | None = None) -> datetime:
    """A past time from '24h'/'7d' (that long ago) or an ISO time; ValueError otherwise."""
    now = now or datetime.now(UTC)
    v = value.strip()
    try:
        return now - timedelta(seconds=parse_duration(v))
    except ValueError:
        pass
    if v.startswith("+"):
        raise ValueError(f"{value!r}: give a duration ago (e.g. 7d) or an ISO time")
    return parse_when(v, now)


def filter_params(
    actor: str | None,
    action: str | None,
    target: str | None,
    result: str | None,
    since: str | None,
    until: str | None,
) -> dict[str, str]:
    """Query parameters of the audit endpoints; exits 2 on a bad option."""
    if result is not None and result not in ("ok", "denied", "failed", "error"):
        fail("--result is one of ok, denied, failed, error", code=2)
    params: dict[str, str] = {}
    for key, value in (("actor", actor), ("action", action), ("target", target)):
        if value is not None:
            params[key] = value
    if result is not None:
        params["result"] = result
    for key, raw in (("since", since), ("until", until)):
        if raw is None:
            continue
        try:
            params[key] = parse_since(raw).isoformat()
        except ValueError as exc:
            fail(f"--{key}: {exc}", code=2)
    return params


def audit_ls(
    actor: ActorOpt = None,
    action: ActionOpt = None,
    target: TargetOpt = None,
    result: ResultOpt = None,
    since: SinceOpt = None,
    until: UntilOpt = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=MAX_LS)] = 50,
    json_out: JsonOpt = False,
) -> None:
    """List audit entries, newest first."""
    params: dict[str, Any] = filter_params(actor, action, target, result, since, until)
    entries: list[dict[str, Any]] = []
    with _client() as c:
        while len(entries) < limit:
            page = c.get("/api/v1/audit", {**params, "limit": min(PAGE, limit - len(entries))})
            entries.extend(page.get("entries") or [])
            if page.get("next_before_id") is None:
                break
            params["before_id"] = page["next_before_id"]
    if json_out:
        print_json(entries)
        return
    if not entries:
        _err().print("No audit entries.")
        return
    colour = {"ok": "green", "denied": "red", "failed": "yellow", "error": "red"}
    t = _table("ID", "AT", "ACTOR", "ACTION", "TARGET", "RESULT", "REMOTE", wrap=("TARGET",))
    for e in entries:
        res = str(e.get("result"))
        status = e.get("status")
        shown = f"{res} {status}" if status is not None else res
        t.add_row(
            str(e.get("id")),
            _esc(str(e.get("at", ""))[:19].replace("T", " ")),
            _esc(e.get("actor") or "-"),
            _esc(e.get("action")),
            _esc(e.get("target") or ""),
            f"[{colour.get(res, 'white')}]{_esc(shown)}[/]",
            _esc(e.get("remote")),
        )
    _out().print(t)


def audit_export(
    out: Annotated[Path, typer.Option("--out", "-o", help="CSV file to write ('-': stdout)")],
    actor: ActorOpt = None,
    action: ActionOpt = None,
    target: TargetOpt = None,
    result: ResultOpt = None,
    since: SinceOpt = None,
    until: UntilOpt = None,
    force: Annotated[bool, typer.Option("--force", help="overwrite an existing file")] = False,
) -> None:
    """Export matching entries as CSV (chain order, with hashes)."""
    params = filter_params(actor, action, target, result, since, until)
    path = "/api/v1/audit.csv" + (f"?{urlencode(params)}" if params else "")
    to_stdout = str(out) == "-"
    if not to_stdout and out.exists() and not force:
        fail(f"{out} already exists (--force to overwrite)", code=2)
    size = 0
    with _client() as c, c.stream(path) as resp:
        if to_stdout:
            for chunk in resp.iter_bytes(1 << 16):
                sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
            return
        # bytes as sent: a value with a line break inside stays exactly as it was hashed
        tmp = out.with_name(f".{out.name}.part")
        try:
            with tmp.open("wb") as fh:
                for chunk in resp.iter_bytes(1 << 16):
                    fh.write(chunk)
                    size += len(chunk)
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
    _err().print(f"[dim]wrote {size} bytes to {_esc(out)}[/]")


def parse_anchor(value: str) -> tuple[int, str]:
    """'ID:HASH' as printed by an earlier verify; ValueError otherwise."""
    ident, sep, digest = value.strip().partition(":")
    digest = digest.lower()
    if not sep or not ident.isdigit() or len(digest) != 64:
        raise ValueError("an anchor is ID:HASH, e.g. 1234:9f86d08…, as `audit verify` prints it")
    try:
        bytes.fromhex(digest)
    except ValueError:
        raise ValueError("the anchor's hash is not hexadecimal") from None
    return int(ident), digest


def audit_verify(
    data_dir: Annotated[
        Path | None, typer.Option("--data-dir", help="server state directory (SQLite)")
    ] = None,
    db: Annotated[str | None, typer.Option("--db", help="postgresql+asyncpg://… URL")] = None,
    anchor: Annotated[
        str | None, typer.Option("--anchor", help="ID:HASH from an earlier run; must still hold")
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Recompute the hash chain straight from the database (no server involved).

    Exit 0: intact; 1: broken (the first bad id is printed); 2: the database cannot be read.
    """
    from custos.cli.server_cmd import build_settings

    try:
        anchor_at = parse_anchor(anchor) if anchor is not None else None
    except ValueError as exc:
        fail(f"--anchor: {exc}", code=2)
    settings = build_settings(data_dir=data_dir, db=db)
    url = settings.database_url
    if settings.is_sqlite:
        # opening a missing SQLite file would create an empty one
        file = Path(url.split(":///", 1)[1])
        if not file.is_file():
            fail(f"no database at {file}", code=2, hint="give --data-dir or --db")
    try:
        report = asyncio.run(_verify(url, anchor_at, show_progress=not json_out))
    except Exception as exc:
        fail(f"cannot read the audit log: {type(exc).__name__}: {exc}", code=2)
    if json_out:
        print_json(report.model_dump())
    elif report.ok:
        _err().print(f"[green]audit chain intact[/]: {report.checked} entries")
        if report.head_id is not None:
            _out().print(f"head {report.head_id}:{report.head_hash}")
    else:
        _err().print(
            f"[bold red]audit chain broken[/] at entry [bold]{report.first_bad_id}[/]: "
            f"{_esc(report.reason)} ({report.checked} entries before it are intact)"
        )
    if not report.ok:
        raise typer.Exit(1)


async def _verify(url: str, anchor: tuple[int, str] | None, *, show_progress: bool) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from custos.audit.service import AuditService
    from custos.db.engine import Database

    database = Database(url, pool_size=1)
    try:
        svc = AuditService(database)
        if not show_progress:
            return await svc.verify(anchor=anchor)
        with Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=_err(),
            transient=True,
        ) as bar:
            task = bar.add_task("verifying", total=None)

            def progress(checked: int, total: int) -> None:
                bar.update(task, completed=checked, total=total)

            return await svc.verify(progress, anchor=anchor)
    finally:
        await database.dispose()


def register(app: typer.Typer) -> None:
    """Add the audit command group."""
    audit = typer.Typer(help="The audit log of admin actions.", no_args_is_help=True)
    audit.command("ls")(audit_ls)
    audit.command("export")(audit_export)
    audit.command("verify")(audit_verify)
    app.add_typer(audit, name="audit")
