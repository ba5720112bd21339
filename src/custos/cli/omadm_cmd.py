"""`custos omadm …`: OMA DM devices: their DMAcc at enrolment, node operations, package #0."""

from __future__ import annotations

import os
import re
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from custos.cli.admin_cmds import (
    TERMINAL_STATES,
    JsonOpt,
    _client,
    _err,
    _esc,
    _out,
    _seg,
    _table,
    _wait,
    print_json,
    relative_time,
)
from custos.cli.client import fail, parse_datetime

if TYPE_CHECKING:
    from custos.cli.client import AdminClient

BASE = "/api/v1/omadm/devices"
AUTHS = ("md5", "basic", "hmac", "cert")
FORMATS = ("chr", "int", "bool", "b64", "xml", "float")
MAX_VALUE_BYTES = 1024 * 1024  # the server's limit on one op's data
MAX_NODE_CHARS = 1000
MIN_PASSWORD, MAX_PASSWORD = 8, 200  # what the server accepts for the DM passwords
MAX_WAIT_S = 86_400
EXIT_TIMED_OUT = 3
ASK = "-"  # --pfx-password - : ask for it on the terminal
_INT = re.compile(r"^[+-]?\d{1,20}$")
# AAuthType of the DMAcc AppAuth nodes for each way of authenticating
DMACC_AUTH_TYPE = {"basic": "BASIC", "md5": "DIGEST", "hmac": "HMAC", "cert": "X509"}

# SyncML / OMA DM status codes a device answers node operations with
STATUS_TEXT = {
    200: "OK",
    202: "accepted for processing",
    213: "chunked item accepted",
    214: "operation cancelled",
    215: "not executed",
    216: "rolled back (atomic)",
    400: "bad request",
    401: "unauthorised",
    403: "forbidden",
    404: "not found",
    405: "command not allowed",
    406: "optional feature not supported",
    412: "incomplete command",
    413: "request entity too large",
    414: "URI too long",
    415: "unsupported media type or format",
    416: "requested size too big",
    418: "already exists",
    420: "device full",
    424: "size mismatch",
    425: "permission denied",
    500: "command failed",
    507: "atomic failed",
    516: "atomic roll back failed",
}

WaitOpt = Annotated[
    float,
    typer.Option(
        "--wait",
        min=0,
        max=MAX_WAIT_S,
        metavar="SECONDS",
        help="wait this long for the device's answer (0: only queue)",
    ),
]
NotifyOpt = Annotated[
    bool,
    typer.Option(
        "--notify/--no-notify",
        help="send package #0 so the device opens a session now (else: at its next session)",
    ),
]
DeviceArg = Annotated[str, typer.Argument(metavar="DEVICE", help="device name or id")]
NodeArg = Annotated[str, typer.Argument(metavar="NODE", help="DM tree URI, e.g. ./DevDetail/SwV")]


# --------------------------------------------------------------------------- pure helpers


def check_node(node: str, what: str = "NODE") -> str:
    """The node URI if the server would take it; ValueError with a readable reason otherwise."""
    if node != "." and not node.startswith("./"):
        raise ValueError(
            f"{what} must be an absolute DM tree URI starting with ./ "
            f"(e.g. ./DevDetail/SwV), got {node[:80]!r}"
        )
    if len(node) > MAX_NODE_CHARS:
        raise ValueError(f"{what} is longer than {MAX_NODE_CHARS} characters")
    from custos.omadm.schemas import NODE_URI

    if not re.match(NODE_URI, node):
        raise ValueError(
            f"{what} {node[:80]!r} is not a valid DM tree URI: at most 31 segments of "
            "1 to 255 characters, no empty segment ('//'), no control characters"
        )
    return node


