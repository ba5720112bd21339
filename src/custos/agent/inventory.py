"""Device inventory: a flat ``dict[str, str]`` keyed by dot paths, plus delta helpers.

The map is flat so that the agent can send only what changed and the server can keep a
per-key change history. Key scheme:

* ``os.name``, ``os.version``, ``os.pretty``, ``os.kernel``, ``os.arch``, ``os.hostname``,
  ``os.boot_time``
* ``hw.manufacturer``, ``hw.model``, ``hw.serial``, ``hw.cpu.model``, ``hw.cpu.cores``,
  ``hw.cpu.threads``, ``hw.memory.total_bytes``
* ``hw.disk.<mountpoint>.{total_bytes,fstype,device}``
* ``hw.net.<iface>.{mac,ipv4,ipv6}``
* ``hw.battery.{percent,plugged}``
* ``sw.<source>.<name>`` = version, source one of dpkg, rpm, pip, winreg, macapp

Collection is blocking (it reads files and runs a few short subprocesses); async callers
should run it in a thread.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import plistlib
import re
import shlex
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import psutil

log = logging.getLogger(__name__)

# every key the collector (and the simulator) produces matches this scheme
KEY_SCHEME = re.compile(
    r"^(?:"
    r"os\.(?:name|version|pretty|kernel|arch|hostname|boot_time)"
    r"|hw\.(?:manufacturer|model|serial|cpu\.(?:model|cores|threads)|memory\.total_bytes"
    r"|battery\.(?:percent|plugged)|disk\.\S+\.(?:total_bytes|fstype|device)"
    r"|net\.\S+\.(?:mac|ipv4|ipv6))"
    r"|sw\.(?:dpkg|rpm|pip|winreg|macapp)\.\S+"
    r")$"
)

MAX_KEYS = 50_000
MAX_KEY_LEN = 512
MAX_VALUE_LEN = 4096

MAX_DISKS = 32
MAX_INTERFACES = 64

FACT_KEYS = (
    "os.hostname",
    "os.name",
    "os.version",
    "os.arch",
    "hw.manufacturer",
    "hw.model",
    "hw.serial",
)

_DMI_DIR = Path("/sys/class/dmi/id")
_SUBPROCESS_TIMEOUT_S = 30.0
_PIP_TIMEOUT_S = 20.0

# Whitespace and control characters would make a key multi-line or ambiguous to read.
_UNSAFE_KEY_CHARS = re.compile(r"[\s\x00-\x1f\x7f-\x9f]+")
_PEP503_SEPARATORS = re.compile(r"[-_.]+")

# Firmware vendors leave these placeholders in DMI fields; reporting them is noise.
_DMI_PLACEHOLDERS = frozenset(
    {
        "",
        "0",
        "00000000",
        "0123456789",
        "123456789",
        "chassis serial number",
        "default string",
        "invalid",
        "n/a",
        "na",
        "none",
        "not applicable",
        "not available",
        "not specified",
        "o.e.m.",
        "oem",
        "system manufacturer",
        "system product name",
        "system serial number",
        "system version",
        "to be filled by o.e.m.",
        "type1productconfigid",
        "unknown",
        "x.x",
    }
)

# Filesystems that are virtual, read-only images or network mounts; statvfs on a dead
# network mount can block for minutes, so those are never touched.
_SKIP_FSTYPES = frozenset(
    {
        "autofs",
        "binfmt_misc",
        "cgroup",
        "cgroup2",
        "cifs",
        "configfs",
        "debugfs",
        "devpts",
        "devtmpfs",
        "fuse.snapfuse",
        "fuse.sshfs",
        "fusectl",
        "mqueue",
        "nfs",
        "nfs4",
        "nsfs",
        "proc",
        "pstore",
        "securityfs",
        "smbfs",
        "squashfs",
        "sysfs",
        "tmpfs",
        "tracefs",
    }
)

_LOOPBACK_NAMES = frozenset({"lo", "lo0"})

# Arm Ltd. core part numbers (implementer 0x41) as /proc/cpuinfo reports them.
_ARM_PARTS = {
    "0xd03": "Cortex-A53",
    "0xd04": "Cortex-A35",
    "0xd05": "Cortex-A55",
    "0xd07": "Cortex-A57",
    "0xd08": "Cortex-A72",
    "0xd09": "Cortex-A73",
    "0xd0a": "Cortex-A75",
    "0xd0b": "Cortex-A76",
    "0xd0c": "Neoverse-N1",
    "0xd0d": "Cortex-A77",
    "0xd40": "Neoverse-V1",
    "0xd41": "Cortex-A78",
    "0xd44": "Cortex-X1",
    "0xd46": "Cortex-A510",
    "0xd47": "Cortex-A710",
    "0xd48": "Cortex-X2",
    "0xd49": "Neoverse-N2",
    "0xd4f": "Neoverse-V2",
}

_MACOS_CODENAMES = {
    "11": "Big Sur",
    "12": "Monterey",
    "13": "Ventura",
    "14": "Sonoma",
    "15": "Sequoia",
    "26": "Tahoe",
}

# Run by the system python3 to list its distributions; kept tiny so it starts fast.
_PIP_SNIPPET = (
    "import json, sys\n"
    "from importlib import metadata\n"
    "out = []\n"
    "for d in metadata.distributions():\n"
    "    m = d.metadata\n"
    "    if m is not None and 'Name' in m:\n"
    "        out.append([m['Name'], d.version or ''])\n"
    "print(json.dumps({'prefix': sys.prefix, 'dists': out}))\n"
)


# --------------------------------------------------------------------------- helpers


def key_part(text: str) -> str:
    """Make a variable key segment (package, interface, mountpoint) single-line and safe."""
    return _UNSAFE_KEY_CHARS.sub("_", text.strip())


def normalize_pip_name(name: str) -> str:
    """Normalize a Python distribution name as PEP 503 does."""
    return _PEP503_SEPARATORS.sub("-", name).lower()


def _read_text(path: str | Path) -> str | None:
    try:
        # Device-tree strings are NUL-terminated.
        return Path(path).read_text(encoding="utf-8", errors="replace").strip().strip("\x00")
    except OSError:
        return None


def _clean_dmi(value: str | None) -> str | None:
    if value is None:
        return None
    value = value.strip().strip("\x00").strip()
    if value.lower() in _DMI_PLACEHOLDERS or len(set(value)) == 1:
        return None
    return value


def _run(argv: list[str], timeout: float = _SUBPROCESS_TIMEOUT_S) -> str | None:
    """Run a short command and return its stdout, or None when it is missing or fails."""
    exe = shutil.which(argv[0])
    if exe is None:
        log.debug("inventory: %s not found, skipping", argv[0])
        return None
    try:
        done = subprocess.run(
            [exe, *argv[1:]],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            check=False,
            # A relative cwd could put stray packages on a Python child's sys.path.
            cwd=os.path.abspath(os.sep),
        )
    except (OSError, subprocess.SubprocessError) as exc:
        log.debug("inventory: %s failed: %s", argv[0], exc)
        return None
    if done.returncode != 0:
        log.debug(
            "inventory: %s exited with %s: %s",
            argv[0],
            done.returncode,
            done.stderr[:200].decode("utf-8", "replace"),
        )
        return None
    return done.stdout.decode("utf-8", errors="replace")


def _add_versions(found: dict[str, set[str]], name: str, version: str) -> None:
    found.setdefault(name, set()).add(version.strip())


def _version_key(version: str) -> list[tuple[int, int | str]]:
    """Sort key that puts 3.9 before 3.10 (numbers compare as numbers)."""
    return [(0, int(p)) if p.isdigit() else (1, p) for p in re.findall(r"\d+|[^\d]+", version)]


def _join_versions(prefix: str, found: Mapping[str, set[str]]) -> dict[str, str]:
    # Several versions of one name (kernels in rpm, a package in two Pythons) share one key.
    out: dict[str, str] = {}
    for name, versions in found.items():
        part = key_part(name)
        if part:
            ordered = sorted((v for v in versions if v), key=_version_key)
            out[f"{prefix}{part}"] = ",".join(ordered)
    return out


# --------------------------------------------------------------------------- os


def _parse_os_release(text: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        name, _, raw = line.partition("=")
        try:
            words = shlex.split(raw)
        except ValueError:
            words = [raw.strip("\"'")]
        fields[name.strip()] = " ".join(words)
    return fields


def _linux_os() -> dict[str, str]:
    text = _read_text("/etc/os-release") or _read_text("/usr/lib/os-release") or ""
    rel = _parse_os_release(text)
    out: dict[str, str] = {"os.name": rel.get("NAME") or "Linux"}
    version = rel.get("VERSION_ID") or rel.get("VERSION") or rel.get("BUILD_ID")
    if version:
        out["os.version"] = version
    out["os.pretty"] = rel.get("PRETTY_NAME") or " ".join(p for p in (out["os.name"], version) if p)
    return out


def _macos_os() -> dict[str, str]:
    version = platform.mac_ver()[0]
    codename = _MACOS_CODENAMES.get(version.split(".")[0], "")
    return {
        "os.name": "macOS",
        "os.version": version,
        "os.pretty": " ".join(p for p in ("macOS", version, codename) if p),
    }


def _windows_os() -> dict[str, str]:
    if sys.platform != "win32":
        return {}
    import winreg

    release, version, _csd, _ptype = platform.win32_ver()
    values: dict[str, str] = {}
    names = ("ProductName", "DisplayVersion", "ReleaseId", "CurrentBuild", "UBR")
    try:
        with winreg.OpenKey(
            winreg.HKEY_LOCAL_MACHINE, r"SOFTWARE\Microsoft\Windows NT\CurrentVersion"
        ) as key:
            for value_name in names:
                with contextlib.suppress(OSError):
                    values[value_name] = str(winreg.QueryValueEx(key, value_name)[0])
    except OSError:
        log.debug("inventory: cannot read the Windows version from the registry")
    name = values.get("ProductName") or f"Windows {release}".strip()
    display = values.get("DisplayVersion") or values.get("ReleaseId") or ""
    build = values.get("CurrentBuild") or (version.rsplit(".", 1)[-1] if version else "")
    ubr = values.get("UBR", "")
    # Windows 11 still reports "Windows 10" as ProductName; the build number tells them apart.
    if build.isdigit() and int(build) >= 22000:
        name = name.replace("Windows 10", "Windows 11")
    full_build = f"{build}.{ubr}" if ubr else build
    return {
        "os.name": name,
        "os.version": display or version,
        "os.pretty": f"{name} {display} (build {full_build})".replace("  ", " "),
    }


def _collect_os() -> dict[str, str]:
    if sys.platform == "win32":
        out = _windows_os()
    elif sys.platform == "darwin":
        out = _macos_os()
    elif sys.platform.startswith("linux"):
        out = _linux_os()
    else:
        out = {"os.name": platform.system(), "os.version": platform.release()}
        out["os.pretty"] = f"{out['os.name']} {out['os.version']}"
    out["os.kernel"] = platform.release()
    out["os.arch"] = platform.machine()
    out["os.hostname"] = socket.gethostname()
    return out


def _collect_boot_time() -> dict[str, str]:
    # Boot time rather than uptime: uptime would change on every check-in.
    booted = datetime.fromtimestamp(round(psutil.boot_time()), tz=UTC)
    return {"os.boot_time": booted.strftime("%Y-%m-%dT%H:%M:%SZ")}


# --------------------------------------------------------------------------- hardware


def _linux_identity() -> dict[str, str]:
    dmi = _DMI_DIR
    out: dict[str, str] = {}
    candidates = {
        "hw.manufacturer": ("sys_vendor", "board_vendor", "chassis_vendor"),
        "hw.model": ("product_name", "board_name"),
        # product_serial is usually readable by root only; a PermissionError just skips it.
        "hw.serial": ("product_serial", "board_serial", "chassis_serial"),
    }
    for key, names in candidates.items():
        for name in names:
            value = _clean_dmi(_read_text(dmi / name))
            if value:
                out[key] = value
                break
    # Lenovo puts the machine type (21HDCTO1WW) in product_name, the model name in version.
    version = _clean_dmi(_read_text(dmi / "product_version"))
    if out.get("hw.manufacturer") == "LENOVO" and version and version.startswith("Think"):
        out["hw.model"] = version
    if "hw.model" in out:
        return out
    # Boards without DMI (Raspberry Pi and other ARM devices) describe themselves in the
    # device tree and /proc/cpuinfo.
    model = _clean_dmi(
        _read_text("/sys/firmware/devicetree/base/model") or _read_text("/proc/device-tree/model")
    )
    serial = _clean_dmi(_read_text("/sys/firmware/devicetree/base/serial-number"))
    cpuinfo = _cpuinfo_fields()
    model = model or _clean_dmi(cpuinfo.get("Model"))
    serial = serial or _clean_dmi(cpuinfo.get("Serial"))
    if model:
        out["hw.model"] = model
        if model.startswith("Raspberry Pi") and "hw.manufacturer" not in out:
            out["hw.manufacturer"] = "Raspberry Pi Ltd"
    if serial and "hw.serial" not in out:
        out["hw.serial"] = serial
    return out


def _macos_identity() -> dict[str, str]:
    out: dict[str, str] = {"hw.manufacturer": "Apple Inc."}
    model = _run(["sysctl", "-n", "hw.model"], timeout=5)
    if model and model.strip():
        out["hw.model"] = model.strip()
    ioreg = _run(["ioreg", "-rd1", "-c", "IOPlatformExpertDevice"], timeout=10)
    if ioreg:
        match = re.search(r'"IOPlatformSerialNumber"\s*=\s*"([^"]+)"', ioreg)
        if match:
            out["hw.serial"] = match.group(1)
    return out


def _windows_identity() -> dict[str, str]:
    if sys.platform != "win32":
        return {}
    import winreg

    out: dict[str, str] = {}
    try:
        with winreg.OpenKey(winreg.HKEY_LOCAL_MACHINE, r"HARDWARE\DESCRIPTION\System\BIOS") as key:
            for out_key, value_name in (
                ("hw.manufacturer", "SystemManufacturer"),
                ("hw.model", "SystemProductName"),
                ("lenovo.version", "SystemVersion"),
            ):
                try:
                    value = _clean_dmi(str(winreg.QueryValueEx(key, value_name)[0]))
                except OSError:
                    continue
                if value:
                    out[out_key] = value
    except OSError:
        log.debug("inventory: cannot read the BIOS identity from the registry")
    # Lenovo puts the machine type in SystemProductName and the model name in SystemVersion.
    version = out.pop("lenovo.version", "")
    if out.get("hw.manufacturer") == "LENOVO" and version.startswith("Think"):
        out["hw.model"] = version
    # The BIOS serial is not in the registry; CIM is the supported way to read it.
    serial = _run(
        [
            "powershell.exe",
            "-NoProfile",
            "-NonInteractive",
            "-Command",
            "(Get-CimInstance -ClassName Win32_BIOS).SerialNumber",
        ],
        timeout=15,
    )
    cleaned = _clean_dmi(serial)
    if cleaned:
        out["hw.serial"] = cleaned
    return out


def _collect_identity() -> dict[str, str]:
    if sys.platform == "win32":
        return _windows_identity()
    if sys.platform == "darwin":
        return _macos_identity()
    if sys.platform.startswith("linux"):
        return _linux_identity()
    return {}


def _cpuinfo_fields() -> dict[str, str]:
    """First value of each field in /proc/cpuinfo (empty off Linux)."""
    fields: dict[str, str] = {}
    for line in (_read_text("/proc/cpuinfo") or "").splitlines():
        name, sep, value = line.partition(":")
        if sep:
            fields.setdefault(name.strip(), value.strip())
    return fields


def _cpu_model() -> str | None:
    if sys.platform.startswith("linux"):
        fields = _cpuinfo_fields()
        if fields.get("model name"):
            return fields["model name"]
        # arm64 kernels only give the implementer and part numbers.
        if fields.get("CPU implementer") == "0x41" and fields.get("CPU part") in _ARM_PARTS:
            return _ARM_PARTS[fields["CPU part"]]
        for name in ("Processor", "cpu model", "Hardware"):
            if fields.get(name):
                return fields[name]
    elif sys.platform == "darwin":
        brand = _run(["sysctl", "-n", "machdep.cpu.brand_string"], timeout=5)
        if brand and brand.strip():
            return brand.strip()
    elif sys.platform == "win32":
        import winreg

        try:
            with winreg.OpenKey(
                winreg.HKEY_LOCAL_MACHINE, r"HARDWARE\DESCRIPTION\System\CentralProcessor\0"
            ) as key:
                return str(winreg.QueryValueEx(key, "ProcessorNameString")[0]).strip()
        except OSError:
            pass
    return platform.processor() or None


def _collect_cpu_memory() -> dict[str, str]:
    out: dict[str, str] = {}
    model = _cpu_model()
    if model:
        out["hw.cpu.model"] = model
    cores = psutil.cpu_count(logical=False)
    threads = psutil.cpu_count(logical=True)
    if cores:
        out["hw.cpu.cores"] = str(cores)
    if threads:
        out["hw.cpu.threads"] = str(threads)
    out["hw.memory.total_bytes"] = str(psutil.virtual_memory().total)
    return out


def _collect_disks() -> dict[str, str]:
    out: dict[str, str] = {}
    partitions = sorted(psutil.disk_partitions(all=False), key=lambda p: p.mountpoint)
    seen = 0
    for part in partitions:
        fstype = part.fstype.lower()
        if fstype in _SKIP_FSTYPES or part.device.startswith("/dev/loop"):
            continue
        # An overlay is only the real disk when it is the root of a container.
        if fstype == "overlay" and part.mountpoint != "/":
            continue
        # Containers bind-mount single files (/etc/hosts) from the host disk.
        if not os.path.isdir(part.mountpoint):
            continue
        mount = key_part(part.mountpoint)
        if not mount:
            continue
        prefix = f"hw.disk.{mount}."
        out[prefix + "fstype"] = part.fstype
        out[prefix + "device"] = part.device
        try:
            out[prefix + "total_bytes"] = str(psutil.disk_usage(part.mountpoint).total)
        except OSError as exc:
            log.debug("inventory: disk_usage(%s) failed: %s", part.mountpoint, exc)
        seen += 1
        if seen >= MAX_DISKS:
            break
    return out


def _collect_network() -> dict[str, str]:
    out: dict[str, str] = {}
    addrs = psutil.net_if_addrs()
    names = sorted(
        n for n in addrs if n not in _LOOPBACK_NAMES and not n.startswith("Loopback Pseudo")
    )
    for name in names[:MAX_INTERFACES]:
        part = key_part(name)
        if not part:
            continue
        mac: str | None = None
        ipv4: set[str] = set()
        ipv6: set[str] = set()
        for addr in addrs[name]:
            if addr.family == psutil.AF_LINK:
                candidate = addr.address.lower().replace("-", ":")
                if candidate and candidate.strip("0:"):
                    mac = candidate
            elif addr.family == socket.AF_INET:
                ipv4.add(addr.address)
            elif addr.family == socket.AF_INET6:
                ipv6.add(addr.address.split("%", 1)[0])
        prefix = f"hw.net.{part}."
        if mac:
            out[prefix + "mac"] = mac
        if ipv4:
            out[prefix + "ipv4"] = ",".join(sorted(ipv4))
        if ipv6:
            out[prefix + "ipv6"] = ",".join(sorted(ipv6))
    return out


def _collect_battery() -> dict[str, str]:
    sensors_battery: Callable[[], object] | None = getattr(psutil, "sensors_battery", None)
    if sensors_battery is None:
        return {}
    battery = sensors_battery()
    if battery is None:
        return {}
    out: dict[str, str] = {}
    percent = getattr(battery, "percent", None)
    if percent is not None:
        # Rounded so that a slowly draining battery does not produce a delta every check-in.
        out["hw.battery.percent"] = str(max(0, min(100, 5 * round(float(percent) / 5))))
    plugged = getattr(battery, "power_plugged", None)
    if plugged is not None:
        out["hw.battery.plugged"] = "true" if plugged else "false"
    return out


# --------------------------------------------------------------------------- software


def _collect_dpkg() -> dict[str, str]:
    text = _run(["dpkg-query", "-W", "-f", "${binary:Package}\t${Version}\t${db:Status-Abbrev}\n"])
    if not text:
        return {}
    found: dict[str, set[str]] = {}
    for line in text.splitlines():
        fields = line.split("\t")
        if len(fields) < 3:
            continue
        package, version, status = fields[0], fields[1], fields[2]
        # The second status letter is the current state; "i" means installed (ii, hi, ...).
        if len(status) >= 2 and status[1] == "i" and package:
            _add_versions(found, package, version)
    return _join_versions("sw.dpkg.", found)


def _collect_rpm() -> dict[str, str]:
    text = _run(["rpm", "-qa", "--qf", "%{NAME}\t%{VERSION}-%{RELEASE}\n"])
    if not text:
        return {}
    found: dict[str, set[str]] = {}
    for line in text.splitlines():
        name, sep, version = line.partition("\t")
        if sep and name:
            _add_versions(found, name, version)
    return _join_versions("sw.rpm.", found)


def _local_distributions() -> list[tuple[str, str]]:
    dists: list[tuple[str, str]] = []
    for dist in importlib_metadata.distributions():
        meta = dist.metadata
        # A broken install can lack METADATA; indexing a missing key warns on newer Pythons.
        if meta is None or "Name" not in meta:
            continue
        dists.append((meta["Name"], dist.version or ""))
    return dists


def _python_candidates() -> list[str]:
    """python3 on PATH and the distribution's /usr/bin/python3, without duplicates."""
    found = [shutil.which("python3") or shutil.which("python")]
    if sys.platform != "win32" and os.path.exists("/usr/bin/python3"):
        found.append("/usr/bin/python3")
    out: list[str] = []
    seen: set[str] = set()
    # A venv's python resolves to its base interpreter, so the realpath cannot tell our own
    # environment apart; that is left to the prefix check of each listing.
    for exe in found:
        if exe and os.path.realpath(exe) not in seen:
            seen.add(os.path.realpath(exe))
            out.append(exe)
    return out


