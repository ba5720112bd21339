"""The `.cpkg` manifest, detection rules, the signed package descriptor, and version ordering.

A `.cpkg` carries `manifest.toml` at its root. Commands are argv lists, never shell strings, so
no field is ever interpolated into a shell. Every model refuses unknown keys and bounds every
list and string, since manifests come from uploads and descriptors travel to devices.

Example::

    name = "hello"
    version = "1.2.0"
    platforms = ["linux", "darwin/aarch64"]
    dependencies = ["libfoo>=2.1", { name = "bar" }]
    uninstall_on_failure = true
    detect = { version_file = "/opt/hello/VERSION", version = "1.2.0" }

    [[install]]
    script = "scripts/install.sh"        # a file in the archive, run with /bin/sh
    timeout = 120

    [[install]]
    command = ["/usr/bin/env", "hello-setup", "--quiet"]
    env = { HELLO_MODE = "managed" }

    [[uninstall]]
    command = ["/bin/rm", "-rf", "/opt/hello"]

Instead of install steps a package may list `files` (archive path → destination, mode); the
agent then places them atomically and removes them on uninstall.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import PurePosixPath, PureWindowsPath
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    ValidationError,
    model_validator,
)

MAX_MANIFEST_BYTES = 256 * 1024
MAX_STEPS = 32
MAX_FILES = 1000
MAX_ARGS = 256
MAX_ARG_CHARS = 8192
MAX_ENV = 64
MAX_STEP_TIMEOUT_S = 24 * 3600.0
MAX_PATH_CHARS = 4096
MAX_ARCHIVE_PATH_CHARS = 1024

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$"
# Debian epochs (':'), tildes, rpm carets and PEP 440 epochs ('!') are all legitimate
VERSION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._+~:^!-]{0,127}$"
SHA256_PATTERN = r"^[0-9a-f]{64}$"
OS_NAMES = ("linux", "windows", "darwin")
FORMATS = ("cpkg", "deb", "rpm", "whl", "msi", "file")

_ARCH_ALIASES = {
    "amd64": "x86_64",
    "x64": "x86_64",
    "x86-64": "x86_64",
    "arm64": "aarch64",
    "i386": "x86",
    "i486": "x86",
    "i586": "x86",
    "i686": "x86",
    "win32": "x86",
    "armhf": "armv7",
    "armv7l": "armv7",
    "armv7hl": "armv7",
}
ANY_ARCH = ("any", "all", "noarch")


class PackageError(ValueError):
    """A package, manifest or descriptor that cannot be accepted; the message says why."""


def normalize_arch(arch: str) -> str:
    """One spelling per CPU architecture (Debian, RPM, wheel and Python names all map here)."""
    a = arch.strip().lower()
    return _ARCH_ALIASES.get(a, a)


# --------------------------------------------------------------------------- field types


def _no_nul(v: str) -> str:
    if "\x00" in v:
        raise ValueError("NUL characters are not allowed")
    return v


def _absolute_path(v: str) -> str:
    _no_nul(v)
    if len(v) > MAX_PATH_CHARS:
        raise ValueError(f"paths are at most {MAX_PATH_CHARS} characters")
    if not (PurePosixPath(v).is_absolute() or PureWindowsPath(v).is_absolute()):
        raise ValueError("an absolute path is required")
    if ".." in re.split(r"[\\/]", v):
        raise ValueError("'..' is not allowed in paths")
    return v


def check_archive_path(v: str) -> str:
    """A normalised relative path inside an archive; raises ValueError naming what is wrong."""
    _no_nul(v)
    if len(v) > MAX_ARCHIVE_PATH_CHARS:
        raise ValueError(f"archive paths are at most {MAX_ARCHIVE_PATH_CHARS} characters")
    if "\\" in v:
        raise ValueError("backslashes are not allowed in archive paths")
    if v.startswith("/") or re.match(r"^[A-Za-z]:", v):
        raise ValueError("absolute paths are not allowed in archives")
    # ':' would name an NTFS alternate stream; control characters garble logs and terminals
    if ":" in v or any(ord(c) < 32 or ord(c) == 127 for c in v):
        raise ValueError("':' and control characters are not allowed in archive paths")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("archive paths must be UTF-8") from None
    parts = v.split("/")
    if ".." in parts:
        raise ValueError("'..' is not allowed in archive paths")
    if any(p in ("", ".") for p in parts):
        raise ValueError("archive paths must be normalised (no empty or '.' parts)")
    return v


def _parse_mode(v: Any) -> Any:
    """Accept 0o755 (TOML octal integer) or "0755"/"755" (an octal string)."""
    if isinstance(v, str):
        if not re.fullmatch(r"0?[0-7]{3}", v):
            raise ValueError("a mode is an octal string such as '0644'")
        return int(v, 8)
    return v


def _dependency(v: Any) -> Any:
    """Accept "name", "name>=1.2" or a table {name, min_version}."""
    if isinstance(v, str):
        name, sep, minimum = v.partition(">=")
        out: dict[str, Any] = {"name": name.strip()}
        if sep:
            out["min_version"] = minimum.strip()
        return out
    return v


Arg = Annotated[str, Field(max_length=MAX_ARG_CHARS), AfterValidator(_no_nul)]
Argv = Annotated[list[Arg], Field(min_length=1, max_length=MAX_ARGS)]
Name = Annotated[str, Field(pattern=NAME_PATTERN)]
Version = Annotated[str, Field(pattern=VERSION_PATTERN)]
Sha256 = Annotated[str, Field(pattern=SHA256_PATTERN)]
AbsPath = Annotated[str, AfterValidator(_absolute_path)]
ArchivePath = Annotated[str, AfterValidator(check_archive_path)]
EnvKey = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")]
EnvValue = Annotated[str, Field(max_length=MAX_ARG_CHARS), AfterValidator(_no_nul)]
FileMode = Annotated[int, BeforeValidator(_parse_mode), Field(ge=0, le=0o777)]
Timeout = Annotated[float, Field(gt=0, le=MAX_STEP_TIMEOUT_S)]
Platform = Annotated[
    str, Field(pattern=r"^(linux|windows|darwin)(/[a-z0-9_]{1,32})?$", max_length=48)
]
ProductCode = Annotated[
    str,
    Field(
        pattern=r"^\{[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}\}$"
    ),
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


# --------------------------------------------------------------------------- detect rules


class FileRule(_Strict):
    """Installed when the file exists (and, if given, has this SHA-256)."""

    file: AbsPath
    sha256: Sha256 | None = None


class CommandRule(_Strict):
    """Installed when the command exits with `exit_code`."""

    command: Argv
    exit_code: int = Field(default=0, ge=-255, le=2**31)
    timeout: Timeout = 60.0


class DpkgRule(_Strict):
    """Installed when dpkg reports the package installed at `min_version` or later."""

    dpkg: Name
    min_version: Version | None = None


class RpmRule(_Strict):
    """Installed when `rpm -q` reports the package at `min_version` or later."""

    rpm: Name
    min_version: Version | None = None


class PipRule(_Strict):
    """Installed when the interpreter's importlib.metadata has the distribution at min_version+."""

    pip: Name
    min_version: Version | None = None
    python: AbsPath | None = None


