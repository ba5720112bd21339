"""Transfer plans: how a device rebuilds an artifact from a base it holds and a wire body.

`chunks`: the wire body is the target's chunks that the base lacks, each an independent
zstd frame, back to back; every piece of the target comes either from the base (offset,
length) or from the wire (offset, compressed length). With no base every piece comes from
the wire: a compressed full download. `delta`: the wire body is a patch-from delta
against the base. The body is deterministic, so a download resumes at any byte.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from custos.artifacts.chunking import MAX_ARTIFACT_BYTES, MAX_CHUNK, MAX_CHUNKS, decompress_frame
from custos.artifacts.delta import DeltaError, apply_delta

SHA_RE = re.compile(r"^[0-9a-f]{64}$")
KINDS = ("chunks", "delta")


class PlanError(ValueError):
    """A plan that is malformed, or a rebuild that does not verify."""


@dataclass(frozen=True)
class Piece:
    """Part of the target: from the base (`src` "b") or from the wire (`src` "w")."""

    src: str
    offset: int  # in the base, or in the wire body
    length: int  # raw bytes in the target
    sha256: str
    zlength: int = 0  # bytes on the wire (wire pieces)


@dataclass(frozen=True)
class Plan:
    """What a device downloads and how it rebuilds the target from it."""

    kind: str
    target_sha256: str
    target_size: int
    base_sha256: str | None
    wire_size: int
    wire_sha256: str
    pieces: tuple[Piece, ...] = field(default=())

    @property
    def id(self) -> str:
        """Deterministic: the sha256 of the canonical document without the id."""
        return hashlib.sha256(_canonical(self._doc())).hexdigest()

    def _doc(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "target_sha256": self.target_sha256,
            "target_size": self.target_size,
            "base_sha256": self.base_sha256,
            "wire_size": self.wire_size,
            "wire_sha256": self.wire_sha256,
            "pieces": [[p.src, p.offset, p.length, p.sha256, p.zlength] for p in self.pieces],
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-able, with its id."""
        return {"id": self.id, **self._doc()}

    @classmethod
    def from_dict(cls, doc: Any) -> Plan:
        """Validate a plan document from the network (PlanError with the reason)."""
        if not isinstance(doc, dict):
            raise PlanError("a plan is an object")
        kind = doc.get("kind")
        if kind not in KINDS:
            raise PlanError("unknown plan kind")
        tsha, base, wsha = doc.get("target_sha256"), doc.get("base_sha256"), doc.get("wire_sha256")
        for v in (tsha, wsha):
            if not isinstance(v, str) or not SHA_RE.match(v):
                raise PlanError("bad sha256 in plan")
        if base is not None and (not isinstance(base, str) or not SHA_RE.match(base)):
            raise PlanError("bad base sha256 in plan")
        tsize, wsize = doc.get("target_size"), doc.get("wire_size")
        for v in (tsize, wsize):
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= MAX_ARTIFACT_BYTES:
                raise PlanError("bad size in plan")
        raw = doc.get("pieces")
        if not isinstance(raw, list) or len(raw) > MAX_CHUNKS:
            raise PlanError("bad piece list")
        pieces, total, wire_at = [], 0, 0
        for item in raw:
            if not (
                isinstance(item, list)
                and len(item) == 5
                and item[0] in ("b", "w")
                and all(isinstance(x, int) and not isinstance(x, bool) for x in item[1:3])
                and isinstance(item[4], int)
                and isinstance(item[3], str)
                and SHA_RE.match(item[3])
                and 0 < item[2] <= MAX_CHUNK
                and 0 <= item[1] <= MAX_ARTIFACT_BYTES
            ):
                raise PlanError("bad piece in plan")
            if item[0] == "w":
                if item[1] != wire_at or not 0 < item[4] <= 2 * MAX_CHUNK:
                    raise PlanError("wire pieces must follow each other")
                wire_at += item[4]
            elif base is None:
                raise PlanError("a base piece in a plan without a base")
            pieces.append(Piece(item[0], item[1], item[2], item[3], item[4]))
            total += item[2]
        if kind == "chunks" and (total != tsize or wire_at != wsize):
            raise PlanError("the pieces do not add up")
        if kind == "delta" and (base is None or pieces):
            raise PlanError("a delta plan names its base and has no pieces")
        assert isinstance(tsize, int) and isinstance(wsize, int)
        plan = cls(str(kind), str(tsha), tsize, base, wsize, str(wsha), tuple(pieces))
        if "id" in doc and doc["id"] != plan.id:
            raise PlanError("the plan id does not match its content")
        return plan


def _canonical(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def reconstruct(plan: Plan, base: Path | None, wire: Path, out: Path) -> None:
    """Rebuild the target into `out`, checking every piece and the whole (PlanError if not)."""
    if plan.base_sha256 is not None and base is None:
        raise PlanError("this plan needs the base version")
    if wire.stat().st_size != plan.wire_size:
        raise PlanError("the wire body does not have the planned size")
    if plan.kind == "delta":
        assert base is not None
        try:
            apply_delta(base, wire, out, plan.target_sha256)
        except DeltaError as exc:
            raise PlanError(str(exc)) from None
        return

    whole = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=out.parent)
    try:
        with (
            os.fdopen(fd, "wb") as dst,
            wire.open("rb") as w,
            base.open("rb") if base is not None else open(os.devnull, "rb") as b,
        ):
            for p in plan.pieces:
                if p.src == "b":
                    b.seek(p.offset)
                    data = b.read(p.length)
                else:
                    w.seek(p.offset)
                    try:
                        data = decompress_frame(w.read(p.zlength), p.length)
                    except ValueError as exc:
                        raise PlanError(f"a wire piece does not decompress: {exc}") from None
                if len(data) != p.length or hashlib.sha256(data).hexdigest() != p.sha256:
                    raise PlanError(f"a piece at {p.offset} does not match its sha256")
                whole.update(data)
                dst.write(data)
        if whole.hexdigest() != plan.target_sha256:
            raise PlanError("the rebuilt file does not have the expected sha256")
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