def _python_listing(exe: str) -> tuple[str, list[tuple[str, str]]] | None:
    """(environment prefix, distributions) of another interpreter, or None on failure."""
    text = _run([exe, "-E", "-c", _PIP_SNIPPET], timeout=_PIP_TIMEOUT_S)
    if not text:
        return None
    try:
        data = json.loads(text)
        prefix = os.path.realpath(str(data["prefix"]))
        dists = [(str(n), str(v)) for n, v in data["dists"] if n]
    except (ValueError, KeyError, TypeError):
        log.debug("inventory: unexpected output from %s", exe)
        return None
    return prefix, dists


def _collect_pip() -> dict[str, str]:
    found: dict[str, set[str]] = {}
    try:
        for name, version in _local_distributions():
            _add_versions(found, normalize_pip_name(name), version)
    except Exception:
        log.debug("inventory: listing this interpreter's distributions failed", exc_info=True)
    candidates = _python_candidates()
    if candidates:
        # Interpreter start-up dominates (a pyenv shim alone costs ~0.2 s), so run them together.
        with ThreadPoolExecutor(max_workers=len(candidates)) as pool:
            listings = list(pool.map(_python_listing, candidates))
        # The same environment may be reachable twice (python3 on PATH may be our own venv).
        seen_prefixes = {os.path.realpath(sys.prefix)}
        for listing in listings:
            if listing is None or listing[0] in seen_prefixes:
                continue
            seen_prefixes.add(listing[0])
            for name, version in listing[1]:
                _add_versions(found, normalize_pip_name(name), version)
    return _join_versions("sw.pip.", found)


