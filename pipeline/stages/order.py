"""Stage ``order``: the fine-tuning order of the blocks by Omega at their allocated bits.

Writes ``order.parquet`` (ft_stage, block, modules, omega) in fine-tuning order: blocks sorted by
``finetune.order`` (Omega descending, reverse or random) and grouped ``finetune.blocks_per_stage``
to a QAT stage.
"""

from __future__ import annotations

import logging

from hawq import finetune_order
from pipeline.config import RunConfig
from pipeline.stages.base import Params, Stage, StageContext

log = logging.getLogger(__name__)


def params(cfg: RunConfig, fingerprint: str) -> Params:
    f = cfg.finetune
    return {
        "finetune.order": f.order,
        "finetune.blocks_per_stage": f.blocks_per_stage,
        "run.seed": cfg.run.seed,
    }


def run(ctx: StageContext) -> None:
    """Order blocks by Omega at their assigned bits; group them into fine-tuning stages."""
    cfg = ctx.cfg
    model = ctx.float_model()
    table = ctx.read_table("hessian", "sensitivity.parquet")
    bits = ctx.read_table("allocate", "bits.parquet").to_pydict()
    assigned = dict(zip(bits["block"], bits["bits"], strict=True))
    ocfg = cfg.finetune.order_to_hawq(cfg.allocation, seed=cfg.run.seed)
    order = finetune_order(model, table, assigned, ocfg)
    ctx.write_table("order.parquet", order.table.rename_columns({"stage": "ft_stage"}))
    log.info("fine-tuning order (%d stages): %s", len(order.stages), order.blocks)


STAGE = Stage(
    name="order",
    deps=("allocate",),
    params=params,
    run=run,
    outputs=("order.parquet",),
    summary="fine-tuning order by Omega",
)
