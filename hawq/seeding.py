"""Stable seeds: every random start vector, probe and shuffle is a pure function of its name.

``derive_seed(seed, *parts)`` turns a base seed and a path of names/indices into a 63-bit
integer via SHA-256 (not Python's salted ``hash``), so the same ``(seed, *parts)`` gives the
same ``torch.Generator`` stream on every process and machine. Used for the eigen start vectors
(``"eig", block``), the Hutchinson probes (``"probe", p``) and QAT data orders (``"qat-data", g``).
"""

from __future__ import annotations

import hashlib


def derive_seed(seed: int, *parts: str | int) -> int:
    """Stable seed in ``[0, 2**63)`` from ``seed`` and a path of names/indices (SHA-256)."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {type(seed).__name__}")
    tokens = [f"i:{seed}"]
    for part in parts:
        if isinstance(part, bool) or not isinstance(part, str | int):
            raise ValueError(f"seed parts must be str or int, got {type(part).__name__}")
        tokens.append(f"s:{part}" if isinstance(part, str) else f"i:{part}")
    digest = hashlib.sha256("\x1f".join(tokens).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1