def _collect_winreg() -> dict[str, str]:
    if sys.platform != "win32":
        return {}
    import winreg

    path = r"SOFTWARE\Microsoft\Windows\CurrentVersion\Uninstall"
    views = (
        (winreg.HKEY_LOCAL_MACHINE, winreg.KEY_WOW64_64KEY),
        (winreg.HKEY_LOCAL_MACHINE, winreg.KEY_WOW64_32KEY),
        (winreg.HKEY_CURRENT_USER, 0),
    )

    def value(key: Any, name: str) -> object:
        try:
            return winreg.QueryValueEx(key, name)[0]
        except OSError:
            return None

    found: dict[str, set[str]] = {}
    for hive, view in views:
        try:
            root = winreg.OpenKey(hive, path, 0, winreg.KEY_READ | view)
        except OSError:
            continue
        with root:
            index = 0
            while True:
                try:
                    sub_name = winreg.EnumKey(root, index)
                except OSError:
                    break
                index += 1
                try:
                    with winreg.OpenKey(root, sub_name, 0, winreg.KEY_READ | view) as sub:
                        name = value(sub, "DisplayName")
                        # Components and updates are hidden from "Apps & features" too.
                        if (
                            not name
                            or value(sub, "SystemComponent") == 1
                            or value(sub, "ParentKeyName")
                        ):
                            continue
                        version = value(sub, "DisplayVersion")
                        _add_versions(found, str(name), str(version or ""))
                except OSError:
                    continue
    return _join_versions("sw.winreg.", found)


