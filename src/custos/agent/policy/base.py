"""What every policy rule provider shares: outcomes, the sandbox root, safe file writes."""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from custos.agent.executor import ProcessResult, run_process

COMPLIANT = "compliant"
REPAIRED = "repaired"
NONCOMPLIANT = "noncompliant"
ERROR = "error"
UNSUPPORTED = "unsupported"
STATUSES = (COMPLIANT, REPAIRED, NONCOMPLIANT, ERROR, UNSUPPORTED)

MAX_DETAIL = 1000
SUBPROCESS_TIMEOUT_S = 30.0
MAX_READ_BYTES = 16 * 1024 * 1024  # a file rule or a setting file larger than this is an error


def cut(text: str) -> str:
    """A detail string within the report's limit."""
    return text if len(text) <= MAX_DETAIL else text[: MAX_DETAIL - 1] + "…"


@dataclass
class Outcome:
    """One rule's result in one evaluation: its status, why, and what happened."""

    status: str
    detail: str = ""
    events: list[tuple[str, str]] = field(default_factory=list)  # (kind, detail)

    @classmethod
    def drifted(cls, why: str, repaired: Outcome | str | None) -> Outcome:
        """A drift and the repair's fate: a string is a success detail, an Outcome a failure."""
        if isinstance(repaired, str):
            return cls(REPAIRED, f"{why}; {repaired}", [("drift", why), ("repaired", repaired)])
        if repaired is None:
            return cls(NONCOMPLIANT, why, [("drift", why)])
        return cls(
            NONCOMPLIANT,
            f"{why}; {repaired.detail}",
            [("drift", why), ("repair_failed", repaired.detail)],
        )


class SandboxError(Exception):
    """A rule path that is not absolute, or escapes the sandbox root."""


class Sandbox:
    """Resolves rule paths under the root directory, never letting one escape it."""

    def __init__(self, root: Path) -> None:
        self.root = Path(os.path.realpath(root))

    @property
    def is_system(self) -> bool:
        """Whether the root is the real filesystem root (system services, accounts)."""
        return self.root == Path(self.root.anchor)

    def resolve(self, raw: str) -> Path:
        """The path under the root for an absolute rule path; SandboxError if it escapes.

        Symlinks along the way are followed only while they stay inside the root; the last
        component itself is not followed (a repair replaces a link, never writes through it).
        """
        text = str(raw)
        if "\x00" in text:
            raise SandboxError("a path must not contain NUL")
        p = Path(text)
        if not p.is_absolute():
            raise SandboxError(f"{text!r} is not an absolute path")
        parts = p.parts[1:]
        if not parts or any(part in ("..", ".") for part in parts):
            raise SandboxError(f"{text!r} must name a file and must not contain '..'")
        target = self.root.joinpath(*parts)
        parent = target.parent
        # the deepest existing ancestor, through links, must still be inside the root
        probe = parent
        while not probe.exists() and probe != self.root and probe.parent != probe:
            if probe.is_symlink():  # a dangling link: where it points is unknowable
                raise SandboxError(f"{text!r} goes through a broken symbolic link")
            probe = probe.parent
        real = Path(os.path.realpath(probe))
        if real != self.root and self.root not in real.parents:
            raise SandboxError(f"{text!r} leads out of the root {self.root}")
        return Path(os.path.realpath(parent)) / target.name if parent.exists() else target


def is_root_user() -> bool:
    """Whether the agent runs with the privileges to chown and lock accounts."""
    return hasattr(os, "geteuid") and os.geteuid() == 0


# O_NOFOLLOW/O_NONBLOCK do not exist on Windows, where these races do not apply the same way
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_BINARY = getattr(os, "O_BINARY", 0)


