"""Stage ``finetune``: block-wise QAT in the Omega order (``hawq.qat.run_qat``), resumable.

The QAT state is persisted after every epoch (and every ``checkpoint_every_steps`` steps, and
on a preemption signal) as ``state.safetensors`` and the epoch rows as
``epochs.parquet`` (see :mod:`pipeline.stages.epochs`); a resumed run continues
bit-identically. Output: ``model.safetensors`` (the fake-quant model's state dict) and
``epochs.parquet``. ``epochs_per_stage: 0`` means post-training quantization: quantize
everything, calibrate activation ranges, no training.
"""

from __future__ import annotations

import functools
import logging

from hawq import run_qat
from hawq.quant.modules import calibrate_
from pipeline.config import RunConfig
from pipeline.stages.artifacts import (
    calibration_inputs,
    load_bit_config,
    qat_stages,
    quantized_float_model,
)
from pipeline.stages.base import Params, Stage, StageContext, flat
from pipeline.stages.epochs import epoch_table, train_resumably

log = logging.getLogger(__name__)

STATE = "state.safetensors"


def params(cfg: RunConfig, fingerprint: str) -> Params:
    return {
        # how often the state is saved does not change the result: not part of the key
        **flat(
            "finetune",
            cfg.finetune.to_dict(),
            skip=("order", "blocks_per_stage", "checkpoint_every_steps"),
        ),  # fmt: skip
        "run.seed": cfg.run.seed,
        "data.batch_size": cfg.data.batch_size,
    }


def run(ctx: StageContext) -> None:
    """QAT stage by stage; state and metrics persisted after every epoch."""
    cfg = ctx.cfg
    if cfg.finetune.epochs_per_stage == 0:
        model = quantized_float_model(ctx)
        calibrate_(model, calibration_inputs(ctx))
        ctx.write_tensors("model.safetensors", model.state_dict())
        ctx.write_table("epochs.parquet", epoch_table(ctx.stage, []))
        return
    stages = qat_stages(ctx)
    qcfg = cfg.finetune.to_hawq(seed=cfg.run.seed, eval_batch_size=cfg.data.batch_size)
    model = ctx.float_model()
    loop = functools.partial(
        run_qat,
        model,
        stages,
        ctx.data.train_data(qcfg.batch_size),
        ctx.data.eval_data(qcfg.eval_batch_size),
        qcfg,
        bit_config=load_bit_config(ctx),
        teacher=ctx.float_model() if qcfg.loss == "distill" else None,
        loss_fn=ctx.loss_fn(),
    )
    train_resumably(
        ctx, loop, state_file=STATE, total=qcfg.epochs * len(stages),
        every_steps=cfg.finetune.checkpoint_every_steps,
    )  # fmt: skip
    ctx.write_tensors("model.safetensors", model.state_dict())


STAGE = Stage(
    name="finetune",
    deps=("order",),
    params=params,
    run=run,
    outputs=("model.safetensors", "epochs.parquet"),
    summary="block-wise quantization-aware fine-tuning",
)
