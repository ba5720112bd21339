"""Reports over a small fleet built through the real protocol — SQLite and PostgreSQL.

Devices enrol and send their inventories by check-in, exactly as agents do; the reports
then read what the check-in path wrote (installed_software included).
"""

from __future__ import annotations

import asyncio
import csv
import io
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import event, select, update

from custos.db.base import utcnow
from custos.devices.models import Device
from custos.reports.models import installed_software

PW = "correct-horse-9"
INJECTED = '=HYPERLINK("http://evil.example","x")'


async def send_inventory(dev: Any, inv: dict[str, str], *, base: int = 0, full: bool = True) -> int:
    r = await dev.checkin({"inventory": {"base": base, "full": full, "set": inv}})
    assert not r["inventory_resync"], r
    return int(r["inventory_version"])


def hw(os_name: str, maker: str, model: str) -> dict[str, str]:
    return {"os.name": os_name, "os.version": "12", "hw.manufacturer": maker, "hw.model": model}


async def group(api: Any, name: str, *devices: Any) -> None:
    r = await api.post("/api/v1/groups", json={"name": name})
    assert r.status_code == 201, r.text
    ids = [d.device_id for d in devices]
    r = await api.post(f"/api/v1/groups/{name}/devices", json={"devices": ids})
    assert r.status_code == 200, r.text


async def fleet(api: Any) -> dict[str, Any]:
    """alpha, charlie in group berlin; bravo in paris; delta retired (had curl)."""
    alpha = await api.new_device("alpha-1")
    await send_inventory(
        alpha,
        {
            **hw("Debian", "LENOVO", "ThinkPad T14"),
            "sw.dpkg.curl": "7.88.1-10+deb12u5",
            "sw.dpkg.git": "1:2.39.2-1.1",
            "sw.pip.requests": "2.31.0",
        },
    )
    bravo = await api.new_device("Bravo-2")
    await send_inventory(
        bravo,
        {
            **hw("Ubuntu", "Dell Inc.", "OptiPlex 7090"),
            "sw.dpkg.curl": "8.5.0-2ubuntu10",
            f"sw.dpkg.{INJECTED}": "-2+3",
        },
    )
    charlie = await api.new_device("charlie-3")
    await send_inventory(
        charlie, {**hw("Debian", "LENOVO", "ThinkPad T14"), "sw.dpkg.git": "1:2.30.2-1"}
    )
    delta = await api.new_device("delta-4")
    await send_inventory(delta, {**hw("Debian", "LENOVO", "X1"), "sw.dpkg.curl": "8.5.0"})
    r = await api.post(f"/api/v1/devices/{delta.device_id}/retire")
    assert r.status_code == 200, r.text
    await group(api, "berlin", alpha, charlie)
    await group(api, "paris", bravo)
    return {"alpha": alpha, "bravo": bravo, "charlie": charlie, "delta": delta}


async def user(api: Any, username: str, roles: list[str], **body: Any) -> dict[str, str]:
    r = await api.post(
        "/api/v1/users", json={"username": username, "password": PW, "roles": roles, **body}
    )
    assert r.status_code == 201, r.text
    r = await api.http.post("/api/v1/auth/login", json={"username": username, "password": PW})
    assert r.status_code == 200, r.text
    return {"authorization": f"Bearer {r.json()['token']}"}


async def rows_of(api: Any, device_id: str) -> dict[tuple[str, str], str]:
    async with api.services.db.read() as s:
        got = await s.execute(
            select(installed_software).where(installed_software.c.device_id == device_id)
        )
        return {(r.source, r.name): r.version for r in got}


def parse_csv(text: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(text)))


@contextmanager
def counting(api: Any) -> Iterator[list[str]]:
    """Statements run by this task (the reports run in the caller's task)."""
    engine = api.services.db.engine.sync_engine
    me = asyncio.current_task()
    seen: list[str] = []

    def hook(_c: Any, _cur: Any, statement: str, *_: Any) -> None:
        if asyncio.current_task() is me:
            seen.append(statement)

    event.listen(engine, "before_cursor_execute", hook)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", hook)


# ------------------------------------------------------------------ installed_software


