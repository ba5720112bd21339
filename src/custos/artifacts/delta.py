"""Binary deltas between artifact versions, with `zstd --patch-from` semantics.

A delta is one zstd frame of the target compressed with the base as its prefix (raw
content the matches may point into), a window that covers both files and long-distance
matching, so the unchanged megabytes cost a few bytes each. Any zstd decoder rebuilds the
target given the same base as prefix (`zstd -d --patch-from=base`).

Why the cffi side of the `zstandard` package: its C-extension API takes a base only as a
dictionary, which libzstd turns into a CDict that long-distance matching cannot see (4.3
MB instead of 85 KB on bench/b6.py's 1 % edit of 50 MB); `ZSTD_CCtx_refPrefix` is what the
zstd CLI uses, and `zstandard.backend_cffi` exposes it from the same bundled libzstd.

Memory: the base is mapped, not read (page cache, not heap). Making a delta costs the
compressor's tables, about the base's size again at level 19 (the hash table is sized so
the whole base is indexed, see `_params`); applying one costs a window of about the
target's size. Both files are limited to `MAX_DELTA_BYTES` (1 GiB), beyond which a
LimitExceeded says so and the planner sends chunks instead.
"""

from __future__ import annotations

import hashlib
import mmap
import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import zstandard

from custos.artifacts import (
    ArtifactError,
    IntegrityError,
    LimitExceeded,
    MalformedError,
    atomic_output,
    check_sha256,
)

MAX_DELTA_BYTES = 1 << 30
DELTA_LEVEL = 19
_IO_BLOCK = 1 << 20


def _zstd() -> tuple[Any, Any]:
    """(ffi, lib) of libzstd, as bundled with `zstandard`."""
    try:
        from zstandard import backend_cffi
    except ImportError as exc:  # the cffi package missing from the environment
        raise ArtifactError(f"deltas need zstandard's cffi backend: {exc}") from None
    return backend_cffi.ffi, backend_cffi.lib


def _check(ffi: Any, lib: Any, ret: int, what: str, error: type[ArtifactError]) -> int:
    if lib.ZSTD_isError(ret):
        name = ffi.string(lib.ZSTD_getErrorName(ret)).decode(errors="replace")
        raise error(f"{what}: {name}")
    return ret


def window_log(base_size: int, target_size: int) -> int:
    """The window a delta uses: twice the larger file, so every match can reach the base."""
    return max(10, min(31, max(base_size, target_size, 1).bit_length() + 1))


def _params(level: int, base_size: int, target_size: int) -> dict[str, int]:
    """Compression parameters for a delta (libzstd parameter name -> value)."""
    wlog = window_log(base_size, target_size)
    cp = zstandard.ZstdCompressionParameters.from_level(
        level, source_size=max(target_size, 1), dict_size=base_size
    )
    # libzstd indexes only the last 2^max(hashLog+3, chainLog+1) bytes of a prefix in its
    # regular match finders; on a larger base, levels 16+ (optimal parsers) then lose most
    # matches (742 KB instead of 85 KB on the 50 MB benchmark with the bundled 1.5.7), so
    # the hash table grows until the whole base is indexed.
    hash_log = max(cp.hash_log, min(30, max(base_size, 1).bit_length() - 3))
    return {
        "ZSTD_c_compressionLevel": level,
        "ZSTD_c_windowLog": wlog,
        "ZSTD_c_hashLog": hash_log,
        "ZSTD_c_enableLongDistanceMatching": 1,  # ZSTD_ps_enable
        "ZSTD_c_checksumFlag": 1,
        "ZSTD_c_contentSizeFlag": 1,
    }


def _size_ok(path: Path, what: str) -> int:
    size = path.stat().st_size
    if size > MAX_DELTA_BYTES:
        raise LimitExceeded(f"the {what} is {size} bytes; deltas take at most {MAX_DELTA_BYTES}")
    return size