class VersionFileRule(_Strict):
    """Installed when the first line of the file is exactly `version`."""

    version_file: AbsPath
    version: Version


class MsiRule(_Strict):
    """Installed when Windows lists the MSI product code (Windows only)."""

    msi: ProductCode
    min_version: Version | None = None


_RULE_KEYS = ("file", "command", "dpkg", "rpm", "pip", "version_file", "msi")


def _rule_tag(v: Any) -> str | None:
    if isinstance(v, dict):
        return next((k for k in _RULE_KEYS if k in v), None)
    for key, cls in _RULE_CLASSES.items():
        if isinstance(v, cls):
            return key
    return None


DetectRule = Annotated[
    Annotated[FileRule, Tag("file")]
    | Annotated[CommandRule, Tag("command")]
    | Annotated[DpkgRule, Tag("dpkg")]
    | Annotated[RpmRule, Tag("rpm")]
    | Annotated[PipRule, Tag("pip")]
    | Annotated[VersionFileRule, Tag("version_file")]
    | Annotated[MsiRule, Tag("msi")],
    Discriminator(
        _rule_tag,
        custom_error_type="detect_rule",
        custom_error_message=f"a detect rule has one of the keys {', '.join(_RULE_KEYS)}",
    ),
]
_RULE_CLASSES: dict[str, type[BaseModel]] = {
    "file": FileRule,
    "command": CommandRule,
    "dpkg": DpkgRule,
    "rpm": RpmRule,
    "pip": PipRule,
    "version_file": VersionFileRule,
    "msi": MsiRule,
}
_RULE_ADAPTER: TypeAdapter[Any] = TypeAdapter(DetectRule)


