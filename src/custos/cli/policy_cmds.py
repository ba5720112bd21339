"""`custos policy …` and the device verbs for compliance, loss, lock and wipe."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from custos.cli.admin_cmds import (
    JsonOpt,
    _client,
    _err,
    _esc,
    _kv_grid,
    _out,
    _seg,
    _table,
    print_json,
    relative_time,
)
from custos.cli.client import fail

MAX_PROFILE_BYTES = 512 * 1024
STATUS_STYLE = {
    "compliant": "green",
    "repaired": "green",
    "noncompliant": "red",
    "error": "red",
    "pending": "yellow",
    "unsupported": "dim",
}


def _styled(status: Any) -> str:
    s = str(status)
    return f"[{STATUS_STYLE.get(s, 'white')}]{_esc(s)}[/]"


def _read_profile(path: str) -> str:
    try:
        raw = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    except OSError as exc:
        fail(f"cannot read the profile: {exc}", code=2)
    if len(raw) > MAX_PROFILE_BYTES:
        fail(f"a profile is at most {MAX_PROFILE_BYTES // 1024} KiB", code=2)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        fail("the profile is not UTF-8 text", code=2)


def policy_add(
    path: Annotated[str, typer.Argument(metavar="FILE", help="YAML or JSON profile ('-': stdin)")],
    json_out: JsonOpt = False,
) -> None:
    """Add a profile, or a new version of the profile with its name."""
    text = _read_profile(path)
    with _client() as c:
        out = c.post("/api/v1/policies", {"document": text})
    if json_out:
        print_json(out)
        return
    if out.get("created"):
        what = "added"
    elif out.get("changed"):
        what = f"updated to version {out.get('version')}"
    else:
        what = f"unchanged (version {out.get('version')})"
    sys.stdout.write(f"{out.get('name')}\n")
    _err().print(
        f"[dim]{_esc(what)}; {out.get('rules')} rule(s); "
        f"new bundles for {out.get('devices_updated')} device(s)[/]"
    )


def _assigned(p: dict[str, Any]) -> str:
    parts = []
    for a in p.get("assignments") or []:
        target = "all devices" if a["kind"] == "all" else f"{a['kind']}:{a['target']}"
        parts.append(target + (f" (p{a['priority']})" if a.get("priority") else ""))
    return ", ".join(parts) or "-"


def policy_ls(json_out: JsonOpt = False) -> None:
    """List policies, their assignments and how many of their devices comply."""
    with _client() as c:
        rows = c.get("/api/v1/policies")
    if json_out:
        print_json(rows)
        return
    if not rows:
        _err().print("No policies.")
        return
    t = _table(
        "NAME", "VER", "RULES", "ASSIGNED TO", "OK", "NOT OK", "PENDING", wrap=("ASSIGNED TO",)
    )
    for p in rows:
        d = p.get("devices") or {}
        t.add_row(
            _esc(p.get("name")),
            str(p.get("version")),
            str(p.get("rules")),
            _esc(_assigned(p)),
            f"[green]{d.get('compliant', 0)}[/]",
            f"[red]{d.get('noncompliant', 0)}[/]" if d.get("noncompliant") else "0",
            str(d.get("pending", 0)),
        )
    _out().print(t)


def policy_show(
    ref: Annotated[str, typer.Argument(metavar="NAME_OR_ID")],
    version: Annotated[
        int | None, typer.Option("--version", min=1, help="an older version")
    ] = None,
    source: Annotated[bool, typer.Option("--source", help="print the profile as written")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Show a policy: assignments, compliance, versions (and its source with --source)."""
    with _client() as c:
        p = c.get(f"/api/v1/policies/{_seg(ref)}", {"version": version})
    if json_out:
        print_json(p)
        return
    if source:
        sys.stdout.write(str(p.get("source")))
        return
    out = _out()
    d = p.get("devices") or {}
    out.print(f"[bold]{_esc(p.get('name'))}[/] policy [dim]{_esc(p.get('id'))}[/]")
    out.print(
        _kv_grid(
            [
                ("Description", p.get("description")),
                ("Version", p.get("version")),
                ("Rules", p.get("rules")),
                ("Assigned to", _assigned(p)),
                (
                    "Devices",
                    f"{d.get('compliant', 0)} compliant, {d.get('noncompliant', 0)} "
                    f"non-compliant, {d.get('pending', 0)} pending",
                ),
            ]
        )
    )
    t = _table("VERSION", "BY", "WHEN", "DIGEST")
    for v in p.get("versions") or []:
        t.add_row(
            str(v["version"]),
            _esc(v.get("created_by")),
            relative_time(v.get("created_at")),
            _esc(str(v.get("digest"))[:12]),
        )
    out.print(t)


