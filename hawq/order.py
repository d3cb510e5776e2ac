"""The block fine-tuning order: blocks by Omega at their assigned bits, grouped into stages.

HAWQ v1 fine-tunes (quantizes, then trains) blocks in descending Omega_i(b_i) at the
assigned bits (``hawq.omega``): the block whose own quantization hurts most goes first.
``reverse`` and ``random`` orders are the ablations.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from torch import nn

from hawq.omega import (
    SENSITIVITY_MODES,
    BlockRecord,
    block_records,
    omega_scale,
    perturbation_matrix,
)
from hawq.validation import check_clip_bits, check_int, check_percentile, check_seed

logger = logging.getLogger(__name__)

ORDER_MODES = ("descending", "reverse", "random")

ORDER_SCHEMA = pa.schema(
    [
        ("stage", pa.int64()),
        ("block", pa.string()),
        ("modules", pa.list_(pa.string())),
        ("omega", pa.float64()),
    ]
)


@dataclass(frozen=True, kw_only=True)
class OrderConfig:
    """Fine-tuning order: ``mode`` descending Omega (HAWQ), ``reverse`` or ``random``."""

    mode: str = "descending"
    blocks_per_stage: int = 1
    seed: int = 0
    sensitivity: str = "eigenvalue"
    per_channel: bool = True
    percentile: float | None = None
    clip_bits: int | None = None
    mse_clip: bool = False

    def __post_init__(self) -> None:
        if self.mode not in ORDER_MODES:
            raise ValueError(f"mode must be one of {ORDER_MODES}, got {self.mode!r}")
        check_int("blocks_per_stage", self.blocks_per_stage, low=1)
        check_seed("seed", self.seed)
        if self.sensitivity not in SENSITIVITY_MODES:
            raise ValueError(
                f"sensitivity must be one of {SENSITIVITY_MODES}, got {self.sensitivity!r}"
            )
        check_percentile("percentile", self.percentile)
        check_clip_bits("clip_bits", self.clip_bits)
        if not isinstance(self.mse_clip, bool):
            raise ValueError(f"mse_clip must be a bool, got {self.mse_clip!r}")


@dataclass(frozen=True)
class FineTuneOrder:
    """``table`` (stage, block, modules, omega) in fine-tuning order; ``stages`` lists the
    module FQNs to quantize and fine-tune at each stage (input of the QAT loop)."""

    table: pa.Table
    stages: list[list[str]]

    @property
    def blocks(self) -> list[str]:
        return self.table.column("block").to_pylist()


def order_blocks(
    blocks: Sequence[str],
    modules: Sequence[Sequence[str]],
    omega: Sequence[float],
    config: OrderConfig | None = None,
) -> FineTuneOrder:
    """Order blocks by Omega (ties keep table order) and group them into stages."""
    config = config or OrderConfig()
    om = np.asarray(omega, dtype=np.float64)
    if not (len(blocks) == len(modules) == len(om)):
        raise ValueError("blocks, modules and omega must have the same length")
    if len(om) == 0:
        raise ValueError("no blocks to order")
    idx = np.arange(len(om))
    if config.mode == "descending":
        perm = np.lexsort((idx, -om))
    elif config.mode == "reverse":
        perm = np.lexsort((idx, om))
    else:
        perm = np.random.default_rng(config.seed).permutation(len(om))
    k = config.blocks_per_stage
    stage = [int(p) // k for p in range(len(perm))]
    table = pa.table(
        {
            "stage": stage,
            "block": [blocks[i] for i in perm],
            "modules": [list(modules[i]) for i in perm],
            "omega": om[perm],
        },
        schema=ORDER_SCHEMA,
    )
    stages: list[list[str]] = [[] for _ in range(stage[-1] + 1)]
    for s, i in zip(stage, perm, strict=True):
        stages[s].extend(modules[i])
    return FineTuneOrder(table=table, stages=stages)


def finetune_order(
    model: nn.Module,
    table: pa.Table | Iterable[Mapping | BlockRecord],
    bits: Mapping[str, int],
    config: OrderConfig | None = None,
) -> FineTuneOrder:
    """HAWQ v1 order: Omega_i = s_i ||Q_{b_i}(W_i) - W_i||^2 at the assigned bits b_i.

    ``bits`` maps block name -> weight bits (e.g. ``Allocation.bits``); blocks absent from
    it stay in full precision and are not scheduled. With the default
    ``sensitivity="eigenvalue"``, s_i = lambda_i as in the paper.
    """
    config = config or OrderConfig()
    all_records = block_records(table)
    unknown = set(bits) - {r.block for r in all_records}
    if unknown:
        raise ValueError(f"bits name blocks not in the sensitivity table: {sorted(unknown)}")
    records = [r for r in all_records if r.block in bits]
    if not records:
        raise ValueError("bits assigns no block of the sensitivity table")
    kw = {"per_channel": config.per_channel, "percentile": config.percentile}
    kw.update(clip_bits=config.clip_bits, mse_clip=config.mse_clip)
    pert = [perturbation_matrix(model, [r.modules], [bits[r.block]], **kw)[0, 0] for r in records]
    omega = omega_scale(records, config.sensitivity) * np.array(pert)
    return order_blocks([r.block for r in records], [r.modules for r in records], omega, config)
