"""The policy engine on a real agent state: bundles, statuses, reports, outbox, guard, software."""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest

from custos.agent.client import RequestRejected, ServerError
from custos.agent.policy import PolicyEngine
from custos.agent.policy.engine import HEARTBEAT_S, fit_report
from custos.agent.policy.packages import installed_versions
from custos.agent.software import SoftwareStore
from custos.agent.state import AgentState


class Clock:
    def __init__(self) -> None:
        self.t = 1_800_000_000.0

    def __call__(self) -> float:
        return self.t


class Server:
    """Collects reports; fails or refuses on demand."""

    def __init__(self) -> None:
        self.reports: list[dict] = []
        self.fail: Exception | None = None
        self.refuse_seq: int | None = None

    async def __call__(self, body: bytes):
        doc = json.loads(body)
        if self.fail is not None:
            raise self.fail
        if doc["seq"] == self.refuse_seq:
            raise RequestRejected(422, "invalid", "bad report")
        self.reports.append(doc)
        return {"accepted": doc["seq"]}


def bundle(rules: list[dict], issued: str = "2026-11-23T21:00:00+00:00", **kw) -> dict:
    sha = uuid.uuid5(uuid.NAMESPACE_OID, json.dumps([rules, kw], sort_keys=True)).hex * 2
    return {"bundle_sha": sha, "issued_at": issued, "interval_s": 60,
            "profiles": [{"policy_id": "p1", "name": "base", "version": 1}],
            "rules": rules, "managed_data": [], "managed_accounts": [], **kw}  # fmt: skip


@pytest.fixture
def env(tmp_path):
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    state = AgentState(tmp_path / "state")
    (state.dir / "ca.pem").write_text("CA\n")
    (state.dir / "device.pem").write_text("CERT\n")
    state.set(server_url="https://mdm.example", device_id="dev1", ca_fingerprint="ab" * 32)
    server, clock = Server(), Clock()
    engine = PolicyEngine(state, root=root, send=server, wall_clock=clock,
                          server_now=clock, inventory=dict)  # fmt: skip
    yield engine, server, clock, root
    state.close()


MOTD = {"id": "file:/etc/motd", "type": "file", "policy": "base", "path": "/etc/motd",
        "content": "Managed\n"}  # fmt: skip


async def test_bundle_is_kept_only_when_newer(env):
    engine, *_ = env
    b1 = bundle([MOTD])
    assert engine.handle(b1) == {"result": {"bundle_sha": b1["bundle_sha"], "applied": True}}
    assert engine.handle(b1)["result"]["applied"] is False  # same sha
    older = bundle([], issued="2026-11-22T00:00:00+00:00")
    assert engine.handle(older)["result"]["applied"] is False
    assert engine.store.bundle()["bundle_sha"] == b1["bundle_sha"]
    newer = bundle([], issued="2026-11-24T00:00:00+00:00")
    assert engine.handle(newer)["result"]["applied"] is True
    bad = engine.handle({"bundle_sha": "x", "issued_at": "soon", "rules": []})
    assert bad["state"] == "rejected" and "issued_at" in bad["error"]
    dup = engine.handle(bundle([MOTD, MOTD], issued="2026-11-25T00:00:00+00:00"))
    assert dup["state"] == "rejected"


async def test_bundle_with_the_same_time_and_another_sha_is_applied(env):
    engine, *_ = env
    b1 = bundle([MOTD])
    assert engine.handle(b1)["result"]["applied"] is True
    resent = bundle([], issued=b1["issued_at"])
    assert resent["bundle_sha"] != b1["bundle_sha"]
    assert engine.handle(resent)["result"]["applied"] is True
    assert engine.store.bundle()["bundle_sha"] == resent["bundle_sha"]
    # the same instant written another way is still the same time
    same = bundle([MOTD], issued="2026-11-23T21:00:00Z", note="x")
    assert engine.handle(same)["result"]["applied"] is True
    older = bundle([MOTD], issued="2026-11-23T20:59:59+00:00", note="y")
    assert engine.handle(older)["result"]["applied"] is False
    assert engine.store.bundle()["bundle_sha"] == same["bundle_sha"]


def test_bundle_takes_up_to_ten_thousand_rules():
    from custos.agent.policy.engine import BundleError, check_bundle

    rules = [{"id": f"file:/etc/f{i}", "type": "file", "path": f"/etc/f{i}"}
             for i in range(10_000)]  # fmt: skip
    assert len(check_bundle(bundle(rules))["rules"]) == 10_000
    with pytest.raises(BundleError, match="at most 10000"):
        check_bundle(bundle([*rules, {"id": "x", "type": "file"}]))
    with pytest.raises(BundleError, match="longer than 1200"):
        check_bundle(bundle([{"id": "f" * 1201, "type": "file"}]))


