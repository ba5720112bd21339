"""The audit log against real databases: recorded API calls, one chain under concurrency,
tampering detected, CSV export, and the offline `custos audit verify` — SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import csv
import io
import itertools
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from custos.audit.middleware import AuditMiddleware
from custos.audit.models import GENESIS_HASH
from custos.audit.service import AuditService, hash_csv_row
from custos.db.engine import Database

# ---------------------------------------------------------------------------- helpers


async def _raw(db_url: str, sql: str, *, superuser_bypass: bool = False) -> None:
    """Run SQL straight on the database, as someone with file or superuser access would."""
    if db_url.startswith("sqlite"):
        conn = sqlite3.connect(db_url.split(":///", 1)[1])
        try:
            conn.execute(sql)
            conn.commit()
        finally:
            conn.close()
        return
    pg = await asyncpg.connect(db_url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        async with pg.transaction():
            if superuser_bypass:
                # a superuser can switch triggers off for its session: the chain still tells
                await pg.execute("SET LOCAL session_replication_role = replica")
            await pg.execute(sql)
    finally:
        await pg.close()


async def _tamper(db_url: str, sql: str) -> None:
    """Change the log behind the service's back (on PostgreSQL past the append-only trigger)."""
    await _raw(db_url, sql, superuser_bypass=not db_url.startswith("sqlite"))


@pytest.fixture
async def audit(db_url):
    database = Database(db_url)
    yield AuditService(database)
    await database.dispose()


async def _fill(svc: AuditService, n: int) -> None:
    for i in range(n):
        await svc.record(
            "test.step",
            result="ok",
            actor="alice",
            actor_id=1,
            via="cli",
            target=f"thing:{i}",
            detail={"i": i},
        )


async def _all(api) -> list[dict]:
    r = await api.get("/api/v1/audit", params={"limit": 500})
    assert r.status_code == 200, r.text
    return r.json()["entries"]


# ---------------------------------------------------------------------------- over the API


async def test_api_calls_build_a_verified_chain(api):
    # the fixture's login is the first entry
    r = await api.post("/api/v1/groups", json={"name": "lab"})
    assert r.status_code == 201, r.text
    assert (await api.get("/api/v1/groups")).status_code == 200  # a read: not recorded
    r = await api.post("/api/v1/devices/nope/retire")
    assert r.status_code == 404
    r = await api.http.post("/api/v1/groups", json={"name": "x"})  # no token
    assert r.status_code == 401
    wrong = {"username": "admin", "password": "Wr0ng-pw-Q"}
    r = await api.http.post("/api/v1/auth/login", json=wrong)
    assert r.status_code == 401
    r = await api.post("/api/v1/groups", json={"name": "lab", "password": "Sekr1t-QQ"})  # invalid
    assert r.status_code == 422

    entries = list(reversed(await _all(api)))  # oldest first
    got = [(e["action"], e["actor"], e["target"], e["result"], e["status"]) for e in entries]
    assert got == [
        # logins carry the username tried, as actor and target, whether they worked or not
        ("auth.login", "admin", "user:admin", "ok", 200),
        ("group.create", "admin", "group:lab", "ok", 201),
        ("device.retire", "admin", "device:nope", "failed", 404),
        ("group.create", "", "", "denied", 401),
        ("auth.login", "admin", "user:admin", "denied", 401),
        ("group.create", "admin", "", "failed", 422),
    ]
    assert [e["id"] for e in entries] == [1, 2, 3, 4, 5, 6]
    assert entries[0]["prev_hash"] == GENESIS_HASH
    assert all(b["prev_hash"] == a["hash"] for a, b in itertools.pairwise(entries))
    retire = entries[2]
    assert retire["detail"] == {"status": 404, "error": "not_found"}
    assert retire["via"] == "token" and retire["actor_id"] is not None
    assert retire["remote"] == "127.0.0.1"
    assert entries[3]["via"] == "anonymous" and entries[3]["actor_id"] is None
    assert entries[3]["detail"]["error"] == "no_token"
    # nothing of any request body (here a password) reaches the log
    assert "Sekr1t-QQ" not in str(entries) and "Wr0ng-pw-Q" not in str(entries)
    assert entries[4]["detail"] == {"status": 401, "error": "bad_credentials", "channel": "token"}

    r = await api.get("/api/v1/audit/verify")
    assert r.status_code == 200
    assert r.json() == {
        "ok": True,
        "checked": 6,
        "first_bad_id": None,
        "reason": None,
        "head_id": 6,
        "head_hash": entries[-1]["hash"],
    }


