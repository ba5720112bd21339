"""Webhooks against a real HTTP receiver, on SQLite and PostgreSQL.

The service tests drive `deliver_due` by hand (retry times are moved into the past instead of
waited for); the API tests go through the app, whose own job delivers in the background.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select, update

from custos.db.base import utcnow
from custos.db.engine import Database
from custos.webhooks.models import WebhookDelivery
from custos.webhooks.schemas import WebhookCreate
from custos.webhooks.service import BACKOFF_S, WebhookService, emit, verify_signature
from served import eventually
from webhook_receiver import Answer, Receiver

KEY = b"w" * 32


@pytest.fixture
async def db(db_url: str) -> AsyncIterator[Database]:
    database = Database(db_url)
    try:
        yield database
    finally:
        await database.dispose()


@pytest.fixture
def receiver() -> Any:
    with Receiver() as r:
        yield r


async def _make_due(db: Database) -> None:
    """Bring every pending delivery's next try to now (instead of waiting for it)."""
    async with db.transaction() as uow:
        await uow.session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.state == "pending")
            .values(next_attempt_at=utcnow() - timedelta(seconds=1))
        )


async def _rows(db: Database) -> list[WebhookDelivery]:
    async with db.read() as s:
        return list(
            (await s.scalars(select(WebhookDelivery).order_by(WebhookDelivery.created_at))).all()
        )


async def _emit(db: Database, event: str, data: dict[str, Any]) -> int:
    async with db.transaction() as uow:
        return await emit(uow.session, event, data)


async def test_emit_sends_a_signed_post_only_to_subscribers(db, receiver):
    svc = WebhookService(db, KEY, timeout_s=5)
    made = await svc.create(
        WebhookCreate(name="siem", url=receiver.url + "/in", events=["device.enrolled"]),
        created_by="admin",
    )
    everything = await svc.create(
        WebhookCreate(name="all", url=receiver.url + "/all", events=["*"], secret="x" * 20),
        created_by="admin",
    )
    assert made.secret.startswith("whsec_") and everything.secret == "x" * 20
    assert await _emit(db, "device.enrolled", {"device_id": "d1", "at": utcnow()}) == 2
    assert await _emit(db, "device.lost", {"device_id": "d1"}) == 1  # only "*"
    with pytest.raises(ValueError, match="unknown webhook event"):
        await _emit(db, "device.exploded", {})
    # an event emitted in a transaction that rolls back is never sent
    with pytest.raises(RuntimeError):
        async with db.transaction() as uow:
            await emit(uow.session, "device.enrolled", {"device_id": "ghost"})
            raise RuntimeError("rolled back")
    assert len(await _rows(db)) == 3

    assert await svc.deliver_due() == 3
    assert await svc.deliver_due() == 0  # nothing is sent twice
    assert sorted(r.path for r in receiver.requests) == ["/all", "/all", "/in"]
    req = next(r for r in receiver.requests if r.path == "/in")
    h = req.headers
    assert h["content-type"] == "application/json"
    assert h["user-agent"] == "Custos-Webhook/1"
    assert h["x-custos-event"] == "device.enrolled"
    assert abs(int(h["x-custos-timestamp"]) - time.time()) < 30
    assert verify_signature(
        made.secret.encode(), h["x-custos-timestamp"], req.body, h["x-custos-signature"]
    )
    assert not verify_signature(
        everything.secret.encode(), h["x-custos-timestamp"], req.body, h["x-custos-signature"]
    )
    doc = json.loads(req.body)
    assert set(doc) == {"id", "event", "created_at", "data"}
    assert doc["id"] == h["x-custos-delivery"] and doc["event"] == "device.enrolled"
    assert doc["data"]["device_id"] == "d1" and doc["data"]["at"].startswith("20")
    rows = {r.id: r for r in await _rows(db)}
    assert rows[doc["id"]].state == "delivered" and rows[doc["id"]].status_code == 200
    assert all(r.state == "delivered" and r.attempts == 1 for r in rows.values())
    listed = {h.name: h for h in await svc.list_webhooks()}
    assert listed["siem"].pending == 0 and listed["siem"].last_delivery_at is not None
    assert "secret" not in listed["siem"].model_dump()


