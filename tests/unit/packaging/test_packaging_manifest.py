"""The cpkg manifest, detect rules, the descriptor schema and version ordering."""

from __future__ import annotations

import pytest

from custos.packaging.manifest import (
    CommandRule,
    Descriptor,
    DpkgRule,
    FileRule,
    Manifest,
    MsiRule,
    PackageError,
    PipRule,
    VersionFileRule,
    compare_versions,
    parse_detect_rule,
    version_at_least,
)

GOOD = b"""
name = "hello"
version = "1.2.0"
description = "says hello"
platforms = ["linux", "darwin/aarch64"]
dependencies = ["libfoo>=2.1", { name = "bar" }]
uninstall_on_failure = true
detect = { version_file = "/opt/hello/VERSION", version = "1.2.0" }

[[install]]
script = "scripts/install.sh"
timeout = 120

[[install]]
command = ["/usr/bin/env", "hello-setup", "--quiet"]
env = { HELLO_MODE = "managed" }

[[uninstall]]
command = ["/bin/rm", "-rf", "/opt/hello"]
"""


def _steps(extra: str) -> bytes:
    return (
        'name = "x"\nversion = "1"\ndetect = { file = "/x" }\n'
        '[[install]]\ncommand = ["true"]\n' + extra
    ).encode()


def test_full_manifest_parses_and_round_trips() -> None:
    m = Manifest.from_toml(GOOD)
    assert (m.name, m.version) == ("hello", "1.2.0")
    assert [d.model_dump() for d in m.dependencies] == [
        {"name": "libfoo", "min_version": "2.1"},
        {"name": "bar", "min_version": None},
    ]
    assert m.install[0].script == "scripts/install.sh" and m.install[0].timeout == 120
    assert m.install[0].script_interpreter() == "sh"
    assert m.install[1].env == {"HELLO_MODE": "managed"}
    assert isinstance(m.detect, VersionFileRule)
    assert m.archive_paths() == {"scripts/install.sh"}
    # the JSON form (what descriptors carry) validates back to the same manifest
    assert Manifest.from_dict(m.to_dict()) == m


def test_files_manifest_accepts_octal_modes() -> None:
    m = Manifest.from_toml(
        b'name = "f"\nversion = "2"\n'
        b'[[files]]\nsource = "bin/tool"\ndestination = "/usr/local/bin/tool"\nmode = 0o755\n'
        b'[[files]]\nsource = "etc/tool.conf"\n'
        b'destination = "C:\\\\tool\\\\tool.conf"\nmode = "0640"\n'
    )
    assert [f.mode for f in m.files] == [0o755, 0o640]
    assert m.files[1].destination == "C:\\tool\\tool.conf"
    assert m.detect is None


@pytest.mark.parametrize(
    ("doc", "reason"),
    [
        (_steps("colour = 1\n"), "Extra inputs"),
        (_steps('[[uninstall]]\ncommand = "rm -rf /"\n'), "valid list"),
        (_steps("[[uninstall]]\ncommand = []\n"), "at least 1"),
        (_steps('[[uninstall]]\ncommand = [""]\n'), "must not be empty"),
        (_steps('[[uninstall]]\ncommand = ["a"]\nscript = "b.sh"\n'), "either"),
        (_steps('[[uninstall]]\nscript = "../b.sh"\n'), "'..'"),
        (_steps('[[uninstall]]\nscript = "/b.sh"\n'), "absolute"),
        (_steps('[[uninstall]]\ncommand = ["a"]\nenv = { "1BAD" = "x" }\n'), "pattern"),
        (_steps('[[uninstall]]\ncommand = ["a"]\ntimeout = 0\n'), "greater than 0"),
        (_steps('[[uninstall]]\ncommand = ["a\\u0000b"]\n'), "NUL"),
        (_steps("[[uninstall]]\ncommand = [" + ", ".join(['"a"'] * 300) + "]\n"), "at most"),
        (_steps('[[uninstall]]\ncommand = ["a"]\n' * 40), "at most 32"),
        (b'name = "-bad"\nversion = "1"\n[[files]]\nsource="a"\ndestination="/a"\n', "name"),
        (b'name = "x"\nversion = "1 0"\n[[files]]\nsource="a"\ndestination="/a"\n', "version"),
        (b'name = "' + b"n" * 200 + b'"\nversion = "1"\n', "name"),
        (b'name = "x"\nversion = "1"\n', "either"),
        (b'name = "x"\nversion = "1"\n[[install]]\ncommand = ["a"]\n', "detect"),
        (b'name = "x"\nversion = "1"\n[[files]]\nsource="a"\ndestination="rel/a"\n', "absolute"),
        (b'name = "x"\nversion = "1"\n[[files]]\nsource="a"\ndestination="/a/../b"\n', "'..'"),
        (
            b'name = "x"\nversion = "1"\n[[files]]\nsource="a"\ndestination="/a"\nmode=0o4755\n',
            "less than or equal",
        ),
        (
            b'name = "x"\nversion = "1"\n[[files]]\nsource="a"\ndestination="/a"\n'
            b'[[files]]\nsource="b"\ndestination="/a"\n',
            "same destination",
        ),
        (b'name = "x"\nversion = "1"\nplatforms = ["plan9"]\n', "pattern"),
        (b"name = ", "not valid TOML"),
        (b"\xff\xfe", "not UTF-8"),
    ],
)
def test_bad_manifests_are_refused_with_a_reason(doc: bytes, reason: str) -> None:
    with pytest.raises(PackageError) as exc:
        Manifest.from_toml(doc)
    assert reason in str(exc.value)