def _collect_macapps() -> dict[str, str]:
    if sys.platform != "darwin":
        return {}
    found: dict[str, set[str]] = {}
    roots = [Path("/Applications"), Path("/Applications/Utilities")]
    for root in roots:
        try:
            bundles = sorted(root.glob("*.app"))
        except OSError:
            continue
        for bundle in bundles:
            try:
                with (bundle / "Contents" / "Info.plist").open("rb") as fh:
                    info = plistlib.load(fh)
            except (OSError, ValueError, plistlib.InvalidFileException):
                continue
            version = info.get("CFBundleShortVersionString") or info.get("CFBundleVersion") or ""
            _add_versions(found, bundle.stem, str(version))
    return _join_versions("sw.macapp.", found)


# --------------------------------------------------------------------------- public API

_COLLECTORS: tuple[Callable[[], dict[str, str]], ...] = (
    _collect_os,
    _collect_boot_time,
    _collect_identity,
    _collect_cpu_memory,
    _collect_disks,
    _collect_network,
    _collect_battery,
    _collect_dpkg,
    _collect_rpm,
    _collect_pip,
    _collect_winreg,
    _collect_macapps,
)


def _run_collectors(collectors: Iterable[Callable[[], dict[str, str]]]) -> dict[str, str]:
    out: dict[str, str] = {}
    for collector in collectors:
        try:
            part = collector()
        except Exception:
            log.warning("inventory: collector %s failed", collector.__name__, exc_info=True)
            continue
        for key, value in part.items():
            if len(out) >= MAX_KEYS:
                log.warning("inventory: more than %d keys, the rest is dropped", MAX_KEYS)
                return out
            if not key or len(key) > MAX_KEY_LEN:
                log.debug("inventory: dropping over-long key %.80s...", key)
                continue
            out[key] = str(value)[:MAX_VALUE_LEN]
    return out


