"""`custos diag` against a real server and a real agent process: the agent answers `diagnose`
with a psutil snapshot, the server stores it, the CLI prints it and lists the history."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from e2e_harness import ADMIN_PASSWORD, CUSTOS, E2E, clean_env

pytestmark = pytest.mark.e2e


def _cli(
    env: dict[str, str], *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CUSTOS, *args], capture_output=True, text=True, env=env, input=stdin, timeout=120
    )


def test_diag_wait_prints_the_snapshot_and_history_lists_it(e2e: E2E, tmp_path: Path) -> None:
    env = clean_env(CUSTOS_CLI_CONFIG=str(tmp_path / "cli"), COLUMNS="200")
    login = _cli(
        env,
        *("login", e2e.url, "--user", "admin", "--password-stdin"),
        *("--ca-fingerprint", e2e.fingerprint),
        stdin=ADMIN_PASSWORD + "\n",
    )
    assert login.returncode == 0, login.stderr
    agent = e2e.agent("diag-box")
    agent.start()

    empty = _cli(env, "diag", "diag-box", "--history")
    assert empty.returncode == 0 and "No diagnostics" in empty.stderr

    shown = _cli(env, "diag", "diag-box", "--wait", "--wait-timeout", "60")
    assert shown.returncode == 0, shown.stderr
    for label in ("Memory available", "Storage free", "Uptime", "Disks", "Top processes"):
        assert label in shown.stdout, shown.stdout
    # the heading names the report's source and kind
    assert "agent snapshot" in shown.stdout

    listed = _cli(env, "diag", "diag-box", "--history", "--json")
    assert listed.returncode == 0, listed.stderr
    reports = json.loads(listed.stdout)
    assert len(reports) == 1
    rep = reports[0]
    assert (rep["source"], rep["kind"]) == ("agent", "snapshot")
    assert rep["mem_total"] > 0 and 0 < rep["mem_available"] <= rep["mem_total"]
    assert rep["storage_total"] and rep["uptime_s"] > 0

    one = _cli(env, "diag", "diag-box", "--report", str(rep["id"]), "--json")
    assert one.returncode == 0, one.stderr
    data = json.loads(one.stdout)["data"]
    assert 0 < len(data["processes"]) <= 10
    assert all(set(p) == {"pid", "name", "rss"} for p in data["processes"])

    # one device only, and a report that does not exist is a clear error
    assert _cli(env, "diag", "group:lab").returncode == 2
    missing = _cli(env, "diag", "diag-box", "--report", "999999")
    assert missing.returncode != 0 and "no diagnostics report" in missing.stderr
