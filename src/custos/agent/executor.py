"""Run remote commands and scripts: bounded output, a hard timeout, no stray children.

The child runs in its own session (POSIX) or process group (Windows) so that a timeout or a
cancellation can take down everything it started, not just the direct child.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

SUPPORTED_INTERPRETERS = ("sh", "python", "powershell")

# How long a timed-out group gets between the polite and the forceful signal.
TERM_GRACE_S = 2.0
# How long to keep reading after the child exited, for output still in flight. Background
# processes that keep stdout/stderr open after the child exits stop being captured after this.
PIPE_GRACE_S = 2.0
# Upper bound on waiting for the exit of a child that was sent SIGKILL.
_KILL_WAIT_S = 5.0

_READ_FDS = (1, 2)


@dataclass(frozen=True)
class ProcessResult:
    """The outcome of one process run."""

    exit_code: int | None
    stdout: str
    stderr: str
    truncated: bool
    timed_out: bool
    duration_s: float
    error: str | None = None


class _Capture:
    """Keeps the first ``limit`` bytes of a stream and counts what it drops."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.chunks: list[bytes] = []
        self.kept = 0
        self.dropped = 0

    def add(self, data: bytes) -> None:
        room = self.limit - self.kept
        if room > 0:
            piece = data[:room]
            self.chunks.append(piece)
            self.kept += len(piece)
        self.dropped += max(0, len(data) - max(room, 0))

    def text(self) -> str:
        out = b"".join(self.chunks).decode("utf-8", errors="replace")
        if self.dropped:
            out += (
                f"\n[custos: output truncated after {self.limit} bytes; "
                f"{self.dropped} more bytes dropped]\n"
            )
        return out


class _Protocol(asyncio.SubprocessProtocol):
    """Collects output as it arrives, so a chatty child never blocks on a full pipe."""

    def __init__(self, loop: asyncio.AbstractEventLoop, limit: int) -> None:
        self.captures = {fd: _Capture(limit) for fd in _READ_FDS}
        self.exited: asyncio.Future[None] = loop.create_future()
        self.pipes_closed: asyncio.Future[None] = loop.create_future()
        self._open = set(_READ_FDS)

    def pipe_data_received(self, fd: int, data: bytes | bytearray) -> None:
        """Store (or count and drop) a chunk of output."""
        capture = self.captures.get(fd)
        if capture is not None:
            capture.add(bytes(data))

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        """Note end of output on stdout or stderr."""
        self._open.discard(fd)
        if not self._open and not self.pipes_closed.done():
            self.pipes_closed.set_result(None)

    def process_exited(self) -> None:
        """Note that the child has exited (and been reaped)."""
        if not self.exited.done():
            self.exited.set_result(None)


def _signal_group(pid: int, force: bool) -> None:
    """Signal the child's whole process group; a group that is already gone is fine."""
    if sys.platform == "win32":
        # No process groups to signal; taskkill /T walks the tree from the child.
        argv = ["taskkill", "/T", "/PID", str(pid)]
        if force:
            argv.insert(1, "/F")
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(argv, capture_output=True, timeout=10, check=False)
    else:
        # The child called setsid(), so its pid is also its process group id.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL if force else signal.SIGTERM)


async def _wait(future: asyncio.Future[None], seconds: float) -> bool:
    """Wait for a future without cancelling it; True when it completed in time."""
    if future.done():
        return True
    done, _ = await asyncio.wait({future}, timeout=max(seconds, 0))
    return bool(done)


def _group_alive(pid: int) -> bool:
    """Whether any process is left in the child's process group (POSIX only)."""
    if sys.platform == "win32":
        return False
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


async def _stop_group(pid: int, protocol: _Protocol) -> None:
    """SIGTERM the group, give it TERM_GRACE_S to finish, then SIGKILL whatever is left."""
    _signal_group(pid, force=False)
    deadline = time.monotonic() + TERM_GRACE_S
    await _wait(protocol.exited, TERM_GRACE_S)
    # Output pipes closing means every process holding them has gone...
    await _wait(protocol.pipes_closed, deadline - time.monotonic())
    # ...but members that closed their output are only visible through the group, and
    # nothing signals when a group empties, so it is polled.
    while time.monotonic() < deadline and _group_alive(pid):  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    _signal_group(pid, force=True)
    await _wait(protocol.exited, _KILL_WAIT_S)


def _spawn_options() -> dict[str, Any]:
    if sys.platform == "win32":
        return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
    return {"start_new_session": True}


async def run_process(
    argv: Sequence[str],
    *,
    # The timeout also drives the group kill, which asyncio.timeout() around a call can't do.
    timeout: float,  # noqa: ASYNC109
    max_output: int = 1_048_576,
    stdin: bytes | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
) -> ProcessResult:
    """Run argv (no shell) with a timeout and capped output; never raises for child failures."""
    if timeout <= 0:
        raise ValueError("timeout must be positive")
    if max_output < 0:
        raise ValueError("max_output must not be negative")
    started = time.monotonic()
    if not argv:
        return ProcessResult(None, "", "", False, False, 0.0, error="empty command line")

    loop = asyncio.get_running_loop()
    try:
        transport, protocol = await loop.subprocess_exec(
            lambda: _Protocol(loop, max_output),
            *argv,
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            **_spawn_options(),
        )
    except (OSError, ValueError, subprocess.SubprocessError) as exc:
        return ProcessResult(
            exit_code=None,
            stdout="",
            stderr="",
            truncated=False,
            timed_out=False,
            duration_s=time.monotonic() - started,
            error=f"cannot start {argv[0]!r}: {exc}",
        )

    pid = transport.get_pid()
    timed_out = False
    try:
        if stdin is not None:
            stdin_pipe = transport.get_pipe_transport(0)
            if isinstance(stdin_pipe, asyncio.WriteTransport):
                # The transport buffers and flushes in the background; close() sends EOF
                # once the buffer is written. A child that exits unread just drops it.
                stdin_pipe.write(stdin)
                stdin_pipe.close()
        if not await _wait(protocol.exited, timeout):
            timed_out = True
            await _stop_group(pid, protocol)
        await _wait(protocol.pipes_closed, PIPE_GRACE_S)
    except BaseException:
        # Cancelled (or failed): nothing the child started may outlive this call. The event
        # loop's child watcher still reaps the child after the transport is closed.
        _signal_group(pid, force=True)
        raise
    finally:
        transport.close()

    stdout = protocol.captures[1]
    stderr = protocol.captures[2]
    return ProcessResult(
        exit_code=transport.get_returncode(),
        stdout=stdout.text(),
        stderr=stderr.text(),
        truncated=bool(stdout.dropped or stderr.dropped),
        timed_out=timed_out,
        duration_s=time.monotonic() - started,
    )


def script_argv(interpreter: str, script_path: str, args: Sequence[str]) -> list[str]:
    """Return the command line that runs script_path with the named interpreter."""
    if interpreter == "sh":
        return ["/bin/sh", script_path, *args]
    if interpreter == "python":
        return [sys.executable, script_path, *args]
    if interpreter == "powershell":
        program = "powershell.exe" if sys.platform == "win32" else "pwsh"
        flags = ["-NoProfile", "-NonInteractive", "-ExecutionPolicy", "Bypass", "-File"]
        return [program, *flags, script_path, *args]
    raise ValueError(f"unsupported interpreter: {interpreter!r}")
