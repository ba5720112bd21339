"""Patch-from deltas: small for a small change, exact round trips, refusals that leave no file."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest

from artifact_versions import make_versions
from custos.artifacts.delta import MAX_DELTA_INPUT, apply_delta, make_delta


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """v1, v2 and the delta v1 -> v2 (made once: level 19 is the slow part)."""
    d = tmp_path_factory.mktemp("delta")
    v1, v2 = make_versions(seed=2)
    (d / "v1").write_bytes(v1)
    (d / "v2").write_bytes(v2)
    make_delta(d / "v1", d / "v2", d / "v1-v2.zst")
    return d / "v1", d / "v2", d / "v1-v2.zst"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _leftovers(d: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name not in keep)


def test_delta_is_small_and_round_trips(made: tuple[Path, Path, Path], tmp_path: Path) -> None:
    v1, v2, delta = made
    # 15 KB of edits, partly random text: the delta carries those, not the megabyte around them
    assert delta.stat().st_size < 0.03 * v2.stat().st_size
    out = tmp_path / "out"
    apply_delta(v1, delta, out, _sha(v2))
    assert out.read_bytes() == v2.read_bytes()
    assert _leftovers(tmp_path, {"out"}) == []


def test_delta_is_what_zstd_patch_from_reads(made: tuple[Path, Path, Path], tmp_path: Path) -> None:
    v1, v2, delta = made
    assert shutil.which("zstd"), "the zstd CLI is part of the dev environment"
    out = tmp_path / "cli-out"
    subprocess.run(
        ["zstd", "-q", "-d", "--long=31", f"--patch-from={v1}", str(delta), "-o", str(out)],
        check=True,
    )
    assert out.read_bytes() == v2.read_bytes()


def test_wrong_base_is_refused_and_writes_nothing(
    made: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    v1, v2, delta = made
    other = tmp_path / "other"
    data = bytearray(v1.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one byte differs from the real base
    other.write_bytes(data)
    with pytest.raises(ValueError):
        apply_delta(other, delta, tmp_path / "out", _sha(v2))
    assert _leftovers(tmp_path, {"other"}) == []


def test_wrong_expected_hash_is_refused(made: tuple[Path, Path, Path], tmp_path: Path) -> None:
    v1, _, delta = made
    with pytest.raises(ValueError):
        apply_delta(v1, delta, tmp_path / "out", _sha(v1))
    assert _leftovers(tmp_path, set()) == []


def test_tampered_delta_is_refused(made: tuple[Path, Path, Path], tmp_path: Path) -> None:
    v1, v2, delta = made
    bad = bytearray(delta.read_bytes())
    bad[len(bad) // 2] ^= 0x55
    (tmp_path / "bad.zst").write_bytes(bad)
    with pytest.raises(ValueError):
        apply_delta(v1, tmp_path / "bad.zst", tmp_path / "out", _sha(v2))
    truncated = delta.read_bytes()[: delta.stat().st_size // 2]
    (tmp_path / "short.zst").write_bytes(truncated)
    with pytest.raises(ValueError):
        apply_delta(v1, tmp_path / "short.zst", tmp_path / "out", _sha(v2))
    assert _leftovers(tmp_path, {"bad.zst", "short.zst"}) == []


def test_files_over_the_limit_are_refused(made: tuple[Path, Path, Path], tmp_path: Path) -> None:
    v1, v2, _ = made
    huge = tmp_path / "huge"
    with huge.open("wb") as fh:  # sparse: the size is what is checked, nothing is read
        fh.truncate(MAX_DELTA_INPUT + 1)
    with pytest.raises(ValueError, match="larger than"):
        make_delta(huge, v2, tmp_path / "d1")
    with pytest.raises(ValueError, match="larger than"):
        make_delta(v1, huge, tmp_path / "d2")
    assert _leftovers(tmp_path, {"huge"}) == []