async def test_installed_software_follows_full_inventories_and_deltas(api):
    dev = await api.new_device("inv")
    long_name = "x" * 300  # too long to index: left out, never an error
    v = await send_inventory(
        dev,
        {
            "os.name": "Debian",
            "sw.dpkg.curl": "7.88",
            "sw.dpkg.git": "2.39",
            "sw.macapp.com.apple.Safari": "17.1",
            f"sw.dpkg.{long_name}": "1",
            "sw.nodots": "1",
            "hw.model": "X",
        },
    )
    assert await rows_of(api, dev.device_id) == {
        ("dpkg", "curl"): "7.88",
        ("dpkg", "git"): "2.39",
        ("macapp", "com.apple.Safari"): "17.1",  # the name keeps its dots
    }
    # a delta: one change, one addition, one removal, one non-software key
    delta = {
        "base": v,
        "set": {"sw.dpkg.curl": "8.0", "sw.pip.requests": "2.31", "os.name": "Ubuntu"},
        "remove": ["sw.dpkg.git"],
    }
    r = await dev.checkin({"inventory": delta})
    assert not r["inventory_resync"]
    assert await rows_of(api, dev.device_id) == {
        ("dpkg", "curl"): "8.0",
        ("pip", "requests"): "2.31",
        ("macapp", "com.apple.Safari"): "17.1",
    }
    # a delta against a stale base changes nothing (the agent resends in full)
    stale = {"base": 0, "set": {"sw.dpkg.vim": "9"}, "remove": []}
    assert (await dev.checkin({"inventory": stale}))["inventory_resync"]
    assert ("dpkg", "vim") not in await rows_of(api, dev.device_id)
    # a full inventory replaces everything
    await send_inventory(dev, {"sw.rpm.bash": "5.2", "sw.dpkg.curl": "8.1" + "9" * 400})
    rows = await rows_of(api, dev.device_id)
    assert set(rows) == {("rpm", "bash"), ("dpkg", "curl")}
    assert rows[("dpkg", "curl")] == ("8.1" + "9" * 400)[:255]  # cut to the indexed width
    # the history and the inventory itself are untouched by the hook
    shown = (await api.get(f"/api/v1/devices/{dev.device_id}")).json()
    assert shown["inventory"]["sw.dpkg.curl"] == "8.1" + "9" * 400


async def test_a_delta_costs_at_most_three_statements_for_the_software_rows(api):
    dev = await api.new_device("budget")
    v = await send_inventory(dev, {f"sw.dpkg.p{i}": "1.0" for i in range(50)})
    delta = {
        "base": v,
        "set": {**{f"sw.dpkg.p{i}": "2.0" for i in range(20)}, "sw.pip.new": "1"},
        "remove": [f"sw.dpkg.p{i}" for i in range(40, 50)],
    }
    with counting(api) as seen:
        r = await dev.checkin({"inventory": delta})
    assert not r["inventory_resync"]
    ours = [s for s in seen if "installed_software" in s]
    assert 1 <= len(ours) <= 3, ours
    rows = await rows_of(api, dev.device_id)
    assert len(rows) == 41 and rows[("dpkg", "p0")] == "2.0" and rows[("pip", "new")] == "1"


# ------------------------------------------------------------------ software reports


