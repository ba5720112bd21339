"""A throwaway Mosquitto for one test (own config, port, certificates, ACL), and device identities.

The shared broker on 127.0.0.1:1883 is fine for publishing and subscribing; a test that
needs TLS, an ACL or a broker that goes down starts its own with this.
"""

from __future__ import annotations

import asyncio
import getpass
import shutil
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import NameOID

from custos.devices.ca import CertificateAuthority

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
SHARED_BROKER = "mqtt://127.0.0.1:1883"


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def unique_prefix(tag: str) -> str:
    """A topic prefix no other test run uses (the shared broker is shared by parallel runs)."""
    return f"custos-test/{tag}-{uuid.uuid4().hex[:10]}/wake"


class Mosquitto:
    """One mosquitto process on its own configuration; start() again after stop() to restart."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.log_path = root / "mosquitto.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.ports: list[int] = []

    def start(self, config: str, ports: list[int], timeout: float = 10.0) -> None:
        """Write the config (plus our own settings) and wait until every port accepts."""
        conf = self.root / "mosquitto.conf"
        # as root mosquitto would switch to user "mosquitto", who cannot read tmp_path
        conf.write_text(f"user {getpass.getuser()}\npersistence false\n{config}")
        self.ports = ports
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [MOSQUITTO, "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        for port in ports:
            while True:
                if self.proc.poll() is not None:
                    pytest.fail(f"mosquitto exited with {self.proc.returncode}:\n{self.log()}")
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        pytest.fail(f"mosquitto not listening on {port}:\n{self.log()}")
                    time.sleep(0.05)

    def stop(self) -> None:
        """Stop it (SIGTERM, then SIGKILL); always reaped."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def log(self) -> str:
        """What mosquitto printed."""
        try:
            return self.log_path.read_text(errors="replace")[-5000:]
        except OSError:
            return ""


def password_file(path: Path, users: dict[str, str]) -> Path:
    """A mosquitto password file (hashed by mosquitto_passwd; no password on a command line)."""
    path.write_text("".join(f"{u}:{p}\n" for u, p in users.items()))
    path.chmod(0o600)
    subprocess.run([MOSQUITTO_PASSWD, "-U", str(path)], check=True, capture_output=True)
    return path


@dataclass
class DeviceFiles:
    """A device identity as `custos agent enroll` leaves it: id, certificate and key files."""

    device_id: str
    cert: Path
    key: Path


def issue_device(ca: CertificateAuthority, root: Path) -> DeviceFiles:
    """An Ed25519 key and a device certificate from the CA's own device-signing path."""
    key = ed25519.Ed25519PrivateKey.generate()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test-device")]))
        .sign(key, None)
    )
    device_id = uuid.uuid4().hex
    issued = ca.sign_device_csr(csr.public_bytes(serialization.Encoding.PEM).decode(), device_id)
    d = root / device_id
    d.mkdir(parents=True)
    (d / "device.pem").write_text(issued.pem)
    (d / "device.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return DeviceFiles(device_id, d / "device.pem", d / "device.key")


async def until(cond: Any, timeout: float = 10.0, what: str = "condition") -> None:
    """Poll cond() until true; fail after timeout."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)
