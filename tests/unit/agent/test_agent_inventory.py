"""Inventory collection on this machine, its limits, and the delta helpers."""

from __future__ import annotations

import random
import re
import shutil
import socket
import time
from collections import namedtuple
from pathlib import Path
from typing import Any

import psutil
import pytest

from custos.agent import inventory as inv_mod
from custos.agent.inventory import (
    FACT_KEYS,
    KEY_SCHEME,
    MAX_KEY_LEN,
    MAX_KEYS,
    MAX_VALUE_LEN,
    apply_delta,
    collect_facts,
    collect_inventory,
    inventory_delta,
    key_part,
    normalize_pip_name,
)

Addr = namedtuple("Addr", "family address netmask broadcast ptp")
Part = namedtuple("Part", "device mountpoint fstype opts")
Usage = namedtuple("Usage", "total used free percent")


@pytest.fixture(scope="module")
def inventory() -> dict[str, str]:
    return collect_inventory()


# --------------------------------------------------------------------------- this machine


def test_collect_inventory_has_os_hw_and_software(inventory: dict[str, str]) -> None:
    for key in ("os.name", "os.version", "os.pretty", "os.kernel", "os.arch", "os.hostname"):
        assert inventory.get(key), key
    assert inventory["os.hostname"] == socket.gethostname()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", inventory["os.boot_time"])
    assert int(inventory["hw.cpu.threads"]) == psutil.cpu_count(logical=True)
    assert int(inventory["hw.memory.total_bytes"]) == psutil.virtual_memory().total
    if Path("/proc/cpuinfo").exists():
        assert inventory.get("hw.cpu.model")
    assert any(k.startswith("hw.disk.") and k.endswith(".total_bytes") for k in inventory)


@pytest.mark.skipif(shutil.which("dpkg-query") is None, reason="not a dpkg system")
def test_collect_inventory_lists_dpkg_packages(inventory: dict[str, str]) -> None:
    dpkg = {k: v for k, v in inventory.items() if k.startswith("sw.dpkg.")}
    assert len(dpkg) > 20
    # Every Debian system has these essential packages.
    assert any(k in dpkg for k in ("sw.dpkg.dpkg", "sw.dpkg.dpkg:amd64"))
    assert all(v for v in dpkg.values())


def test_collect_inventory_lists_pip_distributions(inventory: dict[str, str]) -> None:
    # The system python3 may have its own pytest; both versions are then listed.
    assert pytest.__version__ in inventory["sw.pip.pytest"].split(",")
    assert "sw.pip.psutil" in inventory
    pip_names = [k[len("sw.pip.") :] for k in inventory if k.startswith("sw.pip.")]
    assert all(name == normalize_pip_name(name) for name in pip_names)


def test_inventory_values_are_strings_within_limits(inventory: dict[str, str]) -> None:
    assert 0 < len(inventory) <= MAX_KEYS
    for key, value in inventory.items():
        assert isinstance(key, str) and isinstance(value, str)
        assert 0 < len(key) <= MAX_KEY_LEN
        assert len(value) <= MAX_VALUE_LEN
        assert KEY_SCHEME.match(key), key
        assert not re.search(r"[\s\x00-\x1f]", key), key


def test_loopback_is_not_reported(inventory: dict[str, str]) -> None:
    assert not any(k.startswith(("hw.net.lo.", "hw.net.lo0.")) for k in inventory)


def test_collect_inventory_is_fast_and_stable(inventory: dict[str, str]) -> None:
    started = time.perf_counter()
    again = collect_inventory()
    elapsed = time.perf_counter() - started
    assert elapsed < 5.0, f"collect_inventory took {elapsed:.2f}s"
    # Nothing volatile (uptime, free space, battery drift) may appear as a change.
    changed, removed = inventory_delta(inventory, again)
    assert not removed
    assert set(changed) <= {"hw.battery.percent", "hw.battery.plugged"}


def test_collect_facts_is_the_identity_subset(inventory: dict[str, str]) -> None:
    facts = collect_facts()
    assert set(facts) <= set(FACT_KEYS)
    for key in ("os.hostname", "os.name", "os.version", "os.arch"):
        assert facts[key] == inventory[key]
    for key, value in facts.items():
        assert inventory.get(key) == value


# --------------------------------------------------------------------------- robustness


