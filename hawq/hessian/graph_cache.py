"""Which batches keep their first-order graph: a prefix of the batches, while the estimated
graph sizes fit the memory budget (``HessianOperator`` caches them; the caching plan of the
pipeline's backends prints the same count before any work)."""

from __future__ import annotations

from collections.abc import Sequence


def batches_to_cache(batch_sizes: Sequence[int], first_bytes: float, budget: int | None) -> int:
    """How many batches (a prefix) keep their first-order graph under ``budget`` bytes.

    The first batch's graph takes ``first_bytes``; batch ``j`` is estimated at ``first_bytes *
    n_j / n_0``; batches are kept in order while the running total fits (``None``: all).
    """
    if budget is None:
        return len(batch_sizes)
    per_sample = first_bytes / batch_sizes[0] if batch_sizes else 0.0
    total, count = 0.0, 0
    for n in batch_sizes:
        total += per_sample * n
        if total > budget:
            break
        count += 1
    return count
