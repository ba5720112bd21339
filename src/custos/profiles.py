"""Policy profiles: the desired-state document, its rules, and the merged bundle a device gets.

Both sides import this module and it does no I/O: the server validates what an admin
writes and merges a device's profiles into one bundle; the agent reads the bundle's rules.
See docs/policies.md for the document and docs/agent-protocol.md §11 for the bundle.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

MAX_DOCUMENT_BYTES = 512 * 1024
MAX_RULES = 2000
MAX_CONTENT_BYTES = 256 * 1024
DEFAULT_INTERVAL_S = 900
NAME_RE = r"^[a-z0-9][a-z0-9._-]{0,99}$"

_DURATION = re.compile(r"^\s*(\d+)\s*([smhdw]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class ProfileError(ValueError):
    """A profile document that cannot be used, with the reason."""


def parse_seconds(value: Any) -> int:
    """'90s', '5m', '1h', '7d', '2w' or a number of seconds."""
    if isinstance(value, bool):
        raise ValueError("a duration is a number of seconds or text like 5m, 1h, 7d")
    if isinstance(value, int):
        seconds = value
    else:
        m = _DURATION.match(str(value))
        if not m:
            raise ValueError(f"{value!r} is not a duration (e.g. 30s, 5m, 1h, 7d)")
        seconds = int(m.group(1)) * _UNITS[m.group(2)]
    if seconds < 0 or seconds > 10 * 365 * 86400:
        raise ValueError("a duration is between 0 and 10 years")
    return seconds


Seconds = Annotated[int, Field(ge=0)]
Text = Annotated[str, Field(min_length=1, max_length=255)]
Version = Annotated[str, Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9.+~:_-]+$")]
SoftwareSource = Literal["any", "dpkg", "rpm", "pip", "custos", "windows", "macos"]


def _abs_path(value: str) -> str:
    if not value or len(value) > 1024 or "\x00" in value:
        raise ValueError("a path is 1-1024 characters without NUL")
    if not value.startswith("/"):
        raise ValueError(f"{value!r} is not an absolute path")
    if ".." in value.split("/"):
        raise ValueError(f"{value!r} contains '..'")
    norm = posixpath.normpath(value)
    return "/" + norm.lstrip("/")


AbsPath = Annotated[str, Field(min_length=1, max_length=1024)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RequiredSoftware(_Strict):
    """A package that must be installed, at least at a version."""

    name: Text
    min_version: Version | None = None
    source: SoftwareSource = "any"


class ForbiddenSoftware(_Strict):
    """A package that must not be installed."""

    name: Text
    source: SoftwareSource = "any"


class SoftwareRules(_Strict):
    """Required and forbidden software."""

    required: list[RequiredSoftware] = Field(default_factory=list, max_length=500)
    forbidden: list[ForbiddenSoftware] = Field(default_factory=list, max_length=500)


class FileRule(_Strict):
    """A file with content, mode and owner, or one that must not exist."""

    path: AbsPath
    content: str | None = Field(default=None, max_length=MAX_CONTENT_BYTES)
    content_b64: str | None = Field(default=None, max_length=MAX_CONTENT_BYTES * 4 // 3 + 4)
    mode: str | None = Field(default=None, pattern=r"^0?[0-7]{3,4}$")
    owner: str | None = Field(default=None, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")
    group: str | None = Field(default=None, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")
    ensure: Literal["present", "absent"] = "present"

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        return _abs_path(v)

    @model_validator(mode="after")
    def _one_content(self) -> FileRule:
        if self.content is not None and self.content_b64 is not None:
            raise ValueError("give content or content_b64, not both")
        if self.ensure == "absent" and (
            self.content is not None or self.content_b64 is not None or self.mode
        ):
            raise ValueError("a file that must be absent has no content or mode")
        if self.content_b64 is not None:
            import base64
            import binascii

            try:
                base64.b64decode(self.content_b64, validate=True)
            except (binascii.Error, ValueError):
                raise ValueError("content_b64 is not base64") from None
        return self


class SysctlSetting(_Strict):
    """A kernel parameter (Linux)."""

    provider: Literal["sysctl"]
    key: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
    value: str = Field(max_length=1000)


def _one_line(v: str) -> str:
    if any(ch in _LINE_BREAKS or (ord(ch) < 32 and ch != "\t") for ch in v):
        raise ValueError("line breaks and control characters are not allowed here")
    return v


# what str.splitlines() breaks on: a value holding one could never be found again in the file
_LINE_BREAKS = frozenset("\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")
OneLine = Annotated[str, AfterValidator(_one_line)]


class IniSetting(_Strict):
    """One option in an INI file."""

    provider: Literal["ini"]
    path: AbsPath
    section: OneLine = Field(min_length=1, max_length=200)
    option: OneLine = Field(min_length=1, max_length=200)
    value: OneLine = Field(max_length=4000)

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        return _abs_path(v)


class JsonSetting(_Strict):
    """One value in a JSON file, addressed by a JSON pointer."""

    provider: Literal["json"]
    path: AbsPath
    pointer: str = Field(min_length=2, max_length=500, pattern=r"^/")
    value: Any

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        return _abs_path(v)


class RegistrySetting(_Strict):
    """A Windows registry value."""

    provider: Literal["registry"]
    key: str = Field(min_length=1, max_length=500, pattern=r"^(HKLM|HKCU|HKEY_[A-Z_]+)\\")
    name: str = Field(max_length=255)
    value: str | int
    kind: Literal["sz", "dword", "qword", "expand_sz"] = "sz"


Setting = Annotated[
    SysctlSetting | IniSetting | JsonSetting | RegistrySetting, Field(discriminator="provider")
]


class ServiceRule(_Strict):
    """A service or process that must run; security software is one with a category."""

    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9@._-]+$")
    provider: Literal["systemd", "process"] = "systemd"
    match: str | None = Field(default=None, min_length=1, max_length=200)
    start: list[Annotated[str, Field(max_length=1000)]] | None = Field(
        default=None, min_length=1, max_length=50
    )
    category: Literal["firewall", "antivirus", "vpn", "edr", "other"] | None = None
    package: Text | None = None

    @model_validator(mode="after")
    def _process_needs_start(self) -> ServiceRule:
        if self.provider == "process" and not self.start:
            raise ValueError(f"process service {self.name!r} needs a start command (argv list)")
        return self


class AgentRule(_Strict):
    """The oldest agent version allowed."""

    min_version: Version


class DiskEncryptionRule(_Strict):
    """Whether the system disk must be encrypted."""

    required: bool = True


class ScreenLockRule(_Strict):
    """The longest idle time before the screen locks."""

    max_idle_s: int = Field(ge=1, le=86400)


class PasswordRule(_Strict):
    """Password rules where the platform exposes them."""

    min_length: int | None = Field(default=None, ge=1, le=256)
    max_age_days: int | None = Field(default=None, ge=1, le=3650)


class Action(_Strict):
    """What the server does once a device has been non-compliant for `after`."""

    after: int = 0
    do: Literal["notify", "quarantine", "hold", "lock", "wipe"]
    group: str | None = Field(default=None, min_length=1, max_length=100)
    mode: Literal["selective", "full"] = "selective"

    @field_validator("after", mode="before")
    @classmethod
    def _after(cls, v: Any) -> int:
        return parse_seconds(v)


class Profile(_Strict):
    """A policy profile: the desired state of the devices it is assigned to."""

    name: str = Field(pattern=NAME_RE)
    description: str = Field(default="", max_length=1000)
    interval: int = DEFAULT_INTERVAL_S
    software: SoftwareRules = Field(default_factory=SoftwareRules)
    files: list[FileRule] = Field(default_factory=list, max_length=500)
    settings: list[Setting] = Field(default_factory=list, max_length=500)
    services: list[ServiceRule] = Field(default_factory=list, max_length=200)
    agent: AgentRule | None = None
    disk_encryption: DiskEncryptionRule | None = None
    screen_lock: ScreenLockRule | None = None
    password: PasswordRule | None = None
    managed_data: list[AbsPath] = Field(default_factory=list, max_length=200)
    managed_accounts: list[Annotated[str, Field(pattern=r"^[a-z_][a-z0-9_.-]{0,31}$")]] = Field(
        default_factory=list, max_length=100
    )
    actions: list[Action] = Field(default_factory=list, max_length=10)

    @field_validator("interval", mode="before")
    @classmethod
    def _interval(cls, v: Any) -> int:
        seconds = parse_seconds(v)
        if not 10 <= seconds <= 86400:
            raise ValueError("the interval is between 10 s and 1 day")
        return seconds

    @field_validator("managed_data")
    @classmethod
    def _data_paths(cls, v: list[str]) -> list[str]:
        out = [_abs_path(p) for p in v]
        for p in out:
            if p.count("/") < 2:
                # "/", "/etc", "/home": a selective wipe must never take a whole system tree
                raise ValueError(f"managed_data {p!r} is too broad (give e.g. /var/lib/app)")
        return out

    @model_validator(mode="after")
    def _consistent(self) -> Profile:
        rules = self.rules()
        if len(rules) > MAX_RULES:
            raise ValueError(f"a profile has at most {MAX_RULES} rules")
        seen: set[str] = set()
        for r in rules:
            if r["id"] in seen:
                raise ValueError(f"rule {r['id']!r} is given twice")
            seen.add(r["id"])
        required = {s.name for s in self.software.required}
        for svc in self.services:
            if svc.package and svc.package not in required:
                raise ValueError(
                    f"service {svc.name!r} names package {svc.package!r}, "
                    "which is not in software.required"
                )
        if {s.name for s in self.software.forbidden} & required:
            raise ValueError("a package cannot be both required and forbidden")
        for a in self.actions:
            if a.do == "quarantine" and not a.group:
                raise ValueError("a quarantine action names its group")
        return self

    def rules(self) -> list[dict[str, Any]]:
        """The profile's rules, each with its stable id and type (bundle form, no policy)."""
        out: list[dict[str, Any]] = []
        for req in self.software.required:
            out.append(_rule(f"software_required:{req.name}", "software_required", req))
        for forb in self.software.forbidden:
            out.append(_rule(f"software_forbidden:{forb.name}", "software_forbidden", forb))
        for f in self.files:
            out.append(_rule(f"file:{f.path}", "file", f))
        for st in self.settings:
            out.append(_rule(setting_id(st), "setting", st))
        for svc in self.services:
            out.append(_rule(f"service:{svc.name}", "service", svc))
        singles: Sequence[tuple[str, BaseModel | None]] = (
            ("agent_version", self.agent),
            ("disk_encryption", self.disk_encryption),
            ("screen_lock", self.screen_lock),
            ("password", self.password),
        )
        for rule_type, value in singles:
            if value is not None:
                out.append(_rule(rule_type, rule_type, value))
        return out