def test_failing_collector_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> dict[str, str]:
        raise RuntimeError("boom")

    def fine() -> dict[str, str]:
        return {"os.name": "Testix"}

    monkeypatch.setattr(inv_mod, "_COLLECTORS", (broken, fine))
    assert collect_inventory() == {"os.name": "Testix"}


def test_limits_are_enforced(monkeypatch: pytest.MonkeyPatch) -> None:
    def big() -> dict[str, str]:
        out = {"os.name": "x" * (MAX_VALUE_LEN + 100), "sw.pip." + "a" * MAX_KEY_LEN: "1"}
        out.update({f"sw.dpkg.p{i:03d}": "1.0" for i in range(100)})
        return out

    monkeypatch.setattr(inv_mod, "_COLLECTORS", (big,))
    monkeypatch.setattr(inv_mod, "MAX_KEYS", 10)
    result = collect_inventory()
    assert len(result) == 10
    assert len(result["os.name"]) == MAX_VALUE_LEN
    assert all(len(k) <= MAX_KEY_LEN for k in result)
    # Earlier collectors' keys win when the cap is reached.
    assert "sw.dpkg.p000" in result and "sw.dpkg.p099" not in result


def test_missing_tool_means_source_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inv_mod.shutil, "which", lambda name: None)
    assert inv_mod._collect_dpkg() == {}
    assert inv_mod._collect_rpm() == {}


def test_failing_tool_means_source_is_skipped() -> None:
    assert inv_mod._run(["sh", "-c", "echo partial; exit 3"]) is None
    assert inv_mod._run(["sleep", "5"], timeout=0.2) is None
    assert inv_mod._run(["sh", "-c", "echo ok"]) == "ok\n"


# --------------------------------------------------------------------------- parsers


def test_dpkg_parsing_keeps_installed_packages_only(monkeypatch: pytest.MonkeyPatch) -> None:
    text = (
        "bash\t5.2.15-2+b7\tii \n"
        "libc6:amd64\t2.36-9+deb12u7\tii \n"
        "held-pkg\t1.0-1\thi \n"
        "removed-pkg\t2.0-1\trc \n"
        "half\t3.0-1\tiU \n"
        "bad line without tabs\n"
    )
    monkeypatch.setattr(inv_mod, "_run", lambda argv, timeout=0: text)
    assert inv_mod._collect_dpkg() == {
        "sw.dpkg.bash": "5.2.15-2+b7",
        "sw.dpkg.libc6:amd64": "2.36-9+deb12u7",
        "sw.dpkg.held-pkg": "1.0-1",
    }


def test_rpm_parsing_joins_multiple_versions(monkeypatch: pytest.MonkeyPatch) -> None:
    text = "kernel\t5.14.0-427.el9\nkernel\t5.14.0-362.el9\nbash\t5.1.8-9.el9\nbash\t5.1.8-9.el9\n"
    monkeypatch.setattr(inv_mod, "_run", lambda argv, timeout=0: text)
    assert inv_mod._collect_rpm() == {
        "sw.rpm.kernel": "5.14.0-362.el9,5.14.0-427.el9",
        "sw.rpm.bash": "5.1.8-9.el9",
    }


def test_os_release_parsing() -> None:
    text = (
        'PRETTY_NAME="Ubuntu 24.04.1 LTS"\nNAME="Ubuntu"\nVERSION_ID="24.04"\n'
        '# a comment\nID=ubuntu\nBROKEN="unterminated\n'
    )
    fields = inv_mod._parse_os_release(text)
    assert fields["NAME"] == "Ubuntu"
    assert fields["VERSION_ID"] == "24.04"
    assert fields["PRETTY_NAME"] == "Ubuntu 24.04.1 LTS"
    assert fields["ID"] == "ubuntu"
    assert fields["BROKEN"] == "unterminated"


def test_dmi_placeholders_and_fallbacks(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "sys_vendor").write_text("To Be Filled By O.E.M.\n")
    (tmp_path / "board_vendor").write_text("ASRock\n")
    (tmp_path / "product_name").write_text("B650M Pro RS\n")
    (tmp_path / "product_serial").write_text("Default string\n")
    (tmp_path / "board_serial").write_text("M80-F3012345678\n")
    monkeypatch.setattr(inv_mod, "_DMI_DIR", tmp_path)
    assert inv_mod._linux_identity() == {
        "hw.manufacturer": "ASRock",
        "hw.model": "B650M Pro RS",
        "hw.serial": "M80-F3012345678",
    }


