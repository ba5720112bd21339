"""The check-in hot path: no database work for an empty check-in, session keys, query budgets."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import event

from custos import protocol
from custos.agent.client import DeviceClient, ServerRefused

pytestmark = pytest.mark.asyncio


class QueryCounter:
    """Counts the SQL statements run on behalf of one task (not the server's background jobs)."""

    def __init__(self) -> None:
        self.statements: list[str] = []
        self.task = asyncio.current_task()

    def __call__(self, _conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        # the in-process transport runs the app in the caller's task; check-ins with work
        # are committed by the check-in batcher's workers on its behalf
        task = asyncio.current_task()
        if task is self.task or (task is not None and task.get_name().startswith("checkin-batch")):
            self.statements.append(statement.split(None, 1)[0].upper())

    @property
    def n(self) -> int:
        return len(self.statements)


@contextmanager
def counting(api: Any) -> Iterator[QueryCounter]:
    engine = api.services.db.engine.sync_engine
    counter = QueryCounter()
    event.listen(engine, "before_cursor_execute", counter)
    try:
        yield counter
    finally:
        event.remove(engine, "before_cursor_execute", counter)


def _empty() -> dict[str, Any]:
    return {"agent_version": "t"}


async def _drain(dev: DeviceClient) -> list[dict[str, Any]]:
    """Check in, acknowledge what came, check in again: the device is idle afterwards."""
    got = (await dev.checkin(_empty()))["commands"]
    if got:
        await dev.checkin({"agent_version": "t", "acks": [c["run_id"] for c in got]})
    return got  # type: ignore[no-any-return]


async def test_empty_checkin_touches_no_database(api):
    dev = await api.new_device("idle")
    await dev.checkin(_empty())  # opens the session, caches the status
    assert api.services.work.trusted
    with counting(api) as q:
        for _ in range(20):
            resp = await dev.checkin(_empty())
            assert resp["commands"] == []
    assert q.n == 0, q.statements

    # queued work is found at once, then the device is forgotten again once it is drained
    await api.command(dev.device_id, kind="exec", argv=["echo", "now"])
    with counting(api) as q:
        got = await _drain(dev)
    assert [c["payload"]["argv"] for c in got] == [["echo", "now"]]
    assert q.n > 0
    with counting(api) as q:
        assert (await dev.checkin(_empty()))["commands"] == []
    assert q.n == 0, q.statements


async def test_deferred_work_becomes_due_without_a_query_before(api):
    dev = await api.new_device("later")
    await dev.checkin(_empty())
    due = datetime.now(UTC) + timedelta(seconds=1.5)
    await api.command(
        dev.device_id, kind="exec", argv=["echo", "later"], not_before=due.isoformat()
    )
    with counting(api) as q:
        assert (await dev.checkin(_empty()))["commands"] == []
    assert q.n == 0, "a run due later must not cost a query now"
    await asyncio.sleep(max(0.0, due.timestamp() - time.time()) + 0.1)
    got = await _drain(dev)
    assert [c["payload"]["argv"] for c in got] == [["echo", "later"]]


async def test_untrusted_index_asks_the_database_in_shared_batches(api):
    devs = [await api.new_device(f"fallback{i}") for i in range(20)]
    for d in devs:
        await d.checkin(_empty())
    work = api.services.work
    work._loaded = False  # as after missed events, before the reload has finished
    batcher = api.services.checkin._batch
    before = batcher.batches
    with counting(api) as q:
        got = await asyncio.gather(*(d.checkin(_empty()) for d in devs))
    assert all(r["commands"] == [] for r in got)
    # every check-in went to the database (the index could not vouch), but not one by one:
    # a reconnect storm must not take a pooled connection per device
    # the look for work: a SELECT (SQLite) or one WITH … UPDATE … RETURNING (PostgreSQL)
    assert {"SELECT", "WITH"} & set(q.statements), q.statements
    assert batcher.batches - before < len(devs) / 2, (batcher.batches - before, q.statements)
    assert q.n <= 4 * (batcher.batches - before), q.statements
    await work.load()
    assert work.trusted


@pytest.mark.postgres
async def test_pool_exhaustion_is_unavailable_not_an_internal_error():
    """No free database connection within the pool timeout is overload: 503, retry later."""
    from custos.db.engine import Database
    from custos.errors import Unavailable

    dsn = os.environ.get("CUSTOS_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
    url = dsn.replace("postgresql://", "postgresql+asyncpg://", 1)
    tight = Database(url, pool_size=1, pool_timeout=0.2)
    try:
        async with tight.transaction() as uow:
            await uow.session.execute(select_one())  # holds the only connection (no overflow)
            with pytest.raises(Unavailable) as err:
                await tight.fetch_one(select_one(), {})
            assert err.value.status == 503 and err.value.retry_after > 0
            with pytest.raises(Unavailable):
                async with tight.transaction() as other:
                    await other.session.execute(select_one())
        assert (await tight.fetch_one(select_one(), {}))[0] == 1  # free again afterwards
    finally:
        await tight.dispose()


async def test_overload_answers_503_with_retry_after(api, monkeypatch):
    """The check-in fast path maps overload to 503 + Retry-After, which agents honour."""
    from custos.errors import Unavailable

    dev = await api.new_device("busy")
    await dev.checkin(_empty())

    async def overloaded(*_a: Any, **_k: Any) -> bytes:
        raise Unavailable("the server is busy (no database connection free); retry shortly")

    monkeypatch.setattr(api.services.checkin, "checkin", overloaded)
    path = protocol.DEVICE_API + "/checkin"
    body = b'{"agent_version":"t"}'
    headers = protocol.sign_request(
        dev.identity.key, dev.device_id, "POST", path, body, int(time.time())
    )
    r = await api.http.post(path, content=body, headers=headers)
    assert r.status_code == 503, r.text
    assert r.json()["error"] == "busy"
    assert int(r.headers["retry-after"]) >= 1


def select_one() -> Any:
    from sqlalchemy import text

    return text("SELECT 1")


async def test_session_signing(api):
    dev = await api.new_device("sess")
    other = await api.new_device("other")
    await dev.checkin(_empty())
    assert dev.use_sessions and dev._session is not None
    token, key, _ = dev._session
    http: httpx.AsyncClient = api.http
    path = protocol.DEVICE_API + "/checkin"
    body = b'{"agent_version":"t"}'

    async def send(headers: dict[str, str]) -> httpx.Response:
        return await http.post(path, content=body, headers={**headers, "content-type": "x"})

    now = int(time.time())
    ok = protocol.sign_with_session(key, token, dev.device_id, "POST", path, body, now)
    assert (await send(ok)).status_code == 200

    # the body is covered by the MAC
    r = await http.post(path, content=body + b" ", headers=ok)
    assert r.status_code == 401 and r.json()["error"] == "bad_session"
    # another device cannot use this session, even with the right key
    stolen = protocol.sign_with_session(key, token, other.device_id, "POST", path, body, now)
    r = await send(stolen)
    assert r.status_code == 401 and r.json()["error"] == "bad_session"
    # a forged expiry changes the key the server derives
    forged = token.split(".")
    forged[1] = str(int(forged[1]) + 86400)
    bad = protocol.sign_with_session(key, ".".join(forged), dev.device_id, "POST", path, body, now)
    assert (await send(bad)).json()["error"] == "bad_session"
    # an expired session is refused with a code the agent recovers from
    old_token, old_key, _ = api.services.authenticator.open_session(
        dev.device_id, now=time.time() - 7 * 86400
    )
    expired = protocol.sign_with_session(old_key, old_token, dev.device_id, "POST", path, body, now)
    r = await send(expired)
    assert r.status_code == 401 and r.json()["error"] == "session_expired"
    # the session endpoint itself wants the device key, not a session
    r = await http.post(
        protocol.SESSION_PATH,
        headers=protocol.sign_with_session(
            key, token, dev.device_id, "POST", protocol.SESSION_PATH, b"", now
        ),
    )
    assert r.status_code == 401

    # the client opens a new session by itself when its own has expired
    dev._session = (old_token, old_key, time.monotonic() + 3600)
    assert (await dev.checkin(_empty()))["commands"] == []
    assert dev._session is not None and dev._session[0] != old_token


async def test_retired_device_is_refused_despite_its_session(api):
    dev = await api.new_device("gone")
    await dev.checkin(_empty())
    r = await api.post(f"/api/v1/devices/{dev.device_id}/retire")
    assert r.status_code == 200, r.text
    with pytest.raises(ServerRefused) as exc:
        await dev.checkin(_empty())
    assert exc.value.code == "retired"


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
async def test_two_processes_stay_coherent(api, settings):
    """Work queued and devices retired through one process are seen by another's caches."""
    from custos.server.app import create_app

    other_app = create_app(settings)
    async with other_app.router.lifespan_context(other_app):
        svc_b = other_app.state.services
        transport_b = httpx.ASGITransport(app=other_app)
        dev_a = await api.new_device("a")
        dev_b_side = DeviceClient(
            "http://test", dev_a.device_id, dev_a.identity.key, ca_pem=None, transport=transport_b
        )
        await dev_b_side.checkin(_empty())
        assert svc_b.work.trusted

        await api.command(dev_a.device_id, kind="exec", argv=["echo", "via-a"])
        deadline = time.monotonic() + 5
        while not svc_b.work.may_have_work(dev_a.device_id):
            assert time.monotonic() < deadline, "process B never heard of the new work"
            await asyncio.sleep(0.02)
        got = await _drain(dev_b_side)
        assert [c["payload"]["argv"] for c in got] == [["echo", "via-a"]]

        r = await api.post(f"/api/v1/devices/{dev_a.device_id}/retire")
        assert r.status_code == 200
        deadline = time.monotonic() + 5
        while True:
            try:
                await dev_b_side.checkin(_empty())
            except ServerRefused as exc:
                assert exc.code == "retired"
                break
            assert time.monotonic() < deadline, "process B still accepts a retired device"
            await asyncio.sleep(0.05)
        await dev_b_side.aclose()


# -- query budgets: a list costs a fixed number of statements, whatever its length ----------


async def _statements(api: Any, path: str) -> int:
    with counting(api) as q:
        r = await api.get(path)
    assert r.status_code == 200, r.text
    return q.n


async def test_list_endpoints_have_query_budgets(api):
    first = await api.new_device("d0")
    await first.checkin(_empty())
    await api.command(first.device_id, kind="exec", argv=["true"])
    g = await api.post("/api/v1/groups", json={"name": "g"})
    assert g.status_code == 201, g.text
    paths = {
        "/api/v1/devices": 3,
        "/api/v1/devices?q=d": 3,
        "/api/v1/commands": 4,
        "/api/v1/enrollment-tokens": 3,
        "/api/v1/groups": 3,
        f"/api/v1/devices/{first.device_id}": 4,
        f"/api/v1/devices/{first.device_id}/history": 4,
    }
    small = {p: await _statements(api, p) for p in paths}
    over = {p: (small[p], budget) for p, budget in paths.items() if small[p] > budget}
    assert not over, f"statements over budget: {over}"

    # many more rows: the same number of statements (no query per row)
    for i in range(1, 12):
        dev = await api.new_device(f"d{i}")
        await api.command(dev.device_id, kind="exec", argv=["true"])
        await api.post("/api/v1/groups", json={"name": f"g{i}"})
        r = await api.post("/api/v1/groups/g/devices", json={"devices": [dev.device_id]})
        assert r.status_code == 200, r.text
    cmd = await api.command("group:g", kind="exec", argv=["true"])
    for p in paths:
        assert await _statements(api, p) == small[p], p
    detail = await _statements(api, f"/api/v1/commands/{cmd['id']}")
    assert detail <= 4


async def test_a_woken_device_looks_for_work_even_if_the_index_has_not_heard(api):
    """Behind a load balancer the nudge can overtake the event that tells this process."""
    dev = await api.new_device("woken")
    await dev.checkin(_empty())
    await api.command(dev.device_id, kind="exec", argv=["echo", "raced"])
    api.services.work._maybe.pop(dev.device_id)  # as if this process had not heard yet
    assert (await dev.checkin(_empty()))["commands"] == []
    got = (await dev.checkin({"agent_version": "t", "wake": True}))["commands"]
    assert [c["payload"]["argv"] for c in got] == [["echo", "raced"]]


async def test_fast_path_answers_like_the_routed_endpoint(api):
    """The check-in served ahead of the router and the routed one agree, errors included."""
    dev = await api.new_device("fast")
    await dev.checkin(_empty())
    token, key, _ = dev._session
    http: httpx.AsyncClient = api.http
    path = protocol.DEVICE_API + "/checkin"

    async def post(qs: str, body: bytes, *, tamper: bool = False) -> httpx.Response:
        sign = path + qs
        h = protocol.sign_with_session(
            key, token, dev.device_id, "POST", sign, body, int(time.time())
        )
        if tamper:
            h[protocol.H_SIGNATURE] = h[protocol.H_SIGNATURE][::-1]
        return await http.post(sign, content=body, headers=h)

    for qs in ("", "?via=router"):  # a query string goes through FastAPI's router
        ok = await post(qs, b'{"agent_version":"t"}')
        assert ok.status_code == 200, ok.text
        assert ok.json()["commands"] == [] and ok.headers["content-type"] == "application/json"
        bad = await post(qs, b'{"agent_version":"t"}', tamper=True)
        assert bad.status_code == 401 and bad.json()["error"] == "bad_session"
        assert protocol.H_SERVER_TIME in bad.headers
        broken = await post(qs, b'{"agent_version":')
        assert broken.status_code == 422 and broken.json()["error"] == "malformed_json"
        wrong = await post(qs, b'{"agent_version":"t","surprise":1}')
        assert wrong.status_code == 422 and wrong.json()["error"] == "invalid_request"
    unsigned = await http.post(path, content=b"{}")
    assert unsigned.status_code == 401 and unsigned.json()["error"] == "unsigned"
    too_big = await http.post(path, content=b"x" * (api.services.settings.max_body_bytes + 1))
    assert too_big.status_code == 413


async def test_concurrent_checkins_with_work_share_transactions(api):
    devs = [await api.new_device(f"b{i}") for i in range(12)]
    for d in devs:
        await d.checkin(_empty())
    await api.post("/api/v1/groups", json={"name": "batch"})
    r = await api.post(
        "/api/v1/groups/batch/devices", json={"devices": [d.device_id for d in devs]}
    )
    assert r.status_code == 200, r.text
    cmd = await api.command("group:batch", kind="exec", argv=["echo", "b"])
    batcher = api.services.checkin._batch
    before = batcher.batches
    got = await asyncio.gather(*(d.checkin({"agent_version": "t", "wake": True}) for d in devs))
    runs = [r["commands"][0]["run_id"] for r in got]
    assert len(set(runs)) == len(devs)  # each device got its own run, once
    # results and acks of all of them, again concurrently
    results = [
        {
            "agent_version": "t",
            "acks": [run],
            "results": [
                {"run_id": run, "state": "succeeded", "exit_code": 0, "stdout": f"out-{i}"}
            ],
        }
        for i, run in enumerate(runs)
    ]
    done = await asyncio.gather(*(d.checkin(p) for d, p in zip(devs, results, strict=True)))
    assert [r["accepted_results"] for r in done] == [[run] for run in runs]
    assert batcher.batches - before < 2 * len(devs), "no two check-ins ever shared a transaction"
    detail = (await api.get(f"/api/v1/commands/{cmd['id']}")).json()
    by_device = {r["device_id"]: r for r in detail["runs"]}
    for i, d in enumerate(devs):
        assert by_device[d.device_id]["state"] == "succeeded"
        assert by_device[d.device_id]["stdout"] == f"out-{i}"
    # a device cannot report or acknowledge another device's run
    other = results[0] | {"results": [results[1]["results"][0] | {"stdout": "forged"}]}
    await devs[0].checkin(other)
    detail = (await api.get(f"/api/v1/commands/{cmd['id']}")).json()
    assert {r["stdout"] for r in detail["runs"]} == {f"out-{i}" for i in range(len(devs))}


async def test_a_new_process_knows_every_device_before_its_first_check_in(api, settings):
    """Identities are preloaded at start: a restart does not cost a query per device."""
    from custos.server.app import create_app

    devs = [await api.new_device(f"pre{i}") for i in range(3)]
    for d in devs:
        await d.checkin(_empty())  # sessions opened through the first process
    other_app = create_app(settings)
    async with other_app.router.lifespan_context(other_app):
        transport_b = httpx.ASGITransport(app=other_app)
        engine = other_app.state.services.db.engine.sync_engine
        counter = QueryCounter()
        event.listen(engine, "before_cursor_execute", counter)
        try:
            for d in devs:
                via_b = DeviceClient(
                    "http://test", d.device_id, d.identity.key, ca_pem=None, transport=transport_b
                )
                via_b._session = d._session  # the session key is valid in every process
                await via_b.checkin(_empty())
                await via_b.aclose()
        finally:
            event.remove(engine, "before_cursor_execute", counter)
        assert counter.n == 0, counter.statements


async def test_a_check_in_without_a_version_keeps_the_stored_one(api):
    """A push-woken check-in (and an OMA DM session's last-seen) may carry no agent version:
    the batched last-seen write keeps the version the device reported before."""
    dev = await api.new_device("versioned")
    await dev.checkin({"agent_version": "9.8.7"})
    checkin = api.services.checkin
    await checkin.flush_last_seen()
    checkin.note_seen(dev.device_id, "")
    assert await checkin.flush_last_seen() == 1
    r = await api.get(f"/api/v1/devices/{dev.device_id}")
    assert r.json()["agent_version"] == "9.8.7"
    checkin.note_seen(dev.device_id, "9.9.0")
    await checkin.flush_last_seen()
    assert (await api.get(f"/api/v1/devices/{dev.device_id}")).json()["agent_version"] == "9.9.0"
