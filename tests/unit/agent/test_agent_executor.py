"""The process executor: exit codes, output capture and limits, timeouts, cancellation."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from pathlib import Path

import psutil
import pytest

from custos.agent import executor
from custos.agent.executor import SUPPORTED_INTERPRETERS, run_process, script_argv

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX process groups")

PY = sys.executable


def _gone(pid: int) -> bool:
    # Orphans are reparented to PID 1, which may not reap them; a zombie is dead enough.
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def _wait_gone(pid: int, within: float = 5.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if _gone(pid):
            return True
        await asyncio.sleep(0.05)
    return _gone(pid)


async def _wait_for_file(path: Path, within: float = 5.0) -> str:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return path.read_text().strip()
        await asyncio.sleep(0.02)
    raise AssertionError(f"{path} was not written")


def _kill_quietly(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


# --------------------------------------------------------------------------- basics


async def test_exit_codes() -> None:
    ok = await run_process(["true"], timeout=10)
    assert ok.exit_code == 0 and not ok.timed_out and ok.error is None
    failed = await run_process(["sh", "-c", "exit 7"], timeout=10)
    assert failed.exit_code == 7
    assert failed.duration_s >= 0


async def test_stdout_and_stderr_are_captured_separately() -> None:
    res = await run_process(["sh", "-c", "echo out; echo err >&2; echo more"], timeout=10)
    assert res.stdout == "out\nmore\n"
    assert res.stderr == "err\n"
    assert not res.truncated


async def test_invalid_utf8_is_replaced() -> None:
    res = await run_process(
        [PY, "-c", "import sys; sys.stdout.buffer.write(b'a\\xffb')"], timeout=10
    )
    assert res.stdout == "a\ufffdb"


async def test_signal_exit_is_negative() -> None:
    res = await run_process(["sh", "-c", "kill -9 $$"], timeout=10)
    assert res.exit_code == -signal.SIGKILL


async def test_missing_program_is_an_error_not_an_exception() -> None:
    res = await run_process(["/nonexistent/custos-no-such-program", "x"], timeout=10)
    assert res.exit_code is None
    assert res.error and "custos-no-such-program" in res.error
    assert not res.timed_out and res.stdout == "" and res.stderr == ""


async def test_bad_cwd_is_an_error() -> None:
    res = await run_process(["true"], timeout=10, cwd="/nonexistent/dir")
    assert res.exit_code is None and res.error


async def test_empty_argv_is_an_error() -> None:
    res = await run_process([], timeout=10)
    assert res.exit_code is None and res.error


async def test_invalid_arguments_raise() -> None:
    with pytest.raises(ValueError):
        await run_process(["true"], timeout=0)
    with pytest.raises(ValueError):
        await run_process(["true"], timeout=1, max_output=-1)


async def test_env_and_cwd(tmp_path: Path) -> None:
    res = await run_process(
        ["/bin/sh", "-c", 'echo "$CUSTOS_X"; pwd'],
        timeout=10,
        env={"CUSTOS_X": "hello there", "PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        cwd=str(tmp_path),
    )
    assert res.stdout == f"hello there\n{tmp_path.resolve()}\n"


# --------------------------------------------------------------------------- stdin


async def test_stdin_is_passed_through() -> None:
    res = await run_process(["cat"], timeout=10, stdin=b"line one\nline two\n")
    assert res.stdout == "line one\nline two\n"


async def test_large_stdin() -> None:
    data = b"x" * (3 * 1024 * 1024)
    res = await run_process(["wc", "-c"], timeout=20, stdin=data)
    assert res.stdout.strip() == str(len(data))


async def test_without_stdin_the_child_reads_eof() -> None:
    res = await run_process(["cat"], timeout=5)
    assert res.exit_code == 0 and res.stdout == "" and not res.timed_out


async def test_child_that_ignores_stdin() -> None:
    res = await run_process(["true"], timeout=5, stdin=b"y" * (2 * 1024 * 1024))
    assert res.exit_code == 0 and res.error is None


# --------------------------------------------------------------------------- output limits


async def test_truncation_marker_and_limit_per_stream() -> None:
    code = "import sys; sys.stdout.write('a' * 5000); sys.stderr.write('b' * 50)"
    res = await run_process([PY, "-c", code], timeout=10, max_output=100)
    assert res.truncated
    assert res.stdout.startswith("a" * 100)
    assert not res.stdout.startswith("a" * 101)
    assert "[custos: output truncated after 100 bytes" in res.stdout
    assert res.stdout.endswith("]\n")
    # stderr stayed under its own limit, so it carries no marker.
    assert res.stderr == "b" * 50


async def test_output_beyond_the_limit_is_drained() -> None:
    # 20 MB would fill any pipe buffer: the child only finishes if we keep reading.
    code = (
        "import sys\n"
        "for _ in range(20): sys.stdout.write('z' * 1_000_000)\n"
        "sys.stderr.write('e' * 500_000)"
    )
    started = time.monotonic()
    res = await run_process([PY, "-c", code], timeout=30, max_output=1000)
    assert res.exit_code == 0 and not res.timed_out
    assert res.truncated
    assert res.stdout.startswith("z" * 1000)
    assert "19999000 more bytes dropped" in res.stdout
    assert res.stderr.startswith("e" * 1000) and "truncated" in res.stderr
    assert time.monotonic() - started < 20


async def test_exact_limit_is_not_truncated() -> None:
    res = await run_process(["printf", "12345"], timeout=10, max_output=5)
    assert res.stdout == "12345" and not res.truncated


# --------------------------------------------------------------------------- timeouts


async def test_timeout_kills_the_child() -> None:
    started = time.monotonic()
    res = await run_process(["sleep", "30"], timeout=0.5)
    elapsed = time.monotonic() - started
    assert res.timed_out
    assert res.exit_code == -signal.SIGTERM
    assert elapsed < 5


async def test_timeout_kills_the_whole_group(tmp_path: Path) -> None:
    pidfile = tmp_path / "grandchild.pid"
    script = f"sleep 30 & echo $! > {pidfile}; sleep 30"
    started = time.monotonic()
    res = await run_process(["sh", "-c", script], timeout=1)
    assert res.timed_out
    assert time.monotonic() - started < 6
    grandchild = int(await _wait_for_file(pidfile))
    try:
        assert await _wait_gone(grandchild), "the grandchild survived the timeout"
    finally:
        _kill_quietly(grandchild)


async def test_term_resistant_child_is_killed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(executor, "TERM_GRACE_S", 0.5)
    code = (
        "import signal, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print('ready', flush=True)\n"
        "time.sleep(30)"
    )
    started = time.monotonic()
    res = await run_process([PY, "-c", code], timeout=2)
    assert res.timed_out
    assert res.exit_code == -signal.SIGKILL
    assert res.stdout == "ready\n"
    assert time.monotonic() - started < 6


async def test_detached_term_resistant_grandchild_is_killed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # The grandchild ignores SIGTERM and holds no output pipe: only the group shows it.
    monkeypatch.setattr(executor, "TERM_GRACE_S", 0.5)
    pidfile = tmp_path / "grandchild.pid"
    script = f"(trap '' TERM; exec sleep 30) >/dev/null 2>&1 & echo $! > {pidfile}; sleep 30"
    res = await run_process(["sh", "-c", script], timeout=1)
    assert res.timed_out
    grandchild = int(await _wait_for_file(pidfile))
    try:
        assert await _wait_gone(grandchild), "the grandchild survived the timeout"
    finally:
        _kill_quietly(grandchild)


async def test_output_before_timeout_is_kept() -> None:
    res = await run_process(["sh", "-c", "echo started; sleep 30"], timeout=0.5)
    assert res.timed_out and res.stdout == "started\n"


async def test_background_process_holding_the_pipe_does_not_block(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(executor, "PIPE_GRACE_S", 0.3)
    started = time.monotonic()
    res = await run_process(["sh", "-c", "sleep 30 & echo $!"], timeout=20)
    try:
        assert not res.timed_out and res.exit_code == 0
        assert time.monotonic() - started < 5
    finally:
        _kill_quietly(int(res.stdout.strip()))


# --------------------------------------------------------------------------- cancellation


async def test_cancellation_kills_the_child(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    grandfile = tmp_path / "grandchild.pid"
    script = f"sleep 30 & echo $! > {grandfile}; echo $$ > {pidfile}; sleep 30"
    task = asyncio.create_task(run_process(["sh", "-c", script], timeout=60))
    child = int(await _wait_for_file(pidfile))
    grandchild = int(await _wait_for_file(grandfile))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    try:
        assert await _wait_gone(child), "the child survived cancellation"
        assert await _wait_gone(grandchild), "the grandchild survived cancellation"
    finally:
        _kill_quietly(child)
        _kill_quietly(grandchild)


async def test_no_zombie_children_are_left() -> None:
    for _ in range(5):
        await run_process(["sh", "-c", "echo hi"], timeout=10)
    await run_process(["sleep", "30"], timeout=0.2)
    await asyncio.sleep(0.2)
    zombies = [p.pid for p in psutil.Process().children() if p.status() == psutil.STATUS_ZOMBIE]
    assert zombies == []


# --------------------------------------------------------------------------- scripts


def test_script_argv_mapping(monkeypatch: pytest.MonkeyPatch) -> None:
    assert script_argv("sh", "/tmp/s.sh", ["a", "b c"]) == ["/bin/sh", "/tmp/s.sh", "a", "b c"]
    assert script_argv("python", "/tmp/s.py", []) == [sys.executable, "/tmp/s.py"]
    flags = ["-NoProfile", "-NonInteractive", "-ExecutionPolicy", "Bypass", "-File"]
    monkeypatch.setattr(sys, "platform", "linux")
    assert script_argv("powershell", "/tmp/s.ps1", ["x"]) == ["pwsh", *flags, "/tmp/s.ps1", "x"]
    monkeypatch.setattr(sys, "platform", "win32")
    assert script_argv("powershell", "C:\\s.ps1", []) == ["powershell.exe", *flags, "C:\\s.ps1"]
    assert SUPPORTED_INTERPRETERS == ("sh", "python", "powershell")


@pytest.mark.parametrize("interpreter", ["bash", "", "cmd", "SH"])
def test_script_argv_rejects_unknown_interpreters(interpreter: str) -> None:
    with pytest.raises(ValueError, match="unsupported interpreter"):
        script_argv(interpreter, "/tmp/x", [])


async def test_scripts_run_end_to_end(tmp_path: Path) -> None:
    sh = tmp_path / "s.sh"
    sh.write_text('echo "sh:$1:$#"\n')
    res = await run_process(script_argv("sh", str(sh), ["one two"]), timeout=10)
    assert res.stdout == "sh:one two:1\n"
    py = tmp_path / "s.py"
    py.write_text("import sys\nprint('py', sys.argv[1:])\nsys.exit(3)\n")
    res = await run_process(script_argv("python", str(py), ["x"]), timeout=10)
    assert res.stdout == "py ['x']\n" and res.exit_code == 3
