"""End-to-end harness: a real `custos server` process and real `custos agent` processes.

The server runs over HTTPS with its own CA on a free port, on SQLite or PostgreSQL (the
`db_url` fixture of tests/conftest.py). The admin side talks to it with httpx pinned to that
CA; agents are the real CLI. conftest.py turns this into the `e2e` fixture.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from custos import protocol

ADMIN_PASSWORD = "e2e-admin-pw-1"
# the console script of the environment running the tests (.venv/bin/custos)
CUSTOS = str(Path(sys.prefix) / "bin" / "custos")
if not Path(CUSTOS).exists():  # pragma: no cover - an unusual install
    CUSTOS = shutil.which("custos") or CUSTOS
TERMINAL = ("succeeded", "failed", "interrupted", "expired", "rejected", "cancelled")
LOG_TAIL_CHARS = 20_000
CHECKIN = protocol.DEVICE_API + "/checkin"


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any CUSTOS_* setting, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CUSTOS_")}
    env.update(extra)
    return env


def wait_for(what: str, fn: Callable[[], Any], timeout: float = 20.0, interval: float = 0.1) -> Any:
    """Poll fn until it returns something truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = fn()
        if last:
            return last
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what} (last: {last!r})")
        time.sleep(interval)


def signed_headers(
    key: ed25519.Ed25519PrivateKey,
    device_id: str,
    body: bytes,
    *,
    path: str = CHECKIN,
    method: str = "POST",
    ts: float | None = None,
) -> dict[str, str]:
    """Headers of a device request signed with `key` (the agent's own, or a forger's)."""
    headers = protocol.sign_request(
        key, device_id, method, path, body, int(ts if ts is not None else time.time())
    )
    headers["content-type"] = "application/json"
    return headers


def _stamp() -> str:
    return datetime.now().strftime("%H:%M:%S.%f")[:-3]