def parse_detect_rule(data: Any) -> DetectRule:
    """Validate a detect rule given as a dict (TOML or JSON); PackageError when invalid."""
    try:
        rule: DetectRule = _RULE_ADAPTER.validate_python(data)
    except ValidationError as exc:
        raise PackageError(f"invalid detect rule: {describe_errors(exc)}") from None
    return rule


def rule_to_dict(rule: DetectRule) -> dict[str, Any]:
    """The JSON form of a detect rule (what descriptors carry)."""
    out: dict[str, Any] = rule.model_dump(mode="json")
    return out


# --------------------------------------------------------------------------- manifest


class Step(_Strict):
    """One install/uninstall/verify step: an argv `command`, or a `script` from the archive."""

    command: Argv | None = None
    script: ArchivePath | None = None
    interpreter: Literal["sh", "python", "powershell"] | None = None
    args: Annotated[list[Arg], Field(max_length=MAX_ARGS)] = []
    timeout: Timeout | None = None
    env: Annotated[dict[EnvKey, EnvValue], Field(max_length=MAX_ENV)] = {}
    ok_exit_codes: Annotated[list[int], Field(min_length=1, max_length=16)] = [0]

    @model_validator(mode="after")
    def _one_kind(self) -> Step:
        if (self.command is None) == (self.script is None):
            raise ValueError("a step has either `command` (an argv list) or `script`")
        if self.command is not None and (self.interpreter or self.args):
            raise ValueError("`interpreter` and `args` go with `script`, not `command`")
        if self.command is not None and not self.command[0]:
            raise ValueError("the program (first argv item) must not be empty")
        return self

    def script_interpreter(self) -> str:
        """The interpreter for a script step (by extension when not given)."""
        if self.interpreter:
            return self.interpreter
        suffix = PurePosixPath(self.script or "").suffix.lower()
        return {".py": "python", ".ps1": "powershell"}.get(suffix, "sh")


class FileEntry(_Strict):
    """A payload file placed by the agent: archive `source` → absolute `destination`."""

    source: ArchivePath
    destination: AbsPath
    mode: FileMode = 0o644


class Dependency(_Strict):
    """Another Custos package that must be installed first (optionally at a minimum version)."""

    name: Name
    min_version: Version | None = None


