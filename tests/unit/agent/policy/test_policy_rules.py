"""Policy rule providers on real files under a sandbox root: check, repair, refuse escapes."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import sys
from pathlib import Path

import pytest

from custos.agent.policy import base, checks, files, settings
from custos.agent.policy.base import Context, Sandbox, SandboxError
from custos.agent.policy.settings import ini_value


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "root"
    (r / "etc").mkdir(parents=True)
    return r


@pytest.fixture
def ctx(root, tmp_path):
    return Context(sandbox=Sandbox(root), state_dir=tmp_path / "state", as_root=False)


def file_rule(path: str, **kw) -> dict:
    return {"id": f"file:{path}", "type": "file", "path": path, **kw}


# --- sandbox ---


def test_sandbox_refuses_paths_that_escape(root, tmp_path):
    box = Sandbox(root)
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "etc" / "out").symlink_to(outside)
    (root / "etc" / "inner").symlink_to(root / "etc")
    for bad in ("etc/motd", "/etc/../../x", "/etc/out/motd", "/etc/out/new/deeper", "/"):
        with pytest.raises(SandboxError):
            box.resolve(bad)
    assert box.resolve("/etc/motd") == root / "etc" / "motd"
    assert box.resolve("/etc/inner/motd") == root / "etc" / "motd"  # a link inside is fine
    assert box.resolve("/var/lib/new/file") == root / "var" / "lib" / "new" / "file"
    assert not box.is_system and Sandbox(root.anchor).is_system


# --- files ---


async def test_file_content_drift_is_rewritten_atomically(root, ctx):
    motd = root / "etc" / "motd"
    rule = file_rule("/etc/motd", content="Managed by Custos\n", mode="0640")
    first = await files.evaluate(rule, ctx)
    assert first.status == "repaired" and "missing" in first.detail
    assert motd.read_text() == "Managed by Custos\n"
    assert stat.S_IMODE(motd.stat().st_mode) == 0o640
    assert (await files.evaluate(rule, ctx)).status == "compliant"
    motd.write_text("hacked\n")
    motd.chmod(0o666)
    again = await files.evaluate(rule, ctx)
    assert again.status == "repaired"
    assert [k for k, _ in again.events] == ["drift", "repaired"]
    assert "content differed" in again.events[0][1] and "mode was 0666" in again.events[0][1]
    assert motd.read_text() == "Managed by Custos\n"
    assert stat.S_IMODE(motd.stat().st_mode) == 0o640
    assert [p.name for p in (root / "etc").iterdir()] == ["motd"]  # no temp file left


async def test_file_binary_content_and_mode_only_repair(root, ctx):
    key = root / "etc" / "key.bin"
    rule = file_rule("/etc/key.bin", content_b64="AAEC/w==", mode="0600")
    assert (await files.evaluate(rule, ctx)).status == "repaired"
    assert key.read_bytes() == b"\x00\x01\x02\xff"
    key.chmod(0o644)
    out = await files.evaluate(rule, ctx)
    assert out.status == "repaired" and "mode set" in out.detail
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    bad = await files.evaluate(file_rule("/etc/x", content_b64="not base64!"), ctx)
    assert bad.status == "error" and "base64" in bad.detail


async def test_file_symlink_is_replaced_never_written_through(root, ctx, tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (root / "etc" / "motd").symlink_to(victim)
    out = await files.evaluate(file_rule("/etc/motd", content="x\n"), ctx)
    assert out.status == "repaired" and "not a regular file" in out.detail
    assert victim.read_text() == "precious\n"
    assert not (root / "etc" / "motd").is_symlink()
    assert (root / "etc" / "motd").read_text() == "x\n"


async def test_file_escaping_the_root_is_an_error(root, ctx, tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (root / "etc" / "link").symlink_to(tmp_path / "elsewhere")
    out = await files.evaluate(file_rule("/etc/link/motd", content="x"), ctx)
    assert out.status == "error" and "out of the root" in out.detail
    assert not (tmp_path / "elsewhere" / "motd").exists()


async def test_file_absent_is_removed(root, ctx):
    old = root / "etc" / "old.conf"
    old.write_text("x")
    out = await files.evaluate(file_rule("/etc/old.conf", ensure="absent"), ctx)
    assert out.status == "repaired" and not old.exists()
    assert (await files.evaluate(file_rule("/etc/old.conf", ensure="absent"), ctx)).status == (
        "compliant"
    )


async def test_file_owner_change_without_root_is_reported_not_faked(root, ctx):
    rule = file_rule("/etc/owned", content="x\n", owner="0")
    out = await files.evaluate(rule, ctx)
    assert out.status == "noncompliant"
    assert ("repair_failed" in [k for k, _ in out.events]) and "needs root" in out.detail
    assert (root / "etc" / "owned").read_text() == "x\n"  # the content was still fixed


@pytest.mark.skipif(os.name != "posix" or os.geteuid() != 0, reason="needs root")
async def test_file_owner_is_set_as_root(root, ctx):
    ctx.as_root = True
    owned = root / "etc" / "owned"
    owned.write_text("x\n")
    out = await files.evaluate(file_rule("/etc/owned", content="x\n", owner="1", group="1"), ctx)
    assert out.status == "repaired" and "owner was uid 0" in out.detail
    assert (owned.stat().st_uid, owned.stat().st_gid) == (1, 1)


linux_only = pytest.mark.skipif(
    sys.platform != "linux" or not Path("/proc/self/fd").is_dir(), reason="needs Linux /proc"
)


@linux_only
def test_atomic_write_sets_mode_on_its_own_file_not_a_swapped_in_link(root, tmp_path, monkeypatch):
    victim = tmp_path / "shadow"
    victim.write_text("root:secret\n")
    victim.chmod(0o640)
    real_fsync = os.fsync

    def swap(fd: int) -> None:
        # the race: someone who can write the directory swaps the temp file for a link
        tmp = os.readlink(f"/proc/self/fd/{fd}")
        if tmp.endswith(".custos"):
            os.unlink(tmp)
            os.symlink(victim, tmp)
        real_fsync(fd)

    monkeypatch.setattr(base.os, "fsync", swap)
    base.atomic_write(root / "etc" / "motd", b"x\n", 0o666)
    monkeypatch.undo()
    assert stat.S_IMODE(victim.stat().st_mode) == 0o640  # never chmod-ed through the link
    assert victim.read_text() == "root:secret\n"


def test_atomic_write_never_opens_an_existing_temp_name(root, tmp_path, monkeypatch):
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    names = iter(["planted", "fresh"])
    monkeypatch.setattr(base.secrets, "token_hex", lambda _n: next(names))
    (root / "etc" / ".motd.planted.custos").symlink_to(victim)
    base.atomic_write(root / "etc" / "motd", b"new\n", 0o644)
    assert victim.read_text() == "precious\n" and (root / "etc" / "motd").read_text() == "new\n"


def test_mode_repair_refuses_a_link_swapped_in_after_the_check(root, tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("secret\n")
    victim.chmod(0o600)
    path = root / "etc" / "key"
    path.write_text("x")
    st = path.lstat()  # the evaluation saw a regular file ...
    path.unlink()
    path.symlink_to(victim)  # ... then it became a link
    with pytest.raises(OSError, match="not a regular file"):
        files._repair(path, st, None, 0o644, -1, -1, rewrite=False)
    assert stat.S_IMODE(victim.stat().st_mode) == 0o600


def test_mode_repair_of_an_unreadable_own_file(root):
    path = root / "etc" / "locked"
    path.write_text("x")
    path.chmod(0)
    base.set_mode_owner(path, 0o640)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
async def test_read_limited_refuses_links_and_fifos_without_blocking(root, tmp_path):
    fifo = root / "etc" / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(OSError, match="not a regular file"):
        await asyncio.wait_for(asyncio.to_thread(base.read_limited, fifo), 5)
    (tmp_path / "t").write_text("target")
    (root / "etc" / "link").symlink_to(tmp_path / "t")
    with pytest.raises(OSError, match="not a regular file"):
        base.read_limited(root / "etc" / "link")
    (root / "etc" / "big").write_bytes(b"x" * 11)
    with pytest.raises(OSError, match="larger than 10"):
        base.read_limited(root / "etc" / "big", limit=10)
    assert base.read_limited(root / "etc" / "big", limit=11) == b"x" * 11


async def test_file_content_never_appears_in_details(root, ctx):
    rule = file_rule("/etc/token", content="TOPSECRET\n", mode="0600")
    (root / "etc" / "token").write_text("OLDSECRET\n")
    out = await files.evaluate(rule, ctx)
    text = out.detail + " ".join(d for _, d in out.events)
    assert out.status == "repaired" and "SECRET" not in text


# --- settings ---


async def test_sysctl_is_written_under_the_root(root, ctx):
    rule = {"id": "setting:sysctl:net.ipv4.ip_forward", "type": "setting", "provider": "sysctl",
            "key": "net.ipv4.ip_forward", "value": "0"}  # fmt: skip
    assert (await settings.evaluate(rule, ctx)).status == "unsupported"  # no /proc/sys there
    knob = root / "proc" / "sys" / "net" / "ipv4" / "ip_forward"
    knob.parent.mkdir(parents=True)
    knob.write_text("1\n")
    out = await settings.evaluate(rule, ctx)
    assert out.status == "repaired" and knob.read_text() == "0\n"
    assert (await settings.evaluate(rule, ctx)).status == "compliant"
    missing = await settings.evaluate({**rule, "key": "net.nothing"}, ctx)
    assert missing.status == "error" and "no such sysctl" in missing.detail
    assert (await settings.evaluate({**rule, "key": "../x"}, ctx)).status == "error"


async def test_ini_keeps_comments_and_other_options(root, ctx):
    ini = root / "etc" / "acme.ini"
    ini.write_text("# acme settings\n[main]\nlevel = low ; old\nname: acme\n\n[other]\nlevel=9\n")
    rule = {"id": "setting:ini:x", "type": "setting", "provider": "ini", "path": "/etc/acme.ini",
            "section": "main", "option": "level", "value": "high"}  # fmt: skip
    out = await settings.evaluate(rule, ctx)
    assert out.status == "repaired" and "[main] level differed" in out.detail
    assert "low" not in out.detail and "high" not in out.detail  # values may be secrets
    text = ini.read_text()
    assert text.startswith("# acme settings\n[main]\nlevel = high\nname: acme\n")
    assert ini_value(ini, "other", "level") == "9"
    assert (await settings.evaluate(rule, ctx)).status == "compliant"
    added = await settings.evaluate({**rule, "option": "mode", "value": "strict"}, ctx)
    assert added.status == "repaired" and ini_value(ini, "main", "mode") == "strict"
    new = await settings.evaluate({**rule, "section": "extra", "value": "1"}, ctx)
    assert new.status == "repaired" and ini_value(ini, "extra", "level") == "1"
    assert ini_value(ini, "main", "level") == "high"
    fresh = await settings.evaluate({**rule, "path": "/etc/new.ini"}, ctx)
    assert fresh.status == "repaired" and ini_value(root / "etc" / "new.ini", "main", "level")


async def test_json_pointer_is_set_creating_objects(root, ctx):
    conf = root / "etc" / "conf.json"
    conf.write_text(json.dumps({"name": "acme", "update": {"auto": 1}}))
    rule = {"id": "setting:json:x", "type": "setting", "provider": "json",
            "path": "/etc/conf.json", "pointer": "/update/auto", "value": True}  # fmt: skip
    out = await settings.evaluate(rule, ctx)
    assert out.status == "repaired"  # 1 is not true in JSON
    assert json.loads(conf.read_text()) == {"name": "acme", "update": {"auto": True}}
    assert (await settings.evaluate(rule, ctx)).status == "compliant"
    deep = await settings.evaluate({**rule, "pointer": "/a~1b/c", "value": [1]}, ctx)
    assert deep.status == "repaired"
    assert json.loads(conf.read_text())["a/b"] == {"c": [1]}
    conf.write_text("{not json")
    assert (await settings.evaluate(rule, ctx)).status == "error"
    assert conf.read_text() == "{not json"  # an unreadable document is left alone


async def test_registry_is_unsupported_off_windows(ctx):
    rule = {"id": "setting:registry:x", "type": "setting", "provider": "registry",
            "key": "HKLM\\Software\\Acme", "name": "Level", "value": 3,
            "kind": "dword"}  # fmt: skip
    assert (await settings.evaluate(rule, ctx)).status == "unsupported"


INI = {"id": "setting:ini:x", "type": "setting", "provider": "ini", "path": "/etc/acme.ini",
       "section": "main", "option": "level", "value": "high"}  # fmt: skip


@pytest.mark.parametrize(
    "change",
    [{"section": "ma\rin"}, {"option": "le\rvel"}, {"value": "a\u2028b"}, {"value": "a\x0bb"},
     {"value": "a\x0cb"}, {"value": "a\x1cb"}, {"value": "a\x85b"}, {"value": "a\u2029b"},
     {"value": "a\x00b"}, {"value": "a\x1bb"}, {"section": " main"}, {"option": "lev=el"},
     {"value": " padded"}],
)  # fmt: skip
async def test_ini_refuses_values_it_could_never_find_again(root, ctx, change):
    ini = root / "etc" / "acme.ini"
    ini.write_text("[main]\nlevel = low\n")
    for _ in range(3):
        out = await settings.evaluate({**INI, **change}, ctx)
        assert out.status == "error" and "unusable value" in out.detail
    assert ini.read_text() == "[main]\nlevel = low\n"  # not grown, not touched


async def test_ini_keeps_crlf_line_endings_and_does_not_grow(root, ctx):
    ini = root / "etc" / "acme.ini"
    ini.write_bytes(b"[main]\r\nlevel = low\r\nname = acme\r\n\r\n[other]\r\nx = 1\r\n")
    assert (await settings.evaluate(INI, ctx)).status == "repaired"
    assert ini.read_bytes() == (
        b"[main]\r\nlevel = high\r\nname = acme\r\n\r\n[other]\r\nx = 1\r\n"
    )
    added = await settings.evaluate({**INI, "option": "mode", "value": "strict"}, ctx)
    assert added.status == "repaired" and "was missing; set" in added.detail
    new = await settings.evaluate({**INI, "section": "extra"}, ctx)
    assert new.status == "repaired"
    data = ini.read_bytes()
    assert b"mode = strict\r\n" in data and data.endswith(b"[extra]\r\nlevel = high\r\n")
    assert data.count(b"\n") == data.count(b"\r\n")  # every line still ends in CRLF
    for rule in (INI, {**INI, "option": "mode", "value": "strict"}, {**INI, "section": "extra"}):
        assert (await settings.evaluate(rule, ctx)).status == "compliant"
    assert ini.read_bytes() == data
    assert ini_value(ini, "main", "level") == "high"


async def test_ini_line_with_a_form_feed_in_the_file_is_one_line(root, ctx):
    ini = root / "etc" / "acme.ini"
    ini.write_text("[main]\nnote = a\x0cb\nlevel = low\n")
    assert (await settings.evaluate(INI, ctx)).status == "repaired"
    assert ini.read_text() == "[main]\nnote = a\x0cb\nlevel = high\n"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
async def test_ini_on_a_fifo_is_an_error_not_a_hang(root, ctx):
    os.mkfifo(root / "etc" / "acme.ini")
    out = await asyncio.wait_for(settings.evaluate(INI, ctx), 5)
    assert out.status == "error" and "not a regular file" in out.detail


async def test_setting_values_never_appear_in_details(root, ctx):
    knob = root / "proc" / "sys" / "kernel" / "secret"
    knob.parent.mkdir(parents=True)
    knob.write_text("OLDVALUE\n")
    sysctl = {"id": "s", "type": "setting", "provider": "sysctl", "key": "kernel.secret",
              "value": "NEWVALUE"}  # fmt: skip
    conf = root / "etc" / "app.json"
    conf.write_text(json.dumps({"db": {"password": "OLDVALUE"}}))
    js = {"id": "j", "type": "setting", "provider": "json", "path": "/etc/app.json",
          "pointer": "/db/password", "value": "NEWVALUE"}  # fmt: skip
    (root / "etc" / "acme.ini").write_text("[main]\nlevel = OLDVALUE\n")
    ini = {**INI, "value": "NEWVALUE"}
    for rule in (sysctl, js, ini, {**js, "pointer": "/db/user"}, {**ini, "option": "user"}):
        out = await settings.evaluate(rule, ctx)
        text = out.detail + " ".join(d for _, d in out.events)
        assert out.status == "repaired" and "VALUE" not in text, text
        assert out.detail.endswith("; set")
    assert knob.read_text() == "NEWVALUE\n"


# --- checks ---


def test_agent_version_check():
    assert checks.agent_version({"min_version": "0.1.0"}, "0.1.0").status == "compliant"
    out = checks.agent_version({"min_version": "0.5.0"}, "0.4.9")
    assert out.status == "noncompliant" and "0.4.9" in out.detail


def test_root_on_crypt_device_is_found_in_the_lsblk_tree():
    luks = {"blockdevices": [{"type": "disk", "mountpoint": None, "children": [
        {"type": "part", "mountpoint": "/boot"},
        {"type": "part", "mountpoint": None, "children": [
            {"type": "crypt", "mountpoint": None, "children": [
                {"type": "lvm", "mountpoint": "/"}]}]}]}]}  # fmt: skip
    plain = {"blockdevices": [{"type": "disk", "children": [
        {"type": "part", "mountpoints": ["/"]},
        {"type": "crypt", "mountpoints": ["/home"]}]}]}  # fmt: skip
    assert checks.root_is_encrypted(luks)
    assert not checks.root_is_encrypted(plain)


class FakeRun:
    def __init__(self, stdout: str, code: int = 0, error: str | None = None) -> None:
        self.stdout, self.code, self.error, self.calls = stdout, code, error, []

    async def __call__(self, argv):
        from custos.agent.executor import ProcessResult

        self.calls.append(list(argv))
        return ProcessResult(self.code, self.stdout, "", False, False, 0.0, self.error)


async def test_disk_and_screen_lock_checks_use_argv_helpers(ctx):
    ctx.platform = "linux"
    ctx.run = FakeRun(json.dumps({"blockdevices": [{"type": "crypt", "mountpoint": "/"}]}))
    assert (await checks.disk_encryption({"required": True}, ctx)).status == "compliant"
    assert ctx.run.calls == [["lsblk", "-J", "-o", "TYPE,MOUNTPOINT"]]
    ctx.run = FakeRun("", error="cannot start 'lsblk'")
    assert (await checks.disk_encryption({"required": True}, ctx)).status == "unsupported"
    ctx.run = FakeRun("uint32 900\n")
    out = await checks.screen_lock({"max_idle_s": 600}, ctx)
    assert out.status == "noncompliant" and "900" in out.detail
    ctx.run = FakeRun("uint32 300\n")
    assert (await checks.screen_lock({"max_idle_s": 600}, ctx)).status == "compliant"
    ctx.run = FakeRun("uint32 0\n")
    assert "never" in (await checks.screen_lock({"max_idle_s": 600}, ctx)).detail
    ctx.platform = "win32"
    assert (await checks.screen_lock({"max_idle_s": 600}, ctx)).status == "unsupported"


async def test_password_policy_from_login_defs(root, ctx):
    ctx.platform = "linux"
    rule = {"id": "password", "type": "password", "min_length": 12, "max_age_days": 90}
    assert (await checks.evaluate(rule, ctx)).status == "noncompliant"  # no login.defs
    defs = root / "etc" / "login.defs"
    defs.write_text("# defaults\nPASS_MAX_DAYS\t99999\nPASS_MIN_LEN 8\n")
    out = await checks.evaluate(rule, ctx)
    assert out.status == "noncompliant"
    assert "PASS_MAX_DAYS is 99999" in out.detail and "PASS_MIN_LEN is 8" in out.detail
    defs.write_text("PASS_MAX_DAYS 60\n")
    assert (await checks.evaluate(rule, ctx)).status == "compliant"