def test_manifest_size_is_limited() -> None:
    doc = _steps("") + b"#" * (300 * 1024)
    with pytest.raises(PackageError, match="larger than"):
        Manifest.from_toml(doc)


def test_detect_rules_parse_by_their_key() -> None:
    assert isinstance(parse_detect_rule({"file": "/a", "sha256": "0" * 64}), FileRule)
    assert isinstance(parse_detect_rule({"command": ["true"], "exit_code": 0}), CommandRule)
    assert isinstance(parse_detect_rule({"dpkg": "curl", "min_version": "7.0"}), DpkgRule)
    assert isinstance(parse_detect_rule({"pip": "requests"}), PipRule)
    rule = parse_detect_rule({"msi": "{12345678-1234-1234-1234-123456789ABC}"})
    assert isinstance(rule, MsiRule)
    for bad, reason in [
        ({"nope": 1}, "one of the keys"),
        ({"file": "/a", "dpkg": "x"}, "Extra inputs"),
        ({"file": "/a", "sha256": "XYZ"}, "pattern"),
        ({"command": "true"}, "valid list"),
        ({"msi": "not-a-guid"}, "pattern"),
        ("file", "one of the keys"),
    ]:
        with pytest.raises(PackageError, match=reason):
            parse_detect_rule(bad)


def test_descriptor_requires_what_its_format_needs() -> None:
    base = {"name": "x", "version": "1", "sha256": "a" * 64, "size": 3, "filename": "x.bin"}
    with pytest.raises(PackageError, match="destination"):
        Descriptor.from_dict({**base, "format": "file"})
    with pytest.raises(PackageError, match="manifest"):
        Descriptor.from_dict({**base, "format": "cpkg"})
    with pytest.raises(PackageError, match="plain file name"):
        Descriptor.from_dict({**base, "format": "deb", "filename": "../x.deb"})
    d = Descriptor.from_dict({**base, "format": "deb", "future_key": 1})
    assert d.format == "deb" and d.detect is None


@pytest.mark.parametrize(
    ("a", "b", "scheme", "expected"),
    [
        ("1.0", "1.0", "deb", 0),
        ("1.0", "1.0.1", "deb", -1),
        ("1.10", "1.9", "deb", 1),
        ("1.0~rc1", "1.0", "deb", -1),
        ("1:0.1", "2.0", "deb", 1),
        ("1.0-2", "1.0-10", "deb", -1),
        ("1.0a", "1.0", "deb", 1),
        ("1.0.0", "1.0", "pep440", 0),
        ("1.0a1", "1.0", "pep440", -1),
        ("1.0.dev1", "1.0a1", "pep440", -1),
        ("1.0rc1", "1.0b2", "pep440", 1),
        ("1.0.post1", "1.0", "pep440", 1),
        ("1.0+local.1", "1.0", "pep440", 1),
        ("1!0.1", "2.0", "pep440", 1),
        ("2.0-3", "2.0-12", "rpm", -1),
    ],
)
def test_version_ordering(a: str, b: str, scheme: str, expected: int) -> None:
    assert compare_versions(a, b, scheme) == expected
    assert compare_versions(b, a, scheme) == -expected


def test_version_at_least() -> None:
    assert version_at_least("2.0", None)
    assert version_at_least("2.0", "1.9")
    assert not version_at_least("1.0rc1", "1.0", "pep440")