def test_lenovo_friendly_model_name(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "sys_vendor").write_text("LENOVO\n")
    (tmp_path / "product_name").write_text("21HDCTO1WW\n")
    (tmp_path / "product_version").write_text("ThinkPad T14 Gen 4\n")
    monkeypatch.setattr(inv_mod, "_DMI_DIR", tmp_path)
    assert inv_mod._linux_identity()["hw.model"] == "ThinkPad T14 Gen 4"


def test_network_interfaces(monkeypatch: pytest.MonkeyPatch) -> None:
    addrs = {
        "lo": [Addr(socket.AF_INET, "127.0.0.1", None, None, None)],
        "eth0": [
            Addr(psutil.AF_LINK, "02:FC:00:00:00:01", None, None, None),
            Addr(socket.AF_INET, "192.168.1.20", None, None, None),
            Addr(socket.AF_INET, "10.0.0.5", None, None, None),
            Addr(socket.AF_INET6, "fe80::1%eth0", None, None, None),
            Addr(socket.AF_INET6, "fd00::2", None, None, None),
        ],
        "Wi-Fi 2": [Addr(psutil.AF_LINK, "AA-BB-CC-DD-EE-FF", None, None, None)],
        "dummy": [Addr(psutil.AF_LINK, "00:00:00:00:00:00", None, None, None)],
    }
    addrs.update({f"veth{i:03d}": [] for i in range(100)})
    monkeypatch.setattr(inv_mod.psutil, "net_if_addrs", lambda: addrs)
    net = inv_mod._collect_network()
    assert net["hw.net.eth0.mac"] == "02:fc:00:00:00:01"
    assert net["hw.net.eth0.ipv4"] == "10.0.0.5,192.168.1.20"
    assert net["hw.net.eth0.ipv6"] == "fd00::2,fe80::1"
    assert net["hw.net.Wi-Fi_2.mac"] == "aa:bb:cc:dd:ee:ff"
    assert not any(k.startswith(("hw.net.lo.", "hw.net.dummy.")) for k in net)


def test_interface_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    addrs = {
        f"eth{i:03d}": [Addr(psutil.AF_LINK, f"02:00:00:00:00:{i % 256:02x}", None, None, None)]
        for i in range(1, 200)
    }
    monkeypatch.setattr(inv_mod.psutil, "net_if_addrs", lambda: addrs)
    assert len(inv_mod._collect_network()) == inv_mod.MAX_INTERFACES


