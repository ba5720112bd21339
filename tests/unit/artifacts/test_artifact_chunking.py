"""Content-defined chunking: versions share chunks, recipes round-trip, bad recipes are refused."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from artifact_versions import make_versions
from custos.artifacts.chunking import (
    MAX_ARTIFACT_BYTES,
    MAX_CHUNK,
    MIN_CHUNK,
    Recipe,
    chunk_file,
)


@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("chunking")
    v1, v2 = make_versions(seed=1)
    (d / "v1").write_bytes(v1)
    (d / "v2").write_bytes(v2)
    return d / "v1", d / "v2"


def test_recipe_describes_the_file(versions: tuple[Path, Path]) -> None:
    path = versions[0]
    data = path.read_bytes()
    r = chunk_file(path)
    assert r.size == len(data)
    assert r.sha256 == hashlib.sha256(data).hexdigest()
    at = 0
    for c in r.chunks:
        assert c.offset == at
        assert hashlib.sha256(data[at : at + c.length]).hexdigest() == c.sha256
        at += c.length
    assert at == len(data)
    assert all(MIN_CHUNK <= c.length <= MAX_CHUNK for c in r.chunks[:-1])
    assert len(r.chunks) >= 10  # 1.5 MB in 64 KiB-average chunks
    assert chunk_file(path) == r  # deterministic


def test_a_one_percent_edit_keeps_most_chunks(versions: tuple[Path, Path]) -> None:
    r1, r2 = chunk_file(versions[0]), chunk_file(versions[1])
    old = {c.sha256 for c in r1.chunks}
    shared = [c for c in r2.chunks if c.sha256 in old]
    # six edits touch at most two chunks each; insertions must not shift every later chunk
    assert len(r2.chunks) - len(shared) <= 12
    assert len(shared) / len(r2.chunks) >= 0.5
    assert r1.sha256 != r2.sha256


def test_empty_file(tmp_path: Path) -> None:
    (tmp_path / "empty").write_bytes(b"")
    r = chunk_file(tmp_path / "empty")
    assert r.size == 0
    assert r.chunks == ()
    assert r.sha256 == hashlib.sha256(b"").hexdigest()
    assert Recipe.from_dict(r.to_dict()) == r


def test_recipe_round_trips_through_json(versions: tuple[Path, Path]) -> None:
    r = chunk_file(versions[1])
    doc = json.loads(json.dumps(r.to_dict()))
    assert Recipe.from_dict(doc) == r


def _mutations() -> list[tuple[str, Any]]:
    sha = "ab" * 32

    def doc(**kw: Any) -> dict[str, Any]:
        base: dict[str, Any] = {"size": 300, "sha256": sha, "chunks": [[sha, 100], [sha, 200]]}
        base.update(kw)
        return base

    return [
        ("not an object", [sha, 300]),
        ("uppercase hex", doc(sha256="AB" * 32)),
        ("short hex", doc(sha256="ab" * 31)),
        ("not hex", doc(sha256="zz" * 32)),
        ("bad chunk hex", doc(chunks=[["xy" * 32, 100], [sha, 200]])),
        ("negative size", doc(size=-1)),
        ("size over the limit", doc(size=MAX_ARTIFACT_BYTES + 1)),
        ("size as a string", doc(size="300")),
        ("zero-length chunk", doc(chunks=[[sha, 0], [sha, 300]])),
        ("negative chunk", doc(chunks=[[sha, -100], [sha, 400]])),
        ("chunk over the maximum", doc(size=MAX_CHUNK + 1, chunks=[[sha, MAX_CHUNK + 1]])),
        ("chunks short of the size", doc(size=301)),
        ("chunks past the size", doc(size=299)),
        ("chunk not a pair", doc(chunks=[[sha, 100, 0], [sha, 200]])),
        ("chunks not a list", doc(chunks={"a": 1})),
        ("length as a float", doc(chunks=[[sha, 100.0], [sha, 200]])),
    ]


@pytest.mark.parametrize(("why", "doc"), _mutations(), ids=[m[0] for m in _mutations()])
def test_malformed_recipes_are_refused(why: str, doc: Any) -> None:
    with pytest.raises(ValueError):
        Recipe.from_dict(doc)
