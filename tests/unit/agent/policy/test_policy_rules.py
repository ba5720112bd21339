"""Policy rule providers on real files under a sandbox root: check, repair, refuse escapes."""

from __future__ import annotations

import json
import os
import stat

import pytest

from custos.agent.policy import checks, files, settings
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
    assert out.status == "repaired" and "was 'low ; old'" in out.detail
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
