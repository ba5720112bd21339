"""Content-defined chunking of artifacts (FastCDC), so that versions share most chunks."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# 16/64/256 KiB: on a 50 MB tarball with a 1 % scattered edit, smaller chunks resend a
# little less but cost a longer plan and more per-chunk overhead; 64 KiB averages keep a
# 4 GiB artifact under 70,000 chunks
MIN_CHUNK = 16 * 1024
AVG_CHUNK = 64 * 1024
MAX_CHUNK = 256 * 1024
MAX_ARTIFACT_BYTES = 8 * 1024**3
MAX_CHUNKS = MAX_ARTIFACT_BYTES // MIN_CHUNK + 1
SHA_RE = re.compile(r"^[0-9a-f]{64}$")
READ_BLOCK = 16 * 1024 * 1024


class RecipeError(ValueError):
    """A recipe that does not describe a file."""


@dataclass(frozen=True)
class Chunk:
    """One chunk of a file: its hash, where it starts, how long it is."""

    sha256: str
    offset: int
    length: int


@dataclass(frozen=True)
class Recipe:
    """A file as an ordered list of chunks."""

    size: int
    sha256: str
    chunks: tuple[Chunk, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: chunks as [sha, length] pairs (offsets follow from the lengths)."""
        return {
            "size": self.size,
            "sha256": self.sha256,
            "chunks": [[c.sha256, c.length] for c in self.chunks],
        }

    @classmethod
    def from_dict(cls, doc: Any) -> Recipe:
        """Validate a recipe document (RecipeError with the reason)."""
        if not isinstance(doc, dict):
            raise RecipeError("a recipe is an object")
        size, sha, raw = doc.get("size"), doc.get("sha256"), doc.get("chunks")
        if not isinstance(size, int) or not 0 <= size <= MAX_ARTIFACT_BYTES:
            raise RecipeError("bad recipe size")
        if not isinstance(sha, str) or not SHA_RE.match(sha):
            raise RecipeError("bad recipe sha256")
        if not isinstance(raw, list) or len(raw) > MAX_CHUNKS:
            raise RecipeError("bad recipe chunk list")
        chunks, offset = [], 0
        for item in raw:
            if (
                not isinstance(item, list)
                or len(item) != 2
                or not isinstance(item[0], str)
                or not SHA_RE.match(item[0])
                or not isinstance(item[1], int)
                or not 0 < item[1] <= MAX_CHUNK
            ):
                raise RecipeError("bad recipe chunk")
            chunks.append(Chunk(item[0], offset, item[1]))
            offset += item[1]
        if offset != size:
            raise RecipeError("the chunks do not add up to the size")
        return cls(size, sha, tuple(chunks))


def chunk_file(path: Path) -> Recipe:
    """Split a file into content-defined chunks, hashing each and the whole, in one pass."""
    from fastcdc import fastcdc

    size = path.stat().st_size
    if size > MAX_ARTIFACT_BYTES:
        raise RecipeError(f"artifacts are at most {MAX_ARTIFACT_BYTES} bytes")
    if size == 0:  # fastcdc maps the file, and an empty file cannot be mapped
        return Recipe(0, hashlib.sha256().hexdigest(), ())
    whole = hashlib.sha256()
    chunks: list[Chunk] = []
    for c in fastcdc(str(path), MIN_CHUNK, AVG_CHUNK, MAX_CHUNK, fat=True):
        data = bytes(c.data)
        whole.update(data)
        chunks.append(Chunk(hashlib.sha256(data).hexdigest(), c.offset, c.length))
    if sum(c.length for c in chunks) != size:
        raise RecipeError("the file changed while it was being chunked")
    return Recipe(size, whole.hexdigest(), tuple(chunks))


def decompress_frame(frame: bytes, length: int) -> bytes:
    """One zstd frame that must hold exactly `length` bytes (ValueError otherwise).

    The frame's declared size is checked before anything is decompressed: zstd trusts a
    declared size over `max_output_size`, so a hostile frame could otherwise expand to
    gigabytes. Bytes after the frame are refused too.
    """
    import zstandard as zstd

    try:
        params = zstd.get_frame_parameters(frame)
    except zstd.ZstdError as exc:
        raise ValueError(f"not a zstd frame: {exc}") from None
    if params.content_size != length:
        raise ValueError(f"the frame declares {params.content_size} bytes, not {length}")
    if params.window_size > 8 * MAX_CHUNK:
        raise ValueError("the frame asks for a larger window than a chunk needs")
    dobj = zstd.ZstdDecompressor(max_window_size=8 * MAX_CHUNK).decompressobj()
    try:
        data = dobj.decompress(frame)
    except zstd.ZstdError as exc:
        raise ValueError(f"the frame does not decompress: {exc}") from None
    if len(data) != length or not dobj.eof or dobj.unused_data:
        raise ValueError("the frame is truncated or followed by other bytes")
    return data
