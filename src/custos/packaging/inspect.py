"""Inspect and validate uploaded packages without running anything from them.

Formats (detected from the content's magic bytes and the file name; `format=` overrides):

- ``cpkg`` — Custos package, named ``*.cpkg``: a POSIX tar, plain or zstd-compressed (both are
  accepted and told apart by the zstd magic; ``tar --zstd -cf x.cpkg -C dir .`` makes one). Its
  root holds ``manifest.toml`` exactly once plus payload files. Only regular files and
  directories are allowed: symlinks and hardlinks are refused outright (a package that needs
  links creates them in an install step), as are device files, fifos and sparse files. Paths
  must be relative, without ``..``, backslashes, ``:``, control characters or drive letters.
  Sizes, member count and extended headers are bounded (`Limits`). The agent extracts with the
  same code (`extract_cpkg`).
- ``deb`` — read with a small ar reader; name/version/arch from ``control.tar.{gz,xz,zst}``.
- ``rpm`` — header read with rpmfile after checking the header sizes; version is
  ``[epoch:]version-release``; source rpms are refused.
- ``whl`` — a zip; name/version from the file name and ``*.dist-info/METADATA``, which must agree.
- ``msi`` — only the OLE magic is checked; the caller must give name and version (and may give
  the product code for detection).
- ``file`` — anything else (a tar or zip not named as above too); the caller gives name,
  version and the destination path.

Caller-supplied name/version fill in what a format does not carry. When the package carries its
own and the caller's differ, the package is refused (PackageError): a catalogue entry must never
claim to be something the installer will register under another name or version.
"""

from __future__ import annotations

import email.parser
import gzip
import hashlib
import io
import lzma
import os
import re
import tarfile
import zipfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal, Self

import rpmfile
import zstandard
from pydantic import TypeAdapter, ValidationError

from custos.packaging.manifest import (
    ANY_ARCH,
    FORMATS,
    NAME_PATTERN,
    VERSION_PATTERN,
    Manifest,
    PackageError,
    ProductCode,
    check_archive_path,
    normalize_arch,
    parse_detect_rule,
    rule_to_dict,
)

__all__ = [
    "DEFAULT_LIMITS",
    "Limits",
    "PackageError",
    "PackageInfo",
    "extract_cpkg",
    "inspect_package",
]

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
AR_MAGIC = b"!<arch>\n"
RPM_MAGIC = b"\xed\xab\xee\xdb"
RPM_HEADER_MAGIC = b"\x8e\xad\xe8"
ZIP_MAGIC = b"PK\x03\x04"
OLE_MAGIC = bytes.fromhex("d0cf11e0a1b11ae1")

GiB = 1024**3
MiB = 1024**2
# pax and GNU long-name headers are read whole into memory by tarfile, so they are capped
_TAR_META_LIMIT = 1 * MiB
_TAR_META_TYPES = (
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.SOLARIS_XHDTYPE,
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
)
_CHUNK = 1 * MiB


