"""The process service provider with real processes: started detached, restarted when killed."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import uuid

import pytest

from custos.agent.policy import services
from custos.agent.policy.base import Context, Outcome, Sandbox

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc")


@pytest.fixture
def ctx(tmp_path):
    (tmp_path / "root").mkdir()
    c = Context(sandbox=Sandbox(tmp_path / "root"), state_dir=tmp_path / "state")
    yield c
    for child in c.extra.get("supervisor", services.ProcessSupervisor()).children.values():
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        child.wait(5)


def daemon_rule(marker: str, **kw) -> dict:
    script = "import time\nwhile True: time.sleep(1)"
    return {"id": f"service:{marker}", "type": "service", "name": marker, "provider": "process",
            "match": marker, "start": [sys.executable, "-c", script, marker], **kw}  # fmt: skip


async def test_missing_process_is_started_detached_and_restarted_after_a_kill(ctx):
    marker = f"custos-policy-test-{uuid.uuid4().hex}"
    rule = daemon_rule(marker)
    first = await services.evaluate(rule, ctx)
    assert first.status == "repaired", first.detail
    pid = services.find_process(marker)
    assert pid is not None and os.getsid(pid) == pid  # its own session
    assert (ctx.state_dir / "policy" / f"{marker}.log").exists()
    assert (await services.evaluate(rule, ctx)).status == "compliant"
    os.kill(pid, signal.SIGKILL)
    ctx.extra["supervisor"].children[marker].wait(5)  # dead (the next evaluation reaps it)
    again = await services.evaluate(rule, ctx)
    assert again.status == "repaired" and [k for k, _ in again.events] == ["drift", "repaired"]
    new_pid = services.find_process(marker)
    assert new_pid is not None and new_pid != pid


async def test_a_start_that_exits_at_once_is_a_failed_repair(ctx):
    marker = f"custos-policy-test-{uuid.uuid4().hex}"
    rule = daemon_rule(marker, start=[sys.executable, "-c", "import sys; print('no licence'); "
                                      "sys.exit(3)"])  # fmt: skip
    out = await services.evaluate(rule, ctx)
    assert out.status == "noncompliant"
    assert "exited with code 3" in out.detail and "no licence" in out.detail
    assert [k for k, _ in out.events] == ["drift", "repair_failed"]
    missing = await services.evaluate({**rule, "start": None}, ctx)
    assert missing.status == "noncompliant" and "no start command" in missing.detail


async def test_service_waits_for_its_package_and_systemd_is_unsupported_in_a_sandbox(ctx):
    marker = f"custos-policy-test-{uuid.uuid4().hex}"
    ctx.outcomes["software_required:acme-av"] = Outcome("noncompliant", "not installed")
    out = await services.evaluate(daemon_rule(marker, package="acme-av"), ctx)
    assert out.status == "noncompliant" and "acme-av is not installed" in out.detail
    assert services.find_process(marker) is None  # not started before its package
    unit = {"id": "service:cron", "type": "service", "name": "cron", "provider": "systemd"}
    assert (await services.evaluate(unit, ctx)).status == "unsupported"
