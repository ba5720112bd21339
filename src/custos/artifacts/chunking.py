"""Content-defined chunking of artifacts (FastCDC), so that versions share most chunks.

A `Recipe` lists a file's chunks in order. Chunk boundaries depend only on the bytes near
them, so an edit changes the chunks it touches and leaves the others as they were, even
when it shifts everything after it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import zstandard
from fastcdc import fastcdc

from custos.artifacts import (
    MAX_ARTIFACT_BYTES,
    IntegrityError,
    LimitExceeded,
    MalformedError,
    check_int,
    check_sha256,
)

# 16/64/256 KiB, measured on a 50 MB tarball of real site-packages with 1 % of its bytes
# edited in ~130 files (bench/b6.py's data): 4/16/64 KiB leaves 6.6 % of the chunks new
# (0.97 MB compressed to resend), 16/64/256 leaves 16.6 % (2.0 MB), 32/128/512 leaves
# 23 % (2.5 MB). Smaller chunks resend less but compress worse on their own (whole file in
# independent frames: 25.4 % at 16 KiB against 22.5 % at 64 KiB), make plans four times
# longer (a full download of a 4 GiB artifact would list 260,000 pieces) and put four times
# as many files in the store. Upgrades normally travel as deltas, which do not depend on
# the chunk size; chunks serve fresh installs and dedup, where 64 KiB is the better side.
MIN_CHUNK = 16 * 1024
AVG_CHUNK = 64 * 1024
MAX_CHUNK = 256 * 1024

# Limits for recipes read from disk or the network: chunk lengths up to 1 MiB (room for a
# later change of the chunker's parameters), and never more chunks than min-size chunks.
MAX_CHUNK_BYTES = 1024 * 1024
MAX_CHUNKS = MAX_ARTIFACT_BYTES // MIN_CHUNK + 1
RECIPE_VERSION = 1

# Each chunk is compressed on its own; a frame never needs a larger window than the chunk.
_FRAME_WINDOW_MAX = 1 << 21
READ_BLOCK = 4 * 1024 * 1024  # bytes read per step; the chunker holds at most this + 256 KiB


@dataclass(frozen=True, slots=True)
class ChunkRef:
    """One chunk of a file: its sha256, where it starts, how long it is."""

    sha256: str
    offset: int
    length: int


@dataclass(frozen=True)
class Recipe:
    """A file as the ordered list of its chunks."""

    size: int
    sha256: str
    chunks: tuple[ChunkRef, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form; chunks are [offset, length, sha256] triples (compact, ordered)."""
        return {
            "version": RECIPE_VERSION,
            "size": self.size,
            "sha256": self.sha256,
            "chunks": [[c.offset, c.length, c.sha256] for c in self.chunks],
        }

    @classmethod
    def from_dict(cls, doc: object) -> Recipe:
        """Validate a recipe document; MalformedError or LimitExceeded with the reason."""
        if not isinstance(doc, dict):
            raise MalformedError("a recipe is a JSON object")
        if set(doc) != {"version", "size", "sha256", "chunks"}:
            raise MalformedError("a recipe has exactly: version, size, sha256, chunks")
        if doc["version"] != RECIPE_VERSION:
            raise MalformedError(f"unknown recipe version {doc['version']!r}")
        size = doc["size"]
        if isinstance(size, int) and not isinstance(size, bool) and size > MAX_ARTIFACT_BYTES:
            raise LimitExceeded(f"artifacts are at most {MAX_ARTIFACT_BYTES} bytes")
        size = check_int(size, "recipe size", 0, MAX_ARTIFACT_BYTES)
        sha = check_sha256(doc["sha256"], "recipe sha256")
        raw = doc["chunks"]
        if not isinstance(raw, list):
            raise MalformedError("recipe chunks must be a list")
        if len(raw) > MAX_CHUNKS:
            raise LimitExceeded(f"a recipe has at most {MAX_CHUNKS} chunks")
        chunks: list[ChunkRef] = []
        at = 0
        for i, item in enumerate(raw):
            if not isinstance(item, list) or len(item) != 3:
                raise MalformedError(f"recipe chunk {i} must be [offset, length, sha256]")
            offset = check_int(item[0], f"recipe chunk {i} offset", 0, MAX_ARTIFACT_BYTES)
            length = check_int(item[1], f"recipe chunk {i} length", 1, MAX_CHUNK_BYTES)
            if offset != at:
                raise MalformedError(
                    f"recipe chunk {i} starts at {offset}, the previous one ends at {at}"
                )
            chunks.append(ChunkRef(check_sha256(item[2], f"recipe chunk {i} sha256"), at, length))
            at += length
        if at != size:
            raise MalformedError(f"the chunks cover {at} bytes, the recipe says {size}")
        return cls(size, sha, tuple(chunks))


