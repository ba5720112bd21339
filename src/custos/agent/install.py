"""The agent's install engine: install, remove and detect packages of every Custos format.

Every process runs from an argv list through `custos.agent.executor.run_process` (no shell, its
own process group, killed whole on timeout, bounded capture). Nothing from a package or a
descriptor is ever interpolated into a shell string.

Order of an install: validate the descriptor (and, when given, its signature against the pinned
CA), check the artifact's size and SHA-256 against it, check the platform, ask the detect rule
(already installed → ``already_installed``, unless ``force``), install, then ask the detect rule
again: "not installed" after a clean install is a failure. Rollback, where a format allows:

- ``file`` and cpkg ``files``: the previous files are kept aside and put back;
- cpkg steps: the manifest's ``uninstall`` steps run when ``uninstall_on_failure = true``;
- deb / rpm / whl / msi: ``previous_artifact``, when given, is installed again.

A rollback that ran gives action ``rolled_back`` (still ``ok = False``). Package problems give a
failed `InstallResult` with the reason rather than an exception, so the agent can always report.
Dependencies between Custos packages are the server's to order; the engine does not resolve them.
MSI installs, removals and product-code detection work on Windows only; elsewhere they fail
with a clear reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import platform
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from custos.agent.executor import run_process, script_argv
from custos.packaging.inspect import DEFAULT_LIMITS, Limits, extract_cpkg, sha256_file
from custos.packaging.manifest import (
    ANY_ARCH,
    CommandRule,
    Descriptor,
    DetectRule,
    DpkgRule,
    FileRule,
    Manifest,
    MsiRule,
    PackageError,
    PipRule,
    RpmRule,
    Step,
    VersionFileRule,
    normalize_arch,
    parse_detect_rule,
    version_at_least,
)
from custos.packaging.signing import SignatureError, verify_descriptor

Action = Literal[
    "installed", "removed", "already_installed", "already_removed", "failed", "rolled_back"
]

LOG_LIMIT = 64 * 1024  # what a result keeps of one step's output (stdout and stderr together)
_CAPTURE_LIMIT = 1024 * 1024  # what the executor keeps; its tail goes into the result
_LOG_HEAD = 4 * 1024  # of a long log, keep this much of the start and the rest from the end
DETECT_TIMEOUT_S = 60.0
_MSI_OK_CODES = (0, 1641, 3010)  # 1641/3010: success, a reboot is needed
_CHUNK = 1024 * 1024

_ROOT = os.path.abspath(os.sep)
_PIP_VERSION_SCRIPT = (
    "import sys, importlib.metadata as m\n"
    "try:\n"
    "    print(m.version(sys.argv[1]))\n"
    "except m.PackageNotFoundError:\n"
    "    sys.exit(3)\n"
)


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class DetectResult:
    """Whether a package is installed, the version found (if any) and why."""

    installed: bool
    version: str | None
    detail: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {"installed": self.installed, "version": self.version, "detail": self.detail}


@dataclass(frozen=True)
class StepLog:
    """One process the engine ran, with the tail of its output."""

    phase: str  # install, verify, uninstall, rollback
    argv: list[str]
    ok: bool
    exit_code: int | None
    timed_out: bool
    duration_s: float
    stdout: str
    stderr: str
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {
            "phase": self.phase,
            "argv": self.argv,
            "ok": self.ok,
            "exit_code": self.exit_code,
            "timed_out": self.timed_out,
            "duration_s": round(self.duration_s, 3),
            "stdout": self.stdout,
            "stderr": self.stderr,
            "error": self.error,
        }


@dataclass
class InstallResult:
    """The outcome of an install or removal, as the agent reports it."""

    ok: bool
    action: Action
    name: str
    version: str
    format: str
    steps: list[StepLog] = field(default_factory=list)
    detection: DetectResult | None = None
    duration_s: float = 0.0
    error: str | None = None

    @property
    def exit_codes(self) -> list[int | None]:
        """Exit codes of the processes run, in order."""
        return [s.exit_code for s in self.steps]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {
            "ok": self.ok,
            "action": self.action,
            "name": self.name,
            "version": self.version,
            "format": self.format,
            "exit_codes": self.exit_codes,
            "steps": [s.to_dict() for s in self.steps],
            "detection": self.detection.to_dict() if self.detection else None,
            "duration_s": round(self.duration_s, 3),
            "error": self.error,
        }


def _bound(text: str, limit: int) -> str:
    """Keep the start and the end of a long log: errors are usually at the end."""
    data = text.encode("utf-8", "replace")
    if len(data) <= limit:
        return text
    head = data[:_LOG_HEAD].decode("utf-8", "ignore")
    tail = data[-(limit - _LOG_HEAD) :].decode("utf-8", "ignore")
    dropped = len(data) - _LOG_HEAD - (limit - _LOG_HEAD)
    return f"{head}\n[custos: {dropped} bytes of output omitted]\n{tail}"


def _short(text: str, limit: int = 1000) -> str:
    text = text.strip()
    return text if len(text) <= limit else text[: limit - 1] + "…"


class _Session:
    """One install or removal: the overall deadline and the processes run so far."""

    def __init__(self, timeout_s: float, name: str, version: str, fmt: str) -> None:
        if not timeout_s > 0:
            raise ValueError("timeout_s must be positive")
        self.started = time.monotonic()
        self.deadline = self.started + timeout_s
        self.steps: list[StepLog] = []
        self.name, self.version, self.format = name, version, fmt

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    async def run(
        self,
        phase: str,
        argv: Sequence[str],
        *,
        limit_s: float | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        ok_codes: Sequence[int] = (0,),
    ) -> StepLog:
        shown = [a if len(a) <= 512 else a[:511] + "…" for a in argv[:64]]
        budget = self.remaining() if limit_s is None else min(limit_s, self.remaining())
        if budget <= 0:
            log = StepLog(
                phase, shown, False, None, True, 0.0, "", "", "the overall time limit was reached"
            )
            self.steps.append(log)
            return log
        res = await run_process(argv, timeout=budget, max_output=_CAPTURE_LIMIT, env=env, cwd=cwd)
        error = res.error
        if res.timed_out:
            error = f"timed out after {budget:.1f} s; its process group was killed"
        ok = error is None and res.exit_code in ok_codes
        if error is None and not ok:
            error = f"exit code {res.exit_code}"
        half = LOG_LIMIT // 2
        log = StepLog(
            phase,
            shown,
            ok,
            res.exit_code,
            res.timed_out,
            res.duration_s,
            _bound(res.stdout, half),
            _bound(res.stderr, half),
            error,
        )
        self.steps.append(log)
        return log

    def finish(
        self,
        ok: bool,
        action: Action,
        detection: DetectResult | None = None,
        error: str | None = None,
    ) -> InstallResult:
        return InstallResult(
            ok=ok,
            action=action,
            name=self.name,
            version=self.version,
            format=self.format,
            steps=self.steps,
            detection=detection,
            duration_s=time.monotonic() - self.started,
            error=error,
        )

    def failed(self, error: str, detection: DetectResult | None = None) -> InstallResult:
        return self.finish(False, "failed", detection, error)


# --------------------------------------------------------------------------- preparation


def _absolute(path: Path | str) -> Path:
    # an absolute path never starts with "-", so no installer can read it as an option
    return Path(path).absolute()


def _label(descriptor: Mapping[str, Any], key: str) -> str:
    value = descriptor.get(key) if isinstance(descriptor, Mapping) else None
    return str(value)[:128] if value is not None else ""


def _check_artifact(path: Path, d: Descriptor) -> str | None:
    """None when the artifact is the one the descriptor names, else the reason."""
    try:
        size = path.stat().st_size
        if size != d.size:
            return f"the artifact has {size} bytes, the descriptor says {d.size}"
        if sha256_file(path) != d.sha256:
            return "the artifact's SHA-256 does not match the descriptor"
    except OSError as exc:
        return f"cannot read the artifact: {exc}"
    return None


def current_platform() -> tuple[str, str]:
    """This machine as (os, arch) in manifest spelling, e.g. ("linux", "x86_64")."""
    if sys.platform == "win32":
        os_name = "windows"
    elif sys.platform == "darwin":
        os_name = "darwin"
    else:
        os_name = "linux"
    return os_name, normalize_arch(platform.machine() or "unknown")


def _platform_refusal(platforms: Sequence[str]) -> str | None:
    if not platforms:
        return None
    os_name, arch = current_platform()
    for entry in platforms:
        want_os, _, want_arch = entry.partition("/")
        if want_os == os_name and (not want_arch or want_arch in ANY_ARCH or want_arch == arch):
            return None
    return f"the package is for {', '.join(platforms)}; this device is {os_name}/{arch}"


async def _prepare(
    s: _Session,
    descriptor: Mapping[str, Any],
    artifact: Path | None,
    signature: str | None,
    ca_cert_pem: str | None,
) -> Descriptor | InstallResult:
    if (signature is None) != (ca_cert_pem is None):
        raise ValueError("give both signature and ca_cert_pem, or neither")
    if signature is not None and ca_cert_pem is not None:
        try:
            verify_descriptor(ca_cert_pem, descriptor, signature)
        except SignatureError as exc:
            return s.failed(f"refused: {exc}")
    try:
        d = Descriptor.from_dict(descriptor)
    except PackageError as exc:
        return s.failed(str(exc))
    if artifact is not None:
        problem = await asyncio.to_thread(_check_artifact, Path(artifact), d)
        if problem:
            return s.failed(problem)
    refusal = _platform_refusal(d.platforms)
    if refusal:
        return s.failed(refusal)
    return d


def _rule_of(d: Descriptor) -> DetectRule | None:
    if d.detect is not None:
        return d.detect
    return d.manifest.detect if d.manifest is not None else None


def _presence(rule: DetectRule) -> DetectRule:
    """The rule without its version floor: is any version there at all (for removal)."""
    if isinstance(rule, DpkgRule | RpmRule | PipRule | MsiRule):
        return rule.model_copy(update={"min_version": None})
    if isinstance(rule, FileRule):
        return rule.model_copy(update={"sha256": None})
    return rule


async def _detect_in(
    s: _Session, rule: DetectRule | None, python: str | None
) -> DetectResult | None:
    if rule is None:
        return None
    budget = max(min(DETECT_TIMEOUT_S, s.remaining()), 1.0)
    return await detect(rule, python=python, timeout_s=budget)


def _base_env(**extra: str) -> dict[str, str]:
    return {**os.environ, **extra}


def _dpkg_env() -> dict[str, str]:
    return _base_env(DEBIAN_FRONTEND="noninteractive")


def _pip_env() -> dict[str, str]:
    return _base_env(PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")


def _step_env(d: Descriptor, cwd: Path) -> dict[str, str]:
    return _base_env(
        CUSTOS_PACKAGE_NAME=d.name, CUSTOS_PACKAGE_VERSION=d.version, CUSTOS_PACKAGE_DIR=str(cwd)
    )


# --------------------------------------------------------------------------- files and backups


@dataclass(frozen=True)
class _Backup:
    """What was at a destination before the engine wrote there."""

    dest: Path
    copy: Path | None = None
    link: str | None = None


def _place(src: Path, dest: Path, mode: int) -> None:
    """Copy src to dest atomically (temporary file in the same directory, then rename)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.custos-")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, src.open("rb") as inp:
            shutil.copyfileobj(inp, out, _CHUNK)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _backup(dest: Path, work_dir: Path) -> _Backup:
    if dest.is_symlink():
        return _Backup(dest, link=os.readlink(dest))
    if dest.is_dir():
        raise IsADirectoryError(f"{dest} is a directory")
    if not dest.exists():
        return _Backup(dest)
    copy = work_dir / f"backup-{secrets.token_hex(8)}-{dest.name}"
    shutil.copy2(dest, copy)
    return _Backup(dest, copy=copy)


