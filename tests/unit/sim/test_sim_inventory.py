"""Simulated inventories: deterministic, realistic, in the agent's key scheme."""

from __future__ import annotations

import ipaddress
import random
import re
from collections import Counter
from datetime import UTC, datetime

import pytest

from custos.agent.inventory import KEY_SCHEME, MAX_KEY_LEN, MAX_VALUE_LEN, inventory_delta
from custos.sim.inventory import fake_hostname, fake_inventory, mutate_inventory

REQUIRED = (
    "os.name",
    "os.version",
    "os.pretty",
    "os.kernel",
    "os.arch",
    "os.hostname",
    "os.boot_time",
    "hw.manufacturer",
    "hw.model",
    "hw.serial",
    "hw.cpu.model",
    "hw.cpu.cores",
    "hw.cpu.threads",
    "hw.memory.total_bytes",
)
HOSTNAME = re.compile(r"^(?:lt|ws|tab|pi|kiosk|edge)-[a-z]+-\d{2,}$")
GIB = 1024**3


@pytest.fixture(scope="module")
def fleet() -> list[dict[str, str]]:
    rng = random.Random(2024)
    return [fake_inventory(rng, i) for i in range(300)]


def _sources(inv: dict[str, str]) -> set[str]:
    return {k.split(".")[1] for k in inv if k.startswith("sw.")}


def test_deterministic_per_seed_and_index() -> None:
    assert fake_inventory(random.Random(7), 3) == fake_inventory(random.Random(7), 3)
    assert fake_inventory(random.Random(7), 3) != fake_inventory(random.Random(8), 3)
    assert fake_inventory(random.Random(7), 3) != fake_inventory(random.Random(7), 4)
    first = random.Random(1)
    second = random.Random(1)
    assert [fake_inventory(first, i) for i in range(5)] == [
        fake_inventory(second, i) for i in range(5)
    ]


def test_now_moves_boot_time_only() -> None:
    now = datetime(2030, 6, 1, tzinfo=UTC)
    default = fake_inventory(random.Random(3), 1)
    shifted = fake_inventory(random.Random(3), 1, now=now)
    changed, removed = inventory_delta(default, shifted)
    assert set(changed) == {"os.boot_time"} and not removed
    booted = datetime.strptime(shifted["os.boot_time"], "%Y-%m-%dT%H:%M:%SZ")
    assert booted.replace(tzinfo=UTC) < now


def test_shape_and_limits(fleet: list[dict[str, str]]) -> None:
    for inv in fleet:
        for key in REQUIRED:
            assert inv.get(key), key
        for key, value in inv.items():
            assert isinstance(value, str)
            assert KEY_SCHEME.match(key), key
            assert len(key) <= MAX_KEY_LEN and len(value) <= MAX_VALUE_LEN
            assert not re.search(r"[\s\x00-\x1f]", key), key
        assert HOSTNAME.match(inv["os.hostname"]), inv["os.hostname"]
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", inv["os.boot_time"])
        assert 3.5 * GIB <= int(inv["hw.memory.total_bytes"]) <= 64 * GIB
        assert 1 <= int(inv["hw.cpu.cores"]) <= int(inv["hw.cpu.threads"])
        assert any(k.startswith("hw.disk.") for k in inv)
        software = [k for k in inv if k.startswith("sw.")]
        assert 40 <= len(software) <= 250


def test_software_sources_match_the_os(fleet: list[dict[str, str]]) -> None:
    for inv in fleet:
        sources = _sources(inv)
        name = inv["os.name"]
        if name.startswith("Windows"):
            assert sources == {"winreg"}
            assert inv["os.arch"] == "AMD64"
            assert any(k.startswith("hw.disk.C:\\.") for k in inv)
        elif name == "macOS":
            assert sources <= {"macapp", "pip"} and "macapp" in sources
            assert inv["hw.manufacturer"] == "Apple Inc."
        else:
            assert sources <= {"dpkg", "pip"} and "dpkg" in sources
            assert name in ("Ubuntu", "Debian GNU/Linux", "Raspbian GNU/Linux")
            assert "sw.dpkg.bash" in inv and "sw.dpkg.apt" in inv