def _stop_process(proc: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM, then SIGKILL if it has not exited after `grace` seconds; always reaped."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


class _ChildProcess:
    """A process a test starts, kills (SIGKILL: no shutdown hooks) and stops (SIGTERM)."""

    proc: subprocess.Popen[bytes] | None
    grace = 10.0  # seconds between SIGTERM and SIGKILL in stop()

    def kill(self) -> None:
        """SIGKILL the process."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        """SIGTERM (graceful), SIGKILL if it takes longer than `grace`."""
        if self.proc is not None:
            _stop_process(self.proc, grace=self.grace)


class ServerProcess(_ChildProcess):
    """One `custos server` process; restartable on the same port, data directory and database."""

    grace = 15.0  # the server flushes last-seen times on the way out

    def __init__(self, db_url: str, data_dir: Path, log_path: Path) -> None:
        self.db_url = db_url
        self.data_dir = data_dir
        self.log_path = log_path
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.env = clean_env(
            CUSTOS_ADMIN_PASSWORD=ADMIN_PASSWORD,
            CUSTOS_CHECKIN_INTERVAL_S="1",
            CUSTOS_LAST_SEEN_FLUSH_S="0.5",
        )

    @property
    def running(self) -> bool:
        """Whether the process is alive."""
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self) -> str:
        """The end of the server's output."""
        try:
            return self.log_path.read_text(errors="replace")[-LOG_TAIL_CHARS:]
        except OSError:
            return ""

    def start(self, timeout: float = 30.0) -> None:
        """Start the process and wait until /healthz answers."""
        assert self.proc is None or self.proc.poll() is not None, "server already running"
        argv = [
            CUSTOS, "server", "--data-dir", str(self.data_dir), "--port", str(self.port),
            "--db", self.db_url,
        ]  # fmt: skip
        with self.log_path.open("ab") as log:
            log.write(f"--- {_stamp()} starting {' '.join(argv)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        with httpx.Client(verify=False, timeout=2.0) as http:
            while True:
                if self.proc.poll() is not None:
                    pytest.fail(
                        f"custos server exited with {self.proc.returncode}:\n{self.log_tail()}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if http.get(self.url + "/healthz").status_code == 200:
                        return
                if time.monotonic() > deadline:
                    pytest.fail(f"custos server not healthy after {timeout}s:\n{self.log_tail()}")
                time.sleep(0.1)


class AgentProcess(_ChildProcess):
    """The real agent CLI on one state directory."""

    def __init__(self, name: str, state_dir: Path, log_path: Path) -> None:
        self.name = name
        self.state_dir = state_dir
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.env = clean_env(CUSTOS_AGENT_REBOOT_COMMAND='["true"]')
        self.device_id = ""

    @property
    def running(self) -> bool:
        """Whether the long-running `custos agent run` process is alive."""
        return self.proc is not None and self.proc.poll() is None

    def cli(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run `custos agent ARGS --state-dir DIR` to completion; output is logged too."""
        argv = [CUSTOS, "agent", *args, "--state-dir", str(self.state_dir)]
        started = _stamp()
        res = subprocess.run(
            argv, capture_output=True, text=True, env=self.env, timeout=timeout, check=False
        )
        with self.log_path.open("a") as log:
            log.write(
                f"--- {started}-{_stamp()} {' '.join(argv)} -> {res.returncode}\n"
                f"{res.stdout}{res.stderr}"
            )
        return res

    def enroll(
        self, url: str, token: str, fingerprint: str | None, *, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """`custos agent enroll`; with check, it must succeed and the device id is kept."""
        args = ["enroll", url, "--token", token, "--name", self.name]
        if fingerprint is not None:
            args += ["--ca-fingerprint", fingerprint]
        res = self.cli(*args)
        if check:
            assert res.returncode == 0, res.stderr
            self.device_id = self.peek()["device_id"]
        return res

    def run_once(self) -> subprocess.CompletedProcess[str]:
        """`custos agent run --once`."""
        return self.cli("run", "--once")

    def status(self) -> dict[str, Any]:
        """`custos agent status --json`."""
        res = self.cli("status", "--json")
        assert res.returncode == 0, res.stderr
        return json.loads(res.stdout)  # type: ignore[no-any-return]

    def device_key(self) -> ed25519.Ed25519PrivateKey:
        """The private key `custos agent enroll` stored."""
        key = serialization.load_pem_private_key((self.state_dir / "device.key").read_bytes(), None)
        assert isinstance(key, ed25519.Ed25519PrivateKey)
        return key

    def peek(self) -> dict[str, Any]:
        """The agent's key/values and queue/outbox counts, read straight from its SQLite file.

        Much cheaper than `custos agent status` for polling; tests confirm with status().
        """
        db = sqlite3.connect(self.state_dir / "agent.db", timeout=10)
        try:
            out: dict[str, Any] = dict(db.execute("SELECT k, v FROM kv").fetchall())
            for state, n in db.execute("SELECT state, COUNT(*) FROM queue GROUP BY state"):
                out[f"queue_{state}"] = n
            out["outbox"] = db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
        finally:
            db.close()
        return out

    def start(self) -> None:
        """`custos agent run` in the background."""
        assert self.proc is None or self.proc.poll() is not None, "agent already running"
        argv = [CUSTOS, "agent", "run", "--state-dir", str(self.state_dir), "-v"]
        with self.log_path.open("ab") as log:
            log.write(f"--- {_stamp()} starting {' '.join(argv)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
            )


class Admin:
    """An administrator's HTTPS client, pinned to the server's CA."""

    def __init__(self, url: str, ca_file: Path) -> None:
        ctx = ssl.create_default_context(cafile=str(ca_file))
        self.http = httpx.Client(base_url=url, verify=ctx, timeout=30.0)
        self.token = ""

    def close(self) -> None:
        """Close connections."""
        self.http.close()

    def login(self) -> None:
        """Log in as the first admin."""
        r = self.http.post(
            "/api/v1/auth/login", json={"username": "admin", "password": ADMIN_PASSWORD}
        )
        assert r.status_code == 200, r.text
        self.token = r.json()["token"]

    @property
    def auth(self) -> dict[str, str]:
        """The bearer header."""
        return {"authorization": f"Bearer {self.token}"}

    def get(self, path: str, **kw: Any) -> httpx.Response:
        """GET with the admin token."""
        return self.http.get(path, headers=self.auth, **kw)

    def post(self, path: str, json: Any = None, **kw: Any) -> httpx.Response:
        """POST with the admin token."""
        return self.http.post(path, json=json, headers=self.auth, **kw)

    def enroll_token(self, **body: Any) -> dict[str, Any]:
        """A new enrolment token (uses=1 unless told)."""
        r = self.post("/api/v1/enrollment-tokens", json=body)
        assert r.status_code == 201, r.text
        return r.json()  # type: ignore[no-any-return]

    def command(self, **body: Any) -> dict[str, Any]:
        """Queue a command; it must be accepted."""
        r = self.post("/api/v1/commands", json=body)
        assert r.status_code == 201, r.text
        return r.json()  # type: ignore[no-any-return]

    def device(self, ref: str) -> dict[str, Any]:
        """One device with its inventory."""
        r = self.get(f"/api/v1/devices/{ref}")
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]

    def run_of(self, command_id: str) -> dict[str, Any] | None:
        """The single run of a command (None while the server cannot be reached)."""
        try:
            r = self.get(f"/api/v1/commands/{command_id}")
        except httpx.TransportError:
            return None
        assert r.status_code == 200, r.text
        runs = r.json()["runs"]
        assert len(runs) == 1, runs
        return runs[0]  # type: ignore[no-any-return]

    def wait_run(
        self, command_id: str, states: tuple[str, ...] = TERMINAL, timeout: float = 30.0
    ) -> dict[str, Any]:
        """Poll a command until its run is in one of `states`."""

        def check() -> dict[str, Any] | None:
            run = self.run_of(command_id)
            return run if run is not None and run["state"] in states else None

        return wait_for(f"command {command_id} to reach {states}", check, timeout)  # type: ignore[no-any-return]


class E2E:
    """One test's world: the server, the admin, the agents, a scratch directory."""

    def __init__(self, db_url: str, root: Path, logs: list[tuple[str, Path]]) -> None:
        self.root = root
        self.logs = logs
        self.server = ServerProcess(db_url, root / "server-data", root / "server.log")
        logs.append(("custos server output", self.server.log_path))
        self._admin: Admin | None = None
        self.agents: list[AgentProcess] = []
        self.scratch = root / "scratch"
        self.scratch.mkdir()
        self.ca_pem = ""
        self.fingerprint = ""

    @property
    def admin(self) -> Admin:
        """The logged-in administrator (after start())."""
        assert self._admin is not None, "the server was not started"
        return self._admin

    @property
    def url(self) -> str:
        """The server's base URL."""
        return self.server.url

    def start(self) -> Admin:
        """Start the server, fetch its CA and log the admin in."""
        self.server.start()
        with httpx.Client(verify=False, timeout=10.0) as http:
            ca = http.get(self.url + "/api/v1/ca").json()
        self.ca_pem, self.fingerprint = ca["ca_certificate"], ca["fingerprint"]
        ca_file = self.root / "ca.pem"
        ca_file.write_text(self.ca_pem)
        self._admin = Admin(self.url, ca_file)
        self._admin.login()
        return self._admin

    def agent(self, name: str | None = None, *, enroll: bool = True) -> AgentProcess:
        """A new agent state directory, enrolled with a fresh single-use token unless told."""
        name = name or f"e2e-{len(self.agents) + 1}-{uuid.uuid4().hex[:4]}"
        a = AgentProcess(name, self.root / f"agent-{name}", self.root / f"agent-{name}.log")
        self.agents.append(a)
        self.logs.append((f"agent {name} output", a.log_path))
        if enroll:
            tok = self.admin.enroll_token()
            a.enroll(self.url, tok["token"], tok["ca_fingerprint"])
        return a

    def close(self) -> None:
        """Stop every agent, close the admin client, then stop the server.

        (The server waits for open HTTPS connections when it shuts down, so clients go first.)
        """
        for a in self.agents:
            a.stop()
        if self._admin is not None:
            self._admin.close()
        self.server.stop()
