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
from collections import OrderedDict
from collections.abc import AsyncIterator
from pathlib import Path

from custos.artifacts.delta import DeltaError, make_delta
from custos.artifacts.plan import Piece, Plan
from custos.packaging.inspect import sha256_file
from custos.server.protocols import FileSegment
from custos.software.store import LocalArtifactStore, wire_blob_key

log = logging.getLogger(__name__)

PIECE_BYTES = 1024 * 1024  # about what one yield of the stream carries
PLAN_CACHE_PIECES = 500_000  # pieces of recently served plans kept parsed (~100 MB at most)
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
        self._wires: dict[str, asyncio.Future[Path]] = {}
        self._writing: dict[str, asyncio.Task[None]] = {}  # wire files written in the background
        self._plans: OrderedDict[str, Plan] = OrderedDict()
        self._plan_pieces = 0

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
        plan_id = await asyncio.to_thread(self._save, plan)
        self._remember(plan_id, plan)
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
            out.chmod(0o640)  # as wire files: a front nginx in the server's group sends it
            self.store.put_blob(key, out)
        finally:
            for p in (base, target, out):
                p.unlink(missing_ok=True)
        return self.store.blob_path(key)

    def _save(self, plan: Plan) -> str:
        # a unique temp file: concurrent requests for the same plan each save it
        doc = plan.to_dict()
        fd, name = tempfile.mkstemp(prefix=f"plan-{doc['id']}.", dir=self.store.tmp_dir())
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(doc))
        self.store.put_blob(f"plan-{doc['id']}", Path(name))
        return str(doc["id"])

    async def load_plan(self, plan_id: str) -> Plan:
        """A saved plan (KeyError when unknown); recently used ones come from memory."""
        if not re.fullmatch(r"[0-9a-f]{64}", plan_id):
            raise KeyError(plan_id)
        plan = self._plans.get(plan_id)
        if plan is not None:
            self._plans.move_to_end(plan_id)
            return plan
        plan = await asyncio.to_thread(self._read_plan, plan_id)
        self._remember(plan_id, plan)
        return plan

    def _read_plan(self, plan_id: str) -> Plan:
        path = self.store.blob_path(f"plan-{plan_id}")
        if path is None:
            raise KeyError(plan_id)
        plan = Plan.from_dict(json.loads(path.read_text()))
        if plan.id != plan_id:  # a plan document without its id, or a renamed file
            raise KeyError(plan_id)
        return plan

    def _remember(self, plan_id: str, plan: Plan) -> None:
        # a plan is immutable (its id is its hash): parsing and re-hashing one per download
        # was most of a download's CPU; the budget is in pieces, not plans (a 4 GiB
        # artifact's plan has some 70,000)
        if plan_id in self._plans:
            return
        self._plans[plan_id] = plan
        self._plan_pieces += len(plan.pieces) + 1
        while self._plan_pieces > PLAN_CACHE_PIECES and len(self._plans) > 1:
            _, old = self._plans.popitem(last=False)
            self._plan_pieces -= len(old.pieces) + 1

    def delta_path(self, plan: Plan) -> Path:
        """The stored delta a delta plan sends (KeyError when it is gone)."""
        path = self.store.blob_path(f"delta-{plan.base_sha256}-{plan.target_sha256}")
        if path is None:
            raise KeyError("the delta is gone")
        return path

    def stored_wire_file(self, plan: Plan, plan_id: str | None = None) -> Path | None:
        """The plan's wire body as one stored file, when there is one already.

        `plan_id` is the plan's id when the caller has it (Plan.id hashes the whole plan).
        """
        if plan.kind == "delta":
            return self.delta_path(plan)
        plan_id = plan_id or plan.id
        path = self.store.blob_path(wire_blob_key(plan.target_sha256, plan_id))
        if path is None:
            return None
        try:
            if path.stat().st_size == plan.wire_size:
                return path
        except FileNotFoundError:
            return None
        return None

    async def wire_file(self, plan: Plan, plan_id: str | None = None) -> Path:
        """The plan's wire body as one stored file, written once (a delta is one already).

        Every device with this plan (same target, same base chunks) shares the file; several
        server processes may write it at once, each to its own temp file, the rename wins.
        """
        plan_id = plan_id or plan.id
        path = await asyncio.to_thread(self.stored_wire_file, plan, plan_id)
        if path is not None:
            return path
        pending = self._wires.get(plan_id)
        if pending is not None:
            return await asyncio.shield(pending)
        fut: asyncio.Future[Path] = asyncio.get_running_loop().create_future()
        self._wires[plan_id] = fut
        try:
            path = await asyncio.to_thread(self._write_wire, plan, plan_id)
        except Exception as exc:
            fut.set_exception(exc)
            fut.exception()  # marked retrieved: waiters, if any, get it through shield
            raise
        except BaseException:
            fut.cancel()
            raise
        else:
            fut.set_result(path)
            return path
        finally:
            del self._wires[plan_id]

    async def ready_wire_file(self, plan: Plan, plan_id: str | None = None) -> Path | None:
        """The wire body as one stored file if it is there already; else None, and it is
        written in the background (once), so that no download waits for a whole copy."""
        plan_id = plan_id or plan.id
        path = await asyncio.to_thread(self.stored_wire_file, plan, plan_id)
        if path is None and plan_id not in self._writing:
            task = asyncio.get_running_loop().create_task(self._write_in_background(plan, plan_id))
            self._writing[plan_id] = task
            task.add_done_callback(lambda _: self._writing.pop(plan_id, None))
        return path

    async def _write_in_background(self, plan: Plan, plan_id: str) -> None:
        try:
            await self.wire_file(plan, plan_id)
        except Exception as exc:
            log.warning("software: cannot write the wire file of plan %s: %s", plan_id[:12], exc)

    def _write_wire(self, plan: Plan, plan_id: str) -> Path:
        key = wire_blob_key(plan.target_sha256, plan_id)
        fd, name = tempfile.mkstemp(prefix=f"{key}.", dir=self.store.tmp_dir())
        try:
            # group-readable: a front nginx in the server's group may send it (x-accel)
            os.fchmod(fd, 0o640)
            digest, size = hashlib.sha256(), 0
            with os.fdopen(fd, "wb") as fh:
                for p in plan.pieces:
                    if p.src != "w":
                        continue
                    frame = self.store.read_chunk(p.sha256)
                    if len(frame) != p.zlength:
                        raise ValueError(f"stored chunk {p.sha256} is not the planned size")
                    digest.update(frame)
                    fh.write(frame)
                    size += len(frame)
            if size != plan.wire_size or digest.hexdigest() != plan.wire_sha256:
                raise ValueError(f"the wire body of plan {plan_id} does not match its plan")
            self.store.put_blob(key, Path(name))
        except BaseException:
            Path(name).unlink(missing_ok=True)
            raise
        path = self.store.blob_path(key)
        if path is None:
            raise KeyError(f"the wire body of plan {plan_id} vanished")
        return path

    def wire_segments(
        self, plan: Plan, start: int, end: int, whole: Path | None = None
    ) -> list[FileSegment]:
        """Bytes [start, end) of the wire body as byte ranges of stored files.

        From `whole` (the wire body as one file) when given, else from the chunk frames.
        """
        if whole is None and plan.kind == "delta":
            whole = self.delta_path(plan)
        if whole is not None:
            return [FileSegment(str(whole), start, end - start)] if end > start else []
        wire = [p for p in plan.pieces if p.src == "w"]
        i = max(0, bisect.bisect_right([p.offset for p in wire], start) - 1)
        out: list[FileSegment] = []
        while i < len(wire) and wire[i].offset < end:
            p = wire[i]
            lo, hi = max(start, p.offset), min(end, p.offset + p.zlength)
            if hi > lo:
                path = str(self.store.chunk_path(p.sha256))
                out.append(FileSegment(path, lo - p.offset, hi - lo))
            i += 1
        return out

    def _read_frames(self, pieces: list[Piece]) -> list[bytes]:
        return [self.store.read_chunk(p.sha256) for p in pieces]

    async def iter_wire(self, plan: Plan, start: int, end: int) -> AsyncIterator[bytes]:
        """Bytes [start, end) of the plan's wire body, in pieces of about PIECE_BYTES."""
        if plan.kind == "delta":
            async for part in _file_range(self.delta_path(plan), start, end):
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