def check_value(value: str, fmt: str | None) -> str:
    """The value if it fits its DM format (and the size limit); ValueError otherwise."""
    if len(value.encode("utf-8", "surrogatepass")) > MAX_VALUE_BYTES:
        raise ValueError(f"VALUE is larger than {MAX_VALUE_BYTES // 1024} KiB")
    if fmt == "int" and not _INT.match(value.strip()):
        raise ValueError(f"--format int needs an integer, got {value[:40]!r}")
    if fmt == "bool" and value not in ("true", "false"):
        raise ValueError(f"--format bool needs true or false, got {value[:40]!r}")
    if fmt == "float":
        import math

        try:
            finite = math.isfinite(float(value))
        except ValueError:
            finite = False
        if not finite:
            raise ValueError(f"--format float needs a finite number, got {value[:40]!r}")
    if fmt == "b64":
        import base64
        import binascii

        try:
            base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("--format b64 needs base64 text (A-Z a-z 0-9 + / =)") from None
    return value


def server_url(base: str, path: str) -> str:
    """The DM server's address for the device: the admin URL's origin plus the endpoint path."""
    if path.startswith(("http://", "https://")):
        return path
    return base.rstrip("/") + "/" + path.lstrip("/")


def status_text(code: Any) -> str:
    """'404 not found' for a DM status code; 'no status' when the device gave none."""
    if not isinstance(code, int) or code <= 0:
        return "no status"
    return f"{code} {STATUS_TEXT.get(code, '')}".rstrip()


def pkcs12_bytes(acc: dict[str, Any], password: str | None) -> bytes:
    """The device's key, certificate and the CA as PKCS#12; encrypted when a password is given."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.serialization import pkcs12

    key = serialization.load_pem_private_key(str(acc["private_key"]).encode(), password=None)
    cert = x509.load_pem_x509_certificate(str(acc["certificate"]).encode())
    cas = [x509.load_pem_x509_certificate(str(acc["ca_certificate"]).encode())]
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password.encode())
        if password
        else serialization.NoEncryption()
    )
    return pkcs12.serialize_key_and_certificates(
        str(acc["dev_id"]).encode(),
        key,  # type: ignore[arg-type]  # an EC or RSA key, as the CA issues
        cert,
        cas,
        encryption,
    )


def write_new_private(path: Path, data: bytes) -> None:
    """Create `path` with mode 0600 and write `data`; FileExistsError if it is already there."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags, 0o600)
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, 0o600)  # whatever the umask
        with os.fdopen(fd, "wb") as fh:
            fd = -1
            fh.write(data)
    except BaseException:
        if fd != -1:
            os.close(fd)
        path.unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------- enrol, list


def _check_pfx_target(pfx: Path) -> None:
    if pfx.exists() or pfx.is_symlink():
        fail(f"{pfx} already exists; choose another file for --pfx", code=2)
    parent = pfx.parent if str(pfx.parent) else Path()
    if not parent.is_dir():
        fail(f"--pfx: the directory {parent} does not exist", code=2)
    if not os.access(parent, os.W_OK):
        fail(f"--pfx: cannot write in {parent}", code=2)