@dataclass(frozen=True)
class Limits:
    """Size and count limits applied while inspecting and extracting packages."""

    max_artifact_bytes: int = 4 * GiB
    max_total_bytes: int = 4 * GiB  # sum of unpacked member sizes
    max_member_bytes: int = 2 * GiB
    max_members: int = 10_000
    max_manifest_bytes: int = 256 * 1024
    max_control_bytes: int = 16 * MiB  # a deb's control.tar, packed and unpacked
    max_metadata_bytes: int = 1 * MiB  # a deb's control file, a wheel's METADATA
    max_rpm_header_bytes: int = 64 * MiB


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class PackageInfo:
    """What inspection learnt about a package; `descriptor()` is what the server signs."""

    format: str
    name: str
    version: str
    size: int
    sha256: str
    filename: str
    arch: str | None = None
    platforms: list[str] = field(default_factory=list)
    dependencies: list[dict[str, Any]] = field(default_factory=list)
    manifest: dict[str, Any] | None = None
    detect: dict[str, Any] | None = None
    destination: str | None = None
    mode: int | None = None
    # Informational fields of native formats (description, maintainer, native dependencies…)
    metadata: dict[str, str] = field(default_factory=dict)

    def descriptor(self) -> dict[str, Any]:
        """The package descriptor to sign (see custos.packaging.manifest.Descriptor)."""
        return {
            "name": self.name,
            "version": self.version,
            "format": self.format,
            "sha256": self.sha256,
            "size": self.size,
            "filename": self.filename,
            "arch": self.arch,
            "platforms": list(self.platforms),
            "dependencies": [dict(d) for d in self.dependencies],
            "manifest": self.manifest,
            "detect": self.detect,
            "destination": self.destination,
            "mode": self.mode,
        }

    def to_dict(self) -> dict[str, Any]:
        """Everything, JSON-able."""
        return {**self.descriptor(), "metadata": dict(self.metadata)}


# --------------------------------------------------------------------------- entry point