def collect_inventory() -> dict[str, str]:
    """Collect the full inventory of this machine (blocking; never raises)."""
    try:
        # Collector order is the priority order should the key cap be reached.
        return dict(sorted(_run_collectors(_COLLECTORS).items()))
    except Exception:
        log.exception("inventory: collection failed")
        return {}


def collect_facts() -> dict[str, str]:
    """Collect the small identity subset sent at enrolment (blocking; never raises)."""
    try:
        found = _run_collectors((_collect_os, _collect_identity))
        return {k: found[k] for k in FACT_KEYS if found.get(k)}
    except Exception:
        log.exception("inventory: fact collection failed")
        return {}


def inventory_delta(
    old: Mapping[str, str], new: Mapping[str, str]
) -> tuple[dict[str, str], list[str]]:
    """Return (keys added or changed with their new values, sorted keys removed)."""
    changed = {k: v for k, v in new.items() if k not in old or old[k] != v}
    removed = sorted(k for k in old if k not in new)
    return changed, removed


def apply_delta(
    base: Mapping[str, str], set_: Mapping[str, str], remove: Iterable[str]
) -> dict[str, str]:
    """Apply a delta to a copy of base: removals first, then the set values win."""
    out = dict(base)
    for key in remove:
        out.pop(key, None)
    out.update(set_)
    return out