async def test_permission_denied_is_recorded_with_the_actor(api):
    r = await api.post(
        "/api/v1/users",
        json={"username": "olga", "password": "operator-pw-1", "roles": ["operator"]},
    )
    assert r.status_code == 201, r.text
    r = await api.http.post(
        "/api/v1/auth/login", json={"username": "olga", "password": "operator-pw-1"}
    )
    assert r.status_code == 200, r.text
    olga = {"authorization": f"Bearer {r.json()['token']}"}
    r = await api.http.post(
        "/api/v1/users", json={"username": "eve", "password": "x" * 12}, headers=olga
    )
    assert r.status_code == 403
    # an operator may not read the log either
    assert (await api.http.get("/api/v1/audit", headers=olga)).status_code == 403

    entries = await _all(api)
    newest = entries[0]
    assert (newest["action"], newest["actor"]) == ("user.create", "olga")
    assert newest["result"] == "denied"
    assert newest["detail"] == {"status": 403, "error": "forbidden"}
    created = entries[2]
    assert (created["action"], created["target"], created["result"]) == (
        "user.create",
        "user:olga",
        "ok",
    )


async def test_device_traffic_is_not_recorded(api):
    dev = await api.new_device("box")
    for _ in range(3):
        await dev.checkin({})
    actions = [e["action"] for e in await _all(api)]
    # the login and the enrolment token the admin made; not the enrolment or the check-ins
    assert actions == ["enrollment_token.create", "auth.login"]


async def test_console_form_posts_are_recorded(api):
    r = await api.http.post("/console/login", data={"username": "admin", "password": "x"})
    assert r.status_code >= 400  # no sign-in form token: refused
    newest = (await _all(api))[0]
    assert (newest["action"], newest["actor"], newest["status"]) == (
        "auth.login",
        "",
        r.status_code,
    )
    assert newest["result"] in ("denied", "failed")


async def test_list_filters_and_pages(api):
    for name in ("g1", "g2", "g3"):
        assert (await api.post("/api/v1/groups", json={"name": name})).status_code == 201
    await api.post("/api/v1/devices/ghost/retire")

    async def listing(**params):
        r = await api.get("/api/v1/audit", params=params)
        assert r.status_code == 200, r.text
        return r.json()

    assert [e["target"] for e in (await listing(action="group"))["entries"]] == [
        "group:g3",
        "group:g2",
        "group:g1",
    ]
    assert (await listing(action="group.create", limit=1))["entries"][0]["target"] == "group:g3"
    assert [e["action"] for e in (await listing(result="failed"))["entries"]] == ["device.retire"]
    assert (await listing(actor="admin", action="auth"))["entries"][0]["action"] == "auth.login"
    assert (await listing(target="device:ghost"))["entries"][0]["status"] == 404
    assert (await listing(action="grou"))["entries"] == []  # a prefix is a whole dotted part

    first = await listing(limit=2)
    assert [e["id"] for e in first["entries"]] == [5, 4] and first["next_before_id"] == 4
    second = await listing(limit=2, before_id=first["next_before_id"])
    assert [e["id"] for e in second["entries"]] == [3, 2]
    third = await listing(limit=2, before_id=second["next_before_id"])
    assert [e["id"] for e in third["entries"]] == [1] and third["next_before_id"] is None

    newest_at = first["entries"][0]["at"]
    assert [e["id"] for e in (await listing(since=newest_at))["entries"]] == [5]
    assert 5 not in [e["id"] for e in (await listing(until=newest_at))["entries"]]

    for bad in ({"limit": 501}, {"result": "maybe"}, {"since": "2026-01-01T00:00:00"}):
        r = await api.get("/api/v1/audit", params=bad)
        assert r.status_code == 422, bad
        assert r.json()["error"] == "invalid_request"


async def test_csv_export_round_trips(api):
    await api.post("/api/v1/groups", json={"name": 'we,ird "name"'})  # refused: 422
    await api.post("/api/v1/groups", json={"name": "fine"})
    r = await api.get("/api/v1/audit.csv")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/csv")
    assert r.headers["content-disposition"].startswith('attachment; filename="custos-audit-')
    rows = list(csv.DictReader(io.StringIO(r.text)))
    entries = list(reversed(await _all(api)))
    assert [int(x["id"]) for x in rows] == [e["id"] for e in entries] == [1, 2, 3]
    for row, entry in zip(rows, entries, strict=True):
        # every row's hash is recomputable from the file alone, and the rows chain
        assert hash_csv_row(row) == row["hash"] == entry["hash"]
        assert row["prev_hash"] == entry["prev_hash"]
        assert row["action"] == entry["action"] and row["target"] == entry["target"]
    filtered = await api.get("/api/v1/audit.csv", params={"result": "failed"})
    lines = filtered.text.strip().splitlines()
    assert len(lines) == 2 and ",failed,422," in lines[1]


