"""What a DMAcc rotation's Replace Statuses mean: taken, refused, or unknown (lost, partial)."""

from __future__ import annotations

import pytest

from custos.omadm import dmacc

CL, SRV = "./DMAcc/a/AppAuth/c", "./DMAcc/a/AppAuth/s"
TARGETS = [f"{n}/{leaf}" for n in (CL, SRV) for leaf in ("AAuthSecret", "AAuthData")]


def _rot(atomic: str | None, children: dict[str, str]) -> dict:
    rot = {**dmacc.new_state("r"), "phase": "replace", "acc": "a", "cl": ["c"], "srv": ["s"]}
    if atomic is not None:
        dmacc.record(rot, "Atomic", atomic, None)
    for target in TARGETS:
        dmacc.record(rot, target, children.get(target, "200"), None)
    return rot


def test_all_200_is_taken() -> None:
    rot = _rot("200", {})
    assert dmacc.outcome(rot) == (dmacc.TAKEN, "")
    assert dmacc.advance(rot, "custos") is True


def test_a_refused_atomic_is_definite() -> None:
    rot = _rot("507", {f"{SRV}/AAuthSecret": "500", f"{CL}/AAuthSecret": "216"})
    verdict, why = dmacc.outcome(rot)
    assert verdict == dmacc.REFUSED and "old ones stay" in why and "Atomic: 507" in why
    with pytest.raises(dmacc.RotationFailed, match="AAuthSecret: 500"):
        dmacc.advance(rot, "custos")


@pytest.mark.parametrize(
    ("atomic", "children", "shown"),
    [
        (None, {}, "no answer"),  # nothing came at all
        ("0", {}, "Atomic: no Status"),  # the package ended without it
        ("200", {f"{CL}/AAuthData": "0"}, "AAuthData: no Status"),  # a child left out
        ("200", {f"{SRV}/AAuthSecret": "500"}, "AAuthSecret: 500"),  # 200, yet a child not
    ],
)
def test_anything_else_is_unknown(atomic: str | None, children: dict, shown: str) -> None:
    rot = _rot(atomic, children)
    if atomic is None:
        rot["ops"] = []
    verdict, why = dmacc.outcome(rot)
    assert verdict == dmacc.UNKNOWN and shown in why and "both sets" in why
    assert dmacc.advance(rot, "custos") is True  # not a failure: the session decides


def test_fewer_replaces_answered_than_sent_is_not_taken() -> None:
    rot = _rot("200", {})
    rot["ops"] = [op for op in rot["ops"] if not op["target"].endswith("/AAuthData")]
    assert dmacc.outcome(rot)[0] == dmacc.UNKNOWN
