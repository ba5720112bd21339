"""Fake but realistic device inventories for the demo and the fleet simulator.

Everything uses the key scheme of :mod:`custos.agent.inventory`. Addresses are made-up
strings (private IPv4, locally administered MACs); nothing here is ever contacted.
All randomness comes from the caller's ``random.Random``, so a seed and an index always
produce the same device.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from custos.agent.inventory import key_part

# Boot times are placed before this moment unless the caller passes ``now``; a fixed default
# keeps the output reproducible.
SIM_REFERENCE_TIME = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)

KINDS = ("laptop", "desktop", "embedded", "tablet")
_KIND_WEIGHTS = (45, 25, 18, 12)

_SITES = (
    "berlin",
    "hamburg",
    "munich",
    "vienna",
    "zurich",
    "london",
    "paris",
    "amsterdam",
    "madrid",
    "nyc",
    "austin",
    "toronto",
    "singapore",
    "sydney",
)
_TEAMS = ("ops", "dev", "eng", "fin", "hr", "sales", "support", "design", "it", "lab", "legal")

_GIB = 1024**3
_GB = 1000**3


# --------------------------------------------------------------------------- catalogs


@dataclass(frozen=True)
class _Os:
    family: str  # linux, windows, macos
    name: str
    version: str
    pretty: str
    kernels: tuple[str, ...]
    flavor: str = ""  # dpkg version style: debian, ubuntu, raspbian
    python: str = ""  # python3 version shipped by the distribution


_OSES: dict[str, _Os] = {
    "ubuntu-22.04": _Os(
        "linux",
        "Ubuntu",
        "22.04",
        "Ubuntu 22.04.4 LTS",
        ("5.15.0-116-generic", "6.5.0-41-generic", "6.8.0-40-generic"),
        "ubuntu",
        "3.10.12",
    ),
    "ubuntu-24.04": _Os(
        "linux",
        "Ubuntu",
        "24.04",
        "Ubuntu 24.04.1 LTS",
        ("6.8.0-41-generic", "6.8.0-45-generic", "6.8.0-47-generic"),
        "ubuntu",
        "3.12.3",
    ),
    "debian-12": _Os(
        "linux",
        "Debian GNU/Linux",
        "12",
        "Debian GNU/Linux 12 (bookworm)",
        ("6.1.0-23-amd64", "6.1.0-25-amd64", "6.1.0-26-amd64"),
        "debian",
        "3.11.2",
    ),
    # Raspberry Pi OS identifies itself through os-release as plain Debian since bookworm.
    "rpios-12": _Os(
        "linux",
        "Debian GNU/Linux",
        "12",
        "Debian GNU/Linux 12 (bookworm)",
        ("6.6.31+rpt-rpi-v8", "6.6.51+rpt-rpi-v8"),
        "raspbian",
        "3.11.2",
    ),
    "raspbian-11": _Os(
        "linux",
        "Raspbian GNU/Linux",
        "11",
        "Raspbian GNU/Linux 11 (bullseye)",
        ("6.1.21-v7l+", "6.1.21-v8+"),
        "raspbian",
        "3.9.2",
    ),
    "win11-23h2": _Os(
        "windows",
        "Windows 11 Pro",
        "23H2",
        "Windows 11 Pro 23H2 (build 22631.{ubr})",
        ("11",),
    ),
    "win11-24h2": _Os(
        "windows",
        "Windows 11 Enterprise",
        "24H2",
        "Windows 11 Enterprise 24H2 (build 26100.{ubr})",
        ("11",),
    ),
    "win10-22h2": _Os(
        "windows",
        "Windows 10 Pro",
        "22H2",
        "Windows 10 Pro 22H2 (build 19045.{ubr})",
        ("10",),
    ),
    "win10-iot": _Os(
        "windows",
        "Windows 10 IoT Enterprise LTSC 2021",
        "21H2",
        "Windows 10 IoT Enterprise LTSC 2021 21H2 (build 19044.{ubr})",
        ("10",),
    ),
    "macos-14": _Os("macos", "macOS", "14.6.1", "macOS 14.6.1 Sonoma", ("23.6.0",), python="3.9.6"),
    "macos-15": _Os("macos", "macOS", "15.1", "macOS 15.1 Sequoia", ("24.1.0",), python="3.9.6"),
}

_PC_LINUX_AND_WINDOWS = (
    ("win11-23h2", 40),
    ("win11-24h2", 15),
    ("win10-22h2", 15),
    ("ubuntu-22.04", 12),
    ("ubuntu-24.04", 12),
    ("debian-12", 6),
)
_MAC_OSES = (("macos-14", 45), ("macos-15", 55))


@dataclass(frozen=True)
class _Hardware:
    kind: str
    manufacturer: str
    model: str
    serial_style: str
    cpus: tuple[tuple[str, int, int], ...]  # model, physical cores, threads
    memory_gib: tuple[int, ...]
    disk_gb: tuple[int, ...]
    oses: tuple[tuple[str, int], ...]
    arch: str = "x86_64"
    storage: str = "nvme"  # nvme, sata, mmc, apple
    weight: int = 10


_I5_1345U = ("13th Gen Intel(R) Core(TM) i5-1345U", 10, 12)
_I7_1365U = ("13th Gen Intel(R) Core(TM) i7-1365U", 10, 12)

_HARDWARE: tuple[_Hardware, ...] = (
    _Hardware(
        "laptop",
        "Dell Inc.",
        "Latitude 5440",
        "dell",
        (_I5_1345U, _I7_1365U),
        (8, 16, 32),
        (256, 512),
        _PC_LINUX_AND_WINDOWS,
        weight=14,
    ),
    _Hardware(
        "laptop",
        "LENOVO",
        "ThinkPad T14 Gen 4",
        "lenovo",
        (
            ("13th Gen Intel(R) Core(TM) i5-1335U", 10, 12),
            ("AMD Ryzen 7 PRO 7840U w/ Radeon 780M Graphics", 8, 16),
        ),
        (16, 32),
        (512, 1000),
        _PC_LINUX_AND_WINDOWS,
        weight=14,
    ),
    _Hardware(
        "laptop",
        "HP",
        "HP EliteBook 840 G10 Notebook PC",
        "hp",
        (_I5_1345U, _I7_1365U),
        (16, 32),
        (512,),
        _PC_LINUX_AND_WINDOWS,
        weight=10,
    ),
    _Hardware(
        "laptop",
        "Framework",
        "Laptop 13 (AMD Ryzen 7040Series)",
        "framework",
        (("AMD Ryzen 5 7640U w/ Radeon 760M Graphics", 6, 12),),
        (16, 32, 64),
        (1000, 2000),
        (("ubuntu-24.04", 50), ("debian-12", 20), ("win11-23h2", 30)),
        weight=3,
    ),
    _Hardware(
        "laptop",
        "Apple Inc.",
        "MacBookPro18,3",
        "apple",
        (("Apple M1 Pro", 8, 8), ("Apple M1 Pro", 10, 10)),
        (16, 32),
        (512, 1000),
        _MAC_OSES,
        arch="arm64",
        storage="apple",
        weight=8,
    ),
    _Hardware(
        "laptop",
        "Apple Inc.",
        "Mac14,2",
        "apple",
        (("Apple M2", 8, 8),),
        (8, 16, 24),
        (256, 512),
        _MAC_OSES,
        arch="arm64",
        storage="apple",
        weight=6,
    ),
    _Hardware(
        "desktop",
        "Dell Inc.",
        "OptiPlex 7010",
        "dell",
        (("13th Gen Intel(R) Core(TM) i5-13500", 14, 20),),
        (8, 16, 32),
        (256, 512),
        _PC_LINUX_AND_WINDOWS,
        storage="sata",
        weight=10,
    ),
    _Hardware(
        "desktop",
        "HP",
        "HP EliteDesk 800 G9 Desktop Mini PC",
        "hp",
        (("12th Gen Intel(R) Core(TM) i7-12700T", 12, 20),),
        (16, 32),
        (512,),
        _PC_LINUX_AND_WINDOWS,
        weight=7,
    ),
    _Hardware(
        "desktop",
        "LENOVO",
        "ThinkCentre M70q Gen 4",
        "lenovo",
        (("13th Gen Intel(R) Core(TM) i5-13400T", 10, 16),),
        (8, 16),
        (256, 512),
        _PC_LINUX_AND_WINDOWS,
        weight=7,
    ),
    _Hardware(
        "desktop",
        "Intel Corporation",
        "NUC13ANHi5",
        "intel",
        (("13th Gen Intel(R) Core(TM) i5-1340P", 12, 16),),
        (16, 32, 64),
        (500, 1000),
        (("ubuntu-22.04", 35), ("ubuntu-24.04", 35), ("debian-12", 30)),
        weight=6,
    ),
    _Hardware(
        "desktop",
        "Apple Inc.",
        "Mac14,3",
        "apple",
        (("Apple M2", 8, 8),),
        (8, 16, 24),
        (256, 512),
        _MAC_OSES,
        arch="arm64",
        storage="apple",
        weight=4,
    ),
    _Hardware(
        "embedded",
        "Raspberry Pi Ltd",
        "Raspberry Pi 4 Model B Rev 1.5",
        "rpi",
        (("Cortex-A72", 4, 4),),
        (4, 8),
        (32, 64),
        (("rpios-12", 70), ("raspbian-11", 30)),
        arch="aarch64",
        storage="mmc",
        weight=12,
    ),
    _Hardware(
        "embedded",
        "Raspberry Pi Ltd",
        "Raspberry Pi 5 Model B Rev 1.0",
        "rpi",
        (("Cortex-A76", 4, 4),),
        (4, 8),
        (64, 128),
        (("rpios-12", 100),),
        arch="aarch64",
        storage="mmc",
        weight=8,
    ),
    _Hardware(
        "embedded",
        "Advantech",
        "UNO-2271G V2",
        "advantech",
        (("Intel(R) Celeron(R) J6412 @ 2.00GHz", 4, 4),),
        (4, 8),
        (64, 128),
        (("win10-iot", 40), ("debian-12", 30), ("ubuntu-22.04", 30)),
        storage="sata",
        weight=5,
    ),
    _Hardware(
        "tablet",
        "Microsoft Corporation",
        "Surface Pro 9",
        "surface",
        (("12th Gen Intel(R) Core(TM) i5-1245U", 10, 12),),
        (8, 16),
        (256, 512),
        (("win11-23h2", 70), ("win11-24h2", 30)),
        weight=8,
    ),
    _Hardware(
        "tablet",
        "Microsoft Corporation",
        "Surface Go 4",
        "surface",
        (("Intel(R) Processor N200", 4, 4),),
        (8,),
        (64, 128),
        (("win11-23h2", 100),),
        weight=6,
    ),
    _Hardware(
        "tablet",
        "Panasonic Connect Co., Ltd.",
        "FZ-G2ABHBXLM",
        "panasonic",
        (("11th Gen Intel(R) Core(TM) i5-10310U", 4, 8),),
        (8, 16),
        (256, 512),
        (("win10-22h2", 60), ("win11-23h2", 40)),
        weight=4,
    ),
)

# dpkg packages: name and upstream version; the distribution revision is added per flavor.
_DPKG_BASE: tuple[tuple[str, str], ...] = (
    ("adduser", "3.134"),
    ("apt", "2.6.1"),
    ("base-files", "12.4"),
    ("base-passwd", "3.6.1"),
    ("bash", "5.2.15"),
    ("bsdutils", "2.38.1"),
    ("ca-certificates", "20230311"),
    ("coreutils", "9.1"),
    ("cron", "3.0pl1"),
    ("curl", "7.88.1"),
    ("dash", "0.5.12"),
    ("debconf", "1.5.82"),
    ("debianutils", "5.7"),
    ("diffutils", "3.8"),
    ("dpkg", "1.21.22"),
    ("e2fsprogs", "1.47.0"),
    ("findutils", "4.9.0"),
    ("gpgv", "2.2.40"),
    ("grep", "3.8"),
    ("gzip", "1.12"),
    ("hostname", "3.23"),
    ("init-system-helpers", "1.65.2"),
    ("iproute2", "6.1.0"),
    ("iputils-ping", "20221126"),
    ("less", "590"),
    ("login", "4.13"),
    ("logrotate", "3.21.0"),
    ("lsb-release", "12.0"),
    ("mawk", "1.3.4.20200120"),
    ("mount", "2.38.1"),
    ("nano", "7.2"),
    ("ncurses-base", "6.4"),
    ("netbase", "6.4"),
    ("openssh-client", "9.2p1"),
    ("openssl", "3.0.14"),
    ("passwd", "4.13"),
    ("perl-base", "5.36.0"),
    ("procps", "4.0.2"),
    ("sed", "4.9"),
    ("sensible-utils", "0.0.17"),
    ("sudo", "1.9.13p3"),
    ("systemd", "252.30"),
    ("systemd-sysv", "252.30"),
    ("tar", "1.34"),
    ("tzdata", "2024a"),
    ("util-linux", "2.38.1"),
    ("vim-tiny", "9.0.1378"),
    ("wget", "1.21.3"),
)

# Libraries are Multi-Arch: same, so dpkg-query prints them with an architecture qualifier.
_DPKG_LIBS: tuple[tuple[str, str], ...] = (
    ("libacl1", "2.3.1"),
    ("libapparmor1", "3.0.8"),
    ("libattr1", "2.5.1"),
    ("libaudit1", "3.0.9"),
    ("libblkid1", "2.38.1"),
    ("libbrotli1", "1.0.9"),
    ("libbz2-1.0", "1.0.8"),
    ("libc6", "2.36"),
    ("libcap-ng0", "0.8.3"),
    ("libcap2", "2.66"),
    ("libcryptsetup12", "2.6.1"),
    ("libcurl4", "7.88.1"),
    ("libdb5.3", "5.3.28+dfsg2"),
    ("libdbus-1-3", "1.14.10"),
    ("libexpat1", "2.5.0"),
    ("libffi8", "3.4.4"),
    ("libfreetype6", "2.12.1+dfsg"),
    ("libgcc-s1", "12.2.0"),
    ("libgcrypt20", "1.10.1"),
    ("libglib2.0-0", "2.74.6"),
    ("libgmp10", "6.2.1+dfsg1"),
    ("libgnutls30", "3.7.9"),
    ("libgpg-error0", "1.46"),
    ("libgtk-3-0", "3.24.38"),
    ("libhogweed6", "3.8.1"),
    ("libidn2-0", "2.3.3"),
    ("libjpeg62-turbo", "2.1.5"),
    ("libjson-c5", "0.16"),
    ("libkmod2", "30+20221128"),
    ("libkrb5-3", "1.20.1"),
    ("libldap-2.5-0", "2.5.13+dfsg"),
    ("liblz4-1", "1.9.4"),
    ("liblzma5", "5.4.1"),
    ("libmount1", "2.38.1"),
    ("libncursesw6", "6.4"),
    ("libnettle8", "3.8.1"),
    ("libnghttp2-14", "1.52.0"),
    ("libnss3", "3.87.1"),
    ("libp11-kit0", "0.24.1"),
    ("libpam0g", "1.5.2"),
    ("libpcre2-8-0", "10.42"),
    ("libpng16-16", "1.6.39"),
    ("libpsl5", "0.21.2"),
    ("libreadline8", "8.2"),
    ("libsasl2-2", "2.1.28+dfsg"),
    ("libseccomp2", "2.5.4"),
    ("libselinux1", "3.4"),
    ("libsqlite3-0", "3.40.1"),
    ("libssh2-1", "1.10.0"),
    ("libssl3", "3.0.14"),
    ("libstdc++6", "12.2.0"),
    ("libsystemd0", "252.30"),
    ("libtasn1-6", "4.19.0"),
    ("libtinfo6", "6.4"),
    ("libudev1", "252.30"),
    ("libunistring2", "1.0"),
    ("libuuid1", "2.38.1"),
    ("libx11-6", "1.8.4"),
    ("libxml2", "2.9.14+dfsg"),
    ("libzstd1", "1.5.4+dfsg2"),
    ("zlib1g", "1.2.13.dfsg"),
)

_DPKG_DESKTOP: tuple[tuple[str, str], ...] = (
    ("bluez", "5.66"),
    ("cups", "2.4.2"),
    ("evince", "43.1"),
    ("file-roller", "43.0"),
    ("fonts-dejavu-core", "2.37"),
    ("fonts-noto-color-emoji", "2.042"),
    ("fwupd", "1.8.12"),
    ("gimp", "2.10.34"),
    ("gnome-calculator", "43.0.1"),
    ("gnome-shell", "43.9"),
    ("gnome-terminal", "3.46.8"),
    ("gnupg", "2.2.40"),
    ("keepassxc", "2.7.4+dfsg.1"),
    ("libreoffice-calc", "7.4.7"),
    ("libreoffice-core", "7.4.7"),
    ("libreoffice-impress", "7.4.7"),
    ("libreoffice-writer", "7.4.7"),
    ("nautilus", "43.2"),
    ("network-manager", "1.42.4"),
    ("pipewire", "0.3.65"),
    ("remmina", "1.4.29+dfsg"),
    ("thunderbird", "115.12.0"),
    ("vlc", "3.0.21"),
    ("xwayland", "22.1.9"),
    ("xserver-xorg-core", "21.1.7"),
)

# Third-party repositories keep their own version schemes; these are used verbatim.
_DPKG_THIRD_PARTY: tuple[tuple[str, str], ...] = (
    ("google-chrome-stable", "126.0.6478.126-1"),
    ("code", "1.91.1-1720564633"),
    ("zoom", "6.1.1.443"),
    ("slack-desktop", "4.39.95"),
    ("teams-for-linux", "1.7.5"),
    ("1password", "8.10.36"),
    ("signal-desktop", "7.16.0"),
    ("spotify-client", "1:1.2.37.701.ge66eb7bc"),
    ("docker-ce", "5:27.1.1-1~debian.12~bookworm"),
    ("docker-ce-cli", "5:27.1.1-1~debian.12~bookworm"),
    ("containerd.io", "1.7.19-1"),
    ("docker-compose-plugin", "2.29.1-1~debian.12~bookworm"),
    ("tailscale", "1.70.0"),
    ("falcon-sensor", "7.16.0-16903"),
)

_DPKG_DEV: tuple[tuple[str, str], ...] = (
    ("build-essential", "12.9"),
    ("gcc-12", "12.2.0"),
    ("g++-12", "12.2.0"),
    ("make", "4.3"),
    ("git", "2.39.2"),
    ("htop", "3.2.2"),
    ("jq", "1.6"),
    ("rsync", "3.2.7"),
    ("tmux", "3.3a"),
    ("unzip", "6.0"),
    ("vim", "9.0.1378"),
    ("zip", "3.0"),
    ("zsh", "5.9"),
    ("openssh-server", "9.2p1"),
    ("python3-pip", "23.0.1+dfsg"),
    ("python3-venv", "3.11.2"),
    ("python3-requests", "2.28.1+dfsg"),
    ("python3-yaml", "6.0"),
    ("shellcheck", "0.9.0"),
    ("strace", "6.1"),
    ("tcpdump", "4.99.3"),
    ("wireguard-tools", "1.0.20210914"),
    ("openvpn", "2.6.3"),
)

_DPKG_UBUNTU: tuple[tuple[str, str], ...] = (
    ("snapd", "2.63"),
    ("ubuntu-desktop-minimal", "1.481.1"),
    ("ubuntu-advantage-tools", "32.3.1"),
    ("apport", "2.28.1"),
    ("update-notifier", "3.192.68"),
    ("firefox", "1:1snap1-0ubuntu5"),
    ("linux-firmware", "20240318.git3b128b60"),
)

_DPKG_DEBIAN: tuple[tuple[str, str], ...] = (
    ("firefox-esr", "115.14.0esr"),
    ("unattended-upgrades", "2.9.1+nmu3"),
    ("firmware-iwlwifi", "20230210"),
    ("intel-microcode", "3.20240514.1"),
    ("apt-listchanges", "3.24"),
)

_DPKG_PI: tuple[tuple[str, str], ...] = (
    ("raspi-config", "20240313"),
    ("rpi-eeprom", "25.2"),
    ("raspberrypi-sys-mods", "20240207"),
    ("pi-bluetooth", "0.1.19"),
    ("rpicam-apps", "1.5.1-1"),
    ("chromium-browser", "126.0.6478.164-rpt1"),
    ("mosquitto", "2.0.11"),
    ("nginx", "1.22.1"),
    ("avahi-daemon", "0.8"),
    ("dphys-swapfile", "20100506"),
)

_WINREG: tuple[tuple[str, str], ...] = (
    ("Google Chrome", "126.0.6478.127"),
    ("Microsoft Edge", "126.0.2592.87"),
    ("Microsoft Edge WebView2 Runtime", "126.0.2592.87"),
    ("Mozilla Firefox (x64 en-US)", "127.0.2"),
    ("Mozilla Maintenance Service", "127.0.2"),
    ("Mozilla Thunderbird (x64 en-US)", "115.12.2"),
    ("Brave", "126.1.67.123"),
    ("Microsoft 365 Apps for enterprise - en-us", "16.0.17726.20160"),
    ("Office 16 Click-to-Run Extensibility Component", "16.0.17726.20126"),
    ("Office 16 Click-to-Run Localization Component", "16.0.17726.20126"),
    ("Microsoft OneDrive", "24.116.0609.0003"),
    ("Microsoft Teams Meeting Add-in for Microsoft Office", "1.24.14501"),
    ("Microsoft Update Health Tools", "5.72.0.0"),
    ("Microsoft Policy Platform", "68.1.1010.0"),
    ("Microsoft Intune Management Extension", "1.79.103.0"),
    ("Windows PC Health Check", "3.6.2204.08001"),
    ("Microsoft Visual C++ 2015-2022 Redistributable (x64) - 14.40.33810", "14.40.33810.0"),
    ("Microsoft Visual C++ 2015-2022 Redistributable (x86) - 14.40.33810", "14.40.33810.0"),
    ("Microsoft Visual C++ 2013 Redistributable (x64) - 12.0.40664", "12.0.40664.0"),
    ("Microsoft Visual C++ 2013 Redistributable (x86) - 12.0.40664", "12.0.40664.0"),
    ("Microsoft Visual C++ 2012 Redistributable (x64) - 11.0.61030", "11.0.61030.0"),
    ("Microsoft Visual C++ 2010  x64 Redistributable - 10.0.40219", "10.0.40219"),
    ("Microsoft .NET Runtime - 8.0.6 (x64)", "64.24.26813"),
    ("Microsoft Windows Desktop Runtime - 8.0.6 (x64)", "8.0.6.33720"),
    ("Microsoft Windows Desktop Runtime - 6.0.31 (x64)", "6.0.31.33706"),
    ("Microsoft ASP.NET Core 8.0.6 - Shared Framework (x64)", "8.0.6.24267"),
    ("Microsoft Visual Studio Code", "1.91.1"),
    ("Microsoft Visual Studio Installer", "3.10.2154.60799"),
    ("Visual Studio Community 2022", "17.10.4"),
    ("Windows Subsystem for Linux", "2.2.4.0"),
    ("Docker Desktop", "4.32.0"),
    ("Git", "2.45.2"),
    ("GitHub Desktop", "3.4.2"),
    ("Node.js", "20.15.1"),
    ("Python 3.12.4 (64-bit)", "3.12.4150.0"),
    ("Python Launcher", "3.12.4150.0"),
    ("PowerShell 7-x64", "7.4.3.0"),
    ("Microsoft Build of OpenJDK with Hotspot 17.0.11+9 (x64)", "17.0.11.9"),
    ("Java 8 Update 411 (64-bit)", "8.0.4110.9"),
    ("Postman", "11.2.0"),
    ("Microsoft Azure CLI", "2.62.0"),
    ("Microsoft SQL Server Management Studio - 20.1", "20.1.10.0"),
    ("Wireshark 4.2.6 x64", "4.2.6"),
    ("Npcap", "1.79"),
    ("PuTTY release 0.81 (64-bit)", "0.81.0.0"),
    ("WinSCP 6.3.4", "6.3.4"),
    ("7-Zip 24.07 (x64)", "24.07"),
    ("Notepad++ (64-bit x64)", "8.6.9"),
    ("Adobe Acrobat (64-bit)", "24.002.20933"),
    ("VLC media player", "3.0.21"),
    ("Greenshot", "1.2.10.6"),
    ("KeePass Password Safe 2.57", "2.57"),
    ("Bitwarden", "2024.6.4"),
    ("1Password", "8.10.36"),
    ("Zoom Workplace (64-bit)", "6.1.1 (41705)"),
    ("Slack (Machine - MSI)", "4.39.95"),
    ("Webex", "44.6.0.29928"),
    ("Citrix Workspace 2405", "24.5.0.131"),
    ("Microsoft Remote Desktop", "1.2.5559.0"),
    ("TeamViewer", "15.55.3"),
    ("AnyDesk", "ad 8.0.10"),
    ("Cisco Secure Client - AnyConnect VPN", "5.1.4.74"),
    ("GlobalProtect", "6.2.3"),
    ("FortiClient VPN", "7.4.0.1658"),
    ("CrowdStrike Windows Sensor", "7.16.18613.0"),
    ("Sophos Endpoint Agent", "2023.2.2.1"),
    ("Microsoft Power BI Desktop (x64)", "2.130.930.0"),
    ("LibreOffice 24.2.4.2", "24.2.4.2"),
    ("GIMP 2.10.38", "2.10.38"),
    ("paint.net", "5.0.13"),
    ("Audacity 3.6.1", "3.6.1"),
    ("OBS Studio", "30.1.2"),
    ("Spotify", "1.2.40.599.g606b7f29"),
    ("Intel(R) Management Engine Components", "2406.5.5.0"),
    ("Intel(R) Serial IO", "30.100.2237.26"),
    ("Intel(R) Chipset Device Software", "10.1.19627.8423"),
    ("Intel(R) Wireless Bluetooth(R)", "23.60.0.1"),
    ("Realtek Audio Driver", "6.0.9560.1"),
    ("Realtek Card Reader", "10.0.22621.31258"),
    ("Microsoft GameInput", "10.1.22621.3036"),
)

# Vendor tools only appear on that vendor's machines.
_WINREG_VENDOR: dict[str, tuple[tuple[str, str], ...]] = {
    "Dell Inc.": (
        ("Dell SupportAssist", "4.0.3.49612"),
        ("Dell Command | Update", "5.3.0"),
        ("Dell Optimizer", "4.2.3.0"),
    ),
    "LENOVO": (
        ("Lenovo Vantage Service", "4.1.15.0"),
        ("Lenovo System Update", "5.08.03.59"),
    ),
    "HP": (
        ("HP Wolf Security", "4.5.22.114"),
        ("HP Support Assistant", "9.30.12.0"),
        ("HP Notifications", "1.1.28.1"),
    ),
    "Microsoft Corporation": (("Surface", "105.9.139.0"),),
    "Panasonic Connect Co., Ltd.": (("Panasonic PC Settings Utility", "9.2.1100.0"),),
    "Advantech": (("Advantech WISE-DeviceOn Agent", "5.2.14"),),
}

_WINREG_CORE = (
    "Google Chrome",
    "Microsoft Edge",
    "Microsoft Edge WebView2 Runtime",
    "Microsoft Update Health Tools",
    "Microsoft Visual C++ 2015-2022 Redistributable (x64) - 14.40.33810",
    "Microsoft Visual C++ 2015-2022 Redistributable (x86) - 14.40.33810",
)

_MACAPPS: tuple[tuple[str, str], ...] = (
    ("Google Chrome", "126.0.6478.127"),
    ("Firefox", "127.0.2"),
    ("Microsoft Edge", "126.0.2592.87"),
    ("Brave Browser", "126.1.67.123"),
    ("Arc", "1.49.0"),
    ("Microsoft Word", "16.86"),
    ("Microsoft Excel", "16.86"),
    ("Microsoft PowerPoint", "16.86"),
    ("Microsoft Outlook", "16.86"),
    ("Microsoft OneNote", "16.86"),
    ("Microsoft Teams", "24124.1412.2911.3341"),
    ("OneDrive", "24.116.0609"),
    ("Keynote", "14.1"),
    ("Numbers", "14.1"),
    ("Pages", "14.1"),
    ("GarageBand", "10.4.11"),
    ("iMovie", "10.4.1"),
    ("Slack", "4.39.95"),
    ("zoom.us", "6.1.1 (36333)"),
    ("Webex", "44.6.0.29928"),
    ("Discord", "0.0.310"),
    ("Signal", "7.16.0"),
    ("WhatsApp", "24.13.78"),
    ("Telegram", "10.14"),
    ("Visual Studio Code", "1.91.1"),
    ("Xcode", "15.4"),
    ("iTerm", "3.5.3"),
    ("Docker", "4.32.0"),
    ("Sublime Text", "Build 4180"),
    ("PyCharm", "2024.1.4"),
    ("IntelliJ IDEA", "2024.1.4"),
    ("GitHub Desktop", "3.4.2"),
    ("Sourcetree", "4.2.8"),
    ("TablePlus", "6.0.8"),
    ("Postman", "11.2.0"),
    ("Wireshark", "4.2.6"),
    ("Cyberduck", "9.0.2"),
    ("1Password", "8.10.36"),
    ("Bitwarden", "2024.6.4"),
    ("Obsidian", "1.6.5"),
    ("Notion", "3.11.1"),
    ("Figma", "124.2.9"),
    ("Affinity Designer 2", "2.5.3"),
    ("Raycast", "1.79.1"),
    ("Rectangle", "0.80"),
    ("Alfred 5", "5.5"),
    ("The Unarchiver", "4.3.8"),
    ("Spotify", "1.2.40.599"),
    ("VLC", "3.0.21"),
    ("Dropbox", "203.4.5773"),
    ("Google Drive", "94.0.1"),
    ("Microsoft Remote Desktop", "10.9.8"),
    ("TeamViewer", "15.55.3"),
    ("Citrix Workspace", "24.05.0.89"),
    ("Cisco Secure Client", "5.1.4.74"),
    ("GlobalProtect", "6.2.3-40"),
    ("Tunnelblick", "4.0.1"),
    ("Adobe Acrobat Reader", "24.002.20933"),
    ("Logi Options+", "1.74.587040"),
    ("DisplayLink Manager", "1.10.1"),
    ("Falcon", "7.16.18504.0"),
)

_MACAPPS_CORE = ("Safari", "Google Chrome", "Keynote", "Numbers", "Pages")

_PIP: tuple[tuple[str, str], ...] = (
    ("pip", "24.1.2"),
    ("setuptools", "70.3.0"),
    ("wheel", "0.43.0"),
    ("requests", "2.32.3"),
    ("urllib3", "2.2.2"),
    ("certifi", "2024.7.4"),
    ("idna", "3.7"),
    ("charset-normalizer", "3.3.2"),
    ("six", "1.16.0"),
    ("python-dateutil", "2.9.0.post0"),
    ("pytz", "2024.1"),
    ("tzdata", "2024.1"),
    ("pyyaml", "6.0.1"),
    ("jinja2", "3.1.4"),
    ("markupsafe", "2.1.5"),
    ("click", "8.1.7"),
    ("attrs", "23.2.0"),
    ("packaging", "24.1"),
    ("cryptography", "42.0.8"),
    ("cffi", "1.16.0"),
    ("pycparser", "2.22"),
    ("numpy", "2.0.0"),
    ("pandas", "2.2.2"),
    ("matplotlib", "3.9.1"),
    ("pillow", "10.4.0"),
    ("virtualenv", "20.26.3"),
    ("pipx", "1.6.0"),
    ("black", "24.4.2"),
    ("ruff", "0.5.2"),
    ("mypy", "1.10.1"),
    ("pytest", "8.2.2"),
    ("pluggy", "1.5.0"),
    ("iniconfig", "2.0.0"),
    ("httpx", "0.27.0"),
    ("anyio", "4.4.0"),
    ("sniffio", "1.3.1"),
    ("h11", "0.14.0"),
    ("pydantic", "2.8.2"),
    ("pydantic-core", "2.20.1"),
    ("typing-extensions", "4.12.2"),
    ("rich", "13.7.1"),
    ("pygments", "2.18.0"),
    ("markdown-it-py", "3.0.0"),
    ("mdurl", "0.1.2"),
    ("boto3", "1.34.144"),
    ("botocore", "1.34.144"),
    ("jmespath", "1.0.1"),
    ("s3transfer", "0.10.2"),
    ("ansible-core", "2.17.1"),
    ("paramiko", "3.4.0"),
    ("bcrypt", "4.1.3"),
    ("pynacl", "1.5.0"),
    ("psutil", "6.0.0"),
    ("distro", "1.9.0"),
)

_PIP_CORE = ("pip", "setuptools", "wheel")


# --------------------------------------------------------------------------- helpers


def _weighted(rng: random.Random, options: Sequence[tuple[str, int]]) -> str:
    names = [name for name, _ in options]
    weights = [weight for _, weight in options]
    return rng.choices(names, weights=weights, k=1)[0]


def _alnum(rng: random.Random, n: int, alphabet: str = "0123456789ABCDEFGHJKLMNPQRSTUVWXYZ") -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


def _serial(rng: random.Random, style: str) -> str:
    if style == "dell":
        # Dell service tags: seven characters, no vowels.
        return _alnum(rng, 7, "0123456789BCDFGHJKLMNPQRSTVWXYZ")
    if style == "lenovo":
        return rng.choice(("PF", "PW", "MJ")) + _alnum(rng, 6)
    if style == "hp":
        return rng.choice(("5CG", "5CD", "8CC")) + f"{rng.randint(3200, 3452)}" + _alnum(rng, 3)
    if style == "apple":
        return _alnum(rng, 10, "0123456789CDFGHJKLMNPQRTVWXY")
    if style == "rpi":
        return "10000000" + _alnum(rng, 8, "0123456789abcdef")
    if style == "intel":
        return "BTAH" + f"{rng.randint(0, 99_999_999):08d}"
    if style == "surface":
        return f"{rng.randint(0, 999_999_999_999):012d}"
    if style == "advantech":
        return "AKA" + f"{rng.randint(0, 9_999_999):07d}"
    if style == "panasonic":
        return f"{rng.randint(2, 4)}{_alnum(rng, 1, 'ABCDEFGHJKL')}{rng.randint(0, 99_999):05d}M"
    return "FRAN" + _alnum(rng, 12)  # Framework


def _mac(rng: random.Random) -> str:
    # Locally administered, unicast: never collides with a vendor's real address block.
    first = (rng.randrange(256) & 0xFC) | 0x02
    return ":".join(f"{b:02x}" for b in (first, *(rng.randrange(256) for _ in range(5))))


def _link_local(rng: random.Random) -> str:
    return "fe80::" + ":".join(f"{rng.randrange(65536):x}" for _ in range(4))


def _lan_ipv4(rng: random.Random, site_index: int) -> str:
    if rng.random() < 0.7:
        return f"10.{20 + site_index}.{rng.randint(0, 63)}.{rng.randint(10, 250)}"
    return f"192.168.{rng.choice((0, 1, 8, 10, 178))}.{rng.randint(10, 250)}"


def _dpkg_version(rng: random.Random, upstream: str, flavor: str, os_version: str) -> str:
    revision = rng.choice(("1", "2", "3", "4", "1.1", "2+b1"))
    if flavor == "ubuntu":
        if rng.random() < 0.4:
            return f"{upstream}-{revision.split('+')[0]}ubuntu0.{os_version}.{rng.randint(1, 6)}"
        return f"{upstream}-{revision.split('+')[0]}ubuntu{rng.randint(1, 4)}"
    suffix = "+rpt1" if flavor == "raspbian" and rng.random() < 0.15 else ""
    if rng.random() < 0.2:
        return f"{upstream}-{revision.split('+')[0]}~deb{os_version}u{rng.randint(1, 4)}{suffix}"
    return f"{upstream}-{revision}{suffix}"


def _dpkg_arch(os_: _Os, arch: str) -> str:
    # 32-bit Raspbian keeps armhf packages even when it boots a 64-bit kernel.
    if os_.name.startswith("Raspbian"):
        return "armhf"
    return {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "armhf"}.get(arch, arch)


def _bump_version(rng: random.Random, version: str) -> str:
    """Increase the last number in a version string, as an upgrade would."""
    matches = list(re.finditer(r"\d+", version))
    if not matches:
        return version + ".1"
    last = matches[-1]
    bumped = int(last.group()) + rng.randint(1, 3)
    return f"{version[: last.start()]}{bumped}{version[last.end() :]}"


# --------------------------------------------------------------------------- software


def _pick(
    rng: random.Random, catalog: Sequence[tuple[str, str]], count: int, exclude: Mapping[str, str]
) -> list[tuple[str, str]]:
    choices = [item for item in catalog if item[0] not in exclude]
    return rng.sample(choices, max(0, min(count, len(choices))))


def _dpkg_software(
    rng: random.Random, os_: _Os, hw: _Hardware, kernel: str, target: int
) -> dict[str, str]:
    arch = _dpkg_arch(os_, hw.arch)
    found: dict[str, str] = {}

    def add(name: str, upstream: str, verbatim: bool = False) -> None:
        # A version that already carries a revision comes from its own repository.
        if verbatim or "-" in upstream:
            found[name] = upstream
        else:
            found[name] = _dpkg_version(rng, upstream, os_.flavor, os_.version)

    for name, upstream in _DPKG_BASE:
        add(name, upstream)
    py_short = ".".join(os_.python.split(".")[:2])
    add("python3", os_.python)
    add(f"python{py_short}", os_.python)
    add(f"libpython{py_short}-stdlib:{arch}", os_.python)
    if os_.flavor == "ubuntu":
        abi = kernel.rsplit("-", 1)[0]  # 6.8.0-45-generic -> 6.8.0-45, packaged as 6.8.0-45.45
        add(f"linux-image-{kernel}", f"{abi}.{abi.rsplit('-', 1)[1]}", verbatim=True)
    elif os_.flavor == "debian":
        stable = f"{kernel.split('.')[0]}.{kernel.split('.')[1]}.{rng.randint(90, 115)}"
        add(f"linux-image-{kernel}", f"{stable}-{rng.randint(1, 3)}", verbatim=True)

    extras: list[tuple[str, str, bool]] = []
    if hw.kind == "embedded":
        extras += [(n, v, False) for n, v in (_DPKG_PI if os_.flavor == "raspbian" else ())]
        extras += [(n, v, False) for n, v in _DPKG_DEV[:14]]
    else:
        extras += [(n, v, False) for n, v in _DPKG_DESKTOP]
        extras += [(n, v, False) for n, v in _DPKG_DEV]
        extras += [(n, v, True) for n, v in _DPKG_THIRD_PARTY]
        distro = _DPKG_UBUNTU if os_.flavor == "ubuntu" else _DPKG_DEBIAN
        extras += [(n, v, False) for n, v in distro]
    libs = [(f"{n}:{arch}", v, False) for n, v in _DPKG_LIBS]
    # Embedded images are lean: few extras, fewer libraries.
    rng.shuffle(extras)
    rng.shuffle(libs)
    pool = extras[: rng.randint(len(extras) // 3, len(extras))] + libs
    for name, version, verbatim in pool:
        if len(found) >= target:
            break
        add(name, version, verbatim)
    return {f"sw.dpkg.{key_part(n)}": v for n, v in found.items()}


def _winreg_software(rng: random.Random, hw: _Hardware, target: int) -> dict[str, str]:
    by_name = dict(_WINREG)
    found = {name: by_name[name] for name in _WINREG_CORE}
    found.update(_WINREG_VENDOR.get(hw.manufacturer, ()))
    for name, version in _pick(rng, _WINREG, target - len(found), found):
        found[name] = version
    return {f"sw.winreg.{key_part(n)}": v for n, v in found.items()}


def _macapp_software(rng: random.Random, os_: _Os, target: int) -> dict[str, str]:
    by_name = dict(_MACAPPS)
    found = {"Safari": "18.1" if os_.version.startswith("15") else "17.6"}
    found.update({name: by_name[name] for name in _MACAPPS_CORE if name in by_name})
    for name, version in _pick(rng, _MACAPPS, target - len(found), found):
        found[name] = version
    return {f"sw.macapp.{key_part(n)}": v for n, v in found.items()}


def _pip_software(rng: random.Random, count: int) -> dict[str, str]:
    by_name = dict(_PIP)
    found = {name: by_name[name] for name in _PIP_CORE}
    for name, version in _pick(rng, _PIP, count - len(found), found):
        found[name] = version
    return {f"sw.pip.{n}": v for n, v in found.items()}


# --------------------------------------------------------------------------- devices


def _interfaces(rng: random.Random, os_: _Os, hw: _Hardware) -> list[tuple[str, bool, bool]]:
    """(name, has a MAC, carries the LAN address) for each interface of this device."""
    if os_.family == "windows":
        primary = "Wi-Fi" if hw.kind in ("laptop", "tablet") else "Ethernet"
        names = [
            ("Ethernet", True, primary == "Ethernet"),
            ("Bluetooth Network Connection", True, False),
        ]
        if primary == "Wi-Fi":
            names.insert(0, ("Wi-Fi", True, True))
        if rng.random() < 0.3:
            names.append(("Ethernet 2", True, False))  # a USB-C dock
        return names
    if os_.family == "macos":
        names = [("en0", True, True), ("awdl0", True, False), ("llw0", True, False)]
        names += [(f"utun{i}", False, False) for i in range(rng.randint(2, 4))]
        if hw.kind == "laptop":
            names.append(("en1", True, False))
        return names
    if hw.manufacturer.startswith("Raspberry"):
        wired = rng.random() < 0.6
        return [("eth0", True, wired), ("wlan0", True, not wired)]
    if hw.kind == "laptop":
        names = [("wlp0s20f3", True, True), ("enp0s31f6", True, False)]
    elif hw.model.startswith("NUC"):
        names = [("eno1", True, True), ("wlo1", True, False)]
    else:
        names = [("enp3s0", True, True)]
    if rng.random() < 0.25:
        names.append(("wg0", False, False))  # a WireGuard tunnel
    return names


def _network(rng: random.Random, os_: _Os, hw: _Hardware, site_index: int) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, has_mac, primary in _interfaces(rng, os_, hw):
        prefix = f"hw.net.{key_part(name)}."
        if has_mac:
            out[prefix + "mac"] = _mac(rng)
        if primary:
            out[prefix + "ipv4"] = _lan_ipv4(rng, site_index)
            out[prefix + "ipv6"] = _link_local(rng)
        elif name == "wg0":
            out[prefix + "ipv4"] = f"10.99.{rng.randint(0, 3)}.{rng.randint(2, 250)}"
        elif name.startswith(("utun", "awdl", "llw")):
            out[prefix + "ipv6"] = _link_local(rng)
    return out


def _disk_bytes(rng: random.Random, nominal_gb: int) -> int:
    # What statvfs reports is a little below the marketing size.
    usable = nominal_gb * _GB * rng.uniform(0.93, 0.975)
    return int(usable) // 4096 * 4096


def _disks(rng: random.Random, os_: _Os, hw: _Hardware) -> dict[str, str]:
    size = rng.choice(hw.disk_gb)
    if os_.family == "windows":
        disks = [("C:\\", "C:\\", "NTFS", _disk_bytes(rng, size))]
        if rng.random() < 0.15:
            disks.append(("D:\\", "D:\\", "NTFS", _disk_bytes(rng, rng.choice((500, 1000)))))
    elif os_.family == "macos":
        container = _disk_bytes(rng, size)
        disks = [
            ("/", "/dev/disk3s1s1", "apfs", container),
            ("/System/Volumes/Data", "/dev/disk3s5", "apfs", container),
            ("/System/Volumes/Preboot", "/dev/disk3s2", "apfs", container),
            ("/System/Volumes/VM", "/dev/disk3s6", "apfs", container),
            ("/System/Volumes/Update", "/dev/disk3s4", "apfs", container),
        ]
    elif hw.storage == "mmc":
        boot = "/boot/firmware" if os_.version == "12" else "/boot"
        disks = [
            ("/", "/dev/mmcblk0p2", "ext4", _disk_bytes(rng, size)),
            (
                boot,
                "/dev/mmcblk0p1",
                "vfat",
                535_805_952 if boot == "/boot/firmware" else 267_359_232,
            ),
        ]
    else:
        dev = "/dev/nvme0n1p" if hw.storage == "nvme" else "/dev/sda"
        root = f"{dev}2"
        if os_.flavor == "ubuntu" and rng.random() < 0.5:
            root = "/dev/mapper/ubuntu--vg-ubuntu--lv"
        disks = [
            ("/", root, "ext4", _disk_bytes(rng, size)),
            ("/boot/efi", f"{dev}1", "vfat", 535_805_952),
        ]
    out: dict[str, str] = {}
    for mount, device, fstype, total in disks:
        prefix = f"hw.disk.{key_part(mount)}."
        out[prefix + "total_bytes"] = str(total)
        out[prefix + "fstype"] = fstype
        out[prefix + "device"] = device
    return out


def _memory_bytes(rng: random.Random, gib: int, apple: bool) -> int:
    if apple:
        return gib * _GIB
    # Firmware and integrated graphics reserve part of RAM before the OS counts it.
    return int(gib * _GIB * rng.uniform(0.955, 0.985)) // 4096 * 4096


def _device_rng(rng: random.Random, index: int) -> random.Random:
    # One draw from the caller's generator keeps its sequence independent of device shape.
    # Fake demo data, not security: a plain PRNG is what we want.
    return random.Random(f"custos-sim:{rng.getrandbits(64)}:{index}")  # noqa: S311


def fake_hostname(rng: random.Random, index: int, kind: str | None = None) -> str:
    """Return a plausible hostname such as "lt-berlin-0042" for device number index."""
    if kind is None:
        kind = rng.choices(KINDS, weights=_KIND_WEIGHTS, k=1)[0]
    site = rng.choice(_SITES)
    team = rng.choice(_TEAMS)
    if kind == "laptop":
        return f"lt-{site}-{index:04d}"
    if kind == "desktop":
        return f"ws-{team}-{index:02d}"
    if kind == "tablet":
        return f"tab-{team}-{index:03d}"
    return f"{rng.choice(('pi', 'kiosk', 'edge'))}-{site}-{index:03d}"


def fake_inventory(
    rng: random.Random, index: int, *, now: datetime | None = None
) -> dict[str, str]:
    """Return a realistic inventory for simulated device number index (deterministic)."""
    dev = _device_rng(rng, index)
    kind = dev.choices(KINDS, weights=_KIND_WEIGHTS, k=1)[0]
    models = [hw for hw in _HARDWARE if hw.kind == kind]
    hw = dev.choices(models, weights=[m.weight for m in models], k=1)[0]
    os_key = _weighted(dev, hw.oses)
    os_ = _OSES[os_key]
    kernel = dev.choice(os_.kernels)
    if "Pi 5" in hw.model:
        kernel = kernel.replace("rpi-v8", "rpi-2712")
    site_index = dev.randrange(len(_SITES))
    cpu_model, cores, threads = dev.choice(hw.cpus)
    reference = now if now is not None else SIM_REFERENCE_TIME
    booted = reference - timedelta(seconds=dev.randint(600, 21 * 86400))

    arch = hw.arch
    if os_.family == "windows":
        arch = "AMD64"
    elif kernel.endswith("v7l+"):
        arch = "armv7l"
    inv: dict[str, str] = {
        "os.name": os_.name,
        "os.version": os_.version,
        "os.pretty": os_.pretty.format(ubr=dev.choice((3880, 4037, 4169, 4317))),
        "os.kernel": kernel,
        "os.arch": arch,
        "os.hostname": fake_hostname(dev, index, kind),
        "os.boot_time": booted.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "hw.manufacturer": hw.manufacturer,
        "hw.model": hw.model,
        "hw.serial": _serial(dev, hw.serial_style),
        "hw.cpu.model": cpu_model,
        "hw.cpu.cores": str(cores),
        "hw.cpu.threads": str(threads),
        "hw.memory.total_bytes": str(
            _memory_bytes(dev, dev.choice(hw.memory_gib), hw.storage == "apple")
        ),
    }
    inv.update(_disks(dev, os_, hw))
    inv.update(_network(dev, os_, hw, site_index))
    if kind in ("laptop", "tablet"):
        inv["hw.battery.percent"] = str(5 * dev.randint(2, 20))
        inv["hw.battery.plugged"] = dev.choice(("true", "false"))

    # Software counts stay inside what each catalog can supply, so devices differ.
    if os_.family == "windows":
        target = dev.randint(40, len(_WINREG) - 5)
    elif os_.family == "macos":
        target = dev.randint(40, len(_MACAPPS) + 30)
    else:
        target = dev.randint(60, 120) if kind == "embedded" else dev.randint(80, 250)
    has_pip = os_.family != "windows" and dev.random() < 0.5
    pip_count = dev.randint(8, min(len(_PIP), 40)) if has_pip else 0
    native = target - pip_count
    if os_.family == "windows":
        inv.update(_winreg_software(dev, hw, native))
    elif os_.family == "macos":
        inv.update(_macapp_software(dev, os_, native))
    else:
        inv.update(_dpkg_software(dev, os_, hw, kernel, native))
    if has_pip:
        inv.update(_pip_software(dev, pip_count))
    return dict(sorted(inv.items()))


# --------------------------------------------------------------------------- drift


def _catalog_for(source: str, inv: Mapping[str, str]) -> list[tuple[str, str]]:
    if source == "winreg":
        return list(_WINREG)
    if source == "macapp":
        return list(_MACAPPS)
    if source == "pip":
        return list(_PIP)
    arch = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "armhf"}.get(
        inv.get("os.arch", ""), "amd64"
    )
    desktop = list(_DPKG_DESKTOP) + list(_DPKG_DEV)
    return desktop + [(f"{n}:{arch}", v) for n, v in _DPKG_LIBS]


def _install(rng: random.Random, inv: dict[str, str], sources: list[str]) -> bool:
    source = rng.choice(sources)
    prefix = f"sw.{source}."
    candidates = [
        (name, version)
        for name, version in _catalog_for(source, inv)
        if prefix + key_part(name) not in inv
    ]
    if not candidates:
        return False
    name, version = rng.choice(candidates)
    if source == "dpkg" and "-" not in version:
        flavor = "ubuntu" if inv.get("os.name") == "Ubuntu" else "debian"
        version = _dpkg_version(rng, version, flavor, inv.get("os.version", "12"))
    inv[prefix + key_part(name)] = version
    return True


def mutate_inventory(rng: random.Random, inv: Mapping[str, str]) -> dict[str, str]:
    """Return a copy of inv with one small, realistic change (upgrade, install, battery...)."""
    out = dict(inv)
    sw_keys = sorted(k for k in out if k.startswith("sw."))
    sources = sorted({k.split(".", 2)[1] for k in sw_keys})
    has_battery = "hw.battery.percent" in out
    options = [("upgrade", 45), ("install", 20), ("remove", 10), ("reboot", 5), ("dhcp", 5)]
    if has_battery:
        options.append(("battery", 25))
    for _ in range(8):
        change = _weighted(rng, options)
        if change == "upgrade" and sw_keys:
            key = rng.choice(sw_keys)
            out[key] = _bump_version(rng, out[key])
        elif change == "install" and sources:
            if not _install(rng, out, sources):
                continue
        elif change == "remove" and len(sw_keys) > 40:
            del out[rng.choice(sw_keys)]
        elif change == "battery" and has_battery:
            old = int(out["hw.battery.percent"])
            step = rng.choice((-30, -20, -15, -10, -5, 5, 10, 15, 20))
            new = max(5, min(100, old + step))
            out["hw.battery.percent"] = str(new if new != old else (old - 5 if old > 5 else 10))
            if rng.random() < 0.3:
                out["hw.battery.plugged"] = (
                    "false" if out.get("hw.battery.plugged") == "true" else "true"
                )
        elif change == "reboot" and "os.boot_time" in out:
            booted = datetime.strptime(out["os.boot_time"], "%Y-%m-%dT%H:%M:%SZ")
            later = booted.replace(tzinfo=UTC) + timedelta(seconds=rng.randint(3600, 7 * 86400))
            out["os.boot_time"] = later.strftime("%Y-%m-%dT%H:%M:%SZ")
        elif change == "dhcp":
            ipv4_keys = sorted(
                k for k in out if k.endswith(".ipv4") and not k.startswith("hw.net.wg")
            )
            if not ipv4_keys:
                continue
            key = ipv4_keys[0]
            head, _, last = out[key].rpartition(".")
            out[key] = f"{head}.{(int(last) + rng.randint(1, 200)) % 240 + 10}"
        else:
            continue
        if out != dict(inv):
            return out
    # Nothing applicable (an inventory without software or battery): a reboot always is.
    while out == dict(inv):
        booted = SIM_REFERENCE_TIME + timedelta(seconds=rng.randint(1, 30 * 86400))
        out["os.boot_time"] = booted.strftime("%Y-%m-%dT%H:%M:%SZ")
    return out
