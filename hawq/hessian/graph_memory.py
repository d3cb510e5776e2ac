"""What caching one batch's first-order graph costs in memory, estimated before the analysis.

``HessianOperator`` keeps a batch's first-order graph (the activations saved by the forward
and by the create-graph backward, plus the gradients w.r.t. every block) so that each HVP is
one backward through it. Its size is affine in the batch size ``n``:

    bytes(n) = fixed + per_sample * n

(``fixed``: the parameter-sized gradients and any per-channel tensors; ``per_sample``: the
activations). :func:`measure_graph_memory` measures the graphs of the first one and two samples
of a batch (``HessianOperator.measure_graph_bytes``: the same code path and lean double
backward as the operator) and solves for both terms, so a plan for a large model (e.g.
ResNet-50 at 224x224, where one 128-image graph takes gigabytes) costs two tiny forwards.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from hawq.blocks import Block
from hawq.hessian.operator import Batch, HessianOperator, LossFn


@dataclass(frozen=True, kw_only=True)
class GraphMemory:
    """``bytes(n) = fixed_bytes + per_sample_bytes * n`` for a batch of ``n`` samples."""

    fixed_bytes: float
    per_sample_bytes: float

    def batch_bytes(self, n: int) -> int:
        """Estimated bytes of one cached graph of an ``n``-sample batch."""
        return int(round(self.fixed_bytes + self.per_sample_bytes * n))


def measure_graph_memory(
    model: nn.Module, loss_fn: LossFn, batch: Batch, blocks: Sequence[Block] | None = None
) -> GraphMemory:
    """Fit :class:`GraphMemory` from the graphs of ``batch``'s first 1 and 2 samples.

    With a one-sample batch everything counts as per-sample (what the operator assumes when
    it scales its first graph to the other batches).
    """
    x, y = batch
    # copies, not views: a saved view of the targets would count the whole batch's storage
    sub = [(x[:n].clone(), y[:n].clone()) for n in range(1, min(x.shape[0], 2) + 1)]
    with HessianOperator(model, loss_fn, sub, blocks, memory_budget_bytes=0) as op:
        sizes = [op.measure_graph_bytes(j) for j in range(len(sub))]
    if len(sizes) == 1:
        return GraphMemory(fixed_bytes=0.0, per_sample_bytes=float(sizes[0]))
    per_sample = max(sizes[1] - sizes[0], 0)
    return GraphMemory(fixed_bytes=float(sizes[0] - per_sample), per_sample_bytes=float(per_sample))