@contextmanager
def _mapped(ffi: Any, stack: ExitStack, path: Path | None) -> Iterator[tuple[Any, int]]:
    """(cffi pointer, size) of the base mapped read-only; (NULL, 0) for no or an empty base."""
    if path is None:
        yield ffi.NULL, 0
        return
    fh = stack.enter_context(Path(path).open("rb"))
    size = os.fstat(fh.fileno()).st_size
    if size == 0:
        yield ffi.NULL, 0
        return
    mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        with ffi.from_buffer(mm) as ptr:
            yield ptr, size
    finally:
        mm.close()


def make_delta(
    base_path: Path | None, target_path: Path, out_path: Path, level: int = DELTA_LEVEL
) -> int:
    """Write the delta that turns the base (None: nothing) into the target; its size."""
    if not 1 <= level <= 22:
        raise MalformedError(f"delta level must be 1-22, not {level}")
    ffi, lib = _zstd()
    target_path, out_path = Path(target_path), Path(out_path)
    base_size = _size_ok(Path(base_path), "base") if base_path is not None else 0
    target_size = _size_ok(target_path, "target")
    cctx = lib.ZSTD_createCCtx()
    if cctx == ffi.NULL:
        raise MemoryError("ZSTD_createCCtx")
    written = 0
    try:
        for name, value in _params(level, base_size, target_size).items():
            _check(ffi, lib, lib.ZSTD_CCtx_setParameter(cctx, getattr(lib, name), value),
                   name, ArtifactError)  # fmt: skip
        _check(ffi, lib, lib.ZSTD_CCtx_setPledgedSrcSize(cctx, target_size), "pledged size",
               ArtifactError)  # fmt: skip
        with ExitStack() as stack:
            base_ptr, mapped = stack.enter_context(
                _mapped(ffi, stack, Path(base_path) if base_path else None)
            )
            if mapped != base_size:
                raise IntegrityError("the base changed while the delta was being made")
            if mapped:
                _check(ffi, lib, lib.ZSTD_CCtx_refPrefix(cctx, base_ptr, mapped), "base prefix",
                       ArtifactError)  # fmt: skip
            src = stack.enter_context(target_path.open("rb"))
            out = stack.enter_context(atomic_output(out_path))
            inbuf = bytearray(_IO_BLOCK)
            in_ptr = stack.enter_context(ffi.from_buffer(inbuf))
            out_cap = lib.ZSTD_CStreamOutSize()
            out_mem = ffi.new("char[]", out_cap)
            zin = ffi.new("ZSTD_inBuffer *")
            zout = ffi.new("ZSTD_outBuffer *")
            seen = 0
            while True:
                n = src.readinto(inbuf)
                seen += n
                if seen > target_size:
                    raise IntegrityError("the target grew while the delta was being made")
                last = n == 0
                zin.src, zin.size, zin.pos = in_ptr, n, 0
                mode = lib.ZSTD_e_end if last else lib.ZSTD_e_continue
                while True:
                    zout.dst, zout.size, zout.pos = out_mem, out_cap, 0
                    left = _check(ffi, lib, lib.ZSTD_compressStream2(cctx, zout, zin, mode),
                                  "compressing the delta", ArtifactError)  # fmt: skip
                    out.write(ffi.buffer(out_mem, zout.pos))
                    written += zout.pos
                    if (last and left == 0) or (not last and zin.pos == zin.size):
                        break
                if last:
                    break
    finally:
        lib.ZSTD_freeCCtx(cctx)
    return written


def _frame_header(ffi: Any, lib: Any, head: bytes) -> tuple[int, int]:
    """(content size, window size) declared by a delta's frame header."""
    try:
        hdr = ffi.new("ZSTD_FrameHeader *")
    except ffi.error:  # the name before libzstd 1.5.7
        hdr = ffi.new("ZSTD_frameHeader *")
    ret = lib.ZSTD_getFrameHeader(hdr, head, len(head))
    if lib.ZSTD_isError(ret) or ret != 0 or hdr.frameType != lib.ZSTD_frame:
        raise MalformedError("the delta does not start with a zstd frame header")
    if hdr.frameContentSize >= lib.ZSTD_CONTENTSIZE_ERROR:
        raise MalformedError("the delta does not declare the size of its content")
    return int(hdr.frameContentSize), int(hdr.windowSize)