def _restore(backups: Sequence[_Backup]) -> list[str]:
    """Put every backed-up destination back as it was; returns what could not be restored."""
    problems = []
    for b in reversed(backups):
        try:
            if b.link is not None:
                b.dest.unlink(missing_ok=True)
                os.symlink(b.link, b.dest)
            elif b.copy is not None:
                _place(b.copy, b.dest, b.copy.stat().st_mode & 0o7777)
                b.copy.unlink(missing_ok=True)
            else:
                b.dest.unlink(missing_ok=True)
        except OSError as exc:
            problems.append(f"{b.dest}: {exc}")
    return problems


def _discard(backups: Sequence[_Backup]) -> None:
    for b in backups:
        if b.copy is not None:
            b.copy.unlink(missing_ok=True)


def _remove_files(paths: Sequence[Path]) -> None:
    for p in paths:
        if p.is_dir() and not p.is_symlink():
            raise IsADirectoryError(f"{p} is a directory, not a packaged file")
        p.unlink(missing_ok=True)


def _rollback_note(problems: list[str]) -> str:
    if not problems:
        return "; the previous files were restored"
    return "; restoring the previous files failed for " + ", ".join(problems[:5])


async def _place_files(
    s: _Session,
    pairs: Sequence[tuple[Path, Path, int]],
    work_dir: Path,
    rule: DetectRule | None,
    python: str | None,
    verify: Sequence[Step] = (),
    verify_cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> InstallResult:
    """Place (source, destination, mode) files with backups; restore them if anything fails."""
    backups: list[_Backup] = []
    try:
        try:
            for src, dest, mode in pairs:
                backups.append(await asyncio.to_thread(_backup, dest, work_dir))
                await asyncio.to_thread(_place, src, dest, mode)
        except OSError as exc:
            problems = await asyncio.to_thread(_restore, backups)
            reason = f"cannot place files: {exc}" + _rollback_note(problems)
            return s.finish(False, "rolled_back", None, reason)
        ok = await _run_steps(s, "verify", verify, verify_cwd or work_dir, env or _base_env())
        detection = await _detect_in(s, rule, python) if ok else None
    except asyncio.CancelledError:
        # a cancelled install must not leave half of its files behind
        _restore(backups)
        raise
    if ok and (detection is None or detection.installed):
        await asyncio.to_thread(_discard, backups)
        return s.finish(True, "installed", detection)
    reason = "a verify step failed" if not ok else "the detect rule says not installed"
    problems = await asyncio.to_thread(_restore, backups)
    return s.finish(False, "rolled_back", detection, reason + _rollback_note(problems))


# --------------------------------------------------------------------------- cpkg


def _step_argv(step: Step, cwd: Path) -> list[str]:
    if step.command is not None:
        return list(step.command)
    assert step.script is not None
    return script_argv(step.script_interpreter(), str(cwd / step.script), step.args)


async def _run_steps(
    s: _Session,
    phase: str,
    steps: Sequence[Step],
    cwd: Path,
    env: Mapping[str, str],
    *,
    stop_on_failure: bool = True,
) -> bool:
    all_ok = True
    for step in steps:
        log = await s.run(
            phase,
            _step_argv(step, cwd),
            limit_s=step.timeout,
            env={**env, **step.env},
            cwd=str(cwd),
            ok_codes=step.ok_exit_codes,
        )
        if not log.ok:
            all_ok = False
            if stop_on_failure:
                return False
    return all_ok


async def _extract(
    s: _Session, d: Descriptor, artifact: Path, work_dir: Path, limits: Limits
) -> tuple[Path, Manifest] | InstallResult:
    tmp = Path(tempfile.mkdtemp(prefix="cpkg-", dir=work_dir))
    try:
        manifest = await asyncio.to_thread(extract_cpkg, artifact, tmp, limits=limits)
    except (PackageError, OSError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        return s.failed(f"the package was refused: {exc}")
    assert d.manifest is not None
    if manifest.to_dict() != d.manifest.to_dict():
        shutil.rmtree(tmp, ignore_errors=True)
        return s.failed("the archive's manifest differs from the signed descriptor's")
    return tmp, manifest


async def _install_cpkg(
    s: _Session,
    d: Descriptor,
    artifact: Path,
    work_dir: Path,
    rule: DetectRule | None,
    python: str | None,
    limits: Limits,
) -> InstallResult:
    got = await _extract(s, d, artifact, work_dir, limits)
    if isinstance(got, InstallResult):
        return got
    tmp, manifest = got
    try:
        env = _step_env(d, tmp)
        if manifest.files:
            pairs = [(tmp / f.source, Path(f.destination), f.mode) for f in manifest.files]
            return await _place_files(s, pairs, work_dir, rule, python, manifest.verify, tmp, env)
        ok = await _run_steps(s, "install", manifest.install, tmp, env)
        reason = "an install step failed"
        if ok and not await _run_steps(s, "verify", manifest.verify, tmp, env):
            ok, reason = False, "a verify step failed"
        detection = None
        if ok:
            detection = await _detect_in(s, rule, python)
            if detection is not None and not detection.installed:
                ok, reason = False, "the detect rule says not installed after the install steps"
        if ok:
            return s.finish(True, "installed", detection)
        if not manifest.uninstall_on_failure:
            return s.failed(reason, detection)
        undone = await _run_steps(
            s, "rollback", manifest.uninstall, tmp, env, stop_on_failure=False
        )
        if undone:
            return s.finish(False, "rolled_back", detection, reason + "; the uninstall steps ran")
        return s.failed(reason + "; the uninstall steps failed too", detection)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


async def _uninstall_cpkg(
    s: _Session, d: Descriptor, artifact: Path | None, work_dir: Path, limits: Limits
) -> InstallResult | None:
    """Run the uninstall steps or remove the files; None when that went well."""
    manifest = d.manifest
    assert manifest is not None
    if manifest.files:
        paths = [Path(f.destination) for f in manifest.files]
        try:
            await asyncio.to_thread(_remove_files, paths)
        except OSError as exc:
            return s.failed(f"cannot remove the package's files: {exc}")
        return None
    if not manifest.uninstall:
        return s.failed("the package has no uninstall steps")
    if artifact is None:
        if any(step.script for step in manifest.uninstall):
            return s.failed("the uninstall steps run scripts from the package: give the artifact")
        tmp = Path(tempfile.mkdtemp(prefix="cpkg-", dir=work_dir))
    else:
        got = await _extract(s, d, artifact, work_dir, limits)
        if isinstance(got, InstallResult):
            return got
        tmp = got[0]
    try:
        if not await _run_steps(s, "uninstall", manifest.uninstall, tmp, _step_env(d, tmp)):
            return s.failed("an uninstall step failed")
        return None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- native installers


async def _native_install(
    s: _Session,
    argv: list[str],
    rollback_argv: list[str] | None,
    rule: DetectRule | None,
    python: str | None,
    *,
    env: Mapping[str, str] | None = None,
    ok_codes: Sequence[int] = (0,),
    fix_argv: list[str] | None = None,
) -> InstallResult:
    """Run the platform installer, confirm by detection, reinstall the previous on failure."""
    log = await s.run("install", argv, env=env, ok_codes=ok_codes)
    ok = log.ok
    if not ok and fix_argv is not None:
        ok = (await s.run("install", fix_argv, env=env)).ok
    reason = f"the installer failed ({log.error})"
    detection = await _detect_in(s, rule, python)
    if ok and detection is not None and not detection.installed:
        ok, reason = False, "the detect rule says not installed after the installer ran"
    if ok:
        return s.finish(True, "installed", detection)
    if rollback_argv is None:
        return s.failed(reason, detection)
    back = await s.run("rollback", rollback_argv, env=env, ok_codes=ok_codes)
    if back.ok:
        return s.finish(
            False, "rolled_back", detection, reason + "; the previous version was reinstalled"
        )
    return s.failed(
        reason + f"; reinstalling the previous version failed ({back.error})", detection
    )


def _dpkg_install_argv(path: Path) -> list[str]:
    return ["dpkg", "--force-confdef", "--force-confold", "-i", str(path)]


def _same_path(a: str, b: str) -> bool:
    return os.path.abspath(a) == os.path.abspath(b)


async def _pip_prefix(python: str, budget_s: float) -> list[str] | str:
    """The argv prefix running pip for `python`, or the reason there is none.

    An interpreter without pip (e.g. a venv made --without-pip) is served by this agent's own
    pip through `pip --python`.
    """
    if _same_path(python, sys.executable):
        return [python, "-m", "pip"]
    probe = await run_process([python, "-c", "import pip"], timeout=budget_s, max_output=4096)
    if probe.error:
        return f"the interpreter {python} cannot run: {probe.error}"
    if probe.exit_code == 0:
        return [python, "-m", "pip"]
    if importlib.util.find_spec("pip") is not None:
        return [sys.executable, "-m", "pip", "--python", python]
    return f"neither {python} nor the agent's interpreter has pip"


async def _install_whl(
    s: _Session,
    d: Descriptor,
    artifact: Path,
    work_dir: Path,
    rule: DetectRule | None,
    python: str,
    force: bool,
    previous: Path | None,
    previous_filename: str | None,
) -> InstallResult:
    pip = await _pip_prefix(python, max(min(30.0, s.remaining()), 1.0))
    if isinstance(pip, str):
        return s.failed(pip)
    stage = Path(tempfile.mkdtemp(prefix="whl-", dir=work_dir))
    try:
        # pip reads name, version and tags from the file name, so the wheel keeps its own
        wheel = stage / d.filename
        await asyncio.to_thread(shutil.copyfile, artifact, wheel)
        base = [*pip, "install", "--no-deps", "--no-index", "--no-input"]
        argv = [*base, *(["--force-reinstall"] if force else []), str(wheel)]
        rollback = None
        if previous is not None:
            name = previous_filename or previous.name
            if not name.endswith(".whl") or "/" in name or "\\" in name:
                return s.failed("cannot roll back: the previous wheel's file name is unknown")
            old = stage / "previous"
            old.mkdir()
            await asyncio.to_thread(shutil.copyfile, previous, old / name)
            rollback = [*base, "--force-reinstall", str(old / name)]
        return await _native_install(s, argv, rollback, rule, python, env=_pip_env())
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _msi_log_note(path: Path) -> str:
    """The end of an msiexec log (UTF-16 when it starts with a BOM)."""
    try:
        data = path.read_bytes()[-LOG_LIMIT:]
    except OSError:
        return ""
    encoding = "utf-16" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else "utf-8"
    return data.decode(encoding, "replace")


# --------------------------------------------------------------------------- install / uninstall


async def install(
    descriptor: Mapping[str, Any],
    artifact_path: Path,
    work_dir: Path,
    *,
    timeout_s: float,
    previous_artifact: Path | None = None,
    previous_filename: str | None = None,
    python: str | None = None,
    apt_fix: bool = False,
    force: bool = False,
    signature: str | None = None,
    ca_cert_pem: str | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> InstallResult:
    """Install the package the (signed) descriptor names from `artifact_path`.

    `work_dir` holds extraction and backups (cleaned up afterwards); `timeout_s` bounds the whole
    install; `python` is the interpreter wheels go into (default: this one); `apt_fix` runs
    `apt-get -f install -y` after a failed `dpkg -i`; `force` installs even when the detect rule
    says installed (a newer version satisfies a `min_version` rule, so a downgrade needs it).
    With `signature` and `ca_cert_pem` the descriptor is verified first.
    """
    s = _Session(
        timeout_s,
        _label(descriptor, "name"),
        _label(descriptor, "version"),
        _label(descriptor, "format"),
    )
    artifact = _absolute(artifact_path)
    work_dir = _absolute(work_dir)
    prepared = await _prepare(s, descriptor, artifact, signature, ca_cert_pem)
    if isinstance(prepared, InstallResult):
        return prepared
    d = prepared
    rule = _rule_of(d)
    py = python or sys.executable
    try:
        if rule is not None and not force:
            before = await _detect_in(s, rule, py)
            if before is not None and before.installed:
                return s.finish(True, "already_installed", before)
        work_dir.mkdir(parents=True, exist_ok=True)
        return await _install_format(
            s,
            d,
            artifact,
            work_dir,
            rule,
            py,
            previous_artifact,
            previous_filename,
            apt_fix,
            force,
            limits,
        )
    except (OSError, PackageError) as exc:
        return s.failed(f"install failed: {exc}")


async def _install_format(
    s: _Session,
    d: Descriptor,
    artifact: Path,
    work_dir: Path,
    rule: DetectRule | None,
    python: str,
    previous: Path | None,
    previous_filename: str | None,
    apt_fix: bool,
    force: bool,
    limits: Limits,
) -> InstallResult:
    if d.format == "cpkg":
        return await _install_cpkg(s, d, artifact, work_dir, rule, python, limits)
    if d.format == "file":
        assert d.destination is not None
        mode = 0o644 if d.mode is None else d.mode
        return await _place_files(
            s, [(artifact, Path(d.destination), mode)], work_dir, rule, python
        )
    if d.format == "deb":
        rollback = _dpkg_install_argv(previous) if previous is not None else None
        fix = ["apt-get", "-f", "install", "-y"] if apt_fix else None
        return await _native_install(
            s, _dpkg_install_argv(artifact), rollback, rule, python, env=_dpkg_env(), fix_argv=fix
        )
    if d.format == "rpm":
        argv = ["rpm", "-U", "--replacepkgs", str(artifact)]
        rollback = (
            ["rpm", "-U", "--oldpackage", "--replacepkgs", str(previous)] if previous else None
        )
        return await _native_install(s, argv, rollback, rule, python)
    if d.format == "whl":
        return await _install_whl(
            s, d, artifact, work_dir, rule, python, force, previous, previous_filename
        )
    # msi
    if sys.platform != "win32":
        return s.failed("msi packages install only on Windows")
    log_path = work_dir / f"msi-{secrets.token_hex(6)}.log"
    argv = ["msiexec", "/i", str(artifact), "/qn", "/norestart", "/l*v", str(log_path)]
    rollback = ["msiexec", "/i", str(previous), "/qn", "/norestart"] if previous else None
    result = await _native_install(s, argv, rollback, rule, python, ok_codes=_MSI_OK_CODES)
    if not result.ok and result.error:
        result.error += "\n" + _bound(_msi_log_note(log_path), LOG_LIMIT)
    log_path.unlink(missing_ok=True)
    return result


async def uninstall(
    descriptor: Mapping[str, Any],
    artifact_path: Path | None,
    work_dir: Path,
    *,
    timeout_s: float,
    python: str | None = None,
    signature: str | None = None,
    ca_cert_pem: str | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> InstallResult:
    """Remove the package the descriptor names.

    The artifact is needed only for cpkg uninstall steps that run scripts from the package (and
    is then checked against the descriptor). Removal is confirmed with the detect rule without
    its version floor: any version still present means the removal failed.
    """
    s = _Session(
        timeout_s,
        _label(descriptor, "name"),
        _label(descriptor, "version"),
        _label(descriptor, "format"),
    )
    artifact = _absolute(artifact_path) if artifact_path is not None else None
    work_dir = _absolute(work_dir)
    prepared = await _prepare(s, descriptor, artifact, signature, ca_cert_pem)
    if isinstance(prepared, InstallResult):
        return prepared
    d = prepared
    rule = _rule_of(d)
    presence = _presence(rule) if rule is not None else None
    py = python or sys.executable
    try:
        if presence is not None:
            before = await _detect_in(s, presence, py)
            if before is not None and not before.installed:
                return s.finish(True, "already_removed", before)
        work_dir.mkdir(parents=True, exist_ok=True)
        failure = await _uninstall_format(s, d, artifact, work_dir, presence, py, limits)
        if failure is not None:
            return failure
        after = await _detect_in(s, presence, py)
        if after is not None and after.installed:
            return s.failed("the package is still detected after removal", after)
        return s.finish(True, "removed", after)
    except (OSError, PackageError) as exc:
        return s.failed(f"removal failed: {exc}")


async def _uninstall_format(
    s: _Session,
    d: Descriptor,
    artifact: Path | None,
    work_dir: Path,
    rule: DetectRule | None,
    python: str,
    limits: Limits,
) -> InstallResult | None:
    """Run the format's removal; None when it went well, else the failed result."""
    argv: list[str]
    env: Mapping[str, str] | None = None
    ok_codes: Sequence[int] = (0,)
    if d.format == "cpkg":
        return await _uninstall_cpkg(s, d, artifact, work_dir, limits)
    if d.format == "file":
        assert d.destination is not None
        try:
            await asyncio.to_thread(_remove_files, [Path(d.destination)])
        except OSError as exc:
            return s.failed(f"cannot remove {d.destination}: {exc}")
        return None
    if d.format == "deb":
        argv, env = ["dpkg", "-r", d.name], _dpkg_env()
    elif d.format == "rpm":
        argv = ["rpm", "-e", d.name]
    elif d.format == "whl":
        pip = await _pip_prefix(python, max(min(30.0, s.remaining()), 1.0))
        if isinstance(pip, str):
            return s.failed(pip)
        argv, env = [*pip, "uninstall", "-y", d.name], _pip_env()
    else:
        if sys.platform != "win32":
            return s.failed("msi packages are removed only on Windows")
        if artifact is not None:
            target = str(artifact)
        elif isinstance(rule, MsiRule):
            target = rule.msi
        else:
            return s.failed("removing an msi needs the artifact or a product code")
        argv, ok_codes = ["msiexec", "/x", target, "/qn", "/norestart"], _MSI_OK_CODES
    log = await s.run("uninstall", argv, env=env, ok_codes=ok_codes)
    if not log.ok:
        return s.failed(f"the removal failed ({log.error})")
    return None


# --------------------------------------------------------------------------- detection


async def detect(
    rule: Mapping[str, Any] | DetectRule,
    *,
    python: str | None = None,
    timeout_s: float = DETECT_TIMEOUT_S,
) -> DetectResult:
    """Evaluate a detect rule on this machine; an invalid rule raises PackageError.

    `python` is the interpreter a `pip` rule asks when the rule names none (default: this one).
    """
    parsed: DetectRule = parse_detect_rule(dict(rule)) if isinstance(rule, Mapping) else rule
    if timeout_s <= 0:
        raise ValueError("timeout_s must be positive")
    if isinstance(parsed, FileRule):
        return await asyncio.to_thread(_detect_file, parsed)
    if isinstance(parsed, VersionFileRule):
        return await asyncio.to_thread(_detect_version_file, parsed)
    if isinstance(parsed, CommandRule):
        return await _detect_command(parsed, timeout_s)
    if isinstance(parsed, DpkgRule):
        return await _detect_dpkg(parsed, timeout_s)
    if isinstance(parsed, RpmRule):
        return await _detect_rpm(parsed, timeout_s)
    if isinstance(parsed, PipRule):
        return await _detect_pip(parsed, parsed.python or python or sys.executable, timeout_s)
    return await _detect_msi(parsed)


def _detect_file(rule: FileRule) -> DetectResult:
    path = Path(rule.file)
    try:
        if not path.is_file():
            return DetectResult(False, None, f"{rule.file} does not exist")
        if rule.sha256 is None:
            return DetectResult(True, None, f"{rule.file} exists")
        if sha256_file(path) != rule.sha256:
            return DetectResult(False, None, f"{rule.file} has other content")
    except OSError as exc:
        return DetectResult(False, None, f"cannot read {rule.file}: {exc.strerror}")
    return DetectResult(True, None, f"{rule.file} has the expected content")


def _detect_version_file(rule: VersionFileRule) -> DetectResult:
    try:
        with open(rule.version_file, "rb") as fh:
            first = fh.read(4096).decode("utf-8", "replace").splitlines()
    except FileNotFoundError:
        return DetectResult(False, None, f"{rule.version_file} does not exist")
    except OSError as exc:
        return DetectResult(False, None, f"cannot read {rule.version_file}: {exc.strerror}")
    found = first[0].strip()[:128] if first else ""
    if found == rule.version:
        return DetectResult(True, found, f"{rule.version_file} says {found}")
    return DetectResult(
        False, found or None, f"{rule.version_file} says {found!r}, not {rule.version!r}"
    )


async def _detect_command(rule: CommandRule, timeout_s: float) -> DetectResult:
    res = await run_process(rule.command, timeout=min(rule.timeout, timeout_s), max_output=65536)
    if res.error:
        return DetectResult(False, None, _short(res.error))
    if res.timed_out:
        return DetectResult(False, None, "the detect command timed out")
    detail = f"the detect command exited with {res.exit_code}"
    return DetectResult(res.exit_code == rule.exit_code, None, detail)


def _best(versions: list[str], scheme: str) -> str:
    best = versions[0]
    for v in versions[1:]:
        if version_at_least(v, best, scheme) and v != best:
            best = v
    return best


def _judge(name: str, version: str, minimum: str | None, scheme: str) -> DetectResult:
    if version_at_least(version, minimum, scheme):
        return DetectResult(True, version, f"{name} {version} is installed")
    return DetectResult(False, version, f"{name} {version} is older than {minimum}")


async def _detect_dpkg(rule: DpkgRule, timeout_s: float) -> DetectResult:
    argv = ["dpkg-query", "-W", "-f=${Status}\t${Version}\n", rule.dpkg]
    res = await run_process(argv, timeout=timeout_s, max_output=65536)
    if res.error or res.timed_out:
        return DetectResult(
            False, None, _short(f"dpkg-query did not answer: {res.error or 'timeout'}")
        )
    if res.exit_code != 0:
        return DetectResult(False, None, f"{rule.dpkg} is not known to dpkg")
    installed = []
    states = []
    for line in res.stdout.splitlines():
        status, _, version = line.partition("\t")
        states.append(status.strip())
        # Status is "want flag state"; only "installed" counts (not half-configured, config-files)
        if status.split()[-1:] == ["installed"] and version:
            installed.append(version.strip())
    if not installed:
        return DetectResult(
            False, None, _short(f"{rule.dpkg} is not installed ({'; '.join(states)})")
        )
    return _judge(rule.dpkg, _best(installed, "deb"), rule.min_version, "deb")


async def _detect_rpm(rule: RpmRule, timeout_s: float) -> DetectResult:
    qf = "%|EPOCH?{%{EPOCH}:}:{}|%{VERSION}-%{RELEASE}\n"
    res = await run_process(
        ["rpm", "-q", "--qf", qf, rule.rpm], timeout=timeout_s, max_output=65536
    )
    if res.error or res.timed_out:
        return DetectResult(False, None, _short(f"rpm did not answer: {res.error or 'timeout'}"))
    if res.exit_code != 0:
        return DetectResult(False, None, f"{rule.rpm} is not installed")
    versions = [v.strip() for v in res.stdout.splitlines() if v.strip()]
    if not versions:
        return DetectResult(False, None, f"{rule.rpm} is not installed")
    return _judge(rule.rpm, _best(versions, "rpm"), rule.min_version, "rpm")


async def _detect_pip(rule: PipRule, python: str, timeout_s: float) -> DetectResult:
    # cwd is the filesystem root so that a distribution in the agent's cwd is not picked up
    res = await run_process(
        [python, "-c", _PIP_VERSION_SCRIPT, rule.pip],
        timeout=timeout_s,
        max_output=65536,
        cwd=_ROOT,
    )
    if res.error or res.timed_out:
        return DetectResult(
            False, None, _short(f"{python} did not answer: {res.error or 'timeout'}")
        )
    if res.exit_code == 3:
        return DetectResult(False, None, f"{rule.pip} is not installed in {python}")
    if res.exit_code != 0:
        return DetectResult(False, None, _short(f"{python} failed: {res.stderr}"))
    version = res.stdout.strip().splitlines()[-1][:128] if res.stdout.strip() else ""
    if not version:
        return DetectResult(False, None, f"{python} reported no version for {rule.pip}")
    return _judge(rule.pip, version, rule.min_version, "pep440")


async def _detect_msi(rule: MsiRule) -> DetectResult:
    if sys.platform != "win32":
        return DetectResult(False, None, "msi product codes are detected only on Windows")
    found = await asyncio.to_thread(_msi_lookup, rule.msi)
    if found is None:
        return DetectResult(False, None, f"product {rule.msi} is not installed")
    version = found or None
    if version is None:
        return DetectResult(rule.min_version is None, None, f"product {rule.msi} has no version")
    return _judge(rule.msi, version, rule.min_version, "generic")


def _msi_lookup(code: str) -> str | None:
    """DisplayVersion of an installed product ('' without one), or None when not installed."""
    if sys.platform != "win32":
        return None
    import winreg

    key_path = rf"SOFTWARE\Microsoft\Windows\CurrentVersion\Uninstall\{code}"
    for view in (winreg.KEY_WOW64_64KEY, winreg.KEY_WOW64_32KEY):
        try:
            with winreg.OpenKey(
                winreg.HKEY_LOCAL_MACHINE, key_path, 0, winreg.KEY_READ | view
            ) as key:
                with contextlib.suppress(OSError):
                    value, _ = winreg.QueryValueEx(key, "DisplayVersion")
                    return str(value)
                return ""
        except OSError:
            continue
    return None
