"""The artifact store: content-addressed, chunked, each chunk once as a zstd frame.

`ArtifactStore` is the small interface a shared backend (an S3-compatible bucket) would
implement; `LocalArtifactStore` keeps everything under one directory, which several server
processes may share (every write is a temp file renamed into place). Methods are blocking:
services call them in a worker thread.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from custos.artifacts.chunking import SHA_RE, Recipe, chunk_file, decompress_frame

CHUNK_LEVEL = 19  # chunks are compressed once, when stored, and sent many times
BLOB_KEY_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789-._")


class ArtifactStore(Protocol):
    """What software distribution needs from storage."""

    def ingest(self, path: Path) -> Recipe:
        """Store a file (its chunks once each) and return its recipe."""

    def has(self, sha256: str) -> bool:
        """Whether an artifact with this hash is stored."""

    def recipe(self, sha256: str) -> Recipe:
        """The artifact's recipe (KeyError when unknown)."""

    def chunk_size(self, chunk_sha256: str) -> int:
        """Compressed size of a stored chunk frame."""

    def read_chunk(self, chunk_sha256: str) -> bytes:
        """A chunk's zstd frame as stored."""

    def materialize(self, sha256: str, out: Path) -> None:
        """Rebuild the original file."""

    def put_blob(self, key: str, src: Path) -> None:
        """Keep a derived file (a delta, a plan) under a key; `src` is moved."""

    def blob_path(self, key: str) -> Path | None:
        """A local path to read a blob from, or None."""

    def delete(self, sha256: str) -> None:
        """Forget an artifact; chunks no other artifact uses are removed."""


def wire_blob_key(target_sha256: str, plan_id: str) -> str:
    """The blob a chunk plan's wire body is materialised in (named after its artifact so
    deleting the artifact finds it)."""
    return f"wire-{target_sha256}-{plan_id}"


class LocalArtifactStore:
    """Artifacts in a directory: recipes/, chunks/ab/…, blobs/."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._lock = threading.Lock()

    def _dirs(self) -> None:
        for sub in ("recipes", "chunks", "blobs", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    def _chunk_path(self, sha: str) -> Path:
        if not SHA_RE.match(sha):
            raise KeyError(sha)
        return self.root / "chunks" / sha[:2] / sha

    def chunk_path(self, chunk_sha256: str) -> Path:
        """Where a chunk's frame is stored (for serving it without reading it)."""
        return self._chunk_path(chunk_sha256)

    def _recipe_path(self, sha: str) -> Path:
        if not SHA_RE.match(sha):
            raise KeyError(sha)
        return self.root / "recipes" / f"{sha}.json"

    def _write(self, dest: Path, data: bytes) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=self.root / "tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @contextlib.contextmanager
    def _gc_lock(self, exclusive: bool) -> Iterator[None]:
        """Ingests share this lock; garbage collection takes it alone (across processes).

        Without it a collection in one process could remove a chunk that an ingest in
        another has just found present and is about to name in its recipe.
        """
        self._dirs()
        fd = os.open(self.root / ".gc.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)  # releases the lock

    def ingest(self, path: Path) -> Recipe:
        """Chunk, compress new chunks, then write the recipe (last: it makes the artifact real)."""
        import zstandard as zstd

        recipe = chunk_file(path)
        cctx = zstd.ZstdCompressor(level=CHUNK_LEVEL)
        with self._gc_lock(exclusive=False), path.open("rb") as fh:
            for c in recipe.chunks:
                dest = self._chunk_path(c.sha256)
                if dest.exists():
                    continue
                fh.seek(c.offset)
                self._write(dest, cctx.compress(fh.read(c.length)))
            doc = recipe.to_dict()
            doc["zsizes"] = [self.chunk_size(c.sha256) for c in recipe.chunks]
            self._write(self._recipe_path(recipe.sha256), json.dumps(doc).encode())
        return recipe

    def has(self, sha256: str) -> bool:
        """Whether the artifact's recipe is stored."""
        try:
            return self._recipe_path(sha256).exists()
        except KeyError:
            return False

    def recipe(self, sha256: str) -> Recipe:
        """The stored recipe."""
        try:
            doc = json.loads(self._recipe_path(sha256).read_text())
        except FileNotFoundError:
            raise KeyError(sha256) from None
        doc.pop("zsizes", None)
        return Recipe.from_dict(doc)

    def chunk_size(self, chunk_sha256: str) -> int:
        """Compressed size of a chunk frame."""
        return self._chunk_path(chunk_sha256).stat().st_size

    def read_chunk(self, chunk_sha256: str) -> bytes:
        """The chunk's stored zstd frame."""
        return self._chunk_path(chunk_sha256).read_bytes()

    def materialize(self, sha256: str, out: Path) -> None:
        """Rebuild the original file (temp file, then rename)."""
        rec = self.recipe(sha256)
        whole = hashlib.sha256()
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=out.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                for c in rec.chunks:
                    data = decompress_frame(self.read_chunk(c.sha256), c.length)
                    if hashlib.sha256(data).hexdigest() != c.sha256:
                        raise ValueError(f"stored chunk {c.sha256} is damaged")
                    whole.update(data)
                    fh.write(data)
            if whole.hexdigest() != sha256:
                raise ValueError(f"artifact {sha256} does not rebuild to its hash")
            os.replace(tmp, out)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _blob(self, key: str) -> Path:
        if not key or len(key) > 200 or not set(key) <= BLOB_KEY_CHARS or key.startswith("."):
            raise KeyError(key)
        return self.root / "blobs" / key

    def put_blob(self, key: str, src: Path) -> None:
        """Move a file into the store under `key`."""
        self._dirs()
        os.replace(src, self._blob(key))

    def blob_path(self, key: str) -> Path | None:
        """The blob's path when it exists."""
        p = self._blob(key)
        return p if p.exists() else None

    def blob_dir(self) -> Path:
        """The directory blobs live in (a front proxy may serve wire blobs from it)."""
        return self.root / "blobs"

    def tmp_dir(self) -> Path:
        """Where derived files are written before put_blob (same filesystem)."""
        self._dirs()
        return self.root / "tmp"

    def _recipes(self) -> Iterator[Path]:
        d = self.root / "recipes"
        return d.glob("*.json") if d.exists() else iter(())

    def delete(self, sha256: str) -> None:
        """Remove the recipe, then every chunk no remaining recipe names.

        Waits for ingests in progress (in any process) to finish: see `_gc_lock`.
        """
        with self._lock, self._gc_lock(exclusive=True):
            self._recipe_path(sha256).unlink(missing_ok=True)
            live: set[str] = set()
            for p in self._recipes():
                live.update(c[0] for c in json.loads(p.read_text())["chunks"])
            chunks = self.root / "chunks"
            if chunks.exists():
                for shard in chunks.iterdir():
                    for f in shard.iterdir():
                        if f.name not in live:
                            f.unlink(missing_ok=True)
            # wire bodies of plans for this artifact (named after it, see wire_blob_key)
            blobs = self.root / "blobs"
            if blobs.exists():
                for f in blobs.glob(f"wire-{sha256}-*"):
                    f.unlink(missing_ok=True)

    def stats(self) -> dict[str, int]:
        """Logical bytes (sum of artifact sizes) against bytes stored (chunk frames)."""
        logical = sum(json.loads(p.read_text())["size"] for p in self._recipes())
        chunks = self.root / "chunks"
        stored = (
            sum(f.stat().st_size for f in chunks.rglob("*") if f.is_file())
            if chunks.exists()
            else 0
        )
        return {"logical_bytes": logical, "stored_bytes": stored}