async def test_reports_only_what_changed_with_seq_and_heartbeat(env):
    engine, server, clock, root = env
    engine.handle(bundle([MOTD]))
    await engine.run_once()
    assert (root / "etc" / "motd").read_text() == "Managed\n"
    [r1] = server.reports
    assert r1["seq"] == 1 and r1["bundle_sha"] == engine.store.bundle()["bundle_sha"]
    rules = {r["id"]: r["status"] for r in r1["rules"]}
    assert rules == {"file:/etc/motd": "repaired", "agent_guard": "compliant"}
    assert [(e["rule_id"], e["kind"]) for e in r1["events"]] == [
        ("file:/etc/motd", "drift"), ("file:/etc/motd", "repaired")]  # fmt: skip
    clock.t += 30
    await engine.run_once()  # not due yet
    clock.t += 31
    await engine.run_once()  # due; compliant now: a status change, so reported
    assert [r["seq"] for r in server.reports] == [1, 2]
    assert {r["status"] for r in server.reports[1]["rules"]} == {"compliant"}
    clock.t += 61
    await engine.run_once()  # nothing changed: no report
    assert len(server.reports) == 2
    (root / "etc" / "motd").write_text("tampered")
    clock.t += 61
    await engine.run_once()
    assert server.reports[-1]["seq"] == 3 and server.reports[-1]["events"][0]["kind"] == "drift"
    clock.t += 61
    await engine.run_once()  # repaired -> compliant is a change
    clock.t += HEARTBEAT_S
    await engine.run_once()  # a heartbeat although nothing changed
    assert [r["seq"] for r in server.reports] == [1, 2, 3, 4, 5]
    assert server.reports[-1]["events"] == []
    summary = engine.summary()
    assert summary["policy_noncompliant"] == 0 and summary["policy_outbox"] == 0
    assert summary["policy_bundle_sha"] == engine.store.bundle()["bundle_sha"]


async def test_outbox_waits_offline_in_order_and_drops_a_refused_report(env):
    engine, server, clock, root = env
    engine.handle(bundle([MOTD]))
    server.fail = ServerError("connection refused")
    await engine.run_once()
    (root / "etc" / "motd").unlink()
    clock.t += 61
    await engine.run_once()
    assert server.reports == [] and engine.store.pending() == 2
    server.fail = None
    server.refuse_seq = 1
    assert await engine.flush_reports()
    assert [r["seq"] for r in server.reports] == [2] and engine.store.pending() == 0


async def test_persistent_drift_is_not_reported_again(env):
    engine, server, clock, root = env
    rule = {**MOTD, "id": "file:/etc/dir", "path": "/etc/dir"}
    (root / "etc" / "dir").mkdir()
    engine.handle(bundle([rule]))
    await engine.run_once()
    statuses = {r["id"]: r["status"] for r in server.reports[0]["rules"]}
    assert statuses["file:/etc/dir"] == "noncompliant"
    assert len(server.reports[0]["events"]) == 2
    clock.t += 61
    await engine.run_once()
    assert len(server.reports) == 1  # same drift, same status: nothing new
    assert engine.summary()["policy_noncompliant"] == 1


async def test_empty_bundle_stops_enforcing_and_reports_once(env):
    engine, server, clock, root = env
    engine.handle(bundle([MOTD]))
    await engine.run_once()
    engine.handle(bundle([], issued="2026-11-24T00:00:00+00:00"))
    (root / "etc" / "motd").write_text("mine now")
    await engine.run_once()  # a new bundle is evaluated at once
    assert [r["id"] for r in server.reports[-1]["rules"]] == ["agent_guard"]
    clock.t += 61
    await engine.run_once()
    assert len(server.reports) == 2 and (root / "etc" / "motd").read_text() == "mine now"