async def test_who_has_versions_and_lacks(api):
    f = await fleet(api)
    r = await api.get("/api/v1/reports/software/who-has", params={"name": "curl"})
    assert r.status_code == 200, r.text
    body = r.json()
    # the retired device is left out; order is by name, case-insensitively
    assert [x["device_name"] for x in body["items"]] == ["alpha-1", "Bravo-2"]
    assert body["total"] == 2
    assert body["items"][1]["version"] == "8.5.0-2ubuntu10"
    r = await api.get(
        "/api/v1/reports/software/who-has", params={"name": "curl", "version_prefix": "8."}
    )
    assert [x["device_name"] for x in r.json()["items"]] == ["Bravo-2"]
    r = await api.get(
        "/api/v1/reports/software/who-has", params={"name": "curl", "version": "7.88.1"}
    )
    assert r.json()["total"] == 0  # exact means exact
    r = await api.get("/api/v1/reports/software/who-has", params={"name": "git", "source": "pip"})
    assert r.json()["items"] == []
    r = await api.get("/api/v1/reports/software/who-has", params={"name": "curl", "limit": 1})
    assert len(r.json()["items"]) == 1 and r.json()["total"] == 2

    r = await api.get("/api/v1/reports/software/versions", params={"name": "git"})
    assert sorted((x["version"], x["devices"]) for x in r.json()) == [
        ("1:2.30.2-1", 1),
        ("1:2.39.2-1.1", 1),
    ]

    r = await api.get("/api/v1/reports/software/lacks", params={"name": "curl"})
    assert [x["device_name"] for x in r.json()["items"]] == ["charlie-3"]
    assert r.json()["items"][0]["installed_version"] is None
    # below a minimum: epoch-aware natural comparison (1:2.30 < 2.35 < 1:2.39)
    r = await api.get(
        "/api/v1/reports/software/lacks", params={"name": "git", "min_version": "1:2.35"}
    )
    got = {x["device_name"]: x["installed_version"] for x in r.json()["items"]}
    assert got == {"Bravo-2": None, "charlie-3": "1:2.30.2-1"}
    assert r.json()["total"] == 2
    assert f["delta"].device_id not in str(r.json())


async def test_top_software_reads_the_summary_until_refreshed(api):
    # however long ago the template database was migrated, the summary is not yet due
    api.services.reports.summary_max_age_s = 10**9
    await fleet(api)
    live = (await api.get("/api/v1/reports/software/top", params={"live": "true"})).json()
    assert live["live"] is True
    counts = {(x["source"], x["name"]): x["devices"] for x in live["items"]}
    assert counts[("dpkg", "curl")] == 2 and counts[("dpkg", "git")] == 2
    assert live["items"][0]["devices"] == 2
    # the summary was made before these devices existed
    stale = (await api.get("/api/v1/reports/software/top")).json()
    assert stale["live"] is False and stale["items"] == []
    assert await api.services.reports.refresh_summary() is False  # not due yet
    assert await api.services.reports.refresh_summary(force=True) is True
    fresh = (await api.get("/api/v1/reports/software/top", params={"limit": 3})).json()
    assert fresh["live"] is False and len(fresh["items"]) == 3
    assert {(x["source"], x["name"]): x["devices"] for x in fresh["items"]}.items() <= (
        counts.items()
    )
    assert fresh["as_of"] > stale["as_of"]


# ------------------------------------------------------------------ devices, hardware, errors


async def test_not_seen_and_hardware(api):
    f = await fleet(api)
    await api.services.checkin.flush_last_seen()
    never = await api.new_device("echo-5")  # enrolled, never checked in
    async with api.services.db.transaction() as uow:
        await uow.session.execute(
            update(Device)
            .where(Device.id == f["charlie"].device_id)
            .values(last_seen=utcnow() - timedelta(days=40))
        )
    r = await api.get("/api/v1/reports/not-seen", params={"days": 30})
    body = r.json()
    assert [x["device_name"] for x in body["items"]] == ["echo-5", "charlie-3"]
    assert body["items"][0]["days_since"] is None and body["items"][0]["last_seen"] is None
    assert 39.9 < body["items"][1]["days_since"] < 40.1
    assert body["items"][1]["model"] == "ThinkPad T14"
    assert never.device_id == body["items"][0]["device_id"]

    r = await api.get("/api/v1/reports/hardware")
    models = {(x["manufacturer"], x["model"]): x for x in r.json()}
    assert models[("LENOVO", "ThinkPad T14")]["devices"] == 2
    assert models[("Dell Inc.", "OptiPlex 7090")]["devices"] == 1
    assert ("LENOVO", "X1") not in models  # retired
    assert 0 <= models[("LENOVO", "ThinkPad T14")]["oldest_days"] < 1
    assert models[("LENOVO", "ThinkPad T14")]["mean_days"] >= 0


