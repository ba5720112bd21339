"""Package inspection: every format, and the archives that must be refused."""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import re
import struct
import subprocess
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import zstandard

from custos.packaging.inspect import Limits, PackageError, extract_cpkg, inspect_package
from custos.packaging.manifest import Descriptor

STEPS_MANIFEST = b"""
name = "hello"
version = "1.0.0"
platforms = ["linux"]
dependencies = ["base>=2"]
detect = { version_file = "/opt/hello/VERSION", version = "1.0.0" }

[[install]]
script = "scripts/install.sh"

[[uninstall]]
command = ["/bin/rm", "-rf", "/opt/hello"]
"""

FILES_MANIFEST = b"""
name = "tool"
version = "3.1"

[[files]]
source = "bin/tool"
destination = "/usr/local/bin/custos-test-tool"
mode = 0o755
"""


def _file(tf: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    tf.addfile(info, io.BytesIO(data))


def _special(tf: tarfile.TarFile, name: str, kind: bytes, linkname: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    tf.addfile(info)


def make_cpkg(
    path: Path,
    members: dict[str, bytes],
    *,
    zstd: bool = False,
    extra: Callable[[tarfile.TarFile], None] | None = None,
) -> Path:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in members.items():
            _file(tf, name, data, 0o755 if name.endswith(".sh") else 0o644)
        if extra is not None:
            extra(tf)
    data = buf.getvalue()
    if zstd:
        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)
    return path


def _steps_pkg(tmp_path: Path, *, zstd: bool = False) -> Path:
    members = {"manifest.toml": STEPS_MANIFEST, "scripts/install.sh": b"#!/bin/sh\nexit 0\n"}
    return make_cpkg(tmp_path / "hello.cpkg", members, zstd=zstd)


# --------------------------------------------------------------------------- cpkg


def test_cpkg_plain_tar(tmp_path: Path) -> None:
    path = _steps_pkg(tmp_path)
    info = inspect_package(path, filename="hello.cpkg")
    assert (info.format, info.name, info.version) == ("cpkg", "hello", "1.0.0")
    assert info.platforms == ["linux"]
    assert info.dependencies == [{"name": "base", "min_version": "2"}]
    assert info.size == path.stat().st_size
    assert info.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert (
        info.manifest is not None and info.manifest["install"][0]["script"] == "scripts/install.sh"
    )
    assert info.detect == {"version_file": "/opt/hello/VERSION", "version": "1.0.0"}
    # the descriptor is exactly what the agent's schema accepts
    d = Descriptor.from_dict(info.descriptor())
    assert d.manifest is not None and d.manifest.to_dict() == info.manifest


def test_cpkg_zstd_with_files_gets_a_content_detect_rule(tmp_path: Path) -> None:
    payload = b"#!/bin/sh\necho tool\n"
    members = {"./manifest.toml": FILES_MANIFEST, "./bin/tool": payload}
    path = make_cpkg(tmp_path / "tool.cpkg", members, zstd=True)
    assert path.read_bytes()[:4] == b"\x28\xb5\x2f\xfd"
    info = inspect_package(path, filename="tool.cpkg", name="tool", version="3.1")
    assert info.detect == {
        "file": "/usr/local/bin/custos-test-tool",
        "sha256": hashlib.sha256(payload).hexdigest(),
    }


def test_cpkg_caller_name_or_version_must_agree(tmp_path: Path) -> None:
    path = _steps_pkg(tmp_path)
    with pytest.raises(PackageError, match="conflicts"):
        inspect_package(path, filename="hello.cpkg", version="2.0")
    with pytest.raises(PackageError, match="conflicts"):
        inspect_package(path, filename="hello.cpkg", name="other")


def _big_pax(tf: tarfile.TarFile) -> None:
    info = tarfile.TarInfo("padded")
    info.pax_headers = {"comment": "x" * (2 * 1024 * 1024)}
    tf.addfile(info, io.BytesIO(b""))


HOSTILE: dict[str, tuple[dict[str, bytes], Callable[[tarfile.TarFile], None] | None, str]] = {
    "dotdot": ({"../escape.txt": b"x"}, None, "'..'"),
    "nested_dotdot": ({"a/../../escape.txt": b"x"}, None, "'..'"),
    "absolute": ({"/tmp/custos-escape.txt": b"x"}, None, "absolute"),
    "backslash": ({"a\\..\\b": b"x"}, None, "backslash"),
    "drive": ({"C:/Windows/x.dll": b"x"}, None, "absolute"),
    "stream": ({"a.txt:hidden": b"x"}, None, "not allowed in archive paths"),
    "control_char": ({"a\x1b[2Jb": b"x"}, None, "not allowed in archive paths"),
    "symlink_escape": ({}, lambda tf: _special(tf, "link", tarfile.SYMTYPE, "../../etc"), "links"),
    "symlink_inside": (
        {},
        lambda tf: _special(tf, "link", tarfile.SYMTYPE, "manifest.toml"),
        "links",
    ),
    "hardlink": ({}, lambda tf: _special(tf, "hard", tarfile.LNKTYPE, "manifest.toml"), "links"),
    "fifo": ({}, lambda tf: _special(tf, "pipe", tarfile.FIFOTYPE), "fifos"),
    "device": ({}, lambda tf: _special(tf, "dev", tarfile.CHRTYPE), "device"),
    "duplicate_manifest": ({"./manifest.toml": STEPS_MANIFEST}, None, "more than once"),
    "file_under_file": ({"scripts/install.sh/x": b"x"}, None, "below the file"),
    "big_pax_header": ({}, _big_pax, "extended header"),
    "oversized_member": ({"big.bin": b"\0" * 5000}, None, "larger than 4096"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_cpkg_refused_by_inspect_and_extraction(tmp_path: Path, case: str) -> None:
    members, extra, reason = HOSTILE[case]
    base = {"manifest.toml": STEPS_MANIFEST, "scripts/install.sh": b"#!/bin/sh\n"}
    path = make_cpkg(tmp_path / "bad.cpkg", {**base, **members}, extra=extra, zstd=True)
    limits = Limits(max_member_bytes=4096)
    with pytest.raises(PackageError, match=re.escape(reason)):
        inspect_package(path, filename="bad.cpkg", limits=limits)
    dest = tmp_path / "deep" / "er" / "out"
    dest.mkdir(parents=True)
    with pytest.raises(PackageError, match=re.escape(reason)):
        extract_cpkg(path, dest, limits=limits)
    # nothing landed outside the extraction directory
    assert not (tmp_path / "deep" / "escape.txt").exists()
    assert not (tmp_path / "deep" / "er" / "escape.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.cpkg", "deep"]


@pytest.mark.parametrize(
    ("members", "limits", "reason"),
    [
        ({"scripts/install.sh": b""}, Limits(), "no manifest.toml"),
        ({"manifest.toml": STEPS_MANIFEST}, Limits(), "missing from the archive"),
        ({"manifest.toml": b"name = "}, Limits(), "not valid TOML"),
        (
            {"manifest.toml": STEPS_MANIFEST, "scripts/install.sh": b"", "a": b"", "b": b""},
            Limits(max_members=3),
            "more than 3 members",
        ),
        (
            {"manifest.toml": STEPS_MANIFEST, "scripts/install.sh": b"x" * 600},
            Limits(max_total_bytes=800),
            "unpacks to more than 800",
        ),
        (
            {"manifest.toml": STEPS_MANIFEST, "scripts/install.sh": b""},
            Limits(max_manifest_bytes=100),
            "manifest.toml is larger",
        ),
    ],
)
def test_cpkg_structure_and_limits(
    tmp_path: Path, members: dict[str, bytes], limits: Limits, reason: str
) -> None:
    path = make_cpkg(tmp_path / "x.cpkg", members)
    with pytest.raises(PackageError, match=reason):
        inspect_package(path, filename="x.cpkg", limits=limits)


def test_cpkg_that_is_not_a_tar(tmp_path: Path) -> None:
    path = tmp_path / "x.cpkg"
    path.write_bytes(b"just some text, not an archive" * 30)
    with pytest.raises(PackageError, match="tar archive"):
        inspect_package(path, filename="x.cpkg")
    # corrupt zstd data behind a valid magic
    path.write_bytes(b"\x28\xb5\x2f\xfd" + b"\x00garbage" * 50)
    with pytest.raises(PackageError, match="not a valid cpkg"):
        inspect_package(path, filename="x.cpkg")


def test_extract_cpkg_writes_files_with_safe_modes(tmp_path: Path) -> None:
    path = _steps_pkg(tmp_path, zstd=True)
    dest = tmp_path / "out"
    dest.mkdir()
    manifest = extract_cpkg(path, dest)
    assert manifest.name == "hello"
    script = dest / "scripts" / "install.sh"
    assert script.read_bytes() == b"#!/bin/sh\nexit 0\n"
    assert script.stat().st_mode & 0o7777 == 0o755
    assert (dest / "manifest.toml").stat().st_mode & 0o7777 == 0o644
    with pytest.raises(PackageError, match="not empty"):
        extract_cpkg(path, dest)


def test_artifact_size_limit(tmp_path: Path) -> None:
    path = _steps_pkg(tmp_path)
    with pytest.raises(PackageError, match="larger than 100 bytes"):
        inspect_package(path, filename="hello.cpkg", limits=Limits(max_artifact_bytes=100))


# --------------------------------------------------------------------------- deb


def build_deb(tmp_path: Path, name: str, version: str, *, compress: str = "xz") -> Path:
    root = tmp_path / f"debroot-{compress}"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        f"Package: {name}\nVersion: {version}\nArchitecture: all\n"
        "Maintainer: Custos Tests <tests@example.invalid>\n"
        "Depends: libc6 (>= 2.17), foo | bar\n"
        "Description: test package\n continued description line\n"
    )
    (root / "opt" / name).mkdir(parents=True)
    (root / "opt" / name / "hello").write_text("hello\n")
    out = tmp_path / f"{name}_{version}_all.deb"
    subprocess.run(
        ["dpkg-deb", f"-Z{compress}", "--root-owner-group", "--build", str(root), str(out)],
        check=True,
        capture_output=True,
    )
    return out


@pytest.mark.parametrize("compress", ["xz", "gzip", "zstd", "none"])
def test_deb(tmp_path: Path, compress: str) -> None:
    path = build_deb(tmp_path, "custos-inspect-test", "1.2-3", compress=compress)
    info = inspect_package(path, filename=path.name)
    assert (info.format, info.name, info.version, info.arch) == (
        "deb",
        "custos-inspect-test",
        "1.2-3",
        "all",
    )
    assert info.platforms == ["linux"]
    assert info.detect == {"dpkg": "custos-inspect-test", "min_version": "1.2-3"}
    assert info.metadata["depends"] == "libc6 (>= 2.17), foo | bar"
    assert info.metadata["description"] == "test package\ncontinued description line"
    # detected by content even under another name
    assert inspect_package(path, filename="upload.bin").format == "deb"
    assert inspect_package(path, filename=path.name, name="custos-inspect-test").name == info.name
    with pytest.raises(PackageError, match="conflicts"):
        inspect_package(path, filename=path.name, version="9.9")


def test_deb_shipped_as_a_plain_file(tmp_path: Path) -> None:
    path = build_deb(tmp_path, "custos-inspect-test", "1.0")
    info = inspect_package(
        path, filename=path.name, format="file", name="blob", version="1", destination="/srv/x.deb"
    )
    assert info.format == "file" and info.detect == {"file": "/srv/x.deb", "sha256": info.sha256}


def test_broken_debs(tmp_path: Path) -> None:
    good = build_deb(tmp_path, "custos-inspect-test", "1.0").read_bytes()
    bad = tmp_path / "bad.deb"
    bad.write_bytes(good[: len(good) // 2])
    with pytest.raises(PackageError, match="truncated"):
        inspect_package(bad, filename="bad.deb")
    bad.write_bytes(b"not an ar archive at all")
    with pytest.raises(PackageError, match="ar archive"):
        inspect_package(bad, filename="bad.deb")


# --------------------------------------------------------------------------- rpm


def _rpm_header(entries: list[tuple[int, int, bytes, int]]) -> bytes:
    index, store = b"", b""
    for tag, kind, data, count in entries:
        if kind == 4:
            store += b"\0" * (-len(store) % 4)
        index += struct.pack(">iiii", tag, kind, len(store), count)
        store += data
    return (
        b"\x8e\xad\xe8\x01\0\0\0\0" + struct.pack(">ii", len(entries), len(store)) + index + store
    )


def build_rpm(
    path: Path,
    name: str,
    version: str,
    release: str,
    *,
    epoch: int | None = None,
    source: bool = False,
) -> Path:
    lead = struct.pack(
        ">4sBBhh66shh16s",
        b"\xed\xab\xee\xdb",
        3,
        0,
        1 if source else 0,
        1,
        f"{name}-{version}-{release}".encode(),
        1,
        5,
        b"",
    )
    sig = _rpm_header([(1000, 4, struct.pack(">i", 0), 1)])
    sig += b"\0" * (-len(sig) % 8)
    tags = [
        (1000, 6, name.encode() + b"\0", 1),
        (1001, 6, version.encode() + b"\0", 1),
        (1002, 6, release.encode() + b"\0", 1),
        (1004, 9, b"a test rpm\0", 1),
        (1022, 6, b"x86_64\0", 1),
    ]
    if epoch is not None:
        tags.append((1003, 4, struct.pack(">i", epoch), 1))
    path.write_bytes(lead + sig + _rpm_header(tags) + gzip.compress(b""))
    return path


def test_rpm(tmp_path: Path) -> None:
    path = build_rpm(tmp_path / "t.rpm", "custos-rpm-test", "1.2", "3")
    info = inspect_package(path, filename="t.rpm")
    assert (info.format, info.name, info.version, info.arch) == (
        "rpm",
        "custos-rpm-test",
        "1.2-3",
        "x86_64",
    )
    assert info.platforms == ["linux/x86_64"]
    assert info.detect == {"rpm": "custos-rpm-test", "min_version": "1.2-3"}
    assert info.metadata == {"summary": "a test rpm"}
    with_epoch = build_rpm(tmp_path / "e.rpm", "custos-rpm-test", "1.2", "3", epoch=2)
    assert inspect_package(with_epoch, filename="e.rpm").version == "2:1.2-3"


def test_bad_rpms(tmp_path: Path) -> None:
    src = build_rpm(tmp_path / "s.rpm", "x", "1", "1", source=True)
    with pytest.raises(PackageError, match="source rpms"):
        inspect_package(src, filename="s.src.rpm")
    good = build_rpm(tmp_path / "g.rpm", "x", "1", "1").read_bytes()
    # a header that claims far more index entries than the file holds
    bad = tmp_path / "b.rpm"
    bad.write_bytes(good[:104] + struct.pack(">i", 10_000_000) + good[108:])
    with pytest.raises(PackageError, match="too large"):
        inspect_package(bad, filename="b.rpm")
    bad.write_bytes(good[:150])
    with pytest.raises(PackageError, match=r"truncated|missing"):
        inspect_package(bad, filename="b.rpm")


# --------------------------------------------------------------------------- wheel


def build_wheel(
    directory: Path,
    dist: str = "custos_test_wheel",
    version: str = "1.0",
    *,
    metadata_name: str | None = None,
    module: str = "custos_test_wheel_mod",
    extra: dict[str, bytes] | None = None,
) -> Path:
    info_dir = f"{dist}-{version}.dist-info"
    files = {
        f"{module}/__init__.py": b"VALUE = 42\n",
        f"{info_dir}/METADATA": (
            f"Metadata-Version: 2.1\nName: {metadata_name or dist}\nVersion: {version}\n"
            "Summary: a test wheel\nRequires-Python: >=3.8\n"
        ).encode(),
        f"{info_dir}/WHEEL": b"Wheel-Version: 1.0\nGenerator: custos-tests\n"
        b"Root-Is-Purelib: true\nTag: py3-none-any\n",
        **(extra or {}),
    }
    record = []
    for name, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(data)}")
    record.append(f"{info_dir}/RECORD,,")
    files[f"{info_dir}/RECORD"] = ("\n".join(record) + "\n").encode()
    path = directory / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


def test_wheel(tmp_path: Path) -> None:
    path = build_wheel(tmp_path)
    info = inspect_package(path, filename=path.name)
    assert (info.format, info.name, info.version, info.arch) == (
        "whl",
        "custos_test_wheel",
        "1.0",
        "any",
    )
    assert info.platforms == []
    assert info.detect == {"pip": "custos_test_wheel", "min_version": "1.0", "python": None}
    assert info.metadata["requires_python"] == ">=3.8"
    # PEP 503 names compare equal however they are spelt
    assert inspect_package(path, filename=path.name, name="Custos-Test.Wheel").name == info.name


def test_bad_wheels(tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    mismatch = build_wheel(other, metadata_name="something_else")
    with pytest.raises(PackageError, match="METADATA says"):
        inspect_package(mismatch, filename=mismatch.name)
    evil_dir = tmp_path / "evil"
    evil_dir.mkdir()
    evil = build_wheel(evil_dir, extra={"../../evil.py": b"x"})
    with pytest.raises(PackageError, match=r"'\.\.'"):
        inspect_package(evil, filename=evil.name)
    good = build_wheel(tmp_path)
    with pytest.raises(PackageError, match="file name"):
        inspect_package(good, filename="not-a-wheel-name.whl")
    plain_zip = tmp_path / "z.whl"
    with zipfile.ZipFile(plain_zip, "w") as zf:
        zf.writestr("a.txt", "a")
    with pytest.raises(PackageError, match="file name"):
        inspect_package(plain_zip, filename="z.whl")
    with pytest.raises(PackageError, match="exactly one"):
        inspect_package(plain_zip, filename="z-1.0-py3-none-any.whl")
    text = tmp_path / "t.whl"
    text.write_bytes(b"plain text")
    with pytest.raises(PackageError, match="not a zip"):
        inspect_package(text, filename="t-1.0-py3-none-any.whl")


# --------------------------------------------------------------------------- msi and plain files


def test_msi_needs_magic_name_and_version(tmp_path: Path) -> None:
    path = tmp_path / "setup.msi"
    path.write_bytes(bytes.fromhex("d0cf11e0a1b11ae1") + b"\0" * 4096)
    with pytest.raises(PackageError, match="does not carry its name"):
        inspect_package(path, filename="setup.msi", version="1.0")
    code = "{12345678-ABCD-ABCD-ABCD-123456789abc}"
    info = inspect_package(
        path, filename="setup.msi", name="setup", version="1.0", product_code=code
    )
    assert (info.format, info.platforms) == ("msi", ["windows"])
    assert info.detect == {"msi": code.upper(), "min_version": None}
    plain = inspect_package(path, filename="setup.msi", name="setup", version="1.0")
    assert plain.detect is None
    path.write_bytes(b"MZ" + b"\0" * 4096)
    with pytest.raises(PackageError, match="OLE"):
        inspect_package(path, filename="setup.msi", name="setup", version="1.0")


def test_plain_file(tmp_path: Path) -> None:
    path = tmp_path / "app.conf"
    path.write_bytes(b"key = value\n")
    digest = hashlib.sha256(b"key = value\n").hexdigest()
    info = inspect_package(
        path, filename="app.conf", name="app-conf", version="7", destination="/etc/app.conf"
    )
    assert (info.format, info.mode) == ("file", 0o644)
    assert info.detect == {"file": "/etc/app.conf", "sha256": digest}
    assert Descriptor.from_dict(info.descriptor()).destination == "/etc/app.conf"
    for kwargs, reason in [
        ({"name": "a", "version": "1"}, "destination"),
        ({"name": "a", "version": "1", "destination": "etc/app.conf"}, "absolute"),
        ({"version": "1", "destination": "/etc/a"}, "name"),
        ({"name": "a b", "version": "1", "destination": "/etc/a"}, "not acceptable"),
        ({"name": "a", "version": "1", "destination": "/a", "mode": 0o4755}, "mode"),
    ]:
        with pytest.raises(PackageError, match=reason):
            inspect_package(path, filename="app.conf", **kwargs)  # type: ignore[arg-type]
    with pytest.raises(PackageError, match="only to plain files"):
        inspect_package(_steps_pkg(tmp_path), filename="hello.cpkg", destination="/x")


def test_detect_override_is_validated(tmp_path: Path) -> None:
    path = tmp_path / "setup.msi"
    path.write_bytes(bytes.fromhex("d0cf11e0a1b11ae1") + b"\0" * 4096)
    info = inspect_package(
        path,
        filename="setup.msi",
        name="setup",
        version="1.0",
        detect={"command": ["cmd", "/c", "exit", "0"]},
    )
    assert info.detect == {"command": ["cmd", "/c", "exit", "0"], "exit_code": 0, "timeout": 60.0}
    with pytest.raises(PackageError, match="detect rule"):
        inspect_package(path, filename="setup.msi", name="s", version="1", detect={"x": 1})