def test_disks_skip_pseudo_filesystems(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    mounts = {}
    for name in ("root", "efi", "snap", "run", "docker", "nfs", "hosts-file"):
        mounts[name] = tmp_path / name
        mounts[name].mkdir()
    (tmp_path / "hosts").write_text("")
    parts = [
        Part("/dev/vda1", str(mounts["root"]), "ext4", "rw"),
        Part("/dev/vda2", str(mounts["efi"]), "vfat", "rw"),
        Part("/dev/loop3", str(mounts["snap"]), "squashfs", "ro"),
        Part("tmpfs", str(mounts["run"]), "tmpfs", "rw"),
        Part("overlay", str(mounts["docker"]), "overlay", "rw"),
        Part("server:/export", str(mounts["nfs"]), "nfs4", "rw"),
        Part("/dev/vda1", str(tmp_path / "hosts"), "ext4", "rw"),  # a bind-mounted file
    ]
    monkeypatch.setattr(inv_mod.psutil, "disk_partitions", lambda all=False: parts)
    monkeypatch.setattr(inv_mod.psutil, "disk_usage", lambda p: Usage(1000, 1, 999, 0.1))
    root, efi = mounts["root"], mounts["efi"]
    assert inv_mod._collect_disks() == {
        f"hw.disk.{root}.device": "/dev/vda1",
        f"hw.disk.{root}.fstype": "ext4",
        f"hw.disk.{root}.total_bytes": "1000",
        f"hw.disk.{efi}.device": "/dev/vda2",
        f"hw.disk.{efi}.fstype": "vfat",
        f"hw.disk.{efi}.total_bytes": "1000",
    }


def test_disk_cap(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    parts = []
    for i in range(100):
        (tmp_path / f"{i:03d}").mkdir()
        parts.append(Part(f"/dev/sd{i}", str(tmp_path / f"{i:03d}"), "ext4", "rw"))
    monkeypatch.setattr(inv_mod.psutil, "disk_partitions", lambda all=False: parts)
    monkeypatch.setattr(inv_mod.psutil, "disk_usage", lambda p: Usage(1, 0, 1, 0.0))
    mounts = {k.rsplit(".", 1)[0] for k in inv_mod._collect_disks()}
    assert len(mounts) == inv_mod.MAX_DISKS


def test_battery_is_rounded(monkeypatch: pytest.MonkeyPatch) -> None:
    battery = namedtuple("battery", "percent secsleft power_plugged")
    monkeypatch.setattr(inv_mod.psutil, "sensors_battery", lambda: battery(47.3, 3600, True))
    assert inv_mod._collect_battery() == {"hw.battery.percent": "45", "hw.battery.plugged": "true"}
    monkeypatch.setattr(inv_mod.psutil, "sensors_battery", lambda: battery(98, 0, False))
    assert inv_mod._collect_battery() == {
        "hw.battery.percent": "100",
        "hw.battery.plugged": "false",
    }
    monkeypatch.setattr(inv_mod.psutil, "sensors_battery", lambda: None)
    assert inv_mod._collect_battery() == {}


def test_key_part_and_pip_names() -> None:
    assert key_part("Microsoft Edge") == "Microsoft_Edge"
    assert key_part(" tab\tand\nnewline\x00x ") == "tab_and_newline_x"
    assert key_part("libc6:amd64") == "libc6:amd64"
    assert normalize_pip_name("Typing_Extensions") == "typing-extensions"
    assert normalize_pip_name("zope.interface") == "zope-interface"
    assert normalize_pip_name("a-_.b") == "a-b"


# --------------------------------------------------------------------------- deltas


def test_delta_example() -> None:
    old = {"a": "1", "b": "2", "c": "3"}
    new = {"a": "1", "b": "20", "d": "4"}
    changed, removed = inventory_delta(old, new)
    assert changed == {"b": "20", "d": "4"}
    assert removed == ["c"]
    assert apply_delta(old, changed, removed) == new
    assert inventory_delta(new, new) == ({}, [])


def test_delta_removals_are_sorted_and_inputs_untouched() -> None:
    old = {"z": "1", "a": "1", "m": "1", "keep": "x"}
    frozen = dict(old)
    changed, removed = inventory_delta(old, {"keep": "x"})
    assert changed == {}
    assert removed == ["a", "m", "z"]
    result = apply_delta(old, changed, removed)
    assert result == {"keep": "x"}
    assert old == frozen


def test_apply_delta_ignores_unknown_removals_and_set_wins() -> None:
    assert apply_delta({"a": "1"}, {"a": "2"}, ["a", "missing"]) == {"a": "2"}


def _random_inventory(rng: random.Random, universe: list[str]) -> dict[str, str]:
    keys = rng.sample(universe, rng.randint(0, len(universe)))
    return {k: rng.choice(["1", "2", "3", "", "x" * rng.randint(0, 5)]) for k in keys}


@pytest.mark.parametrize("seed", range(5))
def test_delta_round_trip_property(seed: int) -> None:
    rng = random.Random(seed)
    universe = [f"sw.dpkg.pkg{i}" for i in range(40)] + ["os.name", "hw.model", ""]
    for _ in range(300):
        old = _random_inventory(rng, universe)
        new = _random_inventory(rng, universe)
        changed, removed = inventory_delta(old, new)
        assert apply_delta(old, changed, removed) == new
        assert removed == sorted(removed)
        assert not set(changed) & set(removed)
        # Minimal: only keys whose value really differs are sent.
        assert all(k not in old or old[k] != v for k, v in changed.items())
        assert set(removed) == set(old) - set(new)


def test_delta_chain_reconstructs_history() -> None:
    rng = random.Random(42)
    universe = [f"k{i}" for i in range(60)]
    server_view: dict[str, Any] = {}
    current: dict[str, str] = {}
    for _ in range(200):
        new = _random_inventory(rng, universe)
        changed, removed = inventory_delta(current, new)
        server_view = apply_delta(server_view, changed, removed)
        current = new
        assert server_view == current