def apply_delta(
    base_path: Path | None,
    delta_path: Path,
    out_path: Path,
    expected_sha256: str,
    *,
    expected_size: int | None = None,
) -> None:
    """Rebuild the target from the base and a delta into `out_path`, verified by sha256.

    Writes a temp file renamed into place only when the output has the expected hash (and
    size); IntegrityError for a wrong base or a damaged delta, MalformedError for a delta
    that is not one frame, LimitExceeded for sizes over the limits.
    """
    expected_sha256 = check_sha256(expected_sha256, "expected sha256")
    ffi, lib = _zstd()
    delta_path, out_path = Path(delta_path), Path(out_path)
    base_size = _size_ok(Path(base_path), "base") if base_path is not None else 0
    with delta_path.open("rb") as probe:
        content_size, window = _frame_header(ffi, lib, probe.read(lib.ZSTD_FRAMEHEADERSIZE_MAX))
    if content_size > MAX_DELTA_BYTES:
        raise LimitExceeded(f"the delta rebuilds {content_size} bytes; at most {MAX_DELTA_BYTES}")
    if expected_size is not None and content_size != expected_size:
        raise IntegrityError(f"the delta rebuilds {content_size} bytes, not {expected_size}")
    # the window a real delta for these sizes uses, and no more: a hostile header cannot
    # make the decoder allocate gigabytes
    wlog = window_log(base_size, content_size)
    if window > 1 << wlog:
        raise MalformedError(f"the delta asks for a {window}-byte window")
    dctx = lib.ZSTD_createDCtx()
    if dctx == ffi.NULL:
        raise MemoryError("ZSTD_createDCtx")
    whole = hashlib.sha256()
    produced = 0
    try:
        _check(ffi, lib, lib.ZSTD_DCtx_setParameter(dctx, lib.ZSTD_d_windowLogMax, wlog),
               "window limit", ArtifactError)  # fmt: skip
        with ExitStack() as stack:
            base_ptr, mapped = stack.enter_context(
                _mapped(ffi, stack, Path(base_path) if base_path else None)
            )
            if mapped:
                _check(ffi, lib, lib.ZSTD_DCtx_refPrefix(dctx, base_ptr, mapped), "base prefix",
                       ArtifactError)  # fmt: skip
            src = stack.enter_context(delta_path.open("rb"))
            out = stack.enter_context(atomic_output(out_path))
            inbuf = bytearray(_IO_BLOCK)
            in_ptr = stack.enter_context(ffi.from_buffer(inbuf))
            out_cap = lib.ZSTD_DStreamOutSize()
            out_mem = ffi.new("char[]", out_cap)
            zin = ffi.new("ZSTD_inBuffer *")
            zout = ffi.new("ZSTD_outBuffer *")
            done = False
            while not done:
                n = src.readinto(inbuf)
                if n == 0:
                    raise IntegrityError("the delta is truncated")
                zin.src, zin.size, zin.pos = in_ptr, n, 0
                while zin.pos < zin.size or zout.pos == out_cap:
                    zout.dst, zout.size, zout.pos = out_mem, out_cap, 0
                    ret = _check(ffi, lib, lib.ZSTD_decompressStream(dctx, zout, zin),
                                 "the delta does not apply", IntegrityError)  # fmt: skip
                    if zout.pos:
                        chunk = ffi.buffer(out_mem, zout.pos)
                        produced += zout.pos
                        if produced > content_size:
                            raise IntegrityError("the delta rebuilds more than it declares")
                        whole.update(chunk)
                        out.write(chunk)
                    if ret == 0:
                        done = True
                        break
            if zin.pos < zin.size or src.read(1):
                raise MalformedError("the delta has bytes after its frame")
            if produced != content_size:
                raise IntegrityError(f"the delta rebuilt {produced} of {content_size} bytes")
            if whole.hexdigest() != expected_sha256:
                raise IntegrityError(
                    "the rebuilt file does not have the expected sha256 (wrong base?)"
                )
    finally:
        lib.ZSTD_freeDCtx(dctx)