async def test_failures_are_retried_with_backoff_and_retry_after(db, receiver):
    svc = WebhookService(db, KEY, timeout_s=5)
    await svc.create(
        WebhookCreate(name="flaky", url=receiver.url, events=["device.lost"]), created_by="a"
    )
    receiver.script = [
        Answer(500, b"boom: database down"),
        Answer(429, b"slow down", {"Retry-After": "45"}),
        Answer(204, b""),
    ]
    await _emit(db, "device.lost", {"device_id": "d9"})

    before = utcnow()
    assert await svc.deliver_due() == 1
    (row,) = await _rows(db)
    assert (row.state, row.attempts, row.status_code) == ("pending", 1, 500)
    assert row.error == "HTTP 500" and row.response == "boom: database down"
    assert row.next_attempt_at is not None
    wait = (row.next_attempt_at - before).total_seconds()
    assert BACKOFF_S[0] - 1 <= wait <= BACKOFF_S[0] + 5
    assert await svc.deliver_due() == 0  # not due yet

    await _make_due(db)
    before = utcnow()
    assert await svc.deliver_due() == 1
    (row,) = await _rows(db)
    assert (row.state, row.attempts, row.status_code) == ("pending", 2, 429)
    assert row.next_attempt_at is not None
    assert 44 <= (row.next_attempt_at - before).total_seconds() <= 50  # Retry-After, not 30 s

    await _make_due(db)
    assert await svc.deliver_due() == 1
    (row,) = await _rows(db)
    assert (row.state, row.attempts, row.status_code, row.error) == ("delivered", 3, 204, "")
    assert row.delivered_at is not None and row.next_attempt_at is None
    # the three tries carried the same delivery id and body, each freshly signed
    assert len({r.headers["x-custos-delivery"] for r in receiver.requests}) == 1
    assert len({r.body for r in receiver.requests}) == 1


async def test_retries_run_out_and_the_delivery_fails(db, receiver):
    svc = WebhookService(db, KEY, timeout_s=5)
    await svc.create(WebhookCreate(name="dead", url=receiver.url, events=["*"]), created_by="a")
    receiver.default = Answer(502, b"bad gateway")
    await _emit(db, "device.wiped", {"device_id": "d"})
    for attempt in range(1, len(BACKOFF_S) + 2):
        await _make_due(db)
        assert await svc.deliver_due() == 1
        (row,) = await _rows(db)
        assert row.attempts == attempt
    assert row.state == "failed" and row.next_attempt_at is None
    assert len(receiver.requests) == len(BACKOFF_S) + 1
    await _make_due(db)
    assert await svc.deliver_due() == 0
    assert (await svc.list_webhooks())[0].failed == 1


async def test_redirects_timeouts_big_answers_and_refused_connections(db, receiver):
    svc = WebhookService(db, KEY, timeout_s=1)
    await svc.create(
        WebhookCreate(name="redirect", url=receiver.url + "/r", events=["ping"]), created_by="a"
    )
    receiver.script = [Answer(302, b"", {"Location": receiver.url + "/elsewhere"})]
    d = await svc.test("redirect")
    assert d.state == "pending" and d.status_code == 302
    assert "redirects are not followed" in d.error and "/elsewhere" in d.error
    assert [r.path for r in receiver.requests] == ["/r"]

    receiver.requests.clear()
    await svc.create(WebhookCreate(name="big", url=receiver.url, events=["ping"]), created_by="a")
    receiver.script = [Answer(200, b"y" * 1_000_000)]
    d = await svc.test("big")
    assert d.state == "delivered" and d.response == "y" * 500

    await svc.create(WebhookCreate(name="slow", url=receiver.url, events=["ping"]), created_by="a")
    receiver.script = [Answer(200, b"late", delay_s=3)]
    started = time.monotonic()
    d = await svc.test("slow")
    assert time.monotonic() - started < 2.5
    assert d.state == "pending" and d.status_code is None
    assert "no answer within 1 s" in d.error or "timed out" in d.error

    from served import free_port

    await svc.create(
        WebhookCreate(name="closed", url=f"http://127.0.0.1:{free_port()}/", events=["ping"]),
        created_by="a",
    )
    d = await svc.test("closed")
    assert d.state == "pending" and d.status_code is None and "ConnectError" in d.error
    assert d.attempts == 1 and d.next_attempt_at is not None