async def test_command_and_install_errors(api, tmp_path):
    from test_software import cpkg, manager, take_software, upload

    f = await fleet(api)
    cmd = await api.command("alpha-1", kind="exec", argv=["false"])
    run_id = cmd["runs"][0]["id"]
    result = {"run_id": run_id, "state": "failed", "exit_code": 1, "stderr": "nope"}
    await f["alpha"].checkin({"acks": [run_id]})
    await f["alpha"].checkin({"results": [result]})
    ok = await api.command("alpha-1", kind="exec", argv=["true"])
    good = {"run_id": ok["runs"][0]["id"], "state": "succeeded", "exit_code": 0}
    await f["alpha"].checkin({"results": [good]})

    await upload(api, cpkg(tmp_path / "bad.cpkg", "1.0", tmp_path / "t.bin", b"x", fail=True))
    r = await api.post(
        "/api/v1/deployments", json={"package": "tool", "targets": {"devices": ["Bravo-2"]}}
    )
    assert r.status_code == 201, r.text
    await take_software(api, f["bravo"], manager(f["bravo"], tmp_path))

    r = await api.get("/api/v1/reports/errors", params={"kind": "commands"})
    items = r.json()["items"]
    assert [(x["run_id"], x["state"], x["exit_code"]) for x in items] == [(run_id, "failed", 1)]
    assert items[0]["device_name"] == "alpha-1" and items[0]["kind"] == "exec"
    r = await api.get("/api/v1/reports/errors", params={"kind": "installs"})
    items = r.json()["items"]
    assert [(x["device_name"], x["package_name"], x["state"]) for x in items] == [
        ("Bravo-2", "tool", "failed")
    ]
    later = (utcnow() + timedelta(minutes=5)).isoformat()
    r = await api.get("/api/v1/reports/errors", params={"kind": "commands", "since": later})
    assert r.json()["total"] == 0
    csv_rows = parse_csv((await api.get("/api/v1/reports/errors.csv?kind=installs")).text)
    assert csv_rows[0][:3] == ["deployment_id", "deployment_name", "package_name"]
    assert len(csv_rows) == 2 and csv_rows[1][5] == "Bravo-2"


async def test_device_page_filters_sorts_and_pages(api):
    await fleet(api)
    get = api.get
    r = await get("/api/v1/reports/devices")
    body = r.json()
    assert [d["name"] for d in body["items"]] == ["alpha-1", "Bravo-2", "charlie-3", "delta-4"]
    assert body["total"] == 4 and body["total_is_estimate"] is False
    assert body["items"][0]["groups"] == ["berlin"] and body["items"][0]["os_name"] == "Debian"
    r = await get("/api/v1/reports/devices", params={"status": "active", "os": "Debian"})
    assert [d["name"] for d in r.json()["items"]] == ["alpha-1", "charlie-3"]
    r = await get("/api/v1/reports/devices", params={"model": "OptiPlex 7090"})
    assert [d["name"] for d in r.json()["items"]] == ["Bravo-2"]
    r = await get("/api/v1/reports/devices", params={"group": "berlin", "sort": "name"})
    assert [d["name"] for d in r.json()["items"]] == ["alpha-1", "charlie-3"]
    r = await get("/api/v1/reports/devices", params={"q": "RAV"})
    assert [d["name"] for d in r.json()["items"]] == ["Bravo-2"]
    r = await get("/api/v1/reports/devices", params={"q": "%"})  # a literal percent sign
    assert r.json()["items"] == []
    r = await get("/api/v1/reports/devices", params={"sort": "name", "order": "desc", "limit": 2})
    body = r.json()
    assert [d["name"] for d in body["items"]] == ["delta-4", "charlie-3"] and body["total"] == 4
    r = await get("/api/v1/reports/devices", params={"limit": 2, "offset": 2})
    assert [d["name"] for d in r.json()["items"]] == ["charlie-3", "delta-4"]
    # last_seen: never-seen counts as the oldest in both directions
    never = await api.new_device("zulu-9")
    await api.services.checkin.flush_last_seen()
    r = await get("/api/v1/reports/devices", params={"sort": "last_seen", "order": "desc"})
    assert r.json()["items"][-1]["id"] == never.device_id
    r = await get("/api/v1/reports/devices", params={"sort": "last_seen"})
    assert r.json()["items"][0]["id"] == never.device_id


async def test_device_page_has_a_fixed_statement_budget(api):
    first = await api.new_device("d00")
    await group(api, "g", first)

    async def statements() -> int:
        with counting(api) as seen:
            page = await api.services.reports.devices_page(None, q="d", limit=100)
        assert page.total == len(page.items)
        return len(seen)

    small = await statements()
    assert small <= 3
    for i in range(1, 12):
        dev = await api.new_device(f"d{i:02d}")
        r = await api.post("/api/v1/groups/g/devices", json={"devices": [dev.device_id]})
        assert r.status_code == 200
    assert await statements() == small