def omadm_enroll(
    dev_id: Annotated[
        str, typer.Argument(metavar="DEV_ID", help="the device's DevId, e.g. IMEI:356938035643809")
    ],
    name: Annotated[
        str | None, typer.Option("--name", help="device name (default: DEV_ID)")
    ] = None,
    auth: Annotated[
        str, typer.Option("--auth", help="how the device proves itself: md5, basic, hmac or cert")
    ] = "md5",
    group: Annotated[str | None, typer.Option("--group", help="put the device in it")] = None,
    notify_url: Annotated[
        str | None,
        typer.Option("--notify-url", metavar="URL", help="where package #0 goes (HTTP gateway)"),
    ] = None,
    client_password: Annotated[
        str | None,
        typer.Option("--client-password", help="the device's password (default: generated)"),
    ] = None,
    server_password: Annotated[
        str | None,
        typer.Option("--server-password", help="the server's password (default: generated)"),
    ] = None,
    pfx: Annotated[
        Path | None,
        typer.Option(
            "--pfx", metavar="FILE", help="write the device's key, certificate and CA (PKCS#12)"
        ),
    ] = None,
    pfx_password: Annotated[
        str | None,
        typer.Option("--pfx-password", help="encrypt the --pfx file with it ('-': ask)"),
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Register an OMA DM device and print its DMAcc values (the secrets are shown only now)."""
    if auth not in AUTHS:
        fail(f"--auth is one of {', '.join(AUTHS)}", code=2)
    for option, secret in (
        ("--client-password", client_password),
        ("--server-password", server_password),
    ):
        if secret is not None and not MIN_PASSWORD <= len(secret) <= MAX_PASSWORD:
            fail(f"{option} is {MIN_PASSWORD} to {MAX_PASSWORD} characters long", code=2)
    if pfx_password is not None and pfx is None:
        fail("--pfx-password only applies to --pfx", code=2)
    if auth == "cert" and pfx is None and not json_out:
        fail(
            "--auth cert needs --pfx FILE (or --json) to keep the device's key and "
            "certificate, which are shown only once",
            code=2,
        )
    if pfx is not None:
        _check_pfx_target(pfx)
        if pfx_password == ASK:
            pfx_password = str(
                typer.prompt(
                    f"Password for {pfx}", hide_input=True, confirmation_prompt=True, err=True
                )
            )
        if pfx_password == "":
            fail("empty --pfx-password; leave it out for an unencrypted file", code=2)
    body: dict[str, Any] = {"dev_id": dev_id, "auth": auth}
    for key, value in (
        ("name", name),
        ("group", group),
        ("notify_url", notify_url),
        ("client_password", client_password),
        ("server_password", server_password),
    ):
        if value is not None:
            body[key] = value
    with _client() as c:
        acc: dict[str, Any] = c.post(BASE, body)
        base = c.url
    acc = {**acc, "server_url": server_url(base, str(acc.get("server_url") or ""))}
    pfx_error: str | None = None
    if pfx is not None:
        try:
            write_new_private(pfx, pkcs12_bytes(acc, pfx_password))
        except (OSError, ValueError, TypeError) as exc:
            pfx_error = str(exc) or type(exc).__name__
        else:
            acc["pfx_file"] = str(pfx)
    if json_out:
        print_json(acc)
    else:
        _print_account(acc)
        if pfx is not None and pfx_error is None:
            how = "password-protected" if pfx_password else "[yellow]unencrypted[/]"
            _err().print(
                f"Key, certificate and CA written to [bold]{_esc(pfx)}[/] (PKCS#12, {how}, 0600)."
            )
        _err().print("[dim]The passwords and the key are not shown again.[/]")
    if pfx_error is not None:
        fail(
            f"the device was enrolled, but {pfx} was not written: {pfx_error}",
            hint=(
                "the key exists nowhere else; the passwords above still work"
                if auth != "cert"
                else f"the key exists nowhere else, so the device cannot authenticate: retire "
                f"it (`custos device retire {acc.get('device_id')}`)"
            ),
        )


def _print_account(acc: dict[str, Any]) -> None:
    """The DMAcc values on stdout, each with the node of the DMAcc it belongs in."""
    from rich.table import Table

    auth = str(acc.get("auth"))
    out = _out()
    out.print(
        f"[green]OMA DM device[/] [bold]{_esc(acc.get('name'))}[/] enrolled "
        f"(id {_esc(acc.get('device_id'))}, {_esc(auth)} authentication)\n"
    )
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(overflow="fold")
    grid.add_column(style="dim", no_wrap=True)
    rows: list[tuple[str, Any, str]] = [
        ("Server URL", acc.get("server_url"), "AppAddr/*/Addr"),
        ("Server ID", acc.get("server_id"), "ServerID"),
        ("Authentication", f"{auth} ({DMACC_AUTH_TYPE.get(auth, auth)})", "AAuthPref, AAuthType"),
        ("Client name", acc.get("client_name"), "AppAuth CLCRED AAuthName"),
        ("Client password", acc.get("client_password"), "AppAuth CLCRED AAuthSecret"),
        ("Client nonce", acc.get("client_nonce"), "AppAuth CLCRED AAuthData (b64)"),
        ("Server password", acc.get("server_password"), "AppAuth SRVCRED AAuthSecret"),
        ("Server nonce", acc.get("server_nonce"), "AppAuth SRVCRED AAuthData (b64)"),
    ]
    for label, value, node in rows:
        grid.add_row(label, _esc(value), node)
    out.print(grid)


def omadm_ls(json_out: JsonOpt = False) -> None:
    """List OMA DM devices with their DM identity and last session."""
    with _client() as c:
        rows = c.get(BASE)
    if json_out:
        print_json(rows)
        return
    if not rows:
        _err().print("No OMA DM devices.")
        return
    t = _table(
        "ID",
        "NAME",
        "DEV ID",
        "AUTH",
        "LAST SESSION",
        "INVENTORY",
        "NOTIFIED",
        wrap=("NAME", "DEV ID"),
    )
    for a in rows:
        auth = _esc(a.get("auth"))
        locked = parse_datetime(a.get("locked_until"))
        if locked is not None and locked > datetime.now(UTC):
            auth += f" [red](locked until {locked.astimezone():%H:%M})[/]"
        t.add_row(
            _esc(a.get("device_id")),
            _esc(a.get("name")),
            _esc(a.get("dev_id")),
            auth,
            relative_time(a.get("last_session_at")),
            relative_time(a.get("inventory_at")),
            relative_time(a.get("notified_at")),
        )
    _out().print(t)


# --------------------------------------------------------------------------- node operations


def _notify_line(queued: dict[str, Any]) -> str:
    detail = str(queued.get("notify_detail") or "")
    if queued.get("notified"):
        return f"[green]{_esc(detail or 'package #0 delivered')}[/]"
    if detail == "not requested":
        return "package #0 not sent (--no-notify): the device sees the work at its next session"
    return f"[yellow]package #0 not delivered: {_esc(detail)}[/]"


def _op_results(run: dict[str, Any]) -> list[dict[str, Any]]:
    result = run.get("result") or {}
    ops = result.get("ops") if isinstance(result, dict) else None
    return [o for o in ops or [] if isinstance(o, dict)]


def _report_ops(run: dict[str, Any]) -> None:
    """Each op's status on stderr; a Get's value alone on stdout (for scripts)."""
    err = _err()
    ops = _op_results(run)
    for op in ops:
        code = op.get("status")
        ok = isinstance(code, int) and 200 <= code < 300
        line = f"{op.get('verb')} {op.get('target')}: {status_text(code)}"
        if op.get("error"):
            line += f" ({op['error']})"
        err.print(f"[{'green' if ok else 'red'}]{_esc(line)}[/]")
        if op.get("verb") in ("Get", "Alert") and op.get("data") is not None:
            value = str(op["data"])
            sys.stdout.write(value if value.endswith("\n") else value + "\n")
            sys.stdout.flush()
    state = str(run.get("state") or "")
    if state != "succeeded" and (not ops or run.get("error")):
        reason = ", ".join(str(x) for x in (state, run.get("error")) if x)
        err.print(f"[red]{_esc(reason or 'no run')}[/]")


def _queue(
    device: str,
    ops: list[dict[str, Any]],
    *,
    wait: float,
    notify: bool,
    json_out: bool,
    alert: dict[str, Any] | None = None,
    rotate: bool = False,
) -> None:
    """Queue the ops (or a user alert, or a DMAcc rotation), then print what happened or
    wait for the answer."""
    with _client() as c:
        if rotate:
            queued: dict[str, Any] = c.post(f"{BASE}/{_seg(device)}/rotate", {"notify": notify})
        elif alert is not None:
            queued = c.post(f"{BASE}/{_seg(device)}/alert", {**alert, "notify": notify})
        else:
            queued = c.post(f"{BASE}/{_seg(device)}/ops", {"ops": ops, "notify": notify})
        cid = str(queued.get("command_id"))
        if wait <= 0:
            if json_out:
                print_json(queued)
            else:
                sys.stdout.write(cid + "\n")
                _err().print(_notify_line(queued))
                _err().print(f"[dim]queued; see `custos cmd show {cid}`[/]")
            return
        if not json_out:
            _err().print(f"[dim]command {cid}[/]")
            _err().print(_notify_line(queued))
        run, finished = _wait_run(c, cid, wait)
    if json_out:
        print_json(
            {
                **queued,
                "finished": finished,
                "state": run.get("state"),
                "error": run.get("error"),
                "ops": _op_results(run),
            }
        )
    elif finished:
        _report_ops(run)
    if not finished:
        _err().print(
            f"[yellow]timed out after {wait:g} s: the device has not answered "
            f"(run {_esc(run.get('state') or 'pending')})[/]; the operation stays queued: "
            f"`custos cmd show {cid}`"
        )
        raise typer.Exit(EXIT_TIMED_OUT)
    raise typer.Exit(0 if run.get("state") == "succeeded" else 1)


def _wait_run(c: AdminClient, cid: str, limit: float) -> tuple[dict[str, Any], bool]:
    """The command's single run once it is final (or when the limit passes)."""
    try:
        detail, finished = _wait(c, cid, limit)
    except KeyboardInterrupt:
        _err().print(f"\nStopped waiting; the operation stays queued: `custos cmd show {cid}`")
        raise typer.Exit(130) from None
    runs = detail.get("runs") or []
    run: dict[str, Any] = runs[0] if runs else {}
    return run, finished and run.get("state") in TERMINAL_STATES


def _node(node: str, what: str = "NODE") -> str:
    try:
        return check_node(node, what)
    except ValueError as exc:
        fail(str(exc), code=2)


def omadm_get(
    device: DeviceArg,
    node: NodeArg,
    wait: WaitOpt = 0,
    notify: NotifyOpt = True,
    json_out: JsonOpt = False,
) -> None:
    """Read a node (Get); with --wait, print its value once the device answers."""
    _queue(
        device,
        [{"verb": "Get", "target": _node(node)}],
        wait=wait,
        notify=notify,
        json_out=json_out,
    )


def omadm_set(
    device: DeviceArg,
    node: NodeArg,
    value: Annotated[str, typer.Argument(metavar="VALUE")],
    fmt: Annotated[
        str | None,
        typer.Option("--format", help="chr (default), int, bool, b64, xml or float"),
    ] = None,
    mime: Annotated[
        str | None, typer.Option("--type", metavar="MIME", help="the value's type, e.g. text/plain")
    ] = None,
    add: Annotated[bool, typer.Option("--add", help="create the node (Add, not Replace)")] = False,
    wait: WaitOpt = 0,
    notify: NotifyOpt = True,
    json_out: JsonOpt = False,
) -> None:
    """Set a node's value (Replace, or Add with --add)."""
    if fmt is not None and fmt not in FORMATS:
        fail(f"--format is one of {', '.join(FORMATS)}", code=2)
    if mime is not None and not (0 < len(mime) <= 200 and mime.isprintable()):
        fail("--type is a MIME type of at most 200 printable characters", code=2)
    target = _node(node)
    try:
        check_value(value, fmt)
    except ValueError as exc:
        fail(str(exc), code=2)
    op: dict[str, Any] = {"verb": "Add" if add else "Replace", "target": target, "data": value}
    if fmt is not None:
        op["format"] = fmt
    if mime is not None:
        op["type"] = mime
    _queue(device, [op], wait=wait, notify=notify, json_out=json_out)


def omadm_delete(
    device: DeviceArg,
    node: NodeArg,
    wait: WaitOpt = 0,
    notify: NotifyOpt = True,
    json_out: JsonOpt = False,
) -> None:
    """Delete a node (and what is under it)."""
    _queue(
        device,
        [{"verb": "Delete", "target": _node(node)}],
        wait=wait,
        notify=notify,
        json_out=json_out,
    )


def omadm_exec(
    device: DeviceArg,
    node: NodeArg,
    data: Annotated[
        str | None, typer.Argument(metavar="[DATA]", help="argument passed with the Exec")
    ] = None,
    wait: WaitOpt = 0,
    notify: NotifyOpt = True,
    json_out: JsonOpt = False,
) -> None:
    """Execute a node (e.g. a reboot or a firmware update's Download)."""
    op: dict[str, Any] = {"verb": "Exec", "target": _node(node)}
    if data is not None:
        try:
            op["data"] = check_value(data, None)
        except ValueError as exc:
            fail(str(exc).replace("VALUE", "DATA"), code=2)
    _queue(device, [op], wait=wait, notify=notify, json_out=json_out)


def omadm_alert(
    device: DeviceArg,
    text: Annotated[str, typer.Argument(help="what the user is shown")],
    confirm: Annotated[bool, typer.Option("--confirm", help="a yes/no question")] = False,
    text_input: Annotated[bool, typer.Option("--input", help="ask for a line of text")] = False,
    choice: Annotated[
        list[str] | None, typer.Option("--choice", help="a choice (repeat; at least two)")
    ] = None,
    multi: Annotated[bool, typer.Option("--multi", help="several choices allowed")] = False,
    min_display: Annotated[
        int | None, typer.Option("--min-display", min=1, max=3600, help="seconds shown at least")
    ] = None,
    max_display: Annotated[
        int | None, typer.Option("--max-display", min=1, max=86400, help="seconds until it goes")
    ] = None,
    wait: WaitOpt = 0,
    notify: NotifyOpt = True,
    json_out: JsonOpt = False,
) -> None:
    """Show the device's user a message or ask something (OMA DM Alerts 1100-1104).

    With --wait, exit 0 when the user accepted (for --confirm: said yes), 1 otherwise; the
    typed text or chosen item numbers go to stdout.
    """
    kinds = [k for k, on in (("confirm", confirm), ("input", text_input)) if on]
    if choice:
        kinds.append("multi" if multi else "single")
    elif multi:
        fail("--multi needs --choice", code=2)
    if len(kinds) > 1:
        fail("choose one of --confirm, --input, --choice", code=2)
    if choice is not None and len(choice) < 2:
        fail("give at least two --choice", code=2)
    body: dict[str, Any] = {"kind": kinds[0] if kinds else "display", "text": text}
    if choice:
        body["choices"] = choice
    if min_display:
        body["min_display_s"] = min_display
    if max_display:
        body["max_display_s"] = max_display
    _queue(device, [], wait=wait, notify=notify, json_out=json_out, alert=body)


def omadm_rotate(
    device: DeviceArg, wait: WaitOpt = 0, notify: NotifyOpt = True, json_out: JsonOpt = False
) -> None:
    """Give the device new DM account secrets over the protocol (its DMAcc).

    The server finds the device's account for its ServerID and replaces the client's and
    the server's secrets and nonces in one Atomic; the new ones take effect only once the
    device has accepted all of it, and are never shown. With --wait, exit 0 once done.
    """
    _queue(device, [], wait=wait, notify=notify, json_out=json_out, rotate=True)


def omadm_notify(device: DeviceArg, json_out: JsonOpt = False) -> None:
    """Send package #0 now so the device opens a session; exit 1 if it was not delivered."""
    with _client() as c:
        out = c.post(f"{BASE}/{_seg(device)}/notify")
    if json_out:
        print_json(out)
    elif out.get("sent"):
        _err().print(f"[green]{_esc(out.get('detail'))}[/]")
    else:
        _err().print(f"[red]package #0 not delivered: {_esc(out.get('detail'))}[/]")
    if not out.get("sent"):
        raise typer.Exit(1)


# --------------------------------------------------------------------------- wiring


def register(app: typer.Typer) -> None:
    """Add the omadm command group."""
    omadm = typer.Typer(
        help="OMA DM (SyncML DM 1.2) devices: enrolment, node operations, package #0.",
        no_args_is_help=True,
    )
    omadm.command("enroll")(omadm_enroll)
    omadm.command("ls")(omadm_ls)
    omadm.command("get")(omadm_get)
    omadm.command("set")(omadm_set)
    omadm.command("delete")(omadm_delete)
    omadm.command("exec")(omadm_exec)
    omadm.command("alert")(omadm_alert)
    omadm.command("notify")(omadm_notify)
    omadm.command("rotate")(omadm_rotate)
    app.add_typer(omadm, name="omadm")