async def test_redeliver_sends_the_same_event_again_as_a_new_delivery(db, receiver):
    svc = WebhookService(db, KEY, timeout_s=5)
    await svc.create(WebhookCreate(name="h", url=receiver.url, events=["*"]), created_by="a")
    await _emit(db, "device.locked", {"device_id": "d1", "reason": "stolen"})
    await svc.deliver_due()
    (first,) = await svc.deliveries("h")
    again = await svc.redeliver(first.id)
    assert again.id != first.id and again.redelivery_of == first.id
    assert again.state == "delivered" and again.event == "device.locked"
    bodies = [json.loads(r.body) for r in receiver.requests]
    assert [b["data"] for b in bodies] == [{"device_id": "d1", "reason": "stolen"}] * 2
    assert [b["id"] for b in bodies] == [first.id, again.id]
    page = await svc.deliveries("h", limit=1)
    assert [p.id for p in page] == [again.id]
    assert [p.id for p in await svc.deliveries("h", limit=1, offset=1)] == [first.id]


async def test_old_deliveries_are_purged_at_most_hourly(db, receiver):
    svc = WebhookService(db, KEY, timeout_s=5)
    await svc.create(WebhookCreate(name="h", url=receiver.url, events=["*"]), created_by="a")
    await _emit(db, "device.found", {"n": 1})
    await _emit(db, "device.found", {"n": 2})
    old = utcnow() - timedelta(days=31)

    async def age_one(n: int) -> None:
        rows = await _rows(db)
        target = next(r for r in rows if r.data == {"n": n})
        async with db.transaction() as uow:
            await uow.session.execute(
                update(WebhookDelivery)
                .where(WebhookDelivery.id == target.id)
                .values(created_at=old, state="delivered", next_attempt_at=None)
            )

    await age_one(1)
    assert await svc.deliver_due() == 1  # the purge ran first, then the fresh one was sent
    assert [r.data for r in await _rows(db)] == [{"n": 2}]
    await age_one(2)
    await svc.deliver_due()
    assert len(await _rows(db)) == 1  # within the hour: not purged again
    assert await svc.purge_old() == 1


@pytest.mark.postgres
async def test_two_processes_never_send_the_same_delivery(pg_db_url, receiver):
    # PostgreSQL only: one process per SQLite database; the claim relies on SKIP LOCKED
    db_url = pg_db_url
    dbs = [Database(db_url), Database(db_url)]
    try:
        svcs = [WebhookService(d, KEY, timeout_s=5) for d in dbs]
        await svcs[0].create(
            WebhookCreate(name="h", url=receiver.url, events=["*"]), created_by="a"
        )
        receiver.default = Answer(200, b"ok", delay_s=0.05)
        async with dbs[0].transaction() as uow:
            for i in range(120):
                await emit(uow.session, "device.enrolled", {"i": i})
        counts = await asyncio.gather(*(s.deliver_due() for s in svcs))
        assert sum(counts) == 120
        ids = [r.headers["x-custos-delivery"] for r in receiver.requests]
        assert len(ids) == 120 and len(set(ids)) == 120
        assert all(r.state == "delivered" for r in await _rows(dbs[0]))
    finally:
        for d in dbs:
            await d.dispose()


