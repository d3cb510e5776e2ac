"""Stage ``finetune``: block-wise QAT in the Omega order (``hawq.qat.run_qat``), resumable.

The QAT state is persisted after every epoch (and every ``checkpoint_every_steps`` steps, and
on a preemption signal) as ``state.safetensors`` and the epoch rows as
``epochs.parquet`` (see :mod:`pipeline.stages.epochs`); a resumed run continues
bit-identically. Output: ``model.safetensors`` (the fake-quant model's state dict),
``epochs.parquet`` and ``ranks.parquet`` (QAT runs on ``distributed.world_size`` data-parallel
ranks, see :mod:`pipeline.stages.parallel`). ``epochs_per_stage: 0`` means post-training
quantization: quantize everything, calibrate activation ranges, no training (here).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

import torch

from hawq import BitConfig, QATConfig, run_qat
from hawq.qat import QATState
from hawq.quant.modules import calibrate_
from pipeline.config import RunConfig
from pipeline.data import DataBundle
from pipeline.data_factory import FactoryData
from pipeline.models import LossFn
from pipeline.stages.artifacts import (
    ModelSource,
    calibration_inputs,
    float_source,
    load_bit_config,
    qat_stages,
    quantized_float_model,
)
from pipeline.stages.base import Params, Stage, StageContext, flat
from pipeline.stages.epochs import epoch_table, train_resumably
from pipeline.stages.parallel import Rank, rank_data, run_ranks, world_param

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
        **world_param(cfg, cfg.finetune.batchnorm),
        **cfg.precision.stage_params(),
    }


@dataclass(frozen=True, kw_only=True)
class FinetuneJob:
    """What every rank needs: the float model, the QAT stages and bits, data and settings."""

    float_model: ModelSource
    stages: list[list[str]]
    bit_config: BitConfig
    config: QATConfig
    data: DataBundle | FactoryData
    loss_fn: LossFn | None
    state: QATState | None = None


def fine_tune(job: FinetuneJob, rank: Rank) -> dict[str, torch.Tensor]:
    """One rank: block-wise QAT (``hawq.run_qat``); the fake-quant model's state dict."""
    model = job.float_model.model(rank.device)
    qcfg = job.config
    run_qat(
        model,
        job.stages,
        job.data.train_data(qcfg.batch_size),
        job.data.eval_data(qcfg.eval_batch_size),
        qcfg,
        bit_config=job.bit_config,
        teacher=job.float_model.model(rank.device) if qcfg.loss == "distill" else None,
        loss_fn=job.loss_fn,
        state=job.state,
        on_epoch_end=rank.on_epoch_end,
        on_step=rank.on_step,
    )
    return model.state_dict()


def run(ctx: StageContext) -> None:
    """QAT stage by stage; state and metrics persisted after every epoch."""
    cfg = ctx.cfg
    if cfg.finetune.epochs_per_stage == 0:
        model = quantized_float_model(ctx)
        calibrate_(model, calibration_inputs(ctx), precision=cfg.precision.to_hawq())
        ctx.write_tensors("model.safetensors", model.state_dict())
        ctx.write_table("epochs.parquet", epoch_table(ctx.stage, []))
        return
    stages = qat_stages(ctx)
    qcfg = cfg.finetune.to_hawq(
        seed=cfg.run.seed, eval_batch_size=cfg.data.batch_size, precision=cfg.precision
    )
    job = FinetuneJob(
        float_model=float_source(ctx),
        stages=stages,
        bit_config=load_bit_config(ctx),
        config=qcfg,
        data=rank_data(ctx),
        loss_fn=ctx.loss_fn(),
    )
    every = cfg.finetune.checkpoint_every_steps

    def loop(state: QATState | None, **hooks: Any) -> dict[str, torch.Tensor]:
        job_at = replace(job, state=state)
        return run_ranks(ctx, fine_tune, job_at, every_steps=every, **hooks)

    weights = train_resumably(
        ctx, loop, state_file=STATE, total=qcfg.epochs * len(stages), every_steps=every
    )
    ctx.write_tensors("model.safetensors", weights)


STAGE = Stage(
    name="finetune",
    deps=("order",),
    params=params,
    run=run,
    outputs=("model.safetensors", "epochs.parquet"),
    summary="block-wise quantization-aware fine-tuning",
)
