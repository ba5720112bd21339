"""`custos demo` and `custos sim` as real processes: a server, a fleet, a clean stop."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.e2e

CUSTOS = [sys.executable, "-c", "from custos.cli.main import main; main()"]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("CUSTOS_")}


def _wait(
    what: str,
    fn: Callable[[], Any],
    proc: subprocess.Popen[bytes],
    log: Path,
    timeout: float = 120.0,
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            got = fn()
        except (OSError, httpx.HTTPError, ValueError, KeyError):
            got = None
        if got:
            return got
        if proc.poll() is not None:
            pytest.fail(f"demo exited ({proc.returncode}) before {what}:\n{log.read_text()}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}:\n{log.read_text()[-5000:]}")
        time.sleep(0.3)


def _servers_of(data_dir: Path) -> list[int]:
    """Pids of processes whose command line names this data directory (Linux /proc)."""
    pids = []
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else ():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"server" in cmdline and str(data_dir).encode() in cmdline:
            pids.append(int(entry.name))
    return pids


class _Demo:
    """One `custos demo` process and an admin client for its server."""

    def __init__(self, data_dir: Path, port: int, log: Path, devices: int) -> None:
        self.data_dir, self.port, self.log = data_dir, port, log
        self.url = f"https://127.0.0.1:{port}"
        self._fh = log.open("wb")
        self.proc = subprocess.Popen(
            [
                *CUSTOS,
                "demo",
                "--devices",
                str(devices),
                "--port",
                str(port),
                "--data-dir",
                str(data_dir),
                "--interval",
                "2",
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._fh,
            stderr=subprocess.STDOUT,
            env=_env(),
        )
        self.http = httpx.Client(base_url=self.url, verify=False, timeout=10)
        self.token = ""

    def login(self) -> bool:
        pw = (self.data_dir / "demo-admin-password").read_text().strip()
        r = self.http.post("/api/v1/auth/login", json={"username": "admin", "password": pw})
        if r.status_code != 200:
            return False
        self.token = r.json()["token"]
        return True

    def devices(self) -> list[dict[str, Any]]:
        r = self.http.get("/api/v1/devices", headers={"authorization": f"Bearer {self.token}"})
        r.raise_for_status()
        return r.json()  # type: ignore[no-any-return]

    def wait(self, what: str, fn: Callable[[], Any], timeout: float = 120.0) -> Any:
        return _wait(what, fn, self.proc, self.log, timeout)

    def stop(self, sig: int) -> int:
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(20)
        finally:
            self.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for pid in _servers_of(self.data_dir):  # never leave a server behind, even on failure
            os.kill(pid, signal.SIGKILL)
        self.http.close()
        self._fh.close()


def test_demo_runs_a_fleet_keeps_it_across_runs_and_stops_cleanly(tmp_path: Path) -> None:
    data_dir = tmp_path / "demo"
    port = _free_port()
    demo = _Demo(data_dir, port, tmp_path / "demo-1.log", devices=5)
    try:
        demo.wait("the admin login", demo.login)
        listed = demo.wait("5 devices", lambda: (d := demo.devices()) and len(d) == 5 and d)
        assert all(d["groups"] == ["demo"] for d in listed)
        assert all(d["agent_version"].endswith("+sim") for d in listed)
        demo.wait("every device checking in", lambda: all(d["last_seen"] for d in demo.devices()))
        first_ids = {d["id"] for d in demo.devices()}

        # `custos sim` against the same server, with the demo's enrolment token
        state = json.loads((data_dir / "demo.json").read_text())
        sim = subprocess.run(
            [
                *CUSTOS,
                "sim",
                "--server",
                demo.url,
                "--token",
                state["enroll_token"],
                "--ca-fingerprint",
                state["ca_fingerprint"],
                "--devices",
                "3",
                "--seed",
                "9",
                "--interval",
                "0.5",
                "--duration",
                "4",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env=_env(),
        )
        assert sim.returncode == 0, sim.stderr
        assert "enrolled 3/3" in sim.stderr and "0 errors" in sim.stderr
        assert len(demo.devices()) == 8

        assert demo.stop(signal.SIGINT) == 0
    finally:
        demo.close()
    out = demo.log.read_text()
    assert "sha256:" in out and "custos login" in out and "Stopping the server" in out
    assert _port_free(port) and not _servers_of(data_dir)
    password = (data_dir / "demo-admin-password").read_text()
    assert (data_dir / "demo-admin-password").stat().st_mode & 0o777 == 0o600

    # a second run: same password, same simulated devices (nothing enrolled twice)
    demo = _Demo(data_dir, port, tmp_path / "demo-2.log", devices=5)
    try:
        demo.wait("the admin login", demo.login)
        assert (data_dir / "demo-admin-password").read_text() == password
        time.sleep(3)
        assert {d["id"] for d in demo.devices()} >= first_ids
        assert len(demo.devices()) == 8
        assert demo.stop(signal.SIGTERM) == 0
    finally:
        demo.close()
    assert password.strip() in demo.log.read_text()
    assert _port_free(port) and not _servers_of(data_dir)


def test_demo_on_a_busy_port_says_so(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        res = subprocess.run(
            [*CUSTOS, "demo", "--port", str(port), "--data-dir", str(tmp_path / "d")],
            capture_output=True,
            text=True,
            timeout=60,
            env=_env(),
        )
    assert res.returncode == 1
    assert f"port {port}" in res.stderr and "--port" in res.stderr
    assert not _servers_of(tmp_path / "d")