class Manifest(_Strict):
    """The parsed `manifest.toml` of a `.cpkg`."""

    name: Name
    version: Version
    description: Annotated[str, Field(max_length=4096), AfterValidator(_no_nul)] = ""
    platforms: Annotated[list[Platform], Field(max_length=16)] = []
    dependencies: Annotated[
        list[Annotated[Dependency, BeforeValidator(_dependency)]], Field(max_length=64)
    ] = []
    install: Annotated[list[Step], Field(max_length=MAX_STEPS)] = []
    uninstall: Annotated[list[Step], Field(max_length=MAX_STEPS)] = []
    verify: Annotated[list[Step], Field(max_length=MAX_STEPS)] = []
    files: Annotated[list[FileEntry], Field(max_length=MAX_FILES)] = []
    detect: DetectRule | None = None
    # Undo a half-done install by running the uninstall steps when an install step fails.
    uninstall_on_failure: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        if bool(self.install) == bool(self.files):
            raise ValueError("a manifest has either `install` steps or a `files` list")
        if self.files and self.uninstall:
            raise ValueError("`uninstall` steps go with `install` steps; files are removed")
        if self.install and self.detect is None:
            raise ValueError("a package with install steps needs a `detect` rule")
        if self.uninstall_on_failure and not self.uninstall:
            raise ValueError("`uninstall_on_failure` needs `uninstall` steps")
        destinations = [f.destination for f in self.files]
        if len(set(destinations)) != len(destinations):
            raise ValueError("two `files` entries have the same destination")
        return self

    @classmethod
    def from_toml(cls, data: bytes) -> Manifest:
        """Parse and validate manifest.toml; PackageError with the reason when it is not valid."""
        if len(data) > MAX_MANIFEST_BYTES:
            raise PackageError(f"manifest.toml is larger than {MAX_MANIFEST_BYTES} bytes")
        try:
            doc = tomllib.loads(data.decode("utf-8"))
        except UnicodeDecodeError:
            raise PackageError("manifest.toml is not UTF-8") from None
        except tomllib.TOMLDecodeError as exc:
            raise PackageError(f"manifest.toml is not valid TOML: {exc}") from None
        return cls.from_dict(doc, source="manifest.toml")

    @classmethod
    def from_dict(cls, doc: Any, *, source: str = "manifest") -> Manifest:
        """Validate a manifest given as a dict (TOML document or descriptor JSON)."""
        try:
            return cls.model_validate(doc)
        except ValidationError as exc:
            raise PackageError(f"{source}: {describe_errors(exc)}") from None

    def archive_paths(self) -> set[str]:
        """Archive paths the manifest refers to (files' sources and steps' scripts)."""
        paths = {f.source for f in self.files}
        for step in (*self.install, *self.uninstall, *self.verify):
            if step.script:
                paths.add(step.script)
        return paths

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (what descriptors carry and the agent re-validates)."""
        out: dict[str, Any] = self.model_dump(mode="json")
        return out


# --------------------------------------------------------------------------- descriptor


class Descriptor(BaseModel):
    """What the server signs and the agent installs from: identity, hash, manifest, detection."""

    # New keys from a newer server are ignored rather than failing every older agent.
    model_config = ConfigDict(extra="ignore", frozen=True)

    name: Name
    version: Version
    format: Literal["cpkg", "deb", "rpm", "whl", "msi", "file"]
    sha256: Sha256
    size: int = Field(ge=0)
    filename: Annotated[str, Field(min_length=1, max_length=255), AfterValidator(_no_nul)]
    arch: Annotated[str, Field(max_length=64)] | None = None
    platforms: Annotated[list[Platform], Field(max_length=16)] = []
    dependencies: Annotated[list[Dependency], Field(max_length=64)] = []
    manifest: Manifest | None = None
    detect: DetectRule | None = None
    destination: AbsPath | None = None
    mode: FileMode | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Descriptor:
        if "/" in self.filename or "\\" in self.filename or self.filename in (".", ".."):
            raise ValueError("filename must be a plain file name")
        if self.format == "cpkg" and self.manifest is None:
            raise ValueError("a cpkg descriptor carries its manifest")
        if self.format == "file" and self.destination is None:
            raise ValueError("a file descriptor carries its destination")
        return self

    @classmethod
    def from_dict(cls, data: Any) -> Descriptor:
        """Validate a descriptor dict; PackageError with the reason when it is not valid."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise PackageError(f"invalid package descriptor: {describe_errors(exc)}") from None


def describe_errors(exc: ValidationError, limit: int = 5) -> str:
    """A short human summary of pydantic errors: 'loc: message; …'."""
    parts = []
    for err in exc.errors()[:limit]:
        loc = ".".join(str(p) for p in err["loc"]) or "(top)"
        parts.append(f"{loc}: {err['msg']}")
    more = exc.error_count() - limit
    if more > 0:
        parts.append(f"and {more} more")
    return "; ".join(parts)


# --------------------------------------------------------------------------- versions

_DIGITS = "0123456789"


def _order(s: str, i: int) -> int:
    """Debian's sort weight of one character: '~' first, then end, letters, other symbols."""
    if i >= len(s):
        return 0
    c = s[i]
    if c in _DIGITS:
        return 0
    if c.isascii() and c.isalpha():
        return ord(c)
    if c == "~":
        return -1
    return ord(c) + 256


