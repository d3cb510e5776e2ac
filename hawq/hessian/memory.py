"""What one batch's first-order graph costs in memory, and the budget check before any work.

An HVP needs batch ``j``'s first-order graph: the activations saved by the forward and by the
create-graph backward, plus the gradients ``g_j = dL_j/dW`` w.r.t. every block. The
operator keeps such graphs while they fit ``memory_budget_mb``; a batch whose graph does not
fit is rebuilt for every HVP, which holds the graph just as long. A positive budget smaller
than one batch's graph therefore caches nothing and is exceeded anyway: a configuration error
that :func:`check_memory_budget` reports before any work, with the two fixes.

The estimate is cheap: the graphs of the first one and two samples, with the saved tensors
counted (``saved_tensors_hooks``, the operator's own measurement), solved for

* ``per_sample_bytes``: saved activations, which grow linearly with the batch size, and
* ``fixed_bytes``: the gradients (one tensor per block parameter) and per-channel tensors,

so a batch of ``n`` needs ``n * per_sample_bytes + fixed_bytes``. For torchvision's
ResNet-50 at 224x224 in float32 that is ~82 MB per sample + ~97 MB
(docs/benchmarks/imagenet_scale.md compares it with the peak RSS).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from hawq.blocks import Block
from hawq.hessian.operator import Batch, HessianOperator, LossFn

logger = logging.getLogger(__name__)

MB = 2**20


class MemoryBudgetError(ValueError):
    """The memory budget cannot hold one batch's first-order graph."""


@dataclass(frozen=True, kw_only=True)
class GraphMemory:
    """Bytes of one batch's first-order graph: ``n * per_sample_bytes + fixed_bytes``."""

    per_sample_bytes: float
    fixed_bytes: int

    def batch_bytes(self, batch_size: int) -> int:
        """Estimated bytes of the first-order graph of a batch of ``batch_size`` samples."""
        return int(math.ceil(self.per_sample_bytes * batch_size)) + self.fixed_bytes

    def max_batch_size(self, budget_bytes: int) -> int:
        """The largest batch whose graph fits ``budget_bytes`` (0 if none does)."""
        if self.per_sample_bytes <= 0:
            return 0 if budget_bytes < self.fixed_bytes else 2**31
        return max(0, math.floor((budget_bytes - self.fixed_bytes) / self.per_sample_bytes))


def estimate_graph_memory(
    model: nn.Module, loss_fn: LossFn, batch: Batch, blocks: Sequence[Block] | None = None
) -> GraphMemory:
    """Fit :class:`GraphMemory` from the first-order graphs of ``batch``'s first 1 and 2 samples.

    The graphs are measured as the operator caches them (``HessianOperator.measure_graph_bytes``:
    the distinct saved storages plus the gradients, the same lean double backward), so the fit
    is exact for batch-affine graphs. With a one-sample batch everything counts as per-sample.
    The model's parameters, gradients and modes are left as they were.
    """
    x, y = batch
    # copies, not views: a saved view of the targets would count the whole batch's storage
    sub = [(x[:n].clone(), y[:n].clone()) for n in range(1, min(x.shape[0], 2) + 1)]
    with HessianOperator(model, loss_fn, sub, blocks, memory_budget_bytes=0) as op:
        sizes = [op.measure_graph_bytes(j) for j in range(len(sub))]
    if len(sizes) == 1:
        return GraphMemory(per_sample_bytes=float(sizes[0]), fixed_bytes=0)
    per_sample = max(sizes[1] - sizes[0], 0)
    return GraphMemory(per_sample_bytes=float(per_sample), fixed_bytes=sizes[0] - per_sample)


def check_memory_budget(
    memory: GraphMemory,
    batch_size: int,
    budget_mb: float | None,
    *,
    key: str = "memory_budget_mb",
    batch_key: str = "the Hessian batch size",
) -> None:
    """Raise :class:`MemoryBudgetError` if a positive budget cannot hold one batch's graph.

    ``None`` (no cap) and ``0`` (cache nothing, rebuild each graph per HVP on purpose) pass.
    ``key`` / ``batch_key`` name the settings in the message (e.g. the pipeline's
    ``hessian.memory_budget_mb`` and ``data.hessian_batch_size``).
    """
    if not budget_mb:
        return
    budget_bytes = int(budget_mb * MB)
    need = memory.batch_bytes(batch_size)
    logger.debug(
        "one Hessian batch of %d: first-order graph ~%.1f MB (budget %.1f MB)",
        batch_size, need / MB, budget_bytes / MB,
    )  # fmt: skip
    if need <= budget_bytes:
        return
    fits = memory.max_batch_size(budget_bytes)
    lower = f"lower {batch_key} to <= {fits} or " if fits >= 1 else ""
    raise MemoryBudgetError(
        f"{key}={budget_mb:g} cannot hold one Hessian batch's first-order graph: "
        f"~{_mb(need)} MB for a batch of {batch_size} ({_mb(memory.per_sample_bytes)} MB per "
        f"sample + {_mb(memory.fixed_bytes)} MB of gradients). "
        f"Fix: {lower}raise {key} to >= {_round_up(need / MB):g}"
    )


def _mb(nbytes: float) -> str:
    """Megabytes with 3 significant digits, never in exponent notation."""
    mb = nbytes / MB
    return f"{mb:.0f}" if mb >= 100 else f"{mb:.3g}"


def _round_up(x: float) -> float:
    """``x`` rounded up to 3 significant digits (at least 0 decimals)."""
    decimals = max(0, 2 - math.floor(math.log10(x))) if x > 0 else 0
    return math.ceil(x * 10**decimals) / 10**decimals
