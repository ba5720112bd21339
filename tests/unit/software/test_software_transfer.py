"""Transfer planning end to end: plan, stream the wire body in ranges, rebuild on the 'device'."""

from __future__ import annotations

import asyncio
import itertools
import json
import random
from pathlib import Path

import pytest

from artifact_versions import make_versions
from custos.artifacts.plan import Plan, reconstruct
from custos.software.store import LocalArtifactStore
from custos.software.transfer import PIECE_BYTES, RangeError, TransferPlanner, parse_range


class CountingStore(LocalArtifactStore):
    """The real store, counting how often an artifact is rebuilt (a delta needs two)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.materialized: list[str] = []

    def materialize(self, sha256: str, out: Path) -> None:
        """As the store does, counted."""
        self.materialized.append(sha256)
        super().materialize(sha256, out)


@pytest.fixture
def world(tmp_path: Path) -> dict[str, object]:
    v1, v2 = make_versions(seed=5)
    (tmp_path / "v1").write_bytes(v1)
    (tmp_path / "v2").write_bytes(v2)
    store = CountingStore(tmp_path / "store")
    r1 = store.ingest(tmp_path / "v1")
    r2 = store.ingest(tmp_path / "v2")
    return {
        "dir": tmp_path,
        "store": store,
        "planner": TransferPlanner(store),
        "v1": r1.sha256,
        "v2": r2.sha256,
    }


async def download(planner: TransferPlanner, plan: Plan, dest: Path, step: int) -> list[int]:
    """The wire body fetched in ranges of `step` bytes, as a resuming device would."""
    sizes: list[int] = []
    with dest.open("wb") as fh:
        for start in range(0, plan.wire_size, step):
            end = min(plan.wire_size, start + step)
            async for part in planner.iter_wire(plan, start, end):
                sizes.append(len(part))
                fh.write(part)
    return sizes


async def test_upgrade_plan_is_small_and_rebuilds(world: dict[str, object]) -> None:
    planner, d = world["planner"], world["dir"]
    assert isinstance(planner, TransferPlanner) and isinstance(d, Path)
    plan = await planner.plan(str(world["v2"]), str(world["v1"]))
    full = await planner.plan(str(world["v2"]), None)
    assert plan.base_sha256 == world["v1"]
    assert plan.wire_size < full.wire_size / 5  # a 1 % change sends a few % of the bytes
    # the device's side: the document over JSON, the body over ranges, the rebuild
    received = Plan.from_dict(json.loads(json.dumps(plan.to_dict())))
    await download(planner, received, d / "wire", 1 << 20)
    reconstruct(received, d / "v1", d / "wire", d / "out")
    assert (d / "out").read_bytes() == (d / "v2").read_bytes()


async def test_fresh_install_plan_is_all_wire(world: dict[str, object]) -> None:
    planner, d = world["planner"], world["dir"]
    assert isinstance(planner, TransferPlanner) and isinstance(d, Path)
    plan = await planner.plan(str(world["v2"]), None)
    assert plan.kind == "chunks" and plan.base_sha256 is None
    assert all(p.src == "w" for p in plan.pieces)
    assert plan.wire_size < (d / "v2").stat().st_size  # compressed
    await download(planner, plan, d / "wire", plan.wire_size)
    reconstruct(plan, None, d / "wire", d / "out")
    assert (d / "out").read_bytes() == (d / "v2").read_bytes()


async def test_plans_are_saved_for_every_process(world: dict[str, object]) -> None:
    planner, store = world["planner"], world["store"]
    assert isinstance(planner, TransferPlanner) and isinstance(store, LocalArtifactStore)
    plan = await planner.plan(str(world["v2"]), str(world["v1"]))
    other = TransferPlanner(LocalArtifactStore(store.root))  # another server process
    loaded = await other.load_plan(plan.id)
    assert loaded == plan and loaded.id == plan.id
    with pytest.raises(KeyError):
        await other.load_plan("f" * 64)
    with pytest.raises(KeyError):
        await other.load_plan("../../etc/passwd")


async def test_concurrent_plans_compute_the_delta_once(world: dict[str, object]) -> None:
    planner, store = world["planner"], world["store"]
    assert isinstance(planner, TransferPlanner) and isinstance(store, CountingStore)
    plans = await asyncio.gather(
        *(planner.plan(str(world["v2"]), str(world["v1"])) for _ in range(4))
    )
    assert len({p.id for p in plans}) == 1
    assert sorted(store.materialized) == sorted([str(world["v1"]), str(world["v2"])])
    await planner.plan(str(world["v2"]), str(world["v1"]))  # cached now
    assert len(store.materialized) == 2


@pytest.mark.parametrize("base", [True, False], ids=["upgrade", "fresh"])
async def test_any_ranges_concatenate_to_the_whole_body(
    world: dict[str, object], base: bool
) -> None:
    planner = world["planner"]
    assert isinstance(planner, TransferPlanner)
    plan = await planner.plan(str(world["v2"]), str(world["v1"]) if base else None)
    whole = b"".join([part async for part in planner.iter_wire(plan, 0, plan.wire_size)])
    assert len(whole) == plan.wire_size
    rng = random.Random(7)
    cuts = sorted({0, plan.wire_size, *(rng.randrange(plan.wire_size) for _ in range(25))})
    pieces = []
    for start, end in itertools.pairwise(cuts):
        got = b"".join([p async for p in planner.iter_wire(plan, start, end)])
        assert got == whole[start:end], (start, end)
        pieces.append(got)
    assert b"".join(pieces) == whole
    one = b"".join([p async for p in planner.iter_wire(plan, 5, 6)])
    assert one == whole[5:6]
    # bounded pieces: never the whole body at once
    sizes = [len(p) async for p in planner.iter_wire(plan, 0, plan.wire_size)]
    assert max(sizes) <= PIECE_BYTES + 2 * 256 * 1024


@pytest.mark.parametrize(
    ("header", "size", "want"),
    [
        ("bytes=0-99", 1000, (0, 100)),
        ("bytes=100-", 1000, (100, 1000)),
        ("bytes=999-", 1000, (999, 1000)),
        ("bytes=-10", 1000, (990, 1000)),
        ("bytes=-5000", 1000, (0, 1000)),
        ("bytes=500-99999", 1000, (500, 1000)),
        ("bytes=0-0", 1000, (0, 1)),
        ("bytes=0-1,5-6", 1000, None),  # several ranges: the whole body, 200
    ],
)
def test_parse_range(header: str, size: int, want: tuple[int, int] | None) -> None:
    assert parse_range(header, size) == want


@pytest.mark.parametrize(
    ("header", "size"),
    [
        ("bytes=1000-", 1000),  # starts at the end
        ("bytes=5000-6000", 1000),
        ("bytes=-0", 1000),
        ("bytes=0-", 0),  # nothing to send
        ("bytes=9-3", 1000),
        ("bytes=abc", 1000),
        ("bytes=-", 1000),
        ("bytes=1-2-3", 1000),
    ],
)
def test_unsatisfiable_or_malformed_ranges_raise(header: str, size: int) -> None:
    with pytest.raises(RangeError):
        parse_range(header, size)
