"""Transfer plans: documents round-trip with stable ids, rebuilds verify, bad plans are refused.

Plans here are built by hand from recipes and zstd frames, so `reconstruct` is tested apart
from the server's planner (tests/unit/software covers the planner end to end).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import zstandard

from artifact_versions import make_versions
from custos.artifacts.chunking import MAX_CHUNK, chunk_file
from custos.artifacts.delta import make_delta
from custos.artifacts.plan import Piece, Plan, reconstruct


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def chunk_plan(base: Path | None, target: Path, wire: Path) -> Plan:
    """A chunk plan written out by hand: base chunks by reference, the rest as zstd frames."""
    data = target.read_bytes()
    in_base: dict[str, int] = {}
    if base is not None:
        for c in chunk_file(base).chunks:
            in_base.setdefault(c.sha256, c.offset)
    cctx = zstandard.ZstdCompressor(level=3)
    pieces, frames, at = [], [], 0
    for c in chunk_file(target).chunks:
        if c.sha256 in in_base:
            pieces.append(Piece("b", in_base[c.sha256], c.length, c.sha256))
        else:
            frame = cctx.compress(data[c.offset : c.offset + c.length])
            pieces.append(Piece("w", at, c.length, c.sha256, len(frame)))
            frames.append(frame)
            at += len(frame)
    body = b"".join(frames)
    wire.write_bytes(body)
    base_sha = sha(base.read_bytes()) if base is not None and in_base else None
    return Plan("chunks", sha(data), len(data), base_sha, len(body), sha(body), tuple(pieces))


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("plan")
    v1, v2 = make_versions(seed=3)
    (d / "v1").write_bytes(v1)
    (d / "v2").write_bytes(v2)
    make_delta(d / "v1", d / "v2", d / "delta")
    return {"dir": d, "v1": d / "v1", "v2": d / "v2", "delta": d / "delta"}


@pytest.fixture(scope="module")
def plans(files: dict[str, Path]) -> dict[str, tuple[Plan, Path]]:
    """Each kind of plan with its wire body."""
    d = files["dir"]
    with_base = chunk_plan(files["v1"], files["v2"], d / "wire-base")
    no_base = chunk_plan(None, files["v2"], d / "wire-full")
    body = files["delta"].read_bytes()
    v2 = files["v2"].read_bytes()
    delta = Plan("delta", sha(v2), len(v2), sha(files["v1"].read_bytes()), len(body), sha(body))
    return {
        "chunks-with-base": (with_base, d / "wire-base"),
        "chunks-without-base": (no_base, d / "wire-full"),
        "delta": (delta, files["delta"]),
    }


KINDS = ["chunks-with-base", "chunks-without-base", "delta"]


@pytest.mark.parametrize("kind", KINDS)
def test_plan_rebuilds_the_target(
    kind: str, files: dict[str, Path], plans: dict[str, tuple[Plan, Path]], tmp_path: Path
) -> None:
    plan, wire = plans[kind]
    doc = json.loads(json.dumps(plan.to_dict()))  # as a device receives it
    received = Plan.from_dict(doc)
    assert received == plan
    assert received.id == plan.id == doc["id"]
    out = tmp_path / "out"
    reconstruct(received, files["v1"] if plan.base_sha256 else None, wire, out)
    assert out.read_bytes() == files["v2"].read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_chunk_plan_with_base_sends_little(plans: dict[str, tuple[Plan, Path]]) -> None:
    with_base, _ = plans["chunks-with-base"]
    full, _ = plans["chunks-without-base"]
    assert with_base.base_sha256 is not None
    assert full.base_sha256 is None
    assert all(p.src == "w" for p in full.pieces)
    assert sum(p.src == "b" for p in with_base.pieces) >= len(with_base.pieces) // 2
    assert with_base.wire_size < full.wire_size / 2


def test_plan_id_is_the_hash_of_its_content(plans: dict[str, tuple[Plan, Path]]) -> None:
    plan, _ = plans["chunks-with-base"]
    doc = plan.to_dict()
    again = Plan.from_dict({k: v for k, v in doc.items() if k != "id"})
    assert again.id == plan.id  # deterministic
    doc["wire_size"] += 0  # same content, same id
    assert Plan.from_dict(doc).id == plan.id
    other = dict(doc, target_sha256="0" * 64)
    other.pop("id")
    assert Plan.from_dict(other).id != plan.id
    with pytest.raises(ValueError):
        Plan.from_dict(dict(doc, id="0" * 64))


@pytest.mark.parametrize("kind", KINDS)
def test_tampered_wire_is_refused(
    kind: str, files: dict[str, Path], plans: dict[str, tuple[Plan, Path]], tmp_path: Path
) -> None:
    plan, wire = plans[kind]
    bad = bytearray(wire.read_bytes())
    bad[len(bad) // 3] ^= 0x01
    (tmp_path / "wire").write_bytes(bad)
    base = files["v1"] if plan.base_sha256 else None
    with pytest.raises(ValueError):
        reconstruct(plan, base, tmp_path / "wire", tmp_path / "out")
    (tmp_path / "wire").write_bytes(wire.read_bytes()[:-1])  # one byte short
    with pytest.raises(ValueError):
        reconstruct(plan, base, tmp_path / "wire", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wire"]


@pytest.mark.parametrize("kind", ["chunks-with-base", "delta"])
def test_wrong_base_is_refused(
    kind: str, files: dict[str, Path], plans: dict[str, tuple[Plan, Path]], tmp_path: Path
) -> None:
    plan, wire = plans[kind]
    with pytest.raises(ValueError):  # no base at all
        reconstruct(plan, None, wire, tmp_path / "out")
    wrong = tmp_path / "wrong-base"
    wrong.write_bytes(files["v2"].read_bytes())  # a file, but not the plan's base
    with pytest.raises(ValueError):
        reconstruct(plan, wrong, wire, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wrong-base"]


def _bad_plans() -> list[tuple[str, Any]]:
    h = "cd" * 32
    good: dict[str, Any] = {
        "kind": "chunks",
        "target_sha256": h,
        "target_size": 300,
        "base_sha256": h,
        "wire_size": 50,
        "wire_sha256": h,
        "pieces": [["b", 0, 100, h, 0], ["w", 0, 200, h, 50]],
    }

    def bad(**kw: Any) -> dict[str, Any]:
        return {**good, **kw}

    return [
        ("not an object", [good]),
        ("unknown kind", bad(kind="rsync")),
        ("bad target hex", bad(target_sha256="CD" * 32)),
        ("bad wire hex", bad(wire_sha256="cd" * 31)),
        ("bad base hex", bad(base_sha256=123)),
        ("negative size", bad(target_size=-300)),
        ("size as a bool", bad(wire_size=True)),
        ("pieces not a list", bad(pieces="b,w")),
        ("unknown piece source", bad(pieces=[["x", 0, 100, h, 0], ["w", 0, 200, h, 50]])),
        ("piece of zero length", bad(pieces=[["b", 0, 0, h, 0], ["w", 0, 300, h, 50]])),
        ("piece over the chunk limit",
         bad(target_size=MAX_CHUNK + 201, pieces=[["b", 0, MAX_CHUNK + 1, h, 0],
                                                  ["w", 0, 200, h, 50]])),
        ("wire pieces with a gap", bad(pieces=[["b", 0, 100, h, 0], ["w", 10, 200, h, 40]])),
        ("base piece without a base", bad(base_sha256=None)),
        ("pieces short of the target", bad(target_size=301)),
        ("wire pieces short of the wire", bad(wire_size=51)),
        ("piece with bad hex", bad(pieces=[["b", 0, 100, "zz" * 32, 0], ["w", 0, 200, h, 50]])),
        ("delta with pieces", bad(kind="delta")),
        ("delta without a base", bad(kind="delta", pieces=[], base_sha256=None)),
        ("wrong id", bad(id="00" * 32)),
    ]  # fmt: skip


@pytest.mark.parametrize(("why", "doc"), _bad_plans(), ids=[b[0] for b in _bad_plans()])
def test_malformed_plans_are_refused(why: str, doc: Any) -> None:
    with pytest.raises(ValueError):
        Plan.from_dict(doc)


def test_the_good_plan_of_the_malformed_cases_is_accepted() -> None:
    """The refusals above are for what each changes, not for the document they start from."""
    h = "cd" * 32
    doc = {
        "kind": "chunks",
        "target_sha256": h,
        "target_size": 300,
        "base_sha256": h,
        "wire_size": 50,
        "wire_sha256": h,
        "pieces": [["b", 0, 100, h, 0], ["w", 0, 200, h, 50]],
    }
    plan = Plan.from_dict(doc)
    assert plan.wire_size == 50
    assert [p.src for p in plan.pieces] == ["b", "w"]
