"""Artifact content shared by server and agent: chunking, deltas and transfer plans.

This package is neutral ground: the server builds recipes and plans with it, the agent
rebuilds artifacts with it. It imports nothing from custos but `custos.errors`, and does no
I/O beyond the local files it is handed.

Errors are `DomainError`s, so a server route maps them to a status without a table:
`MalformedError` (422) for documents or deltas that are not acceptable, `IntegrityError`
(422) for content whose hash does not match, `LimitExceeded` (413) for sizes over a limit.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from custos.errors import DomainError, Invalid, TooLarge

__all__ = [
    "MAX_ARTIFACT_BYTES",
    "ArtifactError",
    "IntegrityError",
    "LimitExceeded",
    "MalformedError",
]

# Software packages, not disk images: every size a document or a file claims is checked
# against this before anything is allocated or written.
MAX_ARTIFACT_BYTES = 4 << 30

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


class ArtifactError(DomainError):
    """Any refusal of the artifact layer."""


class MalformedError(ArtifactError, Invalid):
    """A recipe, plan, delta or range that is not well-formed or not consistent."""

    code = "malformed_artifact"


class IntegrityError(ArtifactError):
    """Content that does not hash to what it should (tampered, truncated, or the wrong base)."""

    status = 422
    code = "integrity_failed"

    def __init__(self, detail: str, *, wire_range: tuple[int, int] | None = None) -> None:
        super().__init__(detail)
        # The byte range [start, end) of the wire body that held the bad content, when one
        # frame is to blame: a downloader can fetch just that range again.
        self.wire_range = wire_range


class LimitExceeded(ArtifactError, TooLarge):
    """A size over one of the layer's limits."""

    code = "artifact_too_large"


def is_sha256_hex(value: object) -> bool:
    """Whether `value` is a lowercase hex SHA-256 digest."""
    return isinstance(value, str) and _SHA256_HEX.fullmatch(value) is not None


def check_sha256(value: object, what: str) -> str:
    """`value` if it is a lowercase hex SHA-256 digest, else MalformedError."""
    if not is_sha256_hex(value):
        raise MalformedError(f"{what} must be a lowercase hex SHA-256 digest")
    assert isinstance(value, str)
    return value


def check_int(value: object, what: str, low: int, high: int) -> int:
    """`value` if it is an int (not a bool) within [low, high], else MalformedError."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise MalformedError(f"{what} must be an integer")
    if not low <= value <= high:
        raise MalformedError(f"{what} must be within [{low}, {high}], not {value}")
    return value


def canonical_json(doc: Any) -> bytes:
    """The one byte form of a JSON document (sorted keys, no spaces, ASCII)."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def file_sha256(path: Path, *, block: int = 1 << 20) -> tuple[int, str]:
    """(size, sha256 hex) of a file, read in blocks."""
    h = hashlib.sha256()
    size = 0
    with path.open("rb") as fh:
        buf = bytearray(block)
        view = memoryview(buf)
        while n := fh.readinto(buf):
            h.update(view[:n])
            size += n
    return size, h.hexdigest()


@contextmanager
def atomic_output(out_path: Path) -> Iterator[IO[bytes]]:
    """A temp file next to `out_path`, renamed over it only if the block succeeds."""
    out_path = Path(out_path)
    fd, tmp = tempfile.mkstemp(dir=out_path.parent, prefix=f".{out_path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            # what the device installs must survive a power cut right after the rename
            os.fsync(fh.fileno())
        os.replace(tmp, out_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
