"""Transfer planning and ranged streaming of a plan's wire body (see custos.artifacts.plan)."""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import json
import logging
import os
import re
import tempfile
import threading
from collections.abc import AsyncIterator
from pathlib import Path

from custos.artifacts.delta import DeltaError, make_delta
from custos.artifacts.plan import Piece, Plan
from custos.packaging.inspect import sha256_file
from custos.software.store import LocalArtifactStore

log = logging.getLogger(__name__)

PIECE_BYTES = 1024 * 1024  # about what one yield of the stream carries
# a delta is tried only when the chunk plan still sends more than this share of the target
DELTA_WORTH_TRYING = 0.002
_RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")


class RangeError(ValueError):
    """A Range header that cannot be satisfied (416)."""


def parse_range(value: str, size: int) -> tuple[int, int] | None:
    """`bytes=a-b`, `bytes=a-`, `bytes=-n` -> [start, end); None to send everything.

    Several ranges at once are answered with the whole body (allowed by RFC 9110).
    """
    value = value.strip()
    if "," in value or not value.lower().startswith("bytes="):
        return None  # several ranges, or a unit we do not serve: the whole body (RFC 9110)
    m = _RANGE_RE.match(value)
    if not m or (not m.group(1) and not m.group(2)):
        raise RangeError(f"cannot read the range {value[:100]!r}")
    if not m.group(1):
        n = int(m.group(2))
        if n == 0:
            raise RangeError("an empty suffix range")
        return max(0, size - n), size
    start = int(m.group(1))
    end = int(m.group(2)) + 1 if m.group(2) else size
    if start >= size or end <= start:
        raise RangeError(f"the range starts beyond the body ({size} bytes)")
    return start, min(end, size)