async def test_a_stale_attempt_does_not_overwrite_a_newer_one(db, receiver):
    svc = WebhookService(db, KEY, timeout_s=5)
    await svc.create(WebhookCreate(name="h", url=receiver.url, events=["*"]), created_by="a")
    await _emit(db, "device.found", {})
    (stale,) = await svc._claim(10)
    # the lease runs out (this process stalled) and another claim takes the row
    await _make_due(db)
    (fresh,) = await svc._claim(10)
    assert fresh.attempt == stale.attempt + 1
    async with svc._client() as http:
        await svc._attempt(http, fresh)
        receiver.default = Answer(500, b"")
        await svc._attempt(http, stale)
    (row,) = await _rows(db)
    assert (row.state, row.status_code, row.attempts) == ("delivered", 200, 2)


# --- through the app ----------------------------------------------------------------------


async def test_admin_api_create_list_test_deliveries_redeliver_delete(api, receiver):
    r = await api.post(
        "/api/v1/webhooks",
        json={"name": "ops", "url": receiver.url + "/hook", "events": ["ping", "device.lost"]},
    )
    assert r.status_code == 201, r.text
    secret = r.json()["secret"]
    assert secret.startswith("whsec_")
    listed = (await api.get("/api/v1/webhooks")).json()
    assert [h["name"] for h in listed] == ["ops"] and "secret" not in listed[0]
    assert secret not in (await api.get("/api/v1/webhooks")).text

    for body, status, needle in [
        ({"name": "ops", "url": receiver.url, "events": ["ping"]}, 409, "exists"),
        ({"name": "x", "url": receiver.url, "events": ["device.melted"]}, 422, "unknown event"),
        ({"name": "x", "url": "file:///etc/passwd", "events": ["ping"]}, 422, "http://"),
        ({"name": "Bad Name", "url": receiver.url, "events": ["ping"]}, 422, "name"),
        ({"name": "x", "url": receiver.url, "events": []}, 422, "events"),
        ({"name": "x", "url": receiver.url, "events": ["ping"], "secret": "short"}, 422, "secret"),
        ({"name": "x", "url": receiver.url, "events": ["ping"], "extra": 1}, 422, "extra"),
    ]:
        bad = await api.post("/api/v1/webhooks", json=body)
        assert bad.status_code == status and needle in bad.text, (body, bad.text)

    t = await api.post("/api/v1/webhooks/ops/test")
    assert t.status_code == 201, t.text
    ping = t.json()
    assert ping["state"] == "delivered" and ping["event"] == "ping" and ping["status_code"] == 200
    req = receiver.requests[-1]
    assert req.path == "/hook" and req.headers["x-custos-event"] == "ping"
    assert verify_signature(
        secret.encode(),
        req.headers["x-custos-timestamp"],
        req.body,
        req.headers["x-custos-signature"],
    )

    again = await api.post(f"/api/v1/webhooks/deliveries/{ping['id']}/redeliver")
    assert again.status_code == 201 and again.json()["redelivery_of"] == ping["id"]
    log = await api.get("/api/v1/webhooks/ops/deliveries", params={"limit": 10})
    assert [d["id"] for d in log.json()] == [again.json()["id"], ping["id"]]
    assert (
        await api.get("/api/v1/webhooks/ops/deliveries", params={"limit": 0})
    ).status_code == 422
    assert (await api.get("/api/v1/webhooks/nope/deliveries")).status_code == 404
    assert (await api.post("/api/v1/webhooks/deliveries/nope/redeliver")).status_code == 404
    assert (await api.post("/api/v1/webhooks/nope/test")).status_code == 404

    gone = await api.http.delete("/api/v1/webhooks/ops", headers=api.auth)
    assert gone.status_code == 204
    assert (await api.http.delete("/api/v1/webhooks/ops", headers=api.auth)).status_code == 404
    assert (await api.get("/api/v1/webhooks")).json() == []

    # every change was audited under its own action name; the secret is in none of them
    entries = (await api.get("/api/v1/audit", params={"action": "webhook"})).json()
    items = entries["entries"]
    actions = [(e["action"], e["target"], e["result"]) for e in items]
    for expected in [
        ("webhook.create", "webhook:ops", "ok"),
        ("webhook.test", "webhook:ops", "ok"),
        ("webhook.redeliver", f"webhook_delivery:{ping['id']}", "ok"),
        ("webhook.delete", "webhook:ops", "ok"),
        ("webhook.create", "", "failed"),
    ]:
        assert expected in actions, actions
    assert secret not in json.dumps(items)