async def test_export_streams_in_batches(audit):
    await _fill(audit, 25)
    lines = [line async for line in audit.export_csv(batch=7)]
    assert len(lines) == 26
    body = list(csv.DictReader(io.StringIO("".join(lines))))
    assert [int(r["id"]) for r in body] == list(range(1, 26))
    assert all(hash_csv_row(r) == r["hash"] for r in body)
    only = [line async for line in audit.export_csv(action_prefix="test", target="thing:3")]
    assert len(only) == 2


# ---------------------------------------------------------------------------- the service


async def test_secrets_in_detail_are_dropped(audit):
    entry = await audit.record(
        "user.set_password",
        result="ok",
        actor="admin",
        via="token",
        target="user:bob",
        detail={"password": "hunter2", "otp": "123456", "api_token": "t", "changed": True},
    )
    assert entry.detail == {"changed": True}
    page = await audit.query(action_prefix="user")
    assert page.entries[0].detail == {"changed": True}
    assert (await audit.verify()).ok


async def test_record_refuses_unknown_result_and_via(audit):
    with pytest.raises(ValueError, match="result"):
        await audit.record("x", result="great")
    with pytest.raises(ValueError, match="via"):
        await audit.record("x", result="ok", via="telepathy")
    assert (await audit.query()).entries == []


async def test_concurrent_appends_from_two_processes_form_one_chain(db_url):
    # two Database objects: two connection pools (and on SQLite two write locks), as two
    # server processes have
    a, b = Database(db_url), Database(db_url)
    try:
        sa, sb = AuditService(a), AuditService(b)
        jobs = []
        for i in range(40):
            jobs.append(sa.record("test.a", result="ok", target=str(i), via="system"))
            jobs.append(sb.record("test.b", result="ok", target=str(i), via="system"))
        written = await asyncio.gather(*jobs)
        assert sorted(e.id for e in written) == list(range(1, 81))
        report = await sa.verify()
        assert report.ok and report.checked == 80, report
        prevs = [e.prev_hash for e in written]
        assert len(set(prevs)) == 80  # no two entries claim the same predecessor
    finally:
        await a.dispose()
        await b.dispose()


async def test_verify_reads_in_batches_and_reports_progress(audit):
    await _fill(audit, 23)
    calls: list[tuple[int, int]] = []
    report = await audit.verify(lambda done, total: calls.append((done, total)), batch=5)
    assert report.ok and report.checked == 23 and report.head_id == 23
    assert calls == [(5, 23), (10, 23), (15, 23), (20, 23), (23, 23)]
    empty = AuditService(audit.db)
    assert (await empty.query(actor="nobody")).entries == []


async def test_empty_log_verifies(audit):
    report = await audit.verify()
    assert report.ok and report.checked == 0 and report.head_id is None


async def test_changed_entry_is_found(db_url, audit):
    await _fill(audit, 10)
    if not db_url.startswith("sqlite"):
        # PostgreSQL refuses the change outright
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
            await _raw(db_url, "UPDATE audit_log SET actor = 'mallory' WHERE id = 4")
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
            await _raw(db_url, "DELETE FROM audit_log WHERE id = 4")
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
            await _raw(db_url, "TRUNCATE audit_log")
        assert (await audit.verify()).ok
    await _tamper(db_url, "UPDATE audit_log SET actor = 'mallory' WHERE id = 4")
    report = await audit.verify(batch=3)
    assert not report.ok
    assert report.first_bad_id == 4 and report.checked == 3
    assert "does not match its hash" in (report.reason or "")


async def test_rehashed_entry_breaks_the_next_link(db_url, audit):
    await _fill(audit, 5)
    # a forger who recomputes the changed entry's own hash still breaks the next link
    await _tamper(db_url, "UPDATE audit_log SET hash = '" + "a" * 64 + "' WHERE id = 2")
    report = await audit.verify()
    assert (report.ok, report.first_bad_id) == (False, 2)
    await _tamper(db_url, "UPDATE audit_log SET prev_hash = '" + "a" * 64 + "' WHERE id = 3")
    # (2's content no longer matches its hash either; the first bad entry is what counts)
    assert (await audit.verify()).first_bad_id == 2


