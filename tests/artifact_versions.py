"""Artifact versions for the artifact, store and transfer tests: v2 is v1 with ~1 % edited."""

from __future__ import annotations

import random


def make_versions(size: int = 1_500_000, seed: int = 2) -> tuple[bytes, bytes]:
    """v1: source-like text with some binary blocks; v2: ~1 % of it edited in six places."""
    rng = random.Random(seed)
    words = [f"{a}_{b}" for a in ("get", "set", "load", "parse", "emit") for b in range(40)]
    parts: list[bytes] = []
    total = 0
    while total < size:
        if rng.random() < 0.1:
            part = rng.randbytes(rng.randint(2_000, 20_000))
        else:
            name, arg = rng.choice(words), rng.choice(words)
            part = (
                f"def {name}({arg}, limit={rng.randint(0, 999)}):\n"
                f"    return {arg}.{rng.choice(words)}(limit) + {rng.randint(0, 99)}\n\n"
            ).encode()
        parts.append(part)
        total += len(part)
    v1 = b"".join(parts)[:size]
    v2 = bytearray(v1)
    for i in range(6):
        at = rng.randrange(0, len(v2) - 3_000)
        new = b"".join(f"    x_{i}_{k} = {rng.random()}\n".encode() for k in range(100))[:2_500]
        if i % 2:
            v2[at:at] = new
        else:
            v2[at : at + len(new)] = new
    return v1, bytes(v2)