async def test_guard_restores_configuration(env):
    engine, server, clock, _root = env
    engine.handle(bundle([]))
    await engine.run_once()  # the snapshot
    state = engine.state
    (state.dir / "ca.pem").write_text("EVIL CA\n")
    (state.dir / "device.pem").unlink()
    state.set(server_url="https://evil.example")
    clock.t += 61
    await engine.run_once()
    assert (state.dir / "ca.pem").read_text() == "CA\n"
    assert (state.dir / "device.pem").read_text() == "CERT\n"
    assert state.get("server_url") == "https://mdm.example"
    report = server.reports[-1]
    assert {r["id"]: r["status"] for r in report["rules"]} == {"agent_guard": "repaired"}
    kinds = [e["kind"] for e in report["events"]]
    assert kinds == ["drift", "restored"] and "ca.pem was altered" in report["events"][0]["detail"]
    assert not (state.dir / "guard" / "device.key").exists()


async def test_run_forever_evaluates_a_new_bundle_at_once(env):
    engine, server, _clock, root = env
    stop = asyncio.Event()
    loop = asyncio.create_task(engine.run_forever(stop))
    try:
        for _ in range(100):
            if engine.store.meta("last_evaluation"):
                break
            await asyncio.sleep(0.02)
        assert server.reports == []  # no bundle yet: nothing to report against
        engine.handle(bundle([MOTD]))
        for _ in range(200):
            if server.reports:
                break
            await asyncio.sleep(0.02)
        assert server.reports and (root / "etc" / "motd").exists()
    finally:
        stop.set()
        await asyncio.wait_for(loop, 5)


def test_report_is_fitted_under_the_size_limit():
    report = {"bundle_sha": "s", "rules": [{"id": f"r{i}", "status": "error", "detail": "x" * 1000}
              for i in range(2000)], "events": []}  # fmt: skip
    fitted = fit_report(report)
    assert len(json.dumps(fitted).encode()) <= 1_000_000
    assert len(fitted["rules"]) == 2000 and fitted["rules"][0]["detail"] == "x" * 200


def _body(report: dict) -> int:
    return len(json.dumps({"seq": 2**62, **report}, separators=(",", ":"),
                          ensure_ascii=False).encode())  # fmt: skip


def test_a_report_of_ten_thousand_and_one_rules_fits_in_a_mebibyte():
    ids = [f"setting:ini:/etc/app/service-{i:05d}.conf:main.opt" for i in range(10_001)]
    report = {"bundle_sha": "s" * 64, "evaluated_at": "2026-11-23T21:00:00+00:00",
              "clock_offset_s": 0.0,
              "rules": [{"id": i, "status": "noncompliant", "detail": "é" * 1000} for i in ids],
              "events": [{"rule_id": ids[n], "kind": "repair_failed", "detail": "x" * 1000,
                          "at": "2026-11-23T21:00:00+00:00"} for n in range(500)]}  # fmt: skip
    fitted = fit_report(report)
    assert _body(fitted) <= 1024 * 1024
    assert [r["id"] for r in fitted["rules"]] == ids  # every rule is still there
    assert {r["status"] for r in fitted["rules"]} == {"noncompliant"}


def test_a_report_with_very_long_ids_keeps_the_telling_statuses():
    rules = [{"id": f"{i:05d}" + "p" * 1195, "status": "compliant", "detail": ""}
             for i in range(10_000)]  # fmt: skip
    rules[1234]["status"] = "error"
    rules[9999]["status"] = "noncompliant"
    fitted = fit_report({"bundle_sha": "s", "rules": rules, "events": []})
    assert _body(fitted) <= 1024 * 1024 and fitted["rules"]
    kept = {r["id"][:5]: r["status"] for r in fitted["rules"]}
    assert kept["01234"] == "error" and kept["09999"] == "noncompliant"


# --- software rules ---


def test_installed_versions_by_source():
    inv = {"sw.dpkg.telnet": "0.17-44", "sw.pip.acme-av": "2.0,2.2"}
    assert installed_versions("telnet", "any", inv, {}) == [("dpkg", "0.17-44")]
    assert installed_versions("telnet", "rpm", inv, {}) == []
    assert installed_versions("Acme_AV", "pip", inv, {}) == [("pip", "2.0"), ("pip", "2.2")]
    assert installed_versions("acme-av", "custos", inv, {"acme-av": "2.1"}) == [("custos", "2.1")]


class FakeManager:
    """The SoftwareManager's interface as the policy engine uses it, over a real store."""

    def __init__(self, store: SoftwareStore) -> None:
        self.store = store
        self.jobs: list[dict] = []

    def handle(self, payload: dict) -> dict:
        self.jobs.append(payload)
        self.store.add(payload)
        return {"result": {"accepted": True}}


