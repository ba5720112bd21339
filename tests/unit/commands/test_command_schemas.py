"""Validation of command requests: kinds, paths, times."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from custos.commands.schemas import CommandCreate, check_collect_path


@pytest.mark.parametrize(
    "path",
    ["/etc/hostname", "/var/log/syslog", "C:\\Windows\\win.ini", "C:/Temp/x.log"],
)
def test_good_collect_paths(path):
    assert check_collect_path(path) == path


@pytest.mark.parametrize(
    "path",
    ["../etc/passwd", "/tmp/../etc/passwd", "relative", "/a/./b", "/x\x00y", "C:\\a\\..\\b", ""],
)
def test_bad_collect_paths(path):
    with pytest.raises(ValueError):
        check_collect_path(path)


def test_each_kind_needs_its_fields():
    with pytest.raises(ValidationError, match="exec needs argv"):
        CommandCreate(target="d", kind="exec")
    with pytest.raises(ValidationError, match="script needs"):
        CommandCreate(target="d", kind="script", interpreter="sh")
    with pytest.raises(ValidationError, match="collect_file needs path"):
        CommandCreate(target="d", kind="collect_file")
    with pytest.raises(ValidationError):
        CommandCreate(target="d", kind="exec", argv=["x"], unexpected=1)
    c = CommandCreate(
        target="d", kind="script", interpreter="python", script="print(1)", args=["a"]
    )
    assert c.payload() == {
        "interpreter": "python",
        "script": "print(1)",
        "args": ["a"],
        "timeout_s": 300,
    }


def test_times_need_zone_and_order():
    with pytest.raises(ValidationError, match="timezone"):
        CommandCreate(target="d", kind="ping", not_before="2030-01-01T00:00:00")
    with pytest.raises(ValidationError, match="after not_before"):
        CommandCreate(
            target="d",
            kind="ping",
            not_before="2030-01-02T00:00:00Z",
            expires_at="2030-01-01T00:00:00Z",
        )