def test_fleet_is_a_realistic_mix(fleet: list[dict[str, str]]) -> None:
    os_names = Counter(inv["os.name"].split()[0] for inv in fleet)
    assert {"Windows", "macOS", "Ubuntu", "Debian", "Raspbian"} <= set(os_names)
    models = {inv["hw.model"] for inv in fleet}
    assert {"Latitude 5440", "ThinkPad T14 Gen 4", "MacBookPro18,3", "NUC13ANHi5"} <= models
    assert any(m.startswith("Raspberry Pi 4 Model B") for m in models)
    assert any(m.startswith("HP EliteBook 840 G10") for m in models)
    with_battery = sum("hw.battery.percent" in inv for inv in fleet)
    assert 0.2 * len(fleet) < with_battery < 0.9 * len(fleet)
    assert any("pip" in _sources(inv) for inv in fleet)
    assert len({inv["hw.serial"] for inv in fleet}) == len(fleet)
    assert len({inv["os.hostname"] for inv in fleet}) == len(fleet)


def test_batteries_and_serials(fleet: list[dict[str, str]]) -> None:
    for inv in fleet:
        if "hw.battery.percent" in inv:
            assert int(inv["hw.battery.percent"]) % 5 == 0
            assert 0 < int(inv["hw.battery.percent"]) <= 100
            assert inv["hw.battery.plugged"] in ("true", "false")
            assert not inv["os.hostname"].startswith(("ws-", "pi-", "kiosk-", "edge-"))
        serial = inv["hw.serial"]
        if inv["hw.manufacturer"] == "Dell Inc.":
            assert re.fullmatch(r"[0-9A-Z]{7}", serial)
        elif inv["hw.manufacturer"] == "Raspberry Pi Ltd":
            assert re.fullmatch(r"[0-9a-f]{16}", serial)
        elif inv["hw.manufacturer"] == "Apple Inc.":
            assert re.fullmatch(r"[0-9A-Z]{10}", serial)


def test_addresses_are_private_and_macs_local(fleet: list[dict[str, str]]) -> None:
    for inv in fleet:
        for key, value in inv.items():
            if key.endswith(".mac"):
                assert re.fullmatch(r"(?:[0-9a-f]{2}:){5}[0-9a-f]{2}", value)
                first = int(value[:2], 16)
                assert first & 0x02 and not first & 0x01  # locally administered unicast
            elif key.endswith(".ipv4"):
                for addr in value.split(","):
                    ip = ipaddress.IPv4Address(addr)
                    assert addr.startswith(("10.", "192.168.")) and ip.is_private
            elif key.endswith(".ipv6"):
                for addr in value.split(","):
                    assert ipaddress.IPv6Address(addr).is_link_local


def test_fake_hostname() -> None:
    rng = random.Random(5)
    names = [fake_hostname(rng, i) for i in range(50)]
    assert all(HOSTNAME.match(n) for n in names)
    assert fake_hostname(random.Random(1), 42, "laptop").startswith("lt-")
    assert fake_hostname(random.Random(1), 42, "laptop").endswith("-0042")
    assert fake_hostname(random.Random(1), 17, "desktop").startswith("ws-")
    assert fake_hostname(random.Random(9), 3) == fake_hostname(random.Random(9), 3)


def test_mutate_makes_a_small_change(fleet: list[dict[str, str]]) -> None:
    rng = random.Random(11)
    kinds: Counter[str] = Counter()
    for inv in fleet[:100]:
        before = dict(inv)
        after = mutate_inventory(rng, inv)
        assert inv == before, "the input must not be modified"
        changed, removed = inventory_delta(inv, after)
        assert 1 <= len(changed) + len(removed) <= 2
        for key in [*changed, *removed]:
            kinds[key.split(".")[0] + ("-removed" if key in removed else "")] += 1
        for key, value in after.items():
            assert KEY_SCHEME.match(key) and isinstance(value, str)
    # Over 100 devices there are software changes, removals and battery/boot drift.
    assert kinds["sw"] > 30
    assert kinds["hw"] + kinds["os"] > 0


def test_mutate_chain_drifts_gradually() -> None:
    rng = random.Random(3)
    inv = fake_inventory(random.Random(3), 0)
    original = dict(inv)
    for _ in range(50):
        nxt = mutate_inventory(rng, inv)
        assert nxt != inv
        inv = nxt
    changed, removed = inventory_delta(original, inv)
    assert 0 < len(changed) + len(removed) <= 100
    assert inv["hw.model"] == original["hw.model"]


def test_mutate_works_on_sparse_inventories() -> None:
    rng = random.Random(0)
    for inv in ({}, {"os.name": "Testix"}, {"sw.pip.x": "1.0"}):
        assert mutate_inventory(rng, inv) != inv