def policy_assign(
    ref: Annotated[str, typer.Argument(metavar="NAME_OR_ID")],
    group: Annotated[str | None, typer.Option("--group", "-g", help="a device group")] = None,
    label: Annotated[str | None, typer.Option("--label", "-l", help="a label")] = None,
    everyone: Annotated[bool, typer.Option("--all", help="every device")] = False,
    priority: Annotated[
        int, typer.Option("--priority", "-p", min=-1000, max=1000, help="higher wins conflicts")
    ] = 0,
    remove: Annotated[bool, typer.Option("--remove", help="remove this assignment")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Assign a policy to a group, a label or every device (or --remove the assignment)."""
    chosen = [x for x in (group, label) if x] + (["all"] if everyone else [])
    if len(chosen) != 1:
        fail("give exactly one of --group, --label and --all", code=2)
    kind = "group" if group else "label" if label else "all"
    target = group or label or ""
    with _client() as c:
        if remove:
            out = c.request(
                "DELETE",
                f"/api/v1/policies/{_seg(ref)}/assignments",
                params={"kind": kind, "target": target},
            )
        else:
            out = c.post(
                f"/api/v1/policies/{_seg(ref)}/assignments",
                {"kind": kind, "target": target, "priority": priority},
            )
    if json_out:
        print_json(out)
        return
    _err().print(
        f"[dim]{_esc(out.get('name'))}: {_esc(_assigned(out))}; "
        f"new bundles for {out.get('devices_updated')} device(s)[/]"
    )


def policy_rm(
    ref: Annotated[str, typer.Argument(metavar="NAME_OR_ID")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="do not ask")] = False,
) -> None:
    """Delete a policy; its devices stop enforcing its rules."""
    if not yes and not typer.confirm(f"Delete policy {ref}?", err=True):
        fail("cancelled", code=1)
    with _client() as c:
        c.request("DELETE", f"/api/v1/policies/{_seg(ref)}")
    _err().print(f"[dim]policy {_esc(ref)} deleted[/]")


def compliance_report(
    status: Annotated[
        str | None, typer.Option("--status", help="compliant, noncompliant or pending")
    ] = None,
    policy: Annotated[str | None, typer.Option("--policy", help="one policy's devices")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=10_000)] = 1000,
    json_out: JsonOpt = False,
) -> None:
    """Devices under a policy and their compliance (e.g. --status noncompliant)."""
    with _client() as c:
        rows = c.get("/api/v1/compliance", {"status": status, "policy": policy, "limit": limit})
    if json_out:
        print_json(rows)
        return
    if not rows:
        _err().print("No devices.")
        return
    t = _table("DEVICE", "STATUS", "SINCE", "FAILING", "POLICIES", "SEEN", wrap=("FAILING",))
    for r in rows:
        t.add_row(
            _esc(r.get("device")),
            _styled(r.get("status")) + (" [yellow](held)[/]" if r.get("held") else ""),
            relative_time(r.get("status_since")),
            _esc(", ".join(r.get("failing") or [])),
            _esc(", ".join(r.get("policies") or [])),
            relative_time(r.get("last_seen")),
        )
    _out().print(t)


def device_compliance(
    ref: Annotated[str, typer.Argument(metavar="DEVICE")],
    json_out: JsonOpt = False,
) -> None:
    """A device's compliance: each rule, recent drift and repairs, actions, lost state."""
    with _client() as c:
        d = c.get(f"/api/v1/devices/{_seg(ref)}/compliance")
    if json_out:
        print_json(d)
        return
    out = _out()
    out.print(f"[bold]{_esc(d.get('device'))}[/] {_styled(d.get('status'))}")
    profiles = ", ".join(f"{p['name']} v{p['version']}" for p in d.get("profiles") or [])
    lost = d.get("lost")
    out.print(
        _kv_grid(
            [
                ("Profiles", profiles),
                ("Last report", relative_time(d.get("reported_at"))),
                ("Held", "yes" if d.get("held") else "no"),
                ("Quarantine", d.get("quarantine_group")),
                ("Actions taken", ", ".join(d.get("actions_done") or [])),
                ("Lost", f"{lost['state']} since {lost['marked_at']}" if lost else None),
            ]
        )
    )
    t = _table("RULE", "POLICY", "STATUS", "BY", "SINCE", "DETAIL", wrap=("RULE", "DETAIL"))
    for r in d.get("rules") or []:
        t.add_row(
            _esc(r["rule_id"]),
            _esc(r["policy"]),
            _styled(r["status"]),
            _esc(r["source"]),
            relative_time(r["since"]),
            _esc(r["detail"]),
        )
    out.print(t)
    if d.get("events"):
        h = _table("WHEN", "RULE", "WHAT", "DETAIL", wrap=("RULE", "DETAIL"))
        for e in d["events"][:20]:
            h.add_row(
                relative_time(e["at"]), _esc(e["rule_id"]), _styled(e["kind"]), _esc(e["detail"])
            )
        out.print(h)


def _confirm_wipe(device: str, yes: bool) -> str:
    """The confirmation the server wants: the device's name, typed or given with --yes."""
    if yes:
        return device
    typed = typer.prompt(
        f"This wipes {device} at its next contact. Type its name to confirm", err=True
    )
    if typed != device:
        fail("the name did not match; nothing was sent", code=1)
    return typed


def device_lost(
    ref: Annotated[str, typer.Argument(metavar="DEVICE", help="device name or id")],
    lock: Annotated[bool, typer.Option("--lock/--no-lock", help="lock it at next contact")] = True,
    wipe: Annotated[
        str, typer.Option("--wipe", help="none, selective or full: wipe at next contact")
    ] = "none",
    auto_wipe_days: Annotated[
        int | None,
        typer.Option("--auto-wipe-days", min=1, max=3650, help="wipe if silent this many days"),
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="report what a wipe would do")] = False,
    message: Annotated[str, typer.Option("--message", help="shown on the lock screen")] = "",
    yes: Annotated[bool, typer.Option("--yes", "-y", help="confirm a wipe without asking")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Mark a device lost: lock it and/or wipe it at its next contact."""
    if wipe not in ("none", "selective", "full"):
        fail("--wipe is none, selective or full", code=2)
    body: dict[str, Any] = {
        "lock": lock,
        "wipe": wipe,
        "dry_run": dry_run,
        "message": message,
        "auto_wipe_days": auto_wipe_days,
    }
    if (wipe != "none" or auto_wipe_days) and not dry_run:
        body["confirm"] = _confirm_wipe(ref, yes)
    with _client() as c:
        out = c.post(f"/api/v1/devices/{_seg(ref)}/lost", body)
    if json_out:
        print_json(out)
        return
    did = [w for w, on in (("lock", out.get("lock")),) if on]
    if out.get("wipe_order"):
        did.append(f"{out['wipe']} wipe" + (" (dry run)" if out.get("dry_run") else ""))
    if out.get("auto_wipe_days"):
        did.append(f"auto-wipe after {out['auto_wipe_days']} silent days")
    _err().print(
        f"[dim]{_esc(out.get('device'))} marked lost: {_esc(', '.join(did) or 'noted')}[/]"
    )


def device_found(
    ref: Annotated[str, typer.Argument(metavar="DEVICE")],
    json_out: JsonOpt = False,
) -> None:
    """A lost device is back: pending lock and wipe are cancelled, a lock is undone."""
    with _client() as c:
        out = c.post(f"/api/v1/devices/{_seg(ref)}/found", {})
    if json_out:
        print_json(out)
        return
    _err().print(f"[dim]{_esc(out.get('device'))} marked found[/]")


def device_lock(
    ref: Annotated[str, typer.Argument(metavar="DEVICE")],
    message: Annotated[str, typer.Option("--message", help="shown on the lock screen")] = "",
    json_out: JsonOpt = False,
) -> None:
    """Lock a device (screen or session; managed accounts disabled) at its next contact."""
    with _client() as c:
        out = c.post(f"/api/v1/devices/{_seg(ref)}/lock", {"message": message})
    if json_out:
        print_json(out)
        return
    _err().print(f"[dim]lock queued (run {_esc(out.get('run_id'))})[/]")


def device_wipe(
    ref: Annotated[str, typer.Argument(metavar="DEVICE")],
    mode: Annotated[str, typer.Option("--mode", help="selective or full")] = "selective",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="report only, delete nothing")] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="confirm without asking")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Wipe a device at its next contact (selective: managed data and apps; full: platform)."""
    if mode not in ("selective", "full"):
        fail("--mode is selective or full", code=2)
    body: dict[str, Any] = {"mode": mode, "dry_run": dry_run}
    if not dry_run:
        body["confirm"] = _confirm_wipe(ref, yes)
    with _client() as c:
        out = c.post(f"/api/v1/devices/{_seg(ref)}/wipe", body)
    if json_out:
        print_json(out)
        return
    _err().print(
        f"[dim]{_esc(out.get('mode'))} wipe{' (dry run)' if out.get('dry_run') else ''} queued "
        f"for {_esc(out.get('device'))}: order {_esc(out.get('id'))}[/]"
    )


def wipe_ls(
    limit: Annotated[int, typer.Option("--limit", min=1, max=1000)] = 100,
    json_out: JsonOpt = False,
) -> None:
    """Wipe orders and their outcome."""
    with _client() as c:
        rows = c.get("/api/v1/wipes", {"limit": limit})
    if json_out:
        print_json(rows)
        return
    if not rows:
        _err().print("No wipes.")
        return
    t = _table("DEVICE", "MODE", "STATE", "REASON", "BY", "WHEN")
    for w in rows:
        t.add_row(
            _esc(w["device"]),
            _esc(w["mode"] + (" (dry run)" if w["dry_run"] else "")),
            _esc(w["state"]),
            _esc(w["reason"]),
            _esc(w["requested_by"]),
            relative_time(w["requested_at"]),
        )
    _out().print(t)


def register(app: typer.Typer) -> None:
    """Add the policy command group."""
    policy = typer.Typer(help="Policies: desired state, compliance.", no_args_is_help=True)
    policy.command("add")(policy_add)
    policy.command("ls")(policy_ls)
    policy.command("show")(policy_show)
    policy.command("assign")(policy_assign)
    policy.command("rm")(policy_rm)
    policy.command("compliance")(compliance_report)
    policy.command("wipes")(wipe_ls)
    app.add_typer(policy, name="policy")


def register_device_verbs(device: typer.Typer) -> None:
    """Add compliance, lost, found, lock and wipe to `custos device`."""
    device.command("compliance")(device_compliance)
    device.command("lost")(device_lost)
    device.command("found")(device_found)
    device.command("lock")(device_lock)
    device.command("wipe")(device_wipe)