def inspect_package(
    path: Path,
    *,
    filename: str,
    name: str | None = None,
    version: str | None = None,
    destination: str | None = None,
    mode: int | None = None,
    format: str | None = None,
    product_code: str | None = None,
    detect: Mapping[str, Any] | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> PackageInfo:
    """Detect the format, validate the package and return what it is; PackageError if refused.

    `destination` and `mode` apply to plain files only; `product_code` to msi; `detect`
    replaces the format's default detection rule.
    """
    path = Path(path)
    filename = _check_filename(filename)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise PackageError(f"cannot read the package: {exc.strerror}") from None
    if size > limits.max_artifact_bytes:
        raise PackageError(f"the package is larger than {limits.max_artifact_bytes} bytes")
    with path.open("rb") as fh:
        head = fh.read(512)
    fmt = format or _sniff(head, filename)
    if fmt not in FORMATS:
        raise PackageError(f"unknown package format {fmt!r} (one of {', '.join(FORMATS)})")
    if fmt != "file" and (destination is not None or mode is not None):
        raise PackageError("destination and mode apply only to plain files")
    if fmt != "msi" and product_code is not None:
        raise PackageError("a product code applies only to msi packages")
    for label, value, pattern in (
        ("name", name, NAME_PATTERN),
        ("version", version, VERSION_PATTERN),
    ):
        if value is not None and not re.fullmatch(pattern, value):
            raise PackageError(f"{label} {value!r} is not acceptable (pattern {pattern})")

    if fmt == "cpkg":
        info = _inspect_cpkg(path, head, limits)
    elif fmt == "deb":
        info = _inspect_deb(path, size, limits)
    elif fmt == "rpm":
        info = _inspect_rpm(path, size, limits)
    elif fmt == "whl":
        info = _inspect_whl(path, filename, size, limits)
    elif fmt == "msi":
        info = _inspect_msi(head, size, product_code)
    else:
        info = _Found(detect=None)

    final_name = _reconcile("name", fmt, info.name, name)
    final_version = _reconcile("version", fmt, info.version, version)
    digest = sha256_file(path)

    rule = rule_to_dict(parse_detect_rule(info.detect)) if info.detect is not None else None
    if fmt == "file":
        if destination is None:
            raise PackageError("a plain file needs a destination path")
        try:
            file_rule = parse_detect_rule({"file": destination, "sha256": digest})
        except PackageError:
            raise PackageError(f"destination {destination!r} must be an absolute path") from None
        rule = rule_to_dict(file_rule)
        mode = 0o644 if mode is None else mode
        if not 0 <= mode <= 0o777:
            raise PackageError("mode must be between 0 and 0o777")
    if detect is not None:
        rule = rule_to_dict(parse_detect_rule(dict(detect)))

    return PackageInfo(
        format=fmt,
        name=final_name,
        version=final_version,
        size=size,
        sha256=digest,
        filename=filename,
        arch=info.arch,
        platforms=info.platforms,
        dependencies=info.dependencies,
        manifest=info.manifest,
        detect=rule,
        destination=destination,
        mode=mode,
        metadata=info.metadata,
    )


@dataclass
class _Found:
    """What one format's reader found."""

    name: str | None = None
    version: str | None = None
    arch: str | None = None
    platforms: list[str] = field(default_factory=list)
    dependencies: list[dict[str, Any]] = field(default_factory=list)
    manifest: dict[str, Any] | None = None
    detect: dict[str, Any] | None = None
    metadata: dict[str, str] = field(default_factory=dict)


def _check_filename(filename: str) -> str:
    base = re.split(r"[\\/]", filename)[-1]
    if not base or base in (".", "..") or "\x00" in base or len(base) > 255:
        raise PackageError("a file name (1 to 255 characters, no NUL) is required")
    return base


def _sniff(head: bytes, filename: str) -> str:
    lower = filename.lower()
    if head.startswith(AR_MAGIC) and head[8:21] == b"debian-binary":
        return "deb"
    if head.startswith(RPM_MAGIC):
        return "rpm"
    for ext, fmt in ((".cpkg", "cpkg"), (".whl", "whl"), (".msi", "msi"), (".deb", "deb")):
        if lower.endswith(ext):
            return fmt
    if lower.endswith(".rpm"):
        return "rpm"
    return "file"


def _same_name(fmt: str, a: str, b: str) -> bool:
    if fmt == "whl":
        return _pep503(a) == _pep503(b)
    return a == b


def _pep503(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _reconcile(label: str, fmt: str, found: str | None, given: str | None) -> str:
    pattern = NAME_PATTERN if label == "name" else VERSION_PATTERN
    if found is not None:
        if not re.fullmatch(pattern, found):
            raise PackageError(f"the package's {label} {found!r} is not acceptable")
        same = _same_name(fmt, found, given) if label == "name" and given else found == given
        if given is not None and not same:
            raise PackageError(
                f"the package says its {label} is {found!r}, which conflicts with {given!r}"
            )
        return found
    if given is None:
        raise PackageError(f"a {fmt} package does not carry its {label}: give one")
    return given


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- tar / cpkg


class _BoundedTarInfo(tarfile.TarInfo):
    """Refuses oversized pax/long-name headers and sparse files before tarfile reads them."""

    @classmethod
    def frombuf(cls, buf: bytes | bytearray, encoding: str, errors: str) -> Self:
        """Parse one header block, then apply the limits."""
        info = super().frombuf(buf, encoding, errors)
        if info.type in _TAR_META_TYPES and info.size > _TAR_META_LIMIT:
            raise PackageError(f"a tar extended header is larger than {_TAR_META_LIMIT} bytes")
        if info.type == tarfile.GNUTYPE_SPARSE:
            raise PackageError("sparse files are not allowed in archives")
        return info


_TAR_ERRORS = (
    tarfile.TarError,
    EOFError,
    OSError,
    zlib.error,
    lzma.LZMAError,
    zstandard.ZstdError,
)


def _tar_source(raw: IO[bytes]) -> IO[bytes]:
    magic = raw.read(4)
    raw.seek(0)
    if magic == ZSTD_MAGIC:
        reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
        return reader
    return raw


def _member_path(name: str) -> str:
    """The normalised relative path of a tar member ('' for the archive root)."""
    while name.startswith("./"):
        name = name[2:]
    name = name.rstrip("/") if name.endswith("/") and name.strip("/") else name
    if name in ("", "."):
        return ""
    try:
        return check_archive_path(name)
    except ValueError as exc:
        raise PackageError(f"archive member {name[:200]!r}: {exc}") from None


def _copy_member(src: IO[bytes], target: Path | None, executable: bool) -> str:
    h = hashlib.sha256()
    if target is None:
        while chunk := src.read(_CHUNK):
            h.update(chunk)
        return h.hexdigest()
    target.parent.mkdir(parents=True, exist_ok=True)
    perm = 0o755 if executable else 0o644
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(target, flags | getattr(os, "O_BINARY", 0), perm)
    with os.fdopen(fd, "wb") as out:
        while chunk := src.read(_CHUNK):
            h.update(chunk)
            out.write(chunk)
    if os.name == "posix":
        os.chmod(target, perm)  # the umask may have taken bits away
    return h.hexdigest()


def _scan_cpkg(path: Path, limits: Limits, dest: Path | None) -> tuple[Manifest, dict[str, str]]:
    """Validate (and, with `dest`, extract) a cpkg; returns the manifest and file hashes."""
    files: dict[str, str] = {}
    dirs: set[str] = set()
    manifest_data: bytes | None = None
    total = 0
    count = 0

    def claim(rel: str, is_dir: bool) -> None:
        parts = rel.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            if parent in files:
                raise PackageError(f"archive member {rel!r} is below the file {parent!r}")
            dirs.add(parent)
        if rel in files or (not is_dir and rel in dirs):
            raise PackageError(f"archive member {rel!r} appears more than once")
        if is_dir:
            dirs.add(rel)

    with path.open("rb") as raw:
        try:
            source = _tar_source(raw)
            with tarfile.open(fileobj=source, mode="r|", tarinfo=_BoundedTarInfo) as tf:
                for member in tf:
                    count += 1
                    if count > limits.max_members:
                        raise PackageError(
                            f"the archive has more than {limits.max_members} members"
                        )
                    rel = _member_path(member.name)
                    shown = rel or member.name
                    if member.issym() or member.islnk():
                        raise PackageError(f"archive member {shown!r}: links are not allowed")
                    if member.ischr() or member.isblk() or member.isfifo():
                        raise PackageError(
                            f"archive member {shown!r}: device files and fifos are not allowed"
                        )
                    if member.isdir():
                        if rel:
                            claim(rel, is_dir=True)
                            if dest is not None:
                                (dest / rel).mkdir(mode=0o755, parents=True, exist_ok=True)
                        continue
                    if not member.isreg() or member.sparse is not None:
                        raise PackageError(f"archive member {shown!r}: unsupported member type")
                    if not rel:
                        raise PackageError("a file member has an empty name")
                    claim(rel, is_dir=False)
                    if member.size > limits.max_member_bytes:
                        raise PackageError(
                            f"archive member {rel!r} is larger than {limits.max_member_bytes} bytes"
                        )
                    total += member.size
                    if total > limits.max_total_bytes:
                        raise PackageError(
                            f"the archive unpacks to more than {limits.max_total_bytes} bytes"
                        )
                    src = tf.extractfile(member)
                    if src is None:
                        raise PackageError(f"archive member {rel!r} cannot be read")
                    if rel == "manifest.toml":
                        if member.size > limits.max_manifest_bytes:
                            raise PackageError(
                                f"manifest.toml is larger than {limits.max_manifest_bytes} bytes"
                            )
                        manifest_data = src.read()
                        src = io.BytesIO(manifest_data)
                    target = dest / rel if dest is not None else None
                    files[rel] = _copy_member(src, target, bool(member.mode & 0o111))
        except PackageError:
            raise
        except _TAR_ERRORS as exc:
            raise PackageError(f"not a valid cpkg archive: {exc}") from None

    if manifest_data is None:
        raise PackageError("the archive has no manifest.toml at its root")
    manifest = Manifest.from_toml(manifest_data)
    missing = sorted(p for p in manifest.archive_paths() if p not in files)
    if missing:
        raise PackageError(f"the manifest refers to files missing from the archive: {missing[:5]}")
    return manifest, files


def extract_cpkg(path: Path, dest: Path, *, limits: Limits = DEFAULT_LIMITS) -> Manifest:
    """Validate and extract a cpkg into the empty directory `dest`; returns its manifest.

    On PackageError `dest` may hold part of the archive; the caller removes it.
    """
    dest = Path(dest)
    if any(dest.iterdir()):
        raise PackageError(f"extraction directory {dest} is not empty")
    manifest, _ = _scan_cpkg(Path(path), limits, dest)
    return manifest


def _inspect_cpkg(path: Path, head: bytes, limits: Limits) -> _Found:
    if not (head.startswith(ZSTD_MAGIC) or head[257:262] == b"ustar"):
        raise PackageError("a .cpkg is a tar archive, plain or zstd-compressed")
    manifest, files = _scan_cpkg(path, limits, None)
    rule = manifest.detect
    if rule is None:
        # a files-only package is installed when its first file has the packaged content
        first = manifest.files[0]
        rule = parse_detect_rule({"file": first.destination, "sha256": files[first.source]})
    return _Found(
        name=manifest.name,
        version=manifest.version,
        arch=_single_arch(manifest.platforms),
        platforms=list(manifest.platforms),
        dependencies=[d.model_dump(mode="json") for d in manifest.dependencies],
        manifest=manifest.to_dict(),
        detect=rule_to_dict(rule),
    )


def _single_arch(platforms: list[str]) -> str | None:
    arches = {p.partition("/")[2] for p in platforms if "/" in p}
    return arches.pop() if len(arches) == 1 else None


# --------------------------------------------------------------------------- deb


def _ar_members(fh: IO[bytes], size: int) -> list[tuple[str, int, int]]:
    """(name, data offset, data size) of each member of an ar archive."""
    if fh.read(8) != AR_MAGIC:
        raise PackageError("not a deb: the ar archive header is missing")
    members: list[tuple[str, int, int]] = []
    pos = 8
    while pos < size:
        fh.seek(pos)
        header = fh.read(60)
        if not header:
            break
        if len(header) < 60 or header[58:60] != b"`\n":
            raise PackageError("not a deb: corrupt ar member header")
        name = header[:16].decode("ascii", "replace").rstrip(" ").rstrip("/")
        size_field = header[48:58].strip()
        if not size_field.isdigit():
            raise PackageError("not a deb: corrupt ar member size")
        length = int(size_field)
        start = pos + 60
        if start + length > size:
            raise PackageError(f"not a deb: ar member {name!r} is truncated")
        members.append((name, start, length))
        if len(members) > 16:
            raise PackageError("not a deb: too many ar members")
        pos = start + length + (length & 1)
    return members


def _parse_control(text: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    last: str | None = None
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        if line[0] in " \t":
            if last is None:
                raise PackageError("deb control file: continuation line before any field")
            fields[last] += "\n" + line.strip()
            continue
        key, sep, value = line.partition(":")
        if not sep or not key.strip():
            raise PackageError(f"deb control file: malformed line {line[:80]!r}")
        last = key.strip()
        fields[last] = value.strip()
    return fields


def _read_control(blob: bytes, compression: str, limits: Limits) -> bytes:
    """The ./control file from a control.tar[.gz|.xz|.zst] held in memory."""
    fileobj: IO[bytes] = io.BytesIO(blob)
    mode: Literal["r|", "r|gz", "r|xz"] = "r|"
    if compression == ".gz":
        mode = "r|gz"
    elif compression == ".xz":
        mode = "r|xz"
    try:
        if compression == ".zst":
            fileobj = zstandard.ZstdDecompressor().stream_reader(fileobj, read_across_frames=True)
        with tarfile.open(fileobj=fileobj, mode=mode, tarinfo=_BoundedTarInfo) as tf:
            total = 0
            for count, member in enumerate(tf, start=1):
                if count > 1000:
                    raise PackageError("deb control.tar has too many members")
                total += member.size
                if total > limits.max_control_bytes:
                    raise PackageError("deb control.tar unpacks too large")
                if _member_name(member.name) == "control" and member.isreg():
                    if member.size > limits.max_metadata_bytes:
                        raise PackageError("deb control file is too large")
                    src = tf.extractfile(member)
                    if src is None:
                        break
                    return src.read()
    except PackageError:
        raise
    except (*_TAR_ERRORS, gzip.BadGzipFile) as exc:
        raise PackageError(f"not a deb: unreadable control archive: {exc}") from None
    raise PackageError("not a deb: control.tar has no control file")


def _member_name(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return name


def _deb_platforms(arch: str) -> list[str]:
    return ["linux"] if arch in ANY_ARCH else [f"linux/{normalize_arch(arch)}"]


def _inspect_deb(path: Path, size: int, limits: Limits) -> _Found:
    with path.open("rb") as fh:
        members = _ar_members(fh, size)
        if not members or members[0][0] != "debian-binary":
            raise PackageError("not a deb: the first member is not debian-binary")
        fh.seek(members[0][1])
        if not fh.read(min(members[0][2], 16)).startswith(b"2."):
            raise PackageError("not a deb: unsupported debian-binary version")
        control = next((m for m in members if m[0].startswith("control.tar")), None)
        if control is None or not any(m[0].startswith("data.tar") for m in members):
            raise PackageError("not a deb: control.tar or data.tar is missing")
        compression = control[0][len("control.tar") :]
        if compression not in ("", ".gz", ".xz", ".zst"):
            raise PackageError(f"not a deb: unsupported control archive {control[0]!r}")
        if control[2] > limits.max_control_bytes:
            raise PackageError("deb control.tar is too large")
        fh.seek(control[1])
        blob = fh.read(control[2])
    text = _read_control(blob, compression, limits).decode("utf-8", "replace")
    fields = _parse_control(text)
    for key in ("Package", "Version", "Architecture"):
        if not fields.get(key):
            raise PackageError(f"deb control file has no {key} field")
    arch = fields["Architecture"]
    metadata = {
        k.lower(): v[:4096]
        for k, v in fields.items()
        if k in ("Description", "Maintainer", "Depends", "Pre-Depends", "Section", "Homepage")
    }
    return _Found(
        name=fields["Package"],
        version=fields["Version"],
        arch=arch,
        platforms=_deb_platforms(arch),
        detect={"dpkg": fields["Package"], "min_version": fields["Version"]},
        metadata=metadata,
    )


# --------------------------------------------------------------------------- rpm


def _rpm_header_end(fh: IO[bytes], pos: int, size: int, limits: Limits, label: str) -> int:
    fh.seek(pos)
    intro = fh.read(16)
    if len(intro) < 16 or intro[:3] != RPM_HEADER_MAGIC:
        raise PackageError(f"not an rpm: the {label} header is missing")
    entries = int.from_bytes(intro[8:12], "big")
    store = int.from_bytes(intro[12:16], "big")
    length = entries * 16 + store
    if entries > 65536 or length > limits.max_rpm_header_bytes:
        raise PackageError(f"rpm {label} header is too large")
    end = pos + 16 + length
    if end > size:
        raise PackageError(f"not an rpm: the {label} header is truncated")
    return end


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise PackageError("rpm header text is not UTF-8") from None
    if isinstance(value, int):
        return str(value)
    return None


def _inspect_rpm(path: Path, size: int, limits: Limits) -> _Found:
    with path.open("rb") as fh:
        lead = fh.read(96)
        if len(lead) < 96 or not lead.startswith(RPM_MAGIC):
            raise PackageError("not an rpm: the lead is missing")
        if lead[4] < 3:
            raise PackageError("rpm format versions before 3 are not supported")
        if int.from_bytes(lead[6:8], "big") != 0:
            raise PackageError("source rpms cannot be installed")
        sig_end = _rpm_header_end(fh, 96, size, limits, "signature")
        _rpm_header_end(fh, sig_end + (-sig_end % 8), size, limits, "main")
        fh.seek(0)
        try:
            with rpmfile.open(fileobj=fh) as rpm:
                headers = dict(rpm.headers)
        except Exception as exc:  # rpmfile raises assorted errors on corrupt input
            raise PackageError(f"not a valid rpm: {exc!r}"[:300]) from None
    name, ver, rel = (_text(headers.get(k)) for k in ("name", "version", "release"))
    if not name or not ver or not rel:
        raise PackageError("rpm header lacks name, version or release")
    epoch = _text(headers.get("serial"))  # rpmfile's name for RPMTAG_EPOCH (1003)
    version = f"{epoch}:{ver}-{rel}" if epoch else f"{ver}-{rel}"
    arch = _text(headers.get("arch")) or "noarch"
    summary = _text(headers.get("summary")) or ""
    return _Found(
        name=name,
        version=version,
        arch=arch,
        platforms=_deb_platforms(arch),
        detect={"rpm": name, "min_version": version},
        metadata={"summary": summary[:4096]} if summary else {},
    )


# --------------------------------------------------------------------------- wheel

_WHEEL_FILENAME = re.compile(
    r"^(?P<name>[A-Za-z0-9](?:[A-Za-z0-9._]*[A-Za-z0-9])?)-(?P<version>[^-]+)"
    r"(?:-(?P<build>[0-9][^-]*))?-(?P<py>[^-]+)-(?P<abi>[^-]+)-(?P<plat>[^-]+)\.whl$"
)


def _zip_entry_count(fh: IO[bytes], size: int) -> int:
    """The entry count of the end-of-central-directory record, read before zipfile parses."""
    tail_len = min(size, 65535 + 22)
    fh.seek(size - tail_len)
    tail = fh.read(tail_len)
    i = tail.rfind(b"PK\x05\x06")
    if i < 0 or len(tail) < i + 22:
        raise PackageError("not a wheel: the zip directory is missing")
    return int.from_bytes(tail[i + 10 : i + 12], "little")


def _wheel_platforms(tag: str) -> list[str]:
    out: list[str] = []
    for t in tag.split("."):
        if t == "any":
            return []
        if t.startswith(("linux", "manylinux", "musllinux")):
            arch = re.sub(r"^(many|musl)?linux(_[0-9]+_[0-9]+|[0-9]+)?_", "", t)
            out.append(f"linux/{normalize_arch(arch)}")
        elif t.startswith("win"):
            arch = {"win32": "x86"}.get(t, t.removeprefix("win_"))
            out.append(f"windows/{normalize_arch(arch)}")
        elif t.startswith("macosx"):
            arch = t.rsplit("_", 1)[-1]
            multi = arch in ("universal", "universal2", "intel", "fat", "fat3", "fat64")
            out.append("darwin" if multi else f"darwin/{normalize_arch(arch)}")
    return [p for p in dict.fromkeys(out) if re.fullmatch(r"[a-z]+(/[a-z0-9_]{1,32})?", p)]


def _inspect_whl(path: Path, filename: str, size: int, limits: Limits) -> _Found:
    m = _WHEEL_FILENAME.match(filename)
    if not m:
        raise PackageError("a wheel's file name is name-version[-build]-py-abi-platform.whl")
    with path.open("rb") as fh:
        if fh.read(4) != ZIP_MAGIC:
            raise PackageError("not a wheel: not a zip archive")
        if _zip_entry_count(fh, size) > limits.max_members:
            raise PackageError(f"the wheel has more than {limits.max_members} members")
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            if len(infos) > limits.max_members:
                raise PackageError(f"the wheel has more than {limits.max_members} members")
            total = 0
            metadata_infos = []
            for info in infos:
                name = info.filename.rstrip("/") if info.is_dir() else info.filename
                try:
                    check_archive_path(name)
                except ValueError as exc:
                    raise PackageError(f"wheel member {name[:200]!r}: {exc}") from None
                if (info.external_attr >> 16) & 0o170000 == 0o120000:
                    raise PackageError(f"wheel member {name!r}: links are not allowed")
                if info.flag_bits & 0x1:
                    raise PackageError(f"wheel member {name!r} is encrypted")
                if info.file_size > limits.max_member_bytes:
                    raise PackageError(f"wheel member {name!r} is too large")
                total += info.file_size
                if total > limits.max_total_bytes:
                    raise PackageError(f"the wheel unpacks to more than {limits.max_total_bytes}")
                if re.fullmatch(r"[^/]+\.dist-info/METADATA", name):
                    metadata_infos.append(info)
            if len(metadata_infos) != 1:
                raise PackageError("a wheel has exactly one *.dist-info/METADATA")
            meta_info = metadata_infos[0]
            if meta_info.file_size > limits.max_metadata_bytes:
                raise PackageError("the wheel's METADATA is too large")
            with zf.open(meta_info) as src:
                data = src.read(limits.max_metadata_bytes + 1)
    except PackageError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, RuntimeError) as exc:
        raise PackageError(f"not a valid wheel: {exc}") from None
    except (zlib.error, OSError, EOFError) as exc:
        raise PackageError(f"not a valid wheel: {exc}") from None
    if len(data) > limits.max_metadata_bytes:
        raise PackageError("the wheel's METADATA is too large")
    msg = email.parser.BytesHeaderParser().parsebytes(data)
    dist, version = msg.get("Name"), msg.get("Version")
    if not dist or not version:
        raise PackageError("the wheel's METADATA lacks Name or Version")
    dist, version = str(dist).strip(), str(version).strip()
    if _pep503(dist) != _pep503(m["name"]) or version.replace("-", "_") != m["version"].replace(
        "-", "_"
    ):
        raise PackageError(
            f"the wheel's file name says {m['name']} {m['version']}, METADATA says {dist} {version}"
        )
    dist_info_dir = meta_info.filename.split("/", 1)[0]
    if _pep503(dist_info_dir.removesuffix(".dist-info").rsplit("-", 1)[0]) != _pep503(dist):
        raise PackageError(f"the wheel's {dist_info_dir} does not match its name {dist}")
    platforms = _wheel_platforms(m["plat"])
    metadata = {"tags": f"{m['py']}-{m['abi']}-{m['plat']}"}
    if msg.get("Requires-Python"):
        metadata["requires_python"] = str(msg["Requires-Python"])[:256]
    requires = msg.get_all("Requires-Dist") or []
    if requires:
        metadata["requires_dist"] = "; ".join(str(r) for r in requires)[:4096]
    if msg.get("Summary"):
        metadata["summary"] = str(msg["Summary"])[:4096]
    return _Found(
        name=dist,
        version=version,
        arch=_single_arch(platforms) or (None if platforms else "any"),
        platforms=platforms,
        detect={"pip": dist, "min_version": version},
        metadata=metadata,
    )


# --------------------------------------------------------------------------- msi

_PRODUCT_CODE: TypeAdapter[str] = TypeAdapter(ProductCode)


def _inspect_msi(head: bytes, size: int, product_code: str | None) -> _Found:
    if not head.startswith(OLE_MAGIC) or size < 512:
        raise PackageError("not an msi: the OLE compound file header is missing")
    detect = None
    if product_code is not None:
        try:
            code = _PRODUCT_CODE.validate_python(product_code)
        except ValidationError:
            raise PackageError("a product code looks like {XXXXXXXX-XXXX-…-XXXXXXXXXXXX}") from None
        detect = {"msi": code.upper(), "min_version": None}
    return _Found(platforms=["windows"], detect=detect)