ChunkSink = Callable[[ChunkRef, memoryview], None]


def scan(fh: IO[bytes], on_chunk: ChunkSink | None = None) -> Recipe:
    """Chunk an open file in one streaming pass; `on_chunk` sees each chunk's bytes."""
    whole = hashlib.sha256()
    chunks: list[ChunkRef] = []
    buf = b""
    pos = 0  # file offset of buf[0]
    eof = False
    while True:
        if not eof:
            data = fh.read(READ_BLOCK)
            if data:
                whole.update(data)
                buf = buf + data if buf else data
                if pos + len(buf) > MAX_ARTIFACT_BYTES:
                    raise LimitExceeded(f"artifacts are at most {MAX_ARTIFACT_BYTES} bytes")
            else:
                eof = True
        if not buf:
            break
        view = memoryview(buf)
        used = 0
        for c in fastcdc(view, MIN_CHUNK, AVG_CHUNK, MAX_CHUNK):
            # A cut depends only on the bytes from the chunk's start up to MAX_CHUNK after
            # it, so a chunk is final once that much is buffered (or the file has ended);
            # the boundaries are the same as chunking the whole file at once.
            if not eof and c.offset + MAX_CHUNK > len(buf):
                break
            piece = view[c.offset : c.offset + c.length]
            ref = ChunkRef(hashlib.sha256(piece).hexdigest(), pos + c.offset, c.length)
            chunks.append(ref)
            if on_chunk is not None:
                on_chunk(ref, piece)
            used = c.offset + c.length
        buf = buf[used:]
        pos += used
        if eof and not buf:
            break
    return Recipe(pos, whole.hexdigest(), tuple(chunks))


def chunk_file(path: Path) -> Recipe:
    """The recipe of a file, read as a stream (never whole into memory)."""
    with Path(path).open("rb") as fh:
        return scan(fh)


def compress_chunk(cctx: zstandard.ZstdCompressor, data: bytes | memoryview) -> bytes:
    """One chunk as an independent zstd frame (content size in its header)."""
    return cctx.compress(data)


def decompress_chunk(frame: bytes, ref: ChunkRef | tuple[int, str], *, where: str = "") -> bytes:
    """A chunk frame's content, checked: one frame, the right length and sha256.

    `ref` is the chunk (or its (length, sha256)); IntegrityError names `where` on failure.
    """
    length, sha = (ref.length, ref.sha256) if isinstance(ref, ChunkRef) else ref
    label = where or f"chunk {sha[:12]}"
    try:
        params = zstandard.get_frame_parameters(frame)
    except zstandard.ZstdError as exc:
        raise IntegrityError(f"{label}: not a zstd frame ({exc})") from None
    # the declared size bounds the output before anything is decompressed
    if params.content_size != length:
        raise IntegrityError(f"{label}: the frame holds {params.content_size} bytes, not {length}")
    if params.window_size > _FRAME_WINDOW_MAX:
        raise IntegrityError(f"{label}: the frame asks for a {params.window_size}-byte window")
    dobj = zstandard.ZstdDecompressor(max_window_size=_FRAME_WINDOW_MAX).decompressobj()
    try:
        data = dobj.decompress(frame)
    except zstandard.ZstdError as exc:
        raise IntegrityError(f"{label}: the frame does not decompress ({exc})") from None
    if not dobj.eof or dobj.unused_data:
        raise IntegrityError(f"{label}: the frame is truncated or has bytes after it")
    if len(data) != length or hashlib.sha256(data).hexdigest() != sha:
        raise IntegrityError(f"{label}: the content does not match its sha256")
    return data
