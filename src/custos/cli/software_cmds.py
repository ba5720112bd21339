"""`custos pkg …`, `custos deploy …` and `custos label …`: software distribution."""

from __future__ import annotations

import sys
from collections.abc import Iterator
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

UPLOAD_PIECE = 1024 * 1024
UPLOAD_TIMEOUT_S = 3600.0


def _size(n: Any) -> str:
    value = float(n or 0)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(n)


# --- packages ---------------------------------------------------------------------------


def pkg_add(
    file: Annotated[Path, typer.Argument(metavar="FILE", help=".cpkg, .deb, .rpm, .whl, .msi…")],
    name: Annotated[str | None, typer.Option("--name", help="for formats without one")] = None,
    version: Annotated[str | None, typer.Option("--version", help="likewise")] = None,
    destination: Annotated[
        str | None, typer.Option("--dest", help="plain files: the absolute path on devices")
    ] = None,
    mode: Annotated[str | None, typer.Option("--mode", help="plain files: e.g. 0644")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Upload a package (with a progress bar); the server inspects, chunks and signs it."""
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    try:
        size = file.stat().st_size
        fh = file.open("rb")
    except OSError as exc:
        fail(f"cannot read {file}: {exc.strerror or exc}", code=2)
    params = {
        "filename": file.name,
        "name": name,
        "version": version,
        "destination": destination,
        "mode": mode,
    }
    with (
        fh,
        _client() as c,
        Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=_err(),
            transient=True,
        ) as bar,
    ):
        task = bar.add_task(f"uploading {file.name}", total=size)

        def pieces() -> Iterator[bytes]:
            while piece := fh.read(UPLOAD_PIECE):
                bar.advance(task, len(piece))
                yield piece
            bar.update(task, description="inspecting and storing")

        created = c.request(
            "POST",
            "/api/v1/packages",
            params={k: v for k, v in params.items() if v is not None},
            content=pieces(),
            headers={"content-type": "application/octet-stream", "content-length": str(size)},
            timeout=UPLOAD_TIMEOUT_S,
        )
    if json_out:
        print_json(created)
        return
    sys.stdout.write(str(created["id"]) + "\n")
    _err().print(
        f"[green]added[/] {_esc(created['name'])} {_esc(created['version'])} "
        f"({_esc(created['format'])}, {_size(created['size'])}, signed)"
    )


def pkg_ls(
    name: Annotated[str | None, typer.Option("--name", help="only this package")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=1000)] = 100,
    json_out: JsonOpt = False,
) -> None:
    """List package versions, newest first."""
    with _client() as c:
        pkgs = c.get("/api/v1/packages", {"name": name, "limit": limit})
    if json_out:
        print_json(pkgs)
        return
    if not pkgs:
        _err().print("No packages.")
        return
    t = _table("NAME", "VERSION", "FORMAT", "SIZE", "PLATFORMS", "ADDED", "ID")
    for p in pkgs:
        t.add_row(
            _esc(p["name"]),
            _esc(p["version"]),
            _esc(p["format"]),
            _size(p["size"]),
            _esc(",".join(p.get("platforms") or []) or "any"),
            relative_time(p.get("created_at")),
            _esc(p["id"]),
        )
    _out().print(t)


def pkg_show(
    ref: Annotated[str, typer.Argument(metavar="PKG", help="id, NAME (newest) or NAME==VERSION")],
    json_out: JsonOpt = False,
) -> None:
    """Show a package: its descriptor, detection rule and deployments."""
    with _client() as c:
        p = c.get(f"/api/v1/packages/{_seg(ref)}")
    if json_out:
        print_json(p)
        return
    d = p.get("descriptor") or {}
    _out().print(
        _kv_grid(
            [
                ("Package", f"{p['name']} {p['version']}"),
                ("Format", p["format"]),
                ("File", f"{p['filename']} ({_size(p['size'])})"),
                ("SHA-256", p["sha256"]),
                ("Platforms", ",".join(p.get("platforms") or []) or "any"),
                ("Detect", str(d.get("detect") or "-")),
                ("Deployments", ", ".join(p.get("deployments") or []) or "-"),
                ("Added", f"{relative_time(p.get('created_at'))} by {p.get('created_by')}"),
                ("Id", p["id"]),
            ]
        )
    )


def pkg_rm(ref: Annotated[str, typer.Argument(metavar="PKG")]) -> None:
    """Delete a package version that no deployment uses."""
    with _client() as c:
        c.request("DELETE", f"/api/v1/packages/{_seg(ref)}")
    _err().print(f"Deleted {_esc(ref)}.")


# --- labels -----------------------------------------------------------------------------


def label_create(
    name: Annotated[str, typer.Argument(metavar="NAME")],
    where: Annotated[
        list[str],
        typer.Option("--where", "-w", help="a condition, e.g. 'os.name = Debian' (repeatable)"),
    ],
    description: Annotated[str, typer.Option("--description")] = "",
    json_out: JsonOpt = False,
) -> None:
    """Create a label: the devices whose inventory matches every --where."""
    with _client() as c:
        label = c.post(
            "/api/v1/labels", {"name": name, "conditions": where, "description": description}
        )
    if json_out:
        print_json(label)
        return
    _err().print(f"label {_esc(label['name'])}: {_esc(label['text'])} ({label['devices']} now)")


def label_ls(json_out: JsonOpt = False) -> None:
    """List labels with how many devices each holds now."""
    with _client() as c:
        labels = c.get("/api/v1/labels")
    if json_out:
        print_json(labels)
        return
    if not labels:
        _err().print("No labels.")
        return
    t = _table("NAME", "QUERY", "DEVICES", wrap=("QUERY",))
    for lb in labels:
        t.add_row(_esc(lb["name"]), _esc(lb["text"]), str(lb["devices"]))
    _out().print(t)


def label_rm(name: Annotated[str, typer.Argument(metavar="NAME")]) -> None:
    """Delete a label."""
    with _client() as c:
        c.request("DELETE", f"/api/v1/labels/{_seg(name)}")
    _err().print(f"Deleted {_esc(name)}.")


# --- deployments ------------------------------------------------------------------------


def _list_opt(values: list[str] | None) -> list[str]:
    return [v.strip() for item in values or [] for v in item.split(",") if v.strip()]


def build_deploy_body(
    package: str,
    *,
    devices: list[str],
    groups: list[str],
    labels: list[str],
    name: str | None,
    uninstall: bool,
    available: bool,
    download_at: str | None,
    activate_at: str | None,
    window: str | None,
    waves: str | None,
    success: float | None,
    failure: float | None,
    auto_upgrade: bool,
    limit: str | None,
) -> dict[str, Any]:
    """The POST /api/v1/deployments body; ValueError for bad input."""
    if not (devices or groups or labels):
        raise ValueError("name a target: --device, --group or --label")
    body: dict[str, Any] = {
        "package": package,
        "targets": {"devices": devices, "groups": groups, "labels": labels},
        "action": "uninstall" if uninstall else "install",
        "mode": "available" if available else "required",
        "auto_upgrade": auto_upgrade,
    }
    if name:
        body["name"] = name
    for key, value in (("download_at", download_at), ("activate_at", activate_at)):
        if value:
            body[key] = value
    if window:
        body["window"] = window
    if waves:
        try:
            body["waves"] = [int(w.strip().rstrip("%")) for w in waves.split(",") if w.strip()]
        except ValueError:
            raise ValueError("--waves is a list of percentages, e.g. 10,50,100") from None
    if success is not None:
        body["success_threshold"] = success
    if failure is not None:
        body["failure_threshold"] = failure
    if limit:
        body["limit_bps"] = parse_rate(limit)
    return body


def parse_rate(text: str) -> int:
    """'512k', '2M', '1000000' -> bytes per second."""
    t = text.strip().lower().removesuffix("/s").removesuffix("b")
    mult = {"k": 1024, "m": 1024**2, "g": 1024**3}.get(t[-1:], 1)
    try:
        value = float(t[:-1] if mult > 1 else t)
    except ValueError:
        raise ValueError(f"cannot read the rate {text!r} (e.g. 512k, 2M)") from None
    if value <= 0:
        raise ValueError("the rate must be positive")
    return int(value * mult)


def deploy_create(
    package: Annotated[str, typer.Argument(metavar="PKG", help="id, NAME or NAME==VERSION")],
    device: Annotated[
        list[str] | None, typer.Option("--device", "-d", help="device id/name")
    ] = None,
    group: Annotated[list[str] | None, typer.Option("--group", "-g", help="group name")] = None,
    label: Annotated[list[str] | None, typer.Option("--label", "-l", help="label name")] = None,
    name: Annotated[str | None, typer.Option("--name")] = None,
    uninstall: Annotated[bool, typer.Option("--uninstall", help="remove it instead")] = False,
    available: Annotated[
        bool, typer.Option("--available", help="offer in the self-service catalogue only")
    ] = False,
    download_at: Annotated[
        str | None, typer.Option("--download-at", help="ISO time with zone")
    ] = None,
    activate_at: Annotated[
        str | None, typer.Option("--activate-at", help="install no earlier (ISO, zone)")
    ] = None,
    window: Annotated[
        str | None, typer.Option("--window", help="'mon-fri 01:00-05:00 Europe/Paris'")
    ] = None,
    waves: Annotated[
        str | None, typer.Option("--waves", help="cumulative percentages, e.g. 10,50,100")
    ] = None,
    success: Annotated[
        float | None, typer.Option("--success", help="% of a wave installed to go on [90]")
    ] = None,
    failure: Annotated[
        float | None, typer.Option("--failure", help="% of attempts failed to pause [20]")
    ] = None,
    auto_upgrade: Annotated[
        bool, typer.Option("--auto-upgrade", help="follow the newest version of the package")
    ] = False,
    limit: Annotated[
        str | None, typer.Option("--limit", help="bandwidth per device, e.g. 512k, 2M")
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Deploy a package (or remove it) on devices, groups and labels, in waves."""
    try:
        body = build_deploy_body(
            package,
            devices=_list_opt(device),
            groups=_list_opt(group),
            labels=_list_opt(label),
            name=name,
            uninstall=uninstall,
            available=available,
            download_at=download_at,
            activate_at=activate_at,
            window=window,
            waves=waves,
            success=success,
            failure=failure,
            auto_upgrade=auto_upgrade,
            limit=limit,
        )
    except ValueError as exc:
        fail(str(exc), code=2)
    with _client() as c:
        dep = c.post("/api/v1/deployments", body)
    if json_out:
        print_json(dep)
        return
    sys.stdout.write(str(dep["id"]) + "\n")
    _err().print(
        f"deployment {_esc(dep['name'])}: {_esc(dep['package'])} to {len(dep['devices'])} "
        f"device(s), waves {dep['waves']}"
    )


def deploy_ls(
    limit: Annotated[int, typer.Option("--limit", min=1, max=1000)] = 50,
    json_out: JsonOpt = False,
) -> None:
    """List deployments with their progress."""
    with _client() as c:
        deps = c.get("/api/v1/deployments", {"limit": limit})
    if json_out:
        print_json(deps)
        return
    if not deps:
        _err().print("No deployments.")
        return
    t = _table("NAME", "PACKAGE", "ACTION", "STATE", "WAVE", "PROGRESS", "CREATED")
    for d in deps:
        t.add_row(
            _esc(d["name"]),
            _esc(d["package"]),
            _esc(d["action"] + (" (catalogue)" if d["mode"] == "available" else "")),
            _state(d["state"]),
            f"{d['current_wave'] + 1}/{len(d['waves'])}",
            _esc(_counts(d.get("counts") or {})),
            relative_time(d.get("created_at")),
        )
    _out().print(t)


def _state(state: str) -> str:
    colour = {"active": "green", "paused": "yellow", "aborted": "red"}.get(state, "white")
    return f"[{colour}]{_esc(state)}[/]"


def _counts(counts: dict[str, int]) -> str:
    order = ("installed", "removed", "installing", "downloading", "downloaded", "queued",
             "pending", "failed", "cancelled")  # fmt: skip
    return " ".join(f"{k} {counts[k]}" for k in order if counts.get(k))


def deploy_show(
    ref: Annotated[str, typer.Argument(metavar="DEPLOYMENT", help="id or name")],
    json_out: JsonOpt = False,
) -> None:
    """Show a deployment with every device's status."""
    with _client() as c:
        d = c.get(f"/api/v1/deployments/{_seg(ref)}")
    if json_out:
        print_json(d)
        return
    out = _out()
    out.print(
        _kv_grid(
            [
                ("Deployment", f"{d['name']} ({d['id']})"),
                ("Package", f"{d['package']} — {d['action']}, {d['mode']}"),
                ("State", d["state"] + (f": {d['state_reason']}" if d["state_reason"] else "")),
                ("Waves", f"{d['waves']} (now {d['current_wave'] + 1})"),
                (
                    "Thresholds",
                    f"success {d['success_threshold']:g}%, failure {d['failure_threshold']:g}%",
                ),
                ("Download at", str(d.get("download_at") or "now")),
                ("Activate at", str(d.get("activate_at") or "at once")),
                ("Window", str(d.get("window") or "-")),
                ("Progress", _counts(d.get("counts") or {}) or "-"),
            ]
        )
    )
    devices = d.get("devices") or []
    if devices:
        t = _table("DEVICE", "WAVE", "STATE", "%", "VERSION", "DETAIL", "UPDATED", wrap=("DETAIL",))
        for r in devices:
            t.add_row(
                _esc(r["hostname"]),
                str(r["wave"] + 1),
                _esc(r["state"]),
                str(r["progress"]),
                _esc(r.get("version") or ""),
                _esc((r.get("detail") or "")[:120]),
                relative_time(r.get("updated_at")),
            )
        out.print()
        out.print(t)


def _change(ref: str, action: str) -> None:
    with _client() as c:
        d = c.post(f"/api/v1/deployments/{_seg(ref)}/{action}")
    _err().print(f"{_esc(d['name'])}: {_esc(d['state'])}")


def deploy_pause(ref: Annotated[str, typer.Argument(metavar="DEPLOYMENT")]) -> None:
    """Stop sending the deployment to more devices."""
    _change(ref, "pause")


def deploy_resume(ref: Annotated[str, typer.Argument(metavar="DEPLOYMENT")]) -> None:
    """Go on with a paused deployment."""
    _change(ref, "resume")


def deploy_abort(ref: Annotated[str, typer.Argument(metavar="DEPLOYMENT")]) -> None:
    """End a deployment; devices that have not started are cancelled."""
    _change(ref, "abort")


def register(app: typer.Typer) -> None:
    """Add the pkg, label and deploy command groups."""
    pkg = typer.Typer(help="Software packages.", no_args_is_help=True)
    pkg.command("add")(pkg_add)
    pkg.command("ls")(pkg_ls)
    pkg.command("show")(pkg_show)
    pkg.command("rm")(pkg_rm)
    app.add_typer(pkg, name="pkg")
    label = typer.Typer(help="Labels: saved inventory queries.", no_args_is_help=True)
    label.command("create")(label_create)
    label.command("ls")(label_ls)
    label.command("rm")(label_rm)
    app.add_typer(label, name="label")
    deploy = typer.Typer(help="Deployments and phased rollouts.", no_args_is_help=True)
    deploy.command("create")(deploy_create)
    deploy.command("ls")(deploy_ls)
    deploy.command("show")(deploy_show)
    deploy.command("pause")(deploy_pause)
    deploy.command("resume")(deploy_resume)
    deploy.command("abort")(deploy_abort)
    app.add_typer(deploy, name="deploy")