def _create_temp(directory: Path, name: str) -> tuple[int, Path]:
    """A new file of ours (0600, never an existing file or a link) next to the target."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC | _BINARY
    for _ in range(100):
        tmp = directory / f".{name}.{secrets.token_hex(8)}.custos"
        try:
            return os.open(tmp, flags, 0o600), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name in {directory}")


def _set_attrs(fd: int, st: os.stat_result, mode: int | None, uid: int, gid: int) -> None:
    """Owner then mode on an open file (a chown clears set-id bits, so the mode goes last)."""
    if uid != -1 or gid != -1:
        os.fchown(fd, uid, gid)
        if mode is None:
            mode = stat.S_IMODE(st.st_mode)  # put back what the chown cleared
    if mode is not None:
        os.fchmod(fd, mode)


def atomic_write(path: Path, data: bytes, mode: int | None, uid: int = -1, gid: int = -1) -> None:
    """Write a file by temp + fsync + rename: readers see the old or the new file, never half.

    Mode and owner are set on the open descriptor of a file this call created exclusively:
    someone who can write the directory cannot swap the temp file for a link and have the
    agent chmod or chown what it points to.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temp(path.parent, path.name)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            if hasattr(os, "fchmod"):
                _set_attrs(fh.fileno(), os.fstat(fh.fileno()), mode, uid, gid)
            elif mode is not None:  # pragma: no cover - Windows: no owners, no link races
                os.chmod(tmp, mode)
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def set_mode_owner(path: Path, mode: int | None, uid: int = -1, gid: int = -1) -> None:
    """Set a regular file's mode and owner in place, never through a link or on a non-file."""
    if not hasattr(os, "fchmod"):  # pragma: no cover - Windows
        if mode is not None:
            os.chmod(path, mode)
        return
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _NONBLOCK | _CLOEXEC)
    except PermissionError:
        # a file we may not read (mode 000) but own: pin it by an O_PATH descriptor instead
        if not hasattr(os, "O_PATH") or not os.path.isdir("/proc/self/fd"):
            raise
        fd = os.open(path, os.O_PATH | _NOFOLLOW | _CLOEXEC)
        try:
            st = os.fstat(fd)
            _require_regular(path, st)
            # /proc/self/fd/N names exactly the inode held open, whatever the path is now
            via = f"/proc/self/fd/{fd}"
            if uid != -1 or gid != -1:
                os.chown(via, uid, gid)
                mode = stat.S_IMODE(st.st_mode) if mode is None else mode
            if mode is not None:
                os.chmod(via, mode)
        finally:
            os.close(fd)
        return
    except OSError as exc:
        raise _link_error(path, exc) from None
    try:
        st = os.fstat(fd)
        _require_regular(path, st)
        _set_attrs(fd, st, mode, uid, gid)
    finally:
        os.close(fd)


def _require_regular(path: Path, st: os.stat_result) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise OSError(f"{path} is not a regular file")


def _link_error(path: Path, exc: OSError) -> OSError:
    """O_NOFOLLOW on a link fails with ELOOP: say what it means."""
    if exc.errno == errno.ELOOP:
        return OSError(f"{path} is not a regular file (a symbolic link)")
    return exc


def read_limited(path: Path, limit: int = MAX_READ_BYTES) -> bytes:
    """A regular file's bytes (not through a final symlink), refusing very large files.

    Opened without following a link and without blocking, then checked on the descriptor:
    a FIFO or device swapped in after a check cannot hang or feed the evaluation.
    """
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _NONBLOCK | _CLOEXEC | _BINARY)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise _link_error(path, exc) from None
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fd)
        _require_regular(path, st)
        if st.st_size > limit:
            raise OSError(f"{path} is larger than {limit} bytes")
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise OSError(f"{path} is larger than {limit} bytes")
    return data


Runner = Callable[[Sequence[str]], Awaitable[ProcessResult]]


async def run(argv: Sequence[str]) -> ProcessResult:
    """Run argv (never a shell) with the policy timeout and a small output cap."""
    return await run_process([str(a) for a in argv], timeout=SUBPROCESS_TIMEOUT_S,
                             max_output=64 * 1024)  # fmt: skip


@dataclass
class Context:
    """What rule providers may use during one evaluation."""

    sandbox: Sandbox
    state_dir: Path
    run: Runner = run
    platform: str = sys.platform
    as_root: bool = field(default_factory=is_root_user)
    # filled by the engine while it evaluates: other rules' outcomes this evaluation
    outcomes: dict[str, Outcome] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


def process_failure(res: ProcessResult) -> str:
    """Why a helper process failed, in a line."""
    if res.error:
        return res.error
    if res.timed_out:
        return "timed out"
    tail = (res.stderr or res.stdout).strip().splitlines()
    return f"exit code {res.exit_code}" + (f": {tail[-1][:300]}" if tail else "")
