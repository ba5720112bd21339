"""The local artifact store: chunks stored once, exact rebuilds, and GC of unreferenced chunks."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import pytest

from artifact_versions import make_versions
from custos.artifacts.chunking import chunk_file
from custos.software.store import LocalArtifactStore


@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("store-data")
    v1, v2 = make_versions(seed=4)
    (d / "v1").write_bytes(v1)
    (d / "v2").write_bytes(v2)
    return d / "v1", d / "v2"


def chunk_files(root: Path) -> set[str]:
    """Names of the chunk frames on disk."""
    d = root / "chunks"
    return {p.name for p in d.rglob("*") if p.is_file()} if d.exists() else set()


def test_ingest_stores_shared_chunks_once(versions: tuple[Path, Path], tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path / "store")
    r1 = store.ingest(versions[0])
    r2 = store.ingest(versions[1])
    assert r1 == chunk_file(versions[0])
    assert r2 == chunk_file(versions[1])
    assert store.has(r1.sha256) and store.has(r2.sha256)
    assert not store.has("0" * 64)
    assert store.recipe(r2.sha256) == r2
    distinct = {c.sha256 for c in r1.chunks} | {c.sha256 for c in r2.chunks}
    assert chunk_files(tmp_path / "store") == distinct
    assert len(distinct) < len(r1.chunks) + len(r2.chunks)  # the versions share chunks
    stats = store.stats()
    assert stats["logical_bytes"] == r1.size + r2.size
    # shared chunks stored once, and compressed: well under the two versions' bytes
    assert stats["stored_bytes"] < 0.75 * (r1.size + r2.size)


def test_materialize_rebuilds_the_exact_file(versions: tuple[Path, Path], tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path / "store")
    r = store.ingest(versions[1])
    out = tmp_path / "out"
    store.materialize(r.sha256, out)
    assert out.read_bytes() == versions[1].read_bytes()
    assert hashlib.sha256(out.read_bytes()).hexdigest() == r.sha256


def test_unknown_artifact_is_a_key_error(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path / "store")
    with pytest.raises(KeyError):
        store.recipe("1" * 64)
    with pytest.raises(KeyError):
        store.recipe("../../etc/passwd")


def test_concurrent_ingest_of_the_same_file_is_safe(
    versions: tuple[Path, Path], tmp_path: Path
) -> None:
    store = LocalArtifactStore(tmp_path / "store")
    results: list[object] = []
    errors: list[BaseException] = []

    def ingest() -> None:
        try:
            results.append(store.ingest(versions[0]))
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=ingest) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(results) == 3 and results[0] == results[1] == results[2]
    r = chunk_file(versions[0])
    assert chunk_files(tmp_path / "store") == {c.sha256 for c in r.chunks}
    out = tmp_path / "out"
    store.materialize(r.sha256, out)
    assert out.read_bytes() == versions[0].read_bytes()
    tmp = tmp_path / "store" / "tmp"
    assert not tmp.exists() or list(tmp.iterdir()) == []  # no temp files left behind


def test_delete_collects_only_unreferenced_chunks(
    versions: tuple[Path, Path], tmp_path: Path
) -> None:
    store = LocalArtifactStore(tmp_path / "store")
    r1 = store.ingest(versions[0])
    r2 = store.ingest(versions[1])
    only_v1 = {c.sha256 for c in r1.chunks} - {c.sha256 for c in r2.chunks}
    assert only_v1
    store.delete(r1.sha256)
    assert not store.has(r1.sha256)
    assert chunk_files(tmp_path / "store") == {c.sha256 for c in r2.chunks}
    out = tmp_path / "out"
    store.materialize(r2.sha256, out)  # v2 keeps every chunk it shared with v1
    assert out.read_bytes() == versions[1].read_bytes()
    assert store.stats()["logical_bytes"] == r2.size
    store.delete(r2.sha256)
    assert chunk_files(tmp_path / "store") == set()
    assert store.stats() == {"logical_bytes": 0, "stored_bytes": 0}


def test_blobs_are_kept_by_key(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path / "store")
    src = store.tmp_dir() / "x"
    src.write_bytes(b"derived")
    store.put_blob("plan-abc", src)
    path = store.blob_path("plan-abc")
    assert path is not None and path.read_bytes() == b"derived"
    assert store.blob_path("plan-none") is None
    for key in ("../escape", "UPPER", ".hidden", "", "a/b"):
        with pytest.raises(KeyError):
            store.blob_path(key)


def test_collection_waits_for_an_ingest_in_another_process(
    versions: tuple[Path, Path], tmp_path: Path
) -> None:
    """A delete must not sweep chunks while another process is ingesting (it may reuse them)."""
    import subprocess
    import sys
    import time

    store = LocalArtifactStore(tmp_path / "store")
    r1 = store.ingest(versions[0])
    # another process in the middle of an ingest: it holds the shared lock for 1.5 s
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time\n"
            f"fd = os.open({str(tmp_path / 'store' / '.gc.lock')!r}, os.O_RDWR)\n"
            "fcntl.flock(fd, fcntl.LOCK_SH)\n"
            "print('held', flush=True)\n"
            "time.sleep(1.5)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        store.delete(r1.sha256)
        waited = time.monotonic() - started
    finally:
        holder.wait(10)
        assert holder.stdout is not None
        holder.stdout.close()
    assert waited >= 1.0, waited  # it waited for the ingest to finish
    assert chunk_files(tmp_path / "store") == set()