def _verrevcmp(a: str, b: str) -> int:
    i = j = 0
    while i < len(a) or j < len(b):
        while (i < len(a) and a[i] not in _DIGITS) or (j < len(b) and b[j] not in _DIGITS):
            ac, bc = _order(a, i), _order(b, j)
            if ac != bc:
                return -1 if ac < bc else 1
            i += 1
            j += 1
        while i < len(a) and a[i] == "0":
            i += 1
        while j < len(b) and b[j] == "0":
            j += 1
        first = 0
        while i < len(a) and a[i] in _DIGITS and j < len(b) and b[j] in _DIGITS:
            if not first:
                first = ord(a[i]) - ord(b[j])
            i += 1
            j += 1
        if i < len(a) and a[i] in _DIGITS:
            return 1
        if j < len(b) and b[j] in _DIGITS:
            return -1
        if first:
            return -1 if first < 0 else 1
    return 0


def _deb_parts(v: str) -> tuple[int, str, str]:
    epoch = 0
    head, sep, rest = v.partition(":")
    if sep and head.isdigit():
        epoch, v = int(head), rest
    upstream, sep, revision = v.rpartition("-")
    if not sep:
        upstream, revision = v, ""
    return epoch, upstream, revision


def _compare_deb(a: str, b: str) -> int:
    ea, ua, ra = _deb_parts(a)
    eb, ub, rb = _deb_parts(b)
    if ea != eb:
        return -1 if ea < eb else 1
    return _verrevcmp(ua, ub) or _verrevcmp(ra, rb)


_PEP440 = re.compile(
    r"""^v?(?:(?P<epoch>[0-9]+)!)?(?P<release>[0-9]+(?:\.[0-9]+)*)
    (?:[-_.]?(?P<pre_l>alpha|beta|preview|pre|a|b|c|rc)[-_.]?(?P<pre_n>[0-9]+)?)?
    (?:-(?P<post_n1>[0-9]+)|[-_.]?(?P<post_l>post|rev|r)[-_.]?(?P<post_n2>[0-9]+)?)?
    (?:[-_.]?(?P<dev_l>dev)[-_.]?(?P<dev_n>[0-9]+)?)?
    (?:\+(?P<local>[a-z0-9]+(?:[-_.][a-z0-9]+)*))?$""",
    re.VERBOSE | re.IGNORECASE,
)
_PRE_RANK = {"a": 0, "alpha": 0, "b": 1, "beta": 1, "c": 2, "rc": 2, "pre": 2, "preview": 2}


def _pep440_key(v: str) -> tuple[Any, ...] | None:
    m = _PEP440.match(v.strip())
    if not m:
        return None
    release = [int(x) for x in m["release"].split(".")]
    while len(release) > 1 and release[-1] == 0:
        release.pop()
    has_post = m["post_n1"] is not None or m["post_l"] is not None
    has_dev = m["dev_l"] is not None
    pre: tuple[int, int]
    if m["pre_l"]:
        pre = (_PRE_RANK[m["pre_l"].lower()], int(m["pre_n"] or 0))
    elif has_dev and not has_post:
        pre = (-1, 0)  # 1.0.dev1 sorts before 1.0a1
    else:
        pre = (3, 0)
    post = (1, int(m["post_n1"] or m["post_n2"] or 0)) if has_post else (0, 0)
    dev = (0, int(m["dev_n"] or 0)) if has_dev else (1, 0)
    local: tuple[Any, ...] = (0, ())
    if m["local"]:
        segs = re.split(r"[-_.]", m["local"].lower())
        local = (1, tuple((1, int(s), "") if s.isdigit() else (0, 0, s) for s in segs))
    return (int(m["epoch"] or 0), tuple(release), pre, post, dev, local)


def compare_versions(a: str, b: str, scheme: str = "deb") -> int:
    """-1, 0 or 1 as a < b, a == b, a > b.

    Schemes: "deb" (dpkg's algorithm, also used for "rpm" and "generic": it agrees with rpm's
    for ordinary versions), "pep440" (Python; falls back to "deb" for non-PEP 440 strings).
    """
    if scheme == "pep440":
        ka, kb = _pep440_key(a), _pep440_key(b)
        if ka is not None and kb is not None:
            return (ka > kb) - (ka < kb)
    return _compare_deb(a, b)


def version_at_least(installed: str, minimum: str | None, scheme: str = "deb") -> bool:
    """Whether `installed` satisfies the minimum (no minimum: always)."""
    return minimum is None or compare_versions(installed, minimum, scheme) >= 0