# ------------------------------------------------------------------ scope, permission, CSV


async def test_a_scoped_caller_never_sees_devices_outside_its_groups(api):
    f = await fleet(api)
    op = await user(api, "op-berlin", ["operator"], groups=["berlin"])
    http = api.http
    paris = f["bravo"].device_id

    async def get(path: str, **params: Any) -> Any:
        r = await http.get(path, params=params, headers=op)
        assert r.status_code == 200, r.text
        return r

    body = (await get("/api/v1/reports/devices")).json()
    assert [d["name"] for d in body["items"]] == ["alpha-1", "charlie-3"] and body["total"] == 2
    assert (await get("/api/v1/reports/devices", group="paris")).json()["items"] == []
    body = (await get("/api/v1/reports/software/who-has", name="curl")).json()
    assert [x["device_name"] for x in body["items"]] == ["alpha-1"] and body["total"] == 1
    versions = (await get("/api/v1/reports/software/versions", name="curl")).json()
    assert [v["devices"] for v in versions] == [1]
    lacks = (await get("/api/v1/reports/software/lacks", name="curl")).json()
    assert [x["device_name"] for x in lacks["items"]] == ["charlie-3"]
    top = (await get("/api/v1/reports/software/top")).json()
    assert top["live"] is True  # a scoped caller is counted live, over its own devices
    assert {(x["name"], x["devices"]) for x in top["items"]} >= {("curl", 1), ("git", 2)}
    assert INJECTED not in str(top)
    hardware = (await get("/api/v1/reports/hardware")).json()
    assert [(x["model"], x["devices"]) for x in hardware] == [("ThinkPad T14", 2)]
    not_seen = (await get("/api/v1/reports/not-seen", days=0)).json()
    assert {x["device_name"] for x in not_seen["items"]} <= {"alpha-1", "charlie-3"}
    for path in (
        "/api/v1/reports/devices.csv",
        "/api/v1/reports/software/who-has.csv?name=curl",
        "/api/v1/reports/not-seen.csv?days=0",
        "/api/v1/reports/errors.csv",
    ):
        r = await http.get(path, headers=op)
        assert r.status_code == 200 and paris not in r.text and "Bravo" not in r.text, path

    # without reports.view: refused
    r = await api.post("/api/v1/roles", json={"name": "looker", "permissions": ["devices.view"]})
    assert r.status_code == 201, r.text
    looker = await user(api, "looker", ["looker"])
    r = await http.get("/api/v1/reports/devices", headers=looker)
    assert r.status_code == 403 and r.json()["error"] == "forbidden"
    assert (await http.get("/api/v1/reports/hardware")).status_code == 401


async def test_csv_exports_and_the_formula_guard(api):
    await fleet(api)
    # last-seen is flushed in the background: flush now so two reads below see the same rows
    await api.services.checkin.flush_last_seen()
    r = await api.get("/api/v1/reports/software/who-has.csv", params={"name": INJECTED})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/csv")
    disposition = r.headers["content-disposition"]
    assert (
        disposition.startswith('attachment; filename="custos-who-has-') and "(" not in disposition
    )
    rows = parse_csv(r.text)
    assert rows[0] == ["device_id", "device_name", "source", "name", "version", "last_seen"]
    assert rows[1][3] == "'" + INJECTED and rows[1][4] == "'-2+3"
    same = await api.get(
        "/api/v1/reports/software/who-has", params={"name": INJECTED, "format": "csv"}
    )
    assert parse_csv(same.text) == rows

    rows = parse_csv((await api.get("/api/v1/reports/devices.csv")).text)
    assert rows[0][:3] == ["id", "name", "status"] and rows[0][-1] == "groups"
    assert [x[1] for x in rows[1:]] == ["alpha-1", "Bravo-2", "charlie-3", "delta-4"]
    assert rows[1][-1] == "berlin"
    for path, first in (
        ("/api/v1/reports/software/versions.csv?name=curl", ["source", "version", "devices"]),
        ("/api/v1/reports/software/lacks.csv?name=git&min_version=2", None),
        ("/api/v1/reports/software/top.csv?live=true", ["source", "name", "devices", "versions"]),
        ("/api/v1/reports/hardware.csv", None),
        ("/api/v1/reports/not-seen.csv?days=0", None),
        ("/api/v1/reports/errors.csv?kind=commands", None),
    ):
        r = await api.get(path)
        assert r.status_code == 200, (path, r.text)
        rows = parse_csv(r.text)
        if first:
            assert rows[0] == first, path
        assert all(not c.startswith(("=", "+", "-", "@")) for row in rows for c in row), path
    top = parse_csv((await api.get("/api/v1/reports/software/top.csv?live=true")).text)
    assert ["dpkg", "'" + INJECTED, "1", "1"] in top