async def test_required_software_is_installed_through_a_software_job(env):
    engine, _server, clock, _root = env
    manager = FakeManager(SoftwareStore(engine.state._db))
    engine.software = engine.packages.manager = manager
    engine.inventory = lambda: {"sw.dpkg.telnet": "0.17"}
    install = {"deployment_id": "policy:p1", "package_id": "pkg1", "action": "install",
               "descriptor": {"name": "acme-av"}, "signature": "sig", "activate_at": None,
               "window": None, "limit_bps": None}  # fmt: skip
    rules = [
        {"id": "software_required:acme-av", "type": "software_required", "policy": "base",
         "name": "acme-av", "min_version": "2.1", "source": "custos", "install": install},
        {"id": "software_required:nano", "type": "software_required", "policy": "base",
         "name": "nano", "source": "any"},
        {"id": "software_forbidden:telnet", "type": "software_forbidden", "policy": "base",
         "name": "telnet", "source": "any"},
    ]  # fmt: skip
    engine.handle(bundle(rules))
    out = await engine.evaluate()
    assert out["software_required:acme-av"].status == "noncompliant"
    assert "installing (job policy:p1:acme-av:1)" in out["software_required:acme-av"].detail
    assert [j["deployment_id"] for j in manager.jobs] == ["policy:p1:acme-av:1"]
    assert "nothing to install from" in out["software_required:nano"].detail
    assert "not installed by Custos" in out["software_forbidden:telnet"].detail
    clock.t += 61
    await engine.evaluate()
    assert len(manager.jobs) == 1  # the job runs: not started twice
    # the software job finishes: installed
    manager.store.set_state("policy:p1:acme-av:1", "done")
    manager.store.record_installed("acme-av", "2.1.3", "s" * 64, "pkg1", "/nowhere")
    clock.t += 61
    out = await engine.evaluate()
    assert out["software_required:acme-av"].status == "repaired"
    assert out["software_required:acme-av"].events == [("repaired", "installed: custos 2.1.3")]
    clock.t += 61
    assert (await engine.evaluate())["software_required:acme-av"].status == "compliant"


async def test_a_failed_install_is_retried_later_with_a_new_job_id(env):
    engine, _server, clock, _root = env
    manager = FakeManager(SoftwareStore(engine.state._db))
    engine.software = engine.packages.manager = manager
    install = {
        "deployment_id": "policy:p1",
        "package_id": "pkg1",
        "descriptor": {},
        "signature": "",
    }
    rule = {"id": "software_required:acme-av", "type": "software_required", "policy": "base",
            "name": "acme-av", "source": "custos", "install": install}  # fmt: skip
    engine.handle(bundle([rule]))
    await engine.evaluate()
    manager.store.set_state("policy:p1:acme-av:1", "done")  # finished without installing
    clock.t += 61
    out = (await engine.evaluate())["software_required:acme-av"]
    assert ("repair_failed", "job policy:p1:acme-av:1 did not fix it") in out.events
    assert len(manager.jobs) == 1  # backing off
    clock.t += 600
    await engine.evaluate()
    assert [j["deployment_id"] for j in manager.jobs][-1] == "policy:p1:acme-av:2"


async def test_forbidden_custos_package_is_removed_through_a_job(env):
    engine, _server, clock, _root = env
    store = SoftwareStore(engine.state._db)
    manager = FakeManager(store)
    engine.software = engine.packages.manager = manager
    store.add({"deployment_id": "dep1", "package_id": "pkgT", "action": "install",
               "descriptor": {"name": "telnet"}, "signature": "sig"})  # fmt: skip
    store.set_state("dep1", "done")
    store.record_installed("telnet", "1.0", "t" * 64, "pkgT", "")
    rule = {"id": "software_forbidden:telnet", "type": "software_forbidden", "policy": "base",
            "name": "telnet", "source": "any"}  # fmt: skip
    engine.handle(bundle([rule]))
    out = (await engine.evaluate())["software_forbidden:telnet"]
    assert out.status == "noncompliant" and "removing" in out.detail
    assert manager.jobs[0]["action"] == "uninstall" and manager.jobs[0]["signature"] == "sig"
    store.forget_installed("telnet")
    clock.t += 61
    assert (await engine.evaluate())["software_forbidden:telnet"].status == "repaired"


async def test_unknown_rule_type_does_not_stop_the_others(env):
    engine, *_ = env
    engine.handle(bundle([{"id": "x", "type": "quantum_entanglement"}, MOTD]))
    out = await engine.evaluate()
    assert out["x"].status == "unsupported" and out["file:/etc/motd"].status == "repaired"
