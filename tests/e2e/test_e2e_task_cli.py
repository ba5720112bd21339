"""`custos task …` through the real CLI against a real server and agent."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from e2e_harness import ADMIN_PASSWORD, CUSTOS, E2E, clean_env, wait_for

pytestmark = pytest.mark.e2e


def _cli(
    env: dict[str, str], *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CUSTOS, *args], capture_output=True, text=True, env=env, input=stdin, timeout=120
    )


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_task_commands(e2e: E2E, tmp_path: Path) -> None:
    env = clean_env(CUSTOS_CLI_CONFIG=str(tmp_path / "cli"), COLUMNS="220")
    login = _cli(
        env,
        *("login", e2e.url, "--user", "admin", "--password-stdin"),
        *("--ca-fingerprint", e2e.fingerprint),
        stdin=ADMIN_PASSWORD + "\n",
    )
    assert login.returncode == 0, login.stderr
    agent = e2e.agent("cli-task")
    agent.start()
    script = tmp_path / "cleanup.sh"
    script.write_text('echo "cleaned $1"\n')

    bad = _cli(
        env, "task", "create", "t", "--target", agent.name, "--cron", "61 * * * *", "--", "true"
    )
    assert bad.returncode != 0 and "cron" in bad.stderr
    bad = _cli(
        env,
        "task",
        "create",
        "t",
        "--target",
        agent.name,
        "--every",
        "2",
        "--window",
        "someday 1-2",
        "--",
        "true",
    )
    assert bad.returncode != 0 and "window" in bad.stderr

    made = _cli(
        env, "task", "create", "cleanup", "--target", agent.name, "--every", "2",
        "--script", str(script), "--grace", "1m", "--", "tmp",
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    task_id = made.stdout.strip()
    assert len(task_id) == 32 and "1 device" in made.stderr

    def two_runs() -> list[dict] | None:
        res = _cli(env, "task", "runs", "cleanup", "--json")
        assert res.returncode == 0, res.stderr
        runs = json.loads(res.stdout)
        return runs if len(runs) >= 2 else None

    runs = wait_for("two runs of the task", two_runs, timeout=40, interval=0.5)
    assert all(r["stdout"] == "cleaned tmp\n" and r["state"] == "succeeded" for r in runs)

    table = _cli(env, "task", "runs", "cleanup", "--device", agent.name)
    assert table.returncode == 0 and "succeeded" in table.stdout and "cli-task" in table.stdout
    listed = _cli(env, "task", "ls")
    assert "cleanup" in listed.stdout and "every 2 s" in listed.stdout
    shown = _cli(env, "task", "show", "cleanup")
    assert shown.returncode == 0 and "cli-task" in shown.stdout and "Next runs" in shown.stdout
    off = _cli(env, "task", "disable", "cleanup")
    assert off.returncode == 0 and "revision 2" in off.stderr
    assert json.loads(_cli(env, "task", "show", task_id, "--json").stdout)["enabled"] is False
    gone = _cli(env, "task", "rm", "cleanup")
    assert gone.returncode == 0, gone.stderr
    missing = _cli(env, "task", "show", "cleanup")
    assert missing.returncode != 0 and "no task" in missing.stderr