def setting_id(st: SysctlSetting | IniSetting | JsonSetting | RegistrySetting) -> str:
    """The stable rule id of a setting."""
    if isinstance(st, SysctlSetting):
        return f"setting:sysctl:{st.key}"
    if isinstance(st, IniSetting):
        return f"setting:ini:{st.path}:{st.section}.{st.option}"
    if isinstance(st, JsonSetting):
        return f"setting:json:{st.path}:{st.pointer}"
    return f"setting:registry:{st.key}\\{st.name}"


def _rule(rule_id: str, rule_type: str, model: BaseModel) -> dict[str, Any]:
    body = model.model_dump(mode="json", exclude_none=True)
    return {"id": rule_id, "type": rule_type, **body}


class _NoAliasLoader(yaml.SafeLoader):
    """safe_load without anchors and aliases: a few `*a` would expand a small document
    into millions of nodes (a profile has no use for them)."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, "anchors and aliases (*name) are not allowed", event.start_mark
            )
        return super().compose_node(parent, index)


def parse_profile(text: str | bytes) -> tuple[Profile, dict[str, Any]]:
    """Validate a YAML or JSON document; the profile and its normalised document.

    ProfileError names what is wrong (with the path of the field in the document).
    """
    raw = text.encode() if isinstance(text, str) else text
    if len(raw) > MAX_DOCUMENT_BYTES:
        raise ProfileError(f"a profile is at most {MAX_DOCUMENT_BYTES // 1024} KiB")
    try:
        # safe_load: no tags, no objects; JSON is YAML, so one parser reads both
        doc = yaml.load(raw.decode("utf-8"), Loader=_NoAliasLoader)  # noqa: S506 - safe loader
    except UnicodeDecodeError:
        raise ProfileError("a profile is UTF-8 text") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or "not valid YAML or JSON"
        raise ProfileError(f"{problem}{where}") from None
    if not isinstance(doc, dict):
        raise ProfileError("a profile is a mapping (name: …, files: …, …)")
    try:
        profile = Profile.model_validate(doc)
    except ValidationError as exc:
        raise ProfileError(_describe(exc)) from None
    normalised = profile.model_dump(mode="json", exclude_none=True)
    if len(json.dumps(normalised)) > 2 * MAX_DOCUMENT_BYTES:
        raise ProfileError(f"a profile is at most {MAX_DOCUMENT_BYTES // 1024} KiB once expanded")
    return profile, normalised


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-"))
        msg = str(err["msg"]).removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    more = len(exc.errors()) - 5
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


# --------------------------------------------------------------------------- merging

SPECIFICITY = {"all": 0, "group": 1, "label": 2}


@dataclass(frozen=True)
class Assigned:
    """One profile reaching a device through one assignment."""

    policy_id: str
    name: str
    version: int
    doc: dict[str, Any]
    priority: int
    kind: str  # all | group | label

    def rank(self) -> tuple[int, int, str]:
        """Higher wins: the assignment's priority, then label over group over all, then name."""
        return (self.priority, SPECIFICITY.get(self.kind, 0), self.name)