async def test_bad_report_requests_are_clear_4xx(api):
    cases = [
        ("/api/v1/reports/devices", {"sort": "cert_pem"}),
        ("/api/v1/reports/devices", {"order": "sideways"}),
        ("/api/v1/reports/devices", {"limit": 0}),
        ("/api/v1/reports/devices", {"limit": 5000}),
        ("/api/v1/reports/software/who-has", {}),
        ("/api/v1/reports/software/who-has", {"name": "x" * 300}),
        ("/api/v1/reports/software/who-has", {"name": "curl", "source": "a b"}),
        ("/api/v1/reports/not-seen", {"days": -1}),
        ("/api/v1/reports/errors", {"kind": "everything"}),
        ("/api/v1/reports/errors", {"since": "2026-01-01T00:00:00"}),  # no time zone
        ("/api/v1/reports/devices", {"format": "xlsx"}),
    ]
    for path, params in cases:
        r = await api.get(path, params=params)
        assert r.status_code == 422, (path, params, r.text)
        assert set(r.json()) == {"error", "detail"}


# ------------------------------------------------------------------ the SQL views


VIEWS = {
    "v_devices": {"device_id", "name", "status", "os_name", "model", "last_seen"},
    "v_groups": {"group_id", "name"},
    "v_device_groups": {"device_id", "group_id", "group_name"},
    "v_installed_software": {"device_id", "source", "name", "version"},
    "v_inventory": {"device_id", "key", "value"},
    "v_command_runs": {"run_id", "command_id", "device_id", "kind", "state", "exit_code"},
    "v_packages": {"package_id", "name", "version"},
    "v_deployments": {"deployment_id", "name", "package_name", "state"},
    "v_deployment_results": {"deployment_id", "device_id", "state", "package_version"},
}


async def test_views_have_their_documented_columns(api):
    f = await fleet(api)
    await api.command("alpha-1", kind="ping")
    from sqlalchemy import text

    async with api.services.db.read() as s:
        for view, columns in VIEWS.items():
            res = await s.execute(text(f"SELECT * FROM {view}"))
            assert columns <= set(res.keys()), view
        got = await s.execute(
            text(
                "SELECT d.name, s.version FROM v_installed_software s "
                "JOIN v_devices d ON d.device_id = s.device_id "
                "WHERE s.name = 'curl' AND d.status = 'active'"
            )
        )
        assert sorted(tuple(r) for r in got) == [
            ("Bravo-2", "8.5.0-2ubuntu10"),
            ("alpha-1", "7.88.1-10+deb12u5"),
        ]
        inv = await s.execute(
            text("SELECT value FROM v_inventory WHERE device_id = :d AND key = 'hw.model'"),
            {"d": f["alpha"].device_id},
        )
        assert inv.scalar() == "ThinkPad T14"
        runs = await s.execute(text("SELECT kind, state FROM v_command_runs"))
        assert [tuple(r) for r in runs] == [("ping", "queued")]


