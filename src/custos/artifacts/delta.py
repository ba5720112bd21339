"""Binary deltas between artifact versions: zstd with the old version as a raw dictionary and
long-distance matching, the technique of `zstd --patch-from`."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

MAX_DELTA_INPUT = 1024**3  # both files are held in memory while a delta is made or applied
DELTA_LEVEL = 19


class DeltaError(ValueError):
    """A delta that cannot be made or does not produce the expected file."""


def _window_log(size: int) -> int:
    log = 10
    while (1 << log) < size and log < 31:
        log += 1
    return max(log, 20)


def _read(path: Path, what: str) -> bytes:
    size = path.stat().st_size
    if size > MAX_DELTA_INPUT:
        raise DeltaError(f"the {what} is larger than {MAX_DELTA_INPUT} bytes: no delta")
    return path.read_bytes()


def make_delta(base: Path, target: Path, out: Path, level: int = DELTA_LEVEL) -> int:
    """Write the delta that turns `base` into `target`; returns its size."""
    import zstandard as zstd

    old, new = _read(base, "base"), _read(target, "target")
    wlog = _window_log(len(old) + len(new))
    # match tables sized to the base, as `zstd --patch-from` does: with the level's own
    # (smaller) tables most of a large base is never indexed and the delta is 100x larger.
    # Costs ~(4 << hash_log) + (4 << chain_log) bytes of memory while it runs.
    params = zstd.ZstdCompressionParameters.from_level(
        level,
        source_size=len(new),
        window_log=wlog,
        hash_log=min(max(wlog - 2, 17), 26),
        chain_log=min(max(wlog - 1, 17), 27),
        enable_ldm=True,
    )
    cdict = zstd.ZstdCompressionDict(old, dict_type=zstd.DICT_TYPE_RAWCONTENT)
    data = zstd.ZstdCompressor(dict_data=cdict, compression_params=params).compress(new)
    _write_atomic(out, data)
    return len(data)


def apply_delta(base: Path, delta: Path, out: Path, expected_sha256: str) -> None:
    """Rebuild the target from `base` and the delta; DeltaError unless its hash is expected."""
    import zstandard as zstd

    old = _read(base, "base")
    ddict = zstd.ZstdCompressionDict(old, dict_type=zstd.DICT_TYPE_RAWCONTENT)
    dctx = zstd.ZstdDecompressor(dict_data=ddict, max_window_size=1 << 31)
    raw = _read(delta, "delta")
    try:
        declared = zstd.get_frame_parameters(raw).content_size
    except zstd.ZstdError as exc:
        raise DeltaError(f"the delta is not a zstd frame: {exc}") from None
    # zstd trusts a declared size over max_output_size: check it before decompressing
    if declared > MAX_DELTA_INPUT:
        raise DeltaError(f"the delta would expand to {declared} bytes")
    try:
        data = dctx.decompress(raw, max_output_size=MAX_DELTA_INPUT)
    except zstd.ZstdError as exc:
        raise DeltaError(f"the delta does not apply: {exc}") from None
    if hashlib.sha256(data).hexdigest() != expected_sha256:
        raise DeltaError("the rebuilt file does not have the expected sha256")
    _write_atomic(out, data)


def _write_atomic(out: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