def merge(assigned: Iterable[Assigned]) -> dict[str, Any]:
    """One device's bundle from the profiles assigned to it (without `issued_at`).

    Where two profiles set the same rule (the same file, package, setting, service), the
    one that ranks higher wins (see `Assigned.rank`); a profile assigned twice counts once,
    at its highest rank. The evaluation interval is the shortest asked for; managed data
    and accounts are the union.
    """
    best: dict[str, Assigned] = {}
    for a in assigned:
        held = best.get(a.policy_id)
        if held is None or a.rank() > held.rank():
            best[a.policy_id] = a
    ordered = sorted(best.values(), key=lambda a: a.rank(), reverse=True)
    rules: dict[str, dict[str, Any]] = {}
    data: set[str] = set()
    accounts: set[str] = set()
    interval = DEFAULT_INTERVAL_S if not ordered else 86400
    for a in ordered:
        profile = Profile.model_validate(a.doc)
        interval = min(interval, profile.interval)
        data.update(profile.managed_data)
        accounts.update(profile.managed_accounts)
        for r in profile.rules():
            rules.setdefault(r["id"], {**r, "policy": a.name})
    body = {
        "interval_s": interval,
        "rules": sorted(rules.values(), key=lambda r: str(r["id"])),
        "managed_data": sorted(data),
        "managed_accounts": sorted(accounts),
    }
    return {
        "bundle_sha": bundle_digest(body),
        "profiles": [
            {"policy_id": a.policy_id, "name": a.name, "version": a.version} for a in ordered
        ],
        **body,
    }


def bundle_digest(body: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of what the agent enforces (rules, interval, data, accounts)."""
    canon = {k: body[k] for k in ("interval_s", "rules", "managed_data", "managed_accounts")}
    raw = json.dumps(canon, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(raw.encode()).hexdigest()


def document_digest(doc: dict[str, Any]) -> str:
    """sha256 of a normalised profile document (a new version only when it changes)."""
    raw = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(raw.encode()).hexdigest()