class TransferPlanner:
    """Makes plans (chunks, or a delta when smaller), keeps them in the store, streams them."""

    def __init__(self, store: LocalArtifactStore) -> None:
        self.store = store
        self._deltas: dict[tuple[str, str], asyncio.Future[Path | None]] = {}

    async def plan(self, target_sha: str, base_sha: str | None) -> Plan:
        """The cheapest plan from this base (or from nothing); saved so any process serves it."""
        plan = await asyncio.to_thread(self._chunk_plan, target_sha, base_sha)
        if base_sha is not None and plan.wire_size > DELTA_WORTH_TRYING * plan.target_size:
            delta = await self._delta(base_sha, target_sha)
            if delta is not None:
                size = delta.stat().st_size
                if size < plan.wire_size:
                    plan = Plan(
                        "delta",
                        target_sha,
                        plan.target_size,
                        base_sha,
                        size,
                        await asyncio.to_thread(sha256_file, delta),
                    )
        await asyncio.to_thread(self._save, plan)
        return plan

    def _chunk_plan(self, target_sha: str, base_sha: str | None) -> Plan:
        target = self.store.recipe(target_sha)
        in_base: dict[str, int] = {}
        if base_sha is not None:
            for c in self.store.recipe(base_sha).chunks:
                in_base.setdefault(c.sha256, c.offset)
        pieces, wire_at = [], 0
        wire_hash = hashlib.sha256()
        for c in target.chunks:
            if c.sha256 in in_base:
                pieces.append(Piece("b", in_base[c.sha256], c.length, c.sha256))
                continue
            frame = self.store.read_chunk(c.sha256)
            wire_hash.update(frame)
            pieces.append(Piece("w", wire_at, c.length, c.sha256, len(frame)))
            wire_at += len(frame)
        return Plan(
            "chunks",
            target_sha,
            target.size,
            base_sha if any(p.src == "b" for p in pieces) else None,
            wire_at,
            wire_hash.hexdigest(),
            tuple(pieces),
        )

    async def _delta(self, base_sha: str, target_sha: str) -> Path | None:
        """The cached delta, computed once per process (None when it cannot be made)."""
        key = f"delta-{base_sha}-{target_sha}"
        path = self.store.blob_path(key)
        if path is not None:
            return path
        pending = self._deltas.get((base_sha, target_sha))
        if pending is not None:
            return await asyncio.shield(pending)
        fut: asyncio.Future[Path | None] = asyncio.get_running_loop().create_future()
        self._deltas[(base_sha, target_sha)] = fut
        try:
            result = await asyncio.to_thread(self._make_delta, base_sha, target_sha, key)
            fut.set_result(result)
            return result
        except Exception as exc:
            fut.set_result(None)
            log.warning("software: no delta %s -> %s: %s", base_sha[:12], target_sha[:12], exc)
            return None
        finally:
            del self._deltas[(base_sha, target_sha)]

    def _make_delta(self, base_sha: str, target_sha: str, key: str) -> Path | None:
        # unique names: another server process may be making the same delta right now
        tmp, tag = self.store.tmp_dir(), f"{os.getpid()}.{threading.get_ident()}"
        base, target, out = (tmp / f"{key}.{tag}.{n}" for n in ("base", "target", "out"))
        try:
            self.store.materialize(base_sha, base)
            self.store.materialize(target_sha, target)
            try:
                make_delta(base, target, out)
            except DeltaError:
                return None
            self.store.put_blob(key, out)
        finally:
            for p in (base, target, out):
                p.unlink(missing_ok=True)
        return self.store.blob_path(key)

    def _save(self, plan: Plan) -> None:
        # a unique temp file: concurrent requests for the same plan each save it
        fd, name = tempfile.mkstemp(prefix=f"plan-{plan.id}.", dir=self.store.tmp_dir())
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(plan.to_dict()))
        self.store.put_blob(f"plan-{plan.id}", Path(name))

    async def load_plan(self, plan_id: str) -> Plan:
        """A saved plan (KeyError when unknown)."""
        if not re.fullmatch(r"[0-9a-f]{64}", plan_id):
            raise KeyError(plan_id)
        path = self.store.blob_path(f"plan-{plan_id}")
        if path is None:
            raise KeyError(plan_id)
        doc = json.loads(await asyncio.to_thread(path.read_text))
        return Plan.from_dict(doc)

    def _read_frames(self, pieces: list[Piece]) -> list[bytes]:
        return [self.store.read_chunk(p.sha256) for p in pieces]

    async def iter_wire(self, plan: Plan, start: int, end: int) -> AsyncIterator[bytes]:
        """Bytes [start, end) of the plan's wire body, in pieces of about PIECE_BYTES."""
        if plan.kind == "delta":
            path = self.store.blob_path(f"delta-{plan.base_sha256}-{plan.target_sha256}")
            if path is None:
                raise KeyError("the delta is gone")
            async for part in _file_range(path, start, end):
                yield part
            return
        wire = [p for p in plan.pieces if p.src == "w"]
        starts = [p.offset for p in wire]
        i = max(0, bisect.bisect_right(starts, start) - 1)
        pos = start
        while pos < end and i < len(wire):
            # consecutive frames read in one thread hop and sent as one piece: per-piece
            # overhead (a thread hop, an ASGI message, a socket write) dominates otherwise
            batch: list[Piece] = []
            size = 0
            while i < len(wire) and size < PIECE_BYTES and wire[i].offset < end:
                batch.append(wire[i])
                size += wire[i].zlength
                i += 1
            frames = await asyncio.to_thread(self._read_frames, batch)
            body = b"".join(frames)
            first = batch[0].offset
            data = body[pos - first : min(end, first + len(body)) - first]
            if data:
                yield data
            pos = first + len(body)


async def _file_range(path: Path, start: int, end: int) -> AsyncIterator[bytes]:
    def read(fh_offset: int, n: int) -> bytes:
        with path.open("rb") as fh:
            fh.seek(fh_offset)
            return fh.read(n)

    pos = start
    while pos < end:
        data = await asyncio.to_thread(read, pos, min(PIECE_BYTES, end - pos))
        if not data:
            return
        yield data
        pos += len(data)
