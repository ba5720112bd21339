"""A plan's wire body as stored files: the byte ranges sendfile serves, the materialised wire
file (x-accel and the embedded sendfile path), its clean-up, and the parsed-plan cache."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import random
import stat
from pathlib import Path

import pytest

from artifact_versions import make_versions
from custos.artifacts.plan import Plan
from custos.server.protocols import FileSegment
from custos.software import transfer
from custos.software.store import LocalArtifactStore, wire_blob_key
from custos.software.transfer import TransferPlanner


@pytest.fixture
def world(tmp_path: Path) -> tuple[LocalArtifactStore, TransferPlanner, str, str]:
    v1, v2 = make_versions(seed=11)
    (tmp_path / "v1").write_bytes(v1)
    (tmp_path / "v2").write_bytes(v2)
    store = LocalArtifactStore(tmp_path / "store")
    r1, r2 = store.ingest(tmp_path / "v1"), store.ingest(tmp_path / "v2")
    return store, TransferPlanner(store), r1.sha256, r2.sha256


def read_segments(segments: list[FileSegment]) -> bytes:
    out = bytearray()
    for seg in segments:
        with open(seg.path, "rb") as fh:
            fh.seek(seg.offset)
            data = fh.read(seg.size)
        assert len(data) == seg.size
        out += data
    return bytes(out)


async def whole_body(planner: TransferPlanner, plan: Plan) -> bytes:
    return b"".join([p async for p in planner.iter_wire(plan, 0, plan.wire_size)])


@pytest.mark.parametrize("kind", ["fresh", "upgrade-chunks", "delta"])
@pytest.mark.parametrize("from_whole", [False, True], ids=["frames", "wire-file"])
async def test_segments_are_the_same_bytes_as_the_stream(
    world: tuple[LocalArtifactStore, TransferPlanner, str, str], kind: str, from_whole: bool
) -> None:
    store, planner, v1, v2 = world
    if kind == "delta":
        plan = await planner.plan(v2, v1)
        assert plan.kind == "delta"
    else:
        plan = planner._chunk_plan(v2, v1 if kind == "upgrade-chunks" else None)
    whole = await whole_body(planner, plan)
    file = await planner.wire_file(plan) if from_whole else None
    assert read_segments(planner.wire_segments(plan, 0, plan.wire_size, file)) == whole
    rng = random.Random(3)
    cuts = sorted({0, plan.wire_size, *(rng.randrange(plan.wire_size) for _ in range(30))})
    for start, end in itertools.pairwise(cuts):
        segs = planner.wire_segments(plan, start, end, file)
        assert read_segments(segs) == whole[start:end], (start, end)
        assert all(s.size > 0 for s in segs)
    assert read_segments(planner.wire_segments(plan, 7, 8, file)) == whole[7:8]
    assert planner.wire_segments(plan, 5, 5, file) == []
    if kind == "fresh" and not from_whole:
        # one segment per chunk frame, straight from the chunk store
        assert {Path(s.path).parent.parent for s in planner.wire_segments(plan, 0, 10**9)} == {
            store.root / "chunks"
        }


async def test_the_wire_file_is_written_once_and_shared(
    world: tuple[LocalArtifactStore, TransferPlanner, str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    store, planner, _, v2 = world
    plan = await planner.plan(v2, None)
    writes: list[str] = []
    real = planner._write_wire

    def counting(p: Plan, plan_id: str) -> Path:
        writes.append(plan_id)
        return real(p, plan_id)

    monkeypatch.setattr(planner, "_write_wire", counting)
    paths = await asyncio.gather(*(planner.wire_file(plan) for _ in range(8)))
    assert len(set(paths)) == 1 and writes == [plan.id]
    path = paths[0]
    assert path.name == wire_blob_key(v2, plan.id) and path.parent == store.blob_dir()
    data = path.read_bytes()
    assert len(data) == plan.wire_size
    assert hashlib.sha256(data).hexdigest() == plan.wire_sha256
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert list(store.tmp_dir().iterdir()) == []
    # another process (another planner on the same store) finds it
    other = TransferPlanner(store)
    assert other.stored_wire_file(plan) == path
    assert await other.wire_file(plan, plan.id) == path
    # a file of the wrong size (a crash mid-copy by hand, a full disk) is written again
    with path.open("r+b") as fh:
        fh.truncate(100)
    assert other.stored_wire_file(plan) is None
    assert (await other.wire_file(plan)).read_bytes() == data


async def test_a_damaged_chunk_is_not_made_into_a_wire_file(
    world: tuple[LocalArtifactStore, TransferPlanner, str, str],
) -> None:
    store, planner, _, v2 = world
    plan = await planner.plan(v2, None)
    victim = store.chunk_path(plan.pieces[len(plan.pieces) // 2].sha256)
    frame = victim.read_bytes()
    victim.write_bytes(frame[:-1] + bytes([frame[-1] ^ 1]))  # same size, other bytes
    with pytest.raises(ValueError, match="does not match its plan"):
        await planner.wire_file(plan)
    victim.write_bytes(frame[:-1])  # shorter
    with pytest.raises(ValueError, match="not the planned size"):
        await planner.wire_file(plan)
    assert planner.stored_wire_file(plan) is None
    assert list(store.tmp_dir().iterdir()) == []
    victim.write_bytes(frame)
    assert (await planner.wire_file(plan)).stat().st_size == plan.wire_size


async def test_a_delta_plan_is_served_from_its_delta(
    world: tuple[LocalArtifactStore, TransferPlanner, str, str],
) -> None:
    _, planner, v1, v2 = world
    plan = await planner.plan(v2, v1)
    assert plan.kind == "delta"
    path = await planner.wire_file(plan)
    assert path == planner.delta_path(plan) and path.name.startswith("delta-")
    assert stat.S_IMODE(path.stat().st_mode) == 0o640  # a front nginx may send it
    assert await planner.ready_wire_file(plan) == path


async def test_the_first_downloads_do_not_wait_for_the_wire_file(
    world: tuple[LocalArtifactStore, TransferPlanner, str, str],
) -> None:
    _, planner, _, v2 = world
    plan = await planner.plan(v2, None)
    first = await asyncio.gather(*(planner.ready_wire_file(plan, plan.id) for _ in range(5)))
    assert first == [None] * 5  # served from the chunk frames meanwhile
    assert len(planner._writing) == 1
    await asyncio.gather(*planner._writing.values())
    path = await planner.ready_wire_file(plan)
    assert path is not None and path.stat().st_size == plan.wire_size
    assert planner._writing == {}


async def test_deleting_an_artifact_removes_its_wire_files(
    world: tuple[LocalArtifactStore, TransferPlanner, str, str],
) -> None:
    store, planner, v1, v2 = world
    p1 = await planner.wire_file(await planner.plan(v1, None))
    p2 = await planner.wire_file(await planner.plan(v2, None))
    store.delete(v2)
    assert not p2.exists()
    assert p1.exists()


async def test_plans_are_parsed_once_within_a_budget(
    world: tuple[LocalArtifactStore, TransferPlanner, str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    store, planner, v1, v2 = world
    p1, p2 = planner._chunk_plan(v1, None), planner._chunk_plan(v2, None)
    for p in (p1, p2):
        planner._save(p)
    fresh = TransferPlanner(store)
    reads: list[str] = []
    real = fresh._read_plan

    def counting(plan_id: str) -> Plan:
        reads.append(plan_id)
        return real(plan_id)

    monkeypatch.setattr(fresh, "_read_plan", counting)
    assert await fresh.load_plan(p1.id) == p1
    assert await fresh.load_plan(p1.id) == p1
    assert reads == [p1.id]
    # room for both (a plan counts its pieces and one)
    monkeypatch.setattr(transfer, "PLAN_CACHE_PIECES", len(p1.pieces) + len(p2.pieces) + 2)
    await fresh.load_plan(p2.id)
    await fresh.load_plan(p1.id)
    assert reads == [p1.id, p2.id]
    # room for one: the least recently used goes when another is parsed
    monkeypatch.setattr(transfer, "PLAN_CACHE_PIECES", len(p1.pieces) + 1)
    small = TransferPlanner(store)
    monkeypatch.setattr(small, "_read_plan", counting)
    reads.clear()
    for pid in (p1.id, p2.id, p2.id, p1.id):
        await small.load_plan(pid)
    assert reads == [p1.id, p2.id, p1.id]
    with pytest.raises(KeyError):
        await fresh.load_plan("e" * 64)