async def test_deleted_entry_is_found(db_url, audit):
    await _fill(audit, 8)
    await _tamper(db_url, "DELETE FROM audit_log WHERE id = 5")
    report = await audit.verify()
    assert (report.ok, report.first_bad_id, report.checked) == (False, 6, 4)
    assert report.reason == "entry 5 is missing"
    await _tamper(db_url, "DELETE FROM audit_log WHERE id = 1")
    report = await audit.verify()
    assert (report.first_bad_id, report.reason) == (2, "entry 1 is missing")


async def test_cut_off_tail_is_found_with_an_anchor(db_url, audit):
    await _fill(audit, 6)
    head = await audit.verify()
    assert head.ok and head.head_id == 6 and head.head_hash
    anchor = (head.head_id, head.head_hash)
    await _fill(audit, 2)
    assert (await audit.verify(anchor=anchor)).ok
    assert not (await audit.verify(anchor=(6, "b" * 64))).ok
    await _tamper(db_url, "DELETE FROM audit_log WHERE id >= 5")
    # without the anchor a shorter chain looks whole; with it, the cut shows
    assert (await audit.verify()).ok
    report = await audit.verify(anchor=anchor)
    assert (report.ok, report.first_bad_id) == (False, 6)
    assert "cut off" in (report.reason or "")


# ---------------------------------------------------------------------------- middleware


async def test_server_errors_and_forwarded_addresses(db_url):
    database = Database(db_url)
    app = FastAPI()

    @app.post("/api/v1/boom")
    async def boom() -> None:
        raise RuntimeError("kaput")

    @app.post("/api/v1/fine", status_code=204)
    async def fine() -> None:
        return None

    app.add_middleware(AuditMiddleware)
    audit = AuditService(database)
    settings = SimpleNamespace(trusted_proxies=["127.0.0.0/8"])
    app.state.services = SimpleNamespace(audit=audit, settings=settings)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            r = await http.post("/api/v1/boom", headers={"x-forwarded-for": "203.0.113.9"})
            assert r.status_code == 500
            r = await http.post("/api/v1/fine", headers={"x-forwarded-for": "6.6.6.6, 10.9.8.7"})
            assert r.status_code == 204
            settings.trusted_proxies = []
            await http.post("/api/v1/fine", headers={"x-forwarded-for": "203.0.113.9"})
        got = [(e.action, e.result, e.status, e.remote) for e in (await audit.query()).entries]
        assert got == [
            ("POST /api/v1/fine", "ok", 204, "127.0.0.1"),
            ("POST /api/v1/fine", "ok", 204, "10.9.8.7"),
            ("POST /api/v1/boom", "error", 500, "203.0.113.9"),
        ]
    finally:
        await database.dispose()


# ---------------------------------------------------------------------------- the CLI


def _cli(*args: str, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("custos")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CUSTOS_")}
    env.update(env_extra or {})
    return subprocess.run(
        [str(exe), "audit", "verify", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


async def test_cli_verify_exit_codes(tmp_path, sqlite_template):
    data = tmp_path / "srv"
    data.mkdir()
    shutil.copy(sqlite_template, data / "custos.db")
    url = f"sqlite+aiosqlite:///{data / 'custos.db'}"
    database = Database(url)
    try:
        await _fill(AuditService(database), 12)
    finally:
        await database.dispose()

    ok = await asyncio.to_thread(_cli, "--data-dir", str(data))
    assert ok.returncode == 0, ok.stderr
    assert "intact" in ok.stderr and "12 entries" in ok.stderr
    head = ok.stdout.strip().removeprefix("head ")
    assert head.startswith("12:")

    anchored = await asyncio.to_thread(_cli, "--data-dir", str(data), "--anchor", head)
    assert anchored.returncode == 0, anchored.stderr

    await _raw(url, "UPDATE audit_log SET target = 'thing:99' WHERE id = 7")
    bad = await asyncio.to_thread(_cli, "--db", url, "--json")
    assert bad.returncode == 1
    assert '"first_bad_id": 7' in bad.stdout and '"ok": false' in bad.stdout
    text_bad = await asyncio.to_thread(_cli, "--data-dir", str(data))
    assert text_bad.returncode == 1 and "broken" in text_bad.stderr and "7" in text_bad.stderr

    missing = await asyncio.to_thread(_cli, "--data-dir", str(tmp_path / "nothing"))
    assert missing.returncode == 2 and "no database" in missing.stderr
    assert not (tmp_path / "nothing" / "custos.db").exists()
    garbled = await asyncio.to_thread(_cli, "--data-dir", str(data), "--anchor", "seven")
    assert garbled.returncode == 2 and "--anchor" in garbled.stderr
