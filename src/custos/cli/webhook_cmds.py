"""`custos webhook …`: signed outbound webhooks and their delivery log (over the admin API)."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from custos.cli.admin_cmds import (
    JsonOpt,
    _client,
    _err,
    _esc,
    _out,
    _seg,
    _table,
    print_json,
    relative_time,
)

BASE = "/api/v1/webhooks"
STATE_COLOURS = {"delivered": "green", "pending": "yellow", "failed": "red"}


def delivery_summary(d: dict[str, Any]) -> str:
    """One line on how a delivery went: its state, the answer or the error, the attempts."""
    state = str(d["state"])
    parts = [state]
    if d.get("status_code") is not None:
        parts.append(f"HTTP {d['status_code']}")
    if d.get("duration_ms") is not None:
        parts.append(f"{d['duration_ms']} ms")
    if state != "delivered" and d.get("error"):
        parts.append(str(d["error"]))
    parts.append(f"attempt {d['attempts']}" if d["attempts"] == 1 else f"{d['attempts']} attempts")
    if state == "pending" and d.get("next_attempt_at"):
        parts.append(f"next try {relative_time(d['next_attempt_at'])}")
    return ", ".join(parts)


def webhook_add(
    name: Annotated[str, typer.Argument(help="a unique name: a-z, 0-9, '.', '_', '-'")],
    url: Annotated[str, typer.Argument(help="http(s) URL that receives the POSTs")],
    event: Annotated[
        list[str],
        typer.Option("--event", "-e", help="event to send (repeatable); * for every event"),
    ],
    secret: Annotated[
        str | None,
        typer.Option("--secret", help="signing secret (16+ characters); default: generated"),
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Add a webhook; its signing secret is printed this once only."""
    body: dict[str, Any] = {"name": name, "url": url, "events": event}
    if secret is not None:
        body["secret"] = secret
    with _client() as c:
        hook = c.post(BASE, body)
    if json_out:
        print_json(hook)
        return
    _err().print(
        f"Added webhook [bold]{_esc(hook['name'])}[/] → {_esc(hook['url'])} "
        f"({_esc(', '.join(hook['events']))})"
    )
    if secret is None:
        _err().print("Signing secret (shown only now; keep it with the receiver):")
        # on stdout alone, so `custos webhook add … > secret.txt` captures just the secret
        typer.echo(hook["secret"])


def webhook_ls(json_out: JsonOpt = False) -> None:
    """List webhooks with their pending and failed deliveries."""
    with _client() as c:
        hooks = c.get(BASE)
    if json_out:
        print_json(hooks)
        return
    t = _table("NAME", "URL", "EVENTS", "PENDING", "FAILED", "LAST", wrap=("URL", "EVENTS"))
    for h in hooks:
        t.add_row(
            _esc(h["name"]),
            _esc(h["url"]),
            _esc(", ".join(h["events"])),
            str(h["pending"]),
            f"[red]{h['failed']}[/]" if h["failed"] else "0",
            relative_time(h["last_delivery_at"]),
        )
    _out().print(t)


def webhook_rm(name: Annotated[str, typer.Argument()]) -> None:
    """Remove a webhook and its delivery log."""
    with _client() as c:
        c.request("DELETE", f"{BASE}/{_seg(name)}")
    _err().print(f"Removed webhook [bold]{_esc(name)}[/].")


def webhook_deliveries(
    name: Annotated[str, typer.Argument()],
    state: Annotated[
        str | None, typer.Option("--state", help="pending, delivered or failed")
    ] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=500)] = 50,
    json_out: JsonOpt = False,
) -> None:
    """A webhook's delivery log, newest first."""
    with _client() as c:
        rows = c.get(f"{BASE}/{_seg(name)}/deliveries", {"state": state, "limit": limit})
    if json_out:
        print_json(rows)
        return
    t = _table("ID", "EVENT", "STATE", "CODE", "TRIES", "CREATED", "ERROR", wrap=("ERROR",))
    for d in rows:
        colour = STATE_COLOURS.get(d["state"], "white")
        t.add_row(
            d["id"],
            _esc(d["event"]),
            f"[{colour}]{_esc(d['state'])}[/]",
            str(d["status_code"]) if d["status_code"] is not None else "-",
            str(d["attempts"]),
            relative_time(d["created_at"]),
            _esc(d["error"] if d["state"] != "delivered" else ""),
        )
    _out().print(t)


def _report(d: dict[str, Any], json_out: bool) -> None:
    if json_out:
        print_json(d)
    else:
        colour = STATE_COLOURS.get(d["state"], "white")
        _err().print(f"Delivery {d['id']}: [{colour}]{_esc(delivery_summary(d))}[/]")
    if d["state"] != "delivered":
        raise typer.Exit(1)


def webhook_test(name: Annotated[str, typer.Argument()], json_out: JsonOpt = False) -> None:
    """Send a `ping` event now; exit 1 when the receiver did not accept it."""
    with _client() as c:
        d = c.post(f"{BASE}/{_seg(name)}/test")
    _report(d, json_out)


def webhook_redeliver(
    delivery_id: Annotated[str, typer.Argument(help="an ID from `custos webhook deliveries`")],
    json_out: JsonOpt = False,
) -> None:
    """Send a past delivery's event again now (as a new delivery); exit 1 if not accepted."""
    with _client() as c:
        d = c.post(f"{BASE}/deliveries/{_seg(delivery_id)}/redeliver")
    _report(d, json_out)


def register(app: typer.Typer) -> None:
    """Add the webhook command group."""
    hook = typer.Typer(help="Signed outbound webhooks for server events.", no_args_is_help=True)
    hook.command("add")(webhook_add)
    hook.command("ls")(webhook_ls)
    hook.command("rm")(webhook_rm)
    hook.command("deliveries")(webhook_deliveries)
    hook.command("test")(webhook_test)
    hook.command("redeliver")(webhook_redeliver)
    app.add_typer(hook, name="webhook")
