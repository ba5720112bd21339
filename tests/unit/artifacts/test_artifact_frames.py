"""Chunk frames from the wire or the store are bounded before they are decompressed."""

from __future__ import annotations

import pytest
import zstandard as zstd

from custos.artifacts.chunking import decompress_frame
from custos.software.transfer import parse_range


def test_a_frame_must_declare_exactly_its_chunk_length() -> None:
    data = b"abc" * 1000
    frame = zstd.ZstdCompressor(level=3).compress(data)
    assert decompress_frame(frame, len(data)) == data
    # a frame that would expand far beyond its piece is refused before decompressing
    bomb = zstd.ZstdCompressor(level=1).compress(b"\0" * (64 * 1024 * 1024))
    with pytest.raises(ValueError, match="declares"):
        decompress_frame(bomb, 1000)
    with pytest.raises(ValueError, match="declares"):
        decompress_frame(frame, len(data) - 1)
    with pytest.raises(ValueError, match="followed"):
        decompress_frame(frame + b"trailing", len(data))
    with pytest.raises(ValueError, match="not a zstd frame"):
        decompress_frame(b"not zstd at all", 10)


def test_unknown_range_units_get_the_whole_body() -> None:
    assert parse_range("items=0-1", 100) is None
    assert parse_range("bytes=0-9", 100) == (0, 10)
