"""The batch contract (pipeline/batching.py) and the training loop's start step (hawq.metrics).

Ground truth: the closed-form rank bounds, and the full epoch with its first ``k`` batches
dropped (for tensors, a ``from_step`` callable and a plain callable alike).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hawq.metrics import batches
from pipeline.batching import ShuffledBatches, rank_bounds, rank_slices


def test_rank_slices_partition_every_global_batch():
    order = np.random.default_rng(0).permutation(23)
    for world in (1, 2, 3, 5, 8):
        per_rank = [list(rank_slices(order, 6, r, world)) for r in range(world)]
        assert all(len(p) == 4 for p in per_rank)  # ceil(23 / 6) steps on every rank
        for step in range(4):
            glued = np.concatenate([p[step] for p in per_rank])
            assert np.array_equal(glued, order[6 * step : 6 * step + 6])
            sizes = [len(p[step]) for p in per_rank]
            assert max(sizes) - min(sizes) <= 1  # floor(r b / W) bounds: balanced
    assert rank_bounds(5, 1, 8) == (0, 1) and rank_bounds(5, 0, 8) == (0, 0)  # may be empty
    assert [s.tolist() for s in rank_slices(order, 6, 1, 2, start_step=3)] == [order[20:].tolist()]
    with pytest.raises(ValueError, match="rank < world_size"):
        list(rank_slices(order, 6, 3, 3))


def test_the_loop_starts_at_step_k_for_every_kind_of_data():
    x, y = torch.arange(50.0).view(25, 2), torch.arange(25)
    calls = []

    def take(slices, gen):
        for s in slices:
            calls.append(len(s))
            yield x[torch.from_numpy(s)], y[torch.from_numpy(s)]

    resumable = ShuffledBatches(n=25, batch_size=4, make=take)

    def plain(gen):  # a user's callable without from_step: drawn, then dropped
        return resumable(gen)

    for data in ((x, y), resumable, plain):
        full = list(batches(data, 4, torch.Generator().manual_seed(3), True, False))
        assert len(full) == 7
        calls.clear()
        later = list(batches(data, 4, torch.Generator().manual_seed(3), True, False, start=5))
        assert len(later) == 2 and all(
            torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
            for a, b in zip(full[5:], later, strict=True)
        )
        if data is resumable:
            assert calls == [4, 1]  # only the two batches after step 5 were produced
        if data is plain:
            assert calls == [4, 4, 4, 4, 4, 4, 1]


def test_rank_slices_from_the_loop_equal_slices_of_the_global_batches_for_every_kind_of_data():
    """Under data parallelism the loop cuts rank slices (tensors, plain callables) or has a
    ``sharded`` source cut them before decoding; all give rank r's part of each global batch."""
    x, y = torch.arange(50.0).view(25, 2), torch.arange(25)
    calls = []

    def take(slices, gen):
        for s in slices:
            calls.append(len(s))
            yield x[torch.from_numpy(s)], y[torch.from_numpy(s)]

    sharded = ShuffledBatches(n=25, batch_size=4, make=take)

    def plain(gen):
        return sharded(gen)

    for data in ((x, y), sharded, plain):
        full = list(batches(data, 4, torch.Generator().manual_seed(3), True, False))
        for world in (2, 3):
            for rank in range(world):
                calls.clear()
                part = list(
                    batches(
                        data,
                        4,
                        torch.Generator().manual_seed(3),
                        True,
                        False,
                        start=2,
                        rank=rank,
                        world_size=world,
                    )  # fmt: skip
                )
                assert len(part) == len(full) - 2
                for (xb, yb), (gx, gy) in zip(part, full[2:], strict=True):
                    lo, hi = rank_bounds(len(gy), rank, world)
                    assert torch.equal(xb, gx[lo:hi]) and torch.equal(yb, gy[lo:hi])
                if data is sharded:  # only this rank's samples were produced, none skipped
                    assert calls == [rank_bounds(b, rank, world)[1] - rank_bounds(b, rank, world)[0]
                                     for b in (4, 4, 4, 4, 1)]  # fmt: skip