@pytest.mark.postgres
@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)  # roles are PostgreSQL's
async def test_reporting_role_reads_views_only(db_url, api):
    import asyncpg

    await fleet(api)
    role = f"custos_rt_{uuid.uuid4().hex[:10]}"
    secret = uuid.uuid4().hex
    dsn = db_url.replace("postgresql+asyncpg://", "postgresql://")
    admin = await asyncpg.connect(dsn)
    try:
        await admin.execute(
            f"CREATE ROLE {role} LOGIN PASSWORD '{secret}' IN ROLE custos_reporting"
        )
        host_db = dsn.split("@", 1)[1]
        conn = await asyncpg.connect(f"postgresql://{role}:{secret}@{host_db}")
        try:
            n = await conn.fetchval("SELECT count(*) FROM v_installed_software")
            assert n >= 5
            assert await conn.fetchval("SELECT count(*) FROM v_devices") == 4
            for sql in (
                "SELECT count(*) FROM devices",
                "SELECT count(*) FROM api_tokens",
                "SELECT count(*) FROM installed_software",
                "DELETE FROM v_devices",
                "UPDATE v_installed_software SET version = 'x'",
                "INSERT INTO v_groups (group_id, name) VALUES (999, 'x')",
                "CREATE TABLE sneaky (x int)",
            ):
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await conn.execute(sql)
        finally:
            await conn.close()
    finally:
        await admin.execute(f"DROP ROLE IF EXISTS {role}")
        await admin.close()


async def test_who_has_pages_the_same_whichever_way_it_finds_the_holders(api, monkeypatch):
    from custos.reports import service

    await fleet(api)
    await api.services.checkin.flush_last_seen()  # no background write between the two reads
    for name in ("curl", "git"):
        found = await api.services.reports.who_has(None, name, limit=1, offset=1)
        monkeypatch.setattr(service, "FEW_HOLDERS", 0)  # walk the devices in name order
        walked = await api.services.reports.who_has(None, name, limit=1, offset=1)
        monkeypatch.setattr(service, "FEW_HOLDERS", 2_000)
        assert walked == found and found.total == 2 and len(found.items) == 1


async def test_fleet_snapshots_once_per_period_and_history(api: Any) -> None:
    from datetime import timedelta

    from custos.db.base import utcnow

    reports = api.services.reports
    await api.new_device("snap-1")
    await api.new_device("snap-2")
    now = utcnow()
    # one row per period whoever writes it; a second process finds it taken
    assert await reports.snapshot_fleet(online_within_s=300, period_s=900, now=now)
    assert not await reports.snapshot_fleet(online_within_s=300, period_s=900, now=now)
    later = now + timedelta(seconds=900)
    assert await reports.snapshot_fleet(online_within_s=300, period_s=900, now=later)
    points = await reports.fleet_history(1)
    assert len(points) >= 1 and all(p.total == 2 for p in points)
    assert all(p.online + p.offline == p.total for p in points)
    # far in the future, both devices count as offline
    future = now + timedelta(days=2)
    assert await reports.snapshot_fleet(online_within_s=300, period_s=900, now=future)
    async with api.services.db.read() as s:
        from sqlalchemy import select

        from custos.reports.models import fleet_snapshots

        rows = (await s.execute(select(fleet_snapshots).order_by(fleet_snapshots.c.at))).all()
    assert [r.online for r in rows][-1] == 0 and len(rows) == 3


async def test_fleet_history_api_is_fleet_wide_only(api: Any) -> None:
    await api.new_device("hist-1")
    assert await api.services.reports.snapshot_fleet(online_within_s=300, period_s=60)
    r = await api.get("/api/v1/reports/fleet-history", params={"days": 1})
    assert r.status_code == 200 and r.json()[-1]["total"] == 1
    r = await api.get("/api/v1/reports/fleet-history.csv", params={"days": 1})
    assert r.status_code == 200 and r.text.splitlines()[0] == "at,total,online,offline"
    assert (await api.get("/api/v1/reports/fleet-history", params={"days": 0})).status_code == 422
    assert (await api.post("/api/v1/groups", json={"name": "g"})).status_code == 201
    r = await api.post(
        "/api/v1/users",
        json={"username": "sc", "password": "scoped-pw-12", "roles": ["operator"], "groups": ["g"]},
    )
    assert r.status_code == 201
    tok = (
        await api.http.post(
            "/api/v1/auth/login", json={"username": "sc", "password": "scoped-pw-12"}
        )
    ).json()["token"]
    r = await api.http.get(
        "/api/v1/reports/fleet-history", headers={"authorization": f"Bearer {tok}"}
    )
    assert r.status_code == 403
