"""The DMAcc rotation's steps, the decoder's text budget from the caller, the shared CIDR check."""

from __future__ import annotations

import pytest

from custos.audit.middleware import in_networks
from custos.omadm import codec, dmacc, wbxml


def _answer(rot: dict, answers: dict[str, tuple[str, str | None]]) -> None:
    for target in dmacc.requests(rot):
        status, data = answers.get(target, ("404", None))
        dmacc.record(rot, target, status, data)


def test_rotation_finds_this_servers_account_and_its_credential_nodes() -> None:
    rot = dmacc.new_state("run-1")
    assert dmacc.requests(rot) == ["./DMAcc"]
    _answer(rot, {"./DMAcc": ("200", "a/b/../" + "x" * 65)})
    assert dmacc.advance(rot, "custos") is False
    assert rot["accounts"] == ["a", "b"]  # '..' and over-long names are not followed
    _answer(rot, {"./DMAcc/a/ServerID": ("200", "other"), "./DMAcc/b/ServerID": ("200", "custos")})
    assert dmacc.advance(rot, "custos") is False and rot["acc"] == "b"
    _answer(rot, {"./DMAcc/b/AppAuth": ("200", "c1/s1/x")})
    assert dmacc.advance(rot, "custos") is False
    _answer(
        rot,
        {
            "./DMAcc/b/AppAuth/c1/AAuthLevel": ("200", "CLCRED"),
            "./DMAcc/b/AppAuth/s1/AAuthLevel": ("200", "SRVCRED"),
            "./DMAcc/b/AppAuth/x/AAuthLevel": ("200", "OBEX"),
        },
    )
    assert dmacc.advance(rot, "custos") is False and rot["phase"] == "replace"
    out = dmacc.replaces(rot, ("cpw", "cn"), ("spw", "sn"))
    assert [(r["target"].rsplit("/", 2)[-2], r["data"]) for r in out] == [
        ("c1", "cpw"),
        ("c1", "cn"),
        ("s1", "spw"),
        ("s1", "sn"),
    ]
    dmacc.record(rot, "Atomic", "200", None)
    for r in out:
        dmacc.record(rot, r["target"], "200", None)
    assert dmacc.advance(rot, "custos") is True
    assert "c1" in dmacc.summary(rot) and "cpw" not in dmacc.summary(rot)


@pytest.mark.parametrize(
    ("answers", "reason"),
    [
        ({"./DMAcc": ("404", None)}, "did not list"),
        ({"./DMAcc": ("200", "")}, "no account"),
        ({"./DMAcc": ("200", "a"), "./DMAcc/a/ServerID": ("200", "x")}, "ServerID 'custos'"),
        (
            {
                "./DMAcc": ("200", "a"),
                "./DMAcc/a/ServerID": ("200", "custos"),
                "./DMAcc/a/AppAuth": ("200", "c"),
                "./DMAcc/a/AppAuth/c/AAuthLevel": ("200", "CLCRED"),
            },
            "no SRVCRED",
        ),
    ],
)
def test_rotation_stops_with_a_reason(
    answers: dict[str, tuple[str, str | None]], reason: str
) -> None:
    rot = dmacc.new_state("run-1")
    with pytest.raises(dmacc.RotationFailed, match=reason):
        for _ in range(5):
            _answer(rot, answers)
            dmacc.advance(rot, "custos")


def test_a_refused_replace_fails_the_rotation() -> None:
    rot = {**dmacc.new_state("r"), "phase": "replace", "acc": "a", "cl": ["c"], "srv": ["s"]}
    dmacc.record(rot, "Atomic", "507", None)
    dmacc.record(rot, "./DMAcc/a/AppAuth/c/AAuthSecret", "216", None)
    dmacc.record(rot, "./DMAcc/a/AppAuth/s/AAuthSecret", "500", None)
    with pytest.raises(dmacc.RotationFailed, match=r"Atomic: 507.*s/AAuthSecret: 500"):
        dmacc.advance(rot, "custos")


def test_the_text_budget_comes_from_the_caller() -> None:
    table = b"x" * 100 + b"\x00"
    data = b"\x02\xa4\x01\x6a" + wbxml._uint(len(table)) + table + b"\x6d" + b"\x83\x00" * 50
    data += b"\x01"
    assert len(wbxml.decode(data).text or "") == 5000
    with pytest.raises(wbxml.WbxmlError, match="more than 4000 characters"):
        wbxml.decode(data, max_text=4000)
    with pytest.raises(codec.CodecError, match="more than 4000 characters"):
        codec.decode(data, codec.WBXML_TYPE, max_text=4000)


def test_in_networks() -> None:
    assert in_networks("10.1.2.3", ["192.168.0.0/16", "10.0.0.0/8"])
    assert in_networks("::1", ["::1"])
    assert not in_networks("10.1.2.3", ["not-a-network", "11.0.0.0/8"])
    assert not in_networks("garbage", ["0.0.0.0/0"])