async def test_webhook_routes_need_the_manage_permission(api):
    r = await api.post(
        "/api/v1/users",
        json={"username": "viewer1", "password": "viewer-pass-1", "roles": ["auditor"]},
    )
    assert r.status_code == 201, r.text
    login = await api.http.post(
        "/api/v1/auth/login", json={"username": "viewer1", "password": "viewer-pass-1"}
    )
    auth = {"authorization": f"Bearer {login.json()['token']}"}
    assert (await api.http.get("/api/v1/webhooks", headers=auth)).status_code == 403
    made = await api.http.post(
        "/api/v1/webhooks",
        json={"name": "x", "url": "http://127.0.0.1:1/", "events": ["ping"]},
        headers=auth,
    )
    assert made.status_code == 403
    assert (await api.http.delete("/api/v1/webhooks/x", headers=auth)).status_code == 403
    assert (await api.http.get("/api/v1/webhooks")).status_code == 401


async def test_enrolment_emits_device_enrolled_and_the_job_delivers_it(api, receiver):
    r = await api.post(
        "/api/v1/webhooks",
        json={"name": "cmdb", "url": receiver.url, "events": ["device.enrolled"]},
    )
    secret = r.json()["secret"]
    dev = await api.new_device("laptop-7")
    # the app's own job (every 2 s) sends it
    await eventually(lambda: len(receiver.requests) == 1, timeout=15)
    req = receiver.requests[0]
    doc = json.loads(req.body)
    assert doc["event"] == "device.enrolled"
    assert doc["data"]["device_id"] == dev.device_id and doc["data"]["name"] == "laptop-7"
    assert verify_signature(
        secret.encode(),
        req.headers["x-custos-timestamp"],
        req.body,
        req.headers["x-custos-signature"],
    )
    await eventually(
        lambda: _state_is(api, "cmdb", "delivered"),
        timeout=10,
    )


async def _state_is(api: Any, name: str, state: str) -> bool:
    rows = (await api.get(f"/api/v1/webhooks/{name}/deliveries")).json()
    return bool(rows) and all(d["state"] == state for d in rows)


async def test_a_failed_deployment_emits_deployment_failed(api, tmp_path, receiver):
    from test_software import cpkg, manager, take_software, upload

    await api.post(
        "/api/v1/webhooks",
        json={"name": "alerts", "url": receiver.url, "events": ["deployment.failed"]},
    )
    await upload(api, cpkg(tmp_path / "bad.cpkg", "1.0", tmp_path / "t.bin", b"x" * 100, fail=True))
    dev = await api.new_device("kiosk-1")
    r = await api.post(
        "/api/v1/deployments", json={"package": "tool", "targets": {"devices": ["kiosk-1"]}}
    )
    assert r.status_code == 201, r.text
    dep = r.json()
    await take_software(api, dev, manager(dev, tmp_path))
    await eventually(lambda: len(receiver.requests) >= 1, timeout=15)
    docs = [json.loads(x.body) for x in receiver.requests]
    assert [d["event"] for d in docs] == ["deployment.failed"]
    data = docs[0]["data"]
    assert data["deployment_id"] == dep["id"] and data["device_id"] == dev.device_id
    assert data["package"] == "tool"
