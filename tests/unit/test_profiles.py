"""The profile document: validation, rule ids, merging with precedence, digests."""

from __future__ import annotations

import pytest

from custos.profiles import Assigned, ProfileError, merge, parse_profile, parse_seconds

FULL = """
name: baseline-linux
interval: 5m
software:
  required: [{name: acme-av, min_version: "2.1", source: custos}]
  forbidden: [{name: telnet}]
files:
  - {path: /etc//motd, content: "hi\\n", mode: "0644", owner: root}
  - {path: /etc/old.conf, ensure: absent}
settings:
  - {provider: sysctl, key: net.ipv4.ip_forward, value: "0"}
  - {provider: ini, path: /etc/a.ini, section: main, option: level, value: high}
  - {provider: json, path: /etc/a.json, pointer: /update/auto, value: true}
  - {provider: registry, key: 'HKLM\\Software\\Acme', name: Level, value: 3, kind: dword}
services:
  - {name: av, provider: process, match: av-daemon, start: [/opt/av], category: antivirus,
     package: acme-av}
agent: {min_version: "0.1.0"}
disk_encryption: {required: true}
screen_lock: {max_idle_s: 600}
password: {min_length: 12}
managed_data: [/var/lib/acme/]
actions: [{after: 1h, do: quarantine, group: q}, {after: 7d, do: wipe}]
"""


def _doc(text: str) -> dict:
    return parse_profile(text)[1]


def test_full_profile_rules_have_stable_ids():
    profile, doc = parse_profile(FULL)
    ids = [r["id"] for r in profile.rules()]
    assert ids == [
        "software_required:acme-av",
        "software_forbidden:telnet",
        "file:/etc/motd",  # normalised
        "file:/etc/old.conf",
        "setting:sysctl:net.ipv4.ip_forward",
        "setting:ini:/etc/a.ini:main.level",
        "setting:json:/etc/a.json:/update/auto",
        "setting:registry:HKLM\\Software\\Acme\\Level",
        "service:av",
        "agent_version",
        "disk_encryption",
        "screen_lock",
        "password",
    ]
    assert doc["interval"] == 300 and doc["managed_data"] == ["/var/lib/acme"]
    assert doc["actions"][1] == {"after": 604800, "do": "wipe", "mode": "selective"}
    # JSON is accepted as well, and means the same
    import json

    assert _doc(json.dumps(doc)) == doc


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("name: a\nfiles: [{path: /x, content: a, content_b64: YQ==}]", "not both"),
        ("name: a\nfiles: [{path: /x, ensure: absent, content: a}]", "absent"),
        ("name: a\nfiles: [{path: /x, content_b64: '***'}]", "base64"),
        ("name: a\nfiles: [{path: /a/../b}]", ".."),
        ("name: a\nfiles: [{path: /x}, {path: /x}]", "twice"),
        ("name: a\nmanaged_data: [/]", "too broad"),
        ("name: a\nmanaged_data: [/home]", "too broad"),
        (
            "name: a\nsettings: [{provider: ini, path: /a.ini, section: s, option: o, "
            'value: "x\\u2028y"}]',
            "line breaks",
        ),
        (
            "name: a\nsettings: [{provider: json, path: /a, pointer: /x, value: &a [1, 2]}]\n"
            "managed_accounts: *a",
            "aliases",
        ),
        (
            "name: a\nservices: [{name: s, package: p, start: [x], provider: process}]",
            "software.required",
        ),
        ("name: a\nsettings: [{provider: nope}]", "provider"),
        (
            "name: a\nsettings: [{provider: registry, key: 'Software\\\\X', name: n, value: 1}]",
            "key",
        ),
        ("name: a\ninterval: 3d", "interval"),
        ("name: a\nactions: [{after: soon, do: notify}]", "duration"),
        ("name: a\n" + "x" * 600_000, "KiB"),
        (b"name: \xff", "UTF-8"),
        ("!!python/object:os.system {}", "tag"),
    ],
)
def test_bad_documents_are_refused_with_the_reason(text, needle):
    with pytest.raises(ProfileError) as err:
        parse_profile(text)
    assert needle in str(err.value)


def test_durations():
    assert [parse_seconds(v) for v in (0, "90", "90s", "5m", "2h", "1d", "1w")] == [
        0, 90, 90, 300, 7200, 86400, 604800,
    ]  # fmt: skip
    for bad in ("-1", "1y", True, "1.5h"):
        with pytest.raises(ValueError):
            parse_seconds(bad)


def _a(name: str, doc_text: str, priority: int = 0, kind: str = "group") -> Assigned:
    return Assigned(f"id-{name}", name, 1, _doc(doc_text), priority, kind)


def test_merge_precedence_priority_then_specificity_then_name():
    base = "name: base\ninterval: 10m\nfiles: [{path: /etc/motd, content: base}]\n"
    base += "managed_data: [/srv/a]\n"
    strict = "name: strict\ninterval: 1m\nfiles: [{path: /etc/motd, content: strict}]\n"
    strict += "managed_data: [/srv/b]\nservices: [{name: cron}]\n"
    # a label assignment beats a group assignment of the same priority
    b = merge([_a("base", base, kind="group"), _a("strict", strict, kind="label")])
    motd = next(r for r in b["rules"] if r["id"] == "file:/etc/motd")
    assert motd["policy"] == "strict" and motd["content"] == "strict"
    assert b["interval_s"] == 60 and b["managed_data"] == ["/srv/a", "/srv/b"]
    assert [p["name"] for p in b["profiles"]] == ["strict", "base"]
    # a higher priority beats specificity
    b2 = merge([_a("base", base, priority=5, kind="all"), _a("strict", strict, kind="label")])
    motd = next(r for r in b2["rules"] if r["id"] == "file:/etc/motd")
    assert motd["policy"] == "base"
    assert b2["bundle_sha"] != b["bundle_sha"]
    # the order of the assignments does not matter, and a policy assigned twice counts once
    b3 = merge([_a("strict", strict, kind="label"), _a("base", base), _a("base", base, kind="all")])
    assert b3["bundle_sha"] == b["bundle_sha"]
    # nothing assigned: no rules
    assert merge([])["rules"] == []


def test_the_server_reads_the_agents_inventory_keys():
    from custos.policies.service import judge_from_inventory

    inv = {"custos.pkg.acme-av": "2.1", "sw.dpkg.linux-image": "5.15,6.1", "sw.winreg.Zoom": "5"}
    req = {"type": "software_required", "name": "acme-av", "min_version": "2.0", "source": "custos"}
    assert judge_from_inventory(req, inv, "1.0")[0] == "compliant"  # type: ignore[index]
    kernel = {"type": "software_required", "name": "linux-image", "min_version": "6.0"}
    assert judge_from_inventory(kernel, inv, "1.0")[0] == "compliant"  # type: ignore[index]
    old = {"type": "software_required", "name": "linux-image", "min_version": "7"}
    assert judge_from_inventory(old, inv, "1.0")[0] == "noncompliant"  # type: ignore[index]
    zoom = {"type": "software_forbidden", "name": "Zoom", "source": "windows"}
    assert judge_from_inventory(zoom, inv, "1.0")[0] == "noncompliant"  # type: ignore[index]
    agent = {"type": "agent_version", "min_version": "0.2"}
    assert judge_from_inventory(agent, inv, "0.1.0")[0] == "noncompliant"  # type: ignore[index]
