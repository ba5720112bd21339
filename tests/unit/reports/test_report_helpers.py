"""The pure pieces of the reports: key parsing, version ordering, CSV cells."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime

import pytest

from custos.reports.service import csv_cell, csv_line, software_key, software_rows, version_key


def test_software_keys():
    assert software_key("sw.dpkg.curl") == ("dpkg", "curl")
    assert software_key("sw.macapp.com.apple.Safari") == ("macapp", "com.apple.Safari")
    assert software_key("sw.winreg.Dell Command | Update") == ("winreg", "Dell Command | Update")
    for key in ("os.name", "sw.dpkg", "sw..x", "sw.dpkg.", "hw.sw.dpkg.x", "xsw.dpkg.y"):
        assert software_key(key) is None, key
    assert software_key("sw.dpkg." + "n" * 255) is not None
    assert software_key("sw.dpkg." + "n" * 256) is None  # not indexed rather than cut
    assert software_key("sw." + "s" * 21 + ".x") is None
    rows = software_rows("d1", {"sw.pip.a": "1" * 300, "os.name": "Debian"})
    assert rows == [{"d": "d1", "s": "pip", "n": "a", "v": "1" * 255}]


@pytest.mark.parametrize(
    ("older", "newer"),
    [
        ("1.0", "1.0.1"),
        ("1.9", "1.10"),
        ("2.39.2", "2.39.10"),
        ("1.0~rc1", "1.0"),
        ("1.0~rc1", "1.0rc1"),
        ("1.0rc1", "1.0"),
        ("1.0.dev1", "1.0"),
        ("1.0beta2", "1.0"),
        ("1.0beta2", "1.0rc1"),
        ("1.1.1", "1.1.1w"),
        ("1.0", "1.0-1"),
        ("2.39.2-1", "2.39.2-1ubuntu1"),
        ("9.9", "1:0.1"),
        ("1:2.30.2-1", "1:2.39.2-1.1"),
        ("7.88.1-10+deb12u4", "7.88.1-10+deb12u5"),
        ("8.0.4110.9", "8.0.4110.10"),
    ],
)
def test_version_order(older, newer):
    assert version_key(older) < version_key(newer)
    assert version_key(newer) > version_key(older)


def test_version_equivalents_and_oddities():
    assert version_key("1.0") == version_key("1-0") == version_key("1_0")
    assert version_key("1.0-RC1") == version_key("1.0-rc1")
    # odd strings never raise
    for odd in ("", "   ", "::", "latest", "\u00e9t\u00e9", "1:", "x" * 500):
        version_key(odd)
    assert sorted(["10", "9", "1:1", "9.0"], key=version_key) == ["9", "9.0", "10", "1:1"]


def test_csv_cells_are_guarded_against_formulas():
    for bad in ("=1+1", "+cmd", "-2+3", "@SUM(A1)", "\tx", "\rx"):
        assert csv_cell(bad) == "'" + bad
    assert csv_cell("curl") == "curl"
    assert csv_cell("a=b") == "a=b"
    assert csv_cell(-1) == "-1"  # numbers are numbers, not formulas
    assert csv_cell(None) == ""
    assert csv_cell(True) == "True"
    assert csv_cell(["b", "=a"]) == "b;=a"
    assert csv_cell(["=a", "b"]) == "'=a;b"
    when = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert csv_cell(when) == "2026-01-02T03:04:05+00:00"


def test_csv_lines_quote_and_round_trip():
    line = csv_line(["a,b", 'say "hi"', "two\nlines", "=x", None, 3])
    assert line.endswith("\r\n")
    assert next(csv.reader(io.StringIO(line))) == ["a,b", 'say "hi"', "two\nlines", "'=x", "", "3"]
