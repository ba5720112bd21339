"""The README's tour, through the real `custos` CLI against a real server and agent."""

from __future__ import annotations

import json
import shlex
import subprocess
from pathlib import Path

import pytest
from e2e_harness import ADMIN_PASSWORD, CUSTOS, E2E, AgentProcess, clean_env, wait_for

pytestmark = pytest.mark.e2e


def _cli(
    env: dict[str, str], *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CUSTOS, *args], capture_output=True, text=True, env=env, input=stdin, timeout=120
    )


def _login(env: dict[str, str], url: str, fingerprint: str) -> subprocess.CompletedProcess[str]:
    return _cli(
        env,
        *("login", url, "--user", "admin", "--password-stdin", "--ca-fingerprint", fingerprint),
        stdin=ADMIN_PASSWORD + "\n",
    )


def test_readme_tour(e2e: E2E, tmp_path: Path) -> None:
    env = clean_env(CUSTOS_CLI_CONFIG=str(tmp_path / "cli"), COLUMNS="200")
    # login pins the CA given on the command line and refuses a wrong one
    bad = _login(env, e2e.url, "0" * 64)
    assert bad.returncode != 0 and "mismatch" in bad.stderr
    ok = _login(env, e2e.url, e2e.fingerprint)
    assert ok.returncode == 0, ok.stderr

    created = _cli(env, "token", "create", "--uses", "1", "--expires", "1d", "--json")
    assert created.returncode == 0, created.stderr
    tok = json.loads(created.stdout)
    assert {"token", "ca_fingerprint", "enroll_command"} <= tok.keys()
    assert tok["ca_fingerprint"] == e2e.fingerprint

    # the printed enrol command is what the device runs, as printed
    agent = AgentProcess("tour-box", e2e.root / "agent-tour", e2e.root / "agent-tour.log")
    e2e.agents.append(agent)
    e2e.logs.append(("agent tour-box output", agent.log_path))
    argv = shlex.split(tok["enroll_command"])
    assert argv[:3] == ["custos", "agent", "enroll"]
    res = agent.cli(*argv[2:], "--name", "tour-box")
    assert res.returncode == 0, res.stderr
    agent.start()

    def listed() -> list[dict[str, object]] | None:
        out = _cli(env, "device", "ls", "--json")
        assert out.returncode == 0, out.stderr
        devs = json.loads(out.stdout)
        return devs if devs and devs[0].get("last_seen") else None

    devs = wait_for("the device to be listed with a last-seen time", listed, timeout=30)
    assert [d["name"] for d in devs] == ["tour-box"]
    shown = _cli(env, "device", "show", "tour-box", "--json")
    assert shown.returncode == 0 and "os.name" in json.loads(shown.stdout)["inventory"]

    run = _cli(
        env,
        "cmd",
        "run",
        "tour-box",
        "--wait",
        "--timeout",
        "30",
        "--",
        "sh",
        "-c",
        "echo tour-ok; exit 4",
    )
    assert run.returncode == 4, run.stderr
    assert run.stdout.strip() == "tour-ok"
    ls = _cli(env, "cmd", "ls", "--json")
    assert ls.returncode == 0 and json.loads(ls.stdout)[0]["counts"] == {"failed": 1}

    # unknown device: a clear message and a non-zero exit, nothing queued
    nobody = _cli(env, "cmd", "run", "nobody", "--", "true")
    assert nobody.returncode == 1 and "no device" in nobody.stderr
    assert len(json.loads(_cli(env, "cmd", "ls", "--json").stdout)) == 1

    # reports over the real agent's inventory: a table, JSON, and the server's CSV export
    has = _cli(env, "report", "who-has", "bash", "--source", "dpkg", "--json")
    assert has.returncode == 0, has.stderr
    holders = json.loads(has.stdout)["items"]
    assert [h["device_name"] for h in holders] == ["tour-box"] and holders[0]["version"]
    table = _cli(env, "report", "who-has", "bash")
    assert table.returncode == 0 and "tour-box" in table.stdout and "1-1 of 1" in table.stderr
    out = tmp_path / "errors.csv"
    errs = _cli(env, "report", "errors", "--csv", str(out))
    assert errs.returncode == 0, errs.stderr
    assert "tour-box" in out.read_text()  # the run that exited 4
    lacks = _cli(env, "report", "lacks", "no-such-package-xyz", "--csv", "-")
    assert lacks.returncode == 0 and "tour-box" in lacks.stdout
    bad = _cli(env, "report", "errors", "--kind", "nope")
    assert bad.returncode == 2 and "commands or installs" in bad.stderr
