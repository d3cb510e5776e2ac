"""Stage ``baseline``: the float model, loaded from ``model.checkpoint`` or trained, evaluated.

Outputs: ``model.safetensors`` (float state dict), ``metrics.parquet`` (one row),
``ranks.parquet`` (where each data-parallel rank ran, :mod:`pipeline.stages.parallel`), and
when training ``epochs.parquet`` plus ``train_state.safetensors`` (the training state after
every epoch, see :mod:`pipeline.stages.epochs`) so a killed run resumes at the next epoch with
identical results. Training is ``hawq.qat.train_float`` with ``baseline.to_hawq(...)``: the
same SGD loop, LR schedules, seeded data order and RNG handling as fine-tuning; training and
evaluation run on ``distributed.world_size`` data-parallel ranks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

import pyarrow as pa
import torch
from torch import nn

from hawq import derive_seed, evaluate
from hawq.precision import Precision
from hawq.qat import QATConfig, QATState, train_float
from pipeline.config import RunConfig
from pipeline.data import DataBundle
from pipeline.data_factory import FactoryData
from pipeline.models import LossFn, build_model, model_factory
from pipeline.stages.artifacts import ModelSource
from pipeline.stages.base import Params, Stage, StageContext, flat
from pipeline.stages.epochs import train_resumably
from pipeline.stages.parallel import Rank, rank_data, run_ranks, world_param

log = logging.getLogger(__name__)

STATE = "train_state.safetensors"
METRICS_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("epochs", pa.int64()),
        ("n_params", pa.int64()),
        ("eval_loss", pa.float64()),
        ("eval_acc", pa.float64()),
        ("eval_samples", pa.int64()),
    ]
)


def params(cfg: RunConfig, fingerprint: str) -> Params:
    """Model, data, baseline settings, the run seed and the data fingerprint (and the world
    size when each worker's BatchNorm statistics are its own)."""
    return {
        **flat("model", cfg.model.to_dict()),
        # neither the Hessian set nor the worker count changes the baseline
        **flat(
            "data",
            cfg.data.to_dict(),
            skip=("hessian_samples", "hessian_batch_size", "num_workers"),
        ),
        **flat("baseline", cfg.baseline.to_dict()),
        "run.seed": cfg.run.seed,
        "data.fingerprint": fingerprint,
        **world_param(cfg, cfg.baseline.batchnorm),
        **cfg.precision.stage_params(),
    }


def initial_model(cfg: RunConfig) -> nn.Module:
    """The checkpoint's model, or a fresh one initialised from ``derive_seed(seed, "init")``."""
    if cfg.model.checkpoint is not None:
        return build_model(cfg.model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(cfg.run.seed, "init"))
        return model_factory(cfg.model)()


@dataclass(frozen=True, kw_only=True)
class BaselineJob:
    """What every rank needs: the architecture, its initial weights, data and settings."""

    model: ModelSource  # the initial weights
    data: DataBundle | FactoryData
    train: QATConfig | None  # None: evaluate only
    eval_batch_size: int
    loss_fn: LossFn | None
    precision: Precision
    state: QATState | None = None


def train_and_evaluate(job: BaselineJob, rank: Rank) -> dict[str, Any]:
    """One rank: train (``hawq.qat.train_float``) if asked, then evaluate; the weights, loss
    and accuracy."""
    model = job.model.model(rank.device)
    data = job.data
    if job.train is not None:
        train_float(
            model,
            data.train_data(job.train.batch_size),
            data.eval_data(job.train.eval_batch_size),
            job.train,
            loss_fn=job.loss_fn,
            state=job.state,
            on_epoch_end=rank.on_epoch_end,
            on_step=rank.on_step,
        )
    bs = job.eval_batch_size
    loss, acc = evaluate(
        model, data.eval_data(bs), batch_size=bs, loss_fn=job.loss_fn, precision=job.precision
    )
    return {"weights": model.state_dict(), "eval_loss": loss, "eval_acc": acc}


def run(ctx: StageContext) -> None:
    """Load or train the float model, evaluate it, save weights and metrics."""
    cfg = ctx.cfg
    epochs = cfg.baseline.train_epochs
    tcfg = cfg.baseline.to_hawq(
        seed=cfg.run.seed, eval_batch_size=cfg.data.batch_size, precision=cfg.precision
    )
    model = initial_model(cfg)
    job = BaselineJob(
        model=ModelSource(build=model_factory(cfg.model), weights=model.state_dict()),
        data=rank_data(ctx),
        train=tcfg if epochs > 0 else None,
        eval_batch_size=cfg.data.batch_size,
        loss_fn=ctx.loss_fn(),
        precision=cfg.precision.to_hawq(),
    )
    if epochs > 0:

        def loop(state: QATState | None, **hooks: Any) -> dict[str, Any]:
            return run_ranks(ctx, train_and_evaluate, replace(job, state=state), **hooks)

        out = train_resumably(ctx, loop, state_file=STATE, total=tcfg.epochs)
    else:
        out = run_ranks(ctx, train_and_evaluate, job)
    loss, acc = out["eval_loss"], out["eval_acc"]
    source = "trained" if epochs else "checkpoint" if cfg.model.checkpoint else "random init"
    log.info("baseline (%s): eval loss %.4f, accuracy %.4f", source, loss, acc)
    weights = out["weights"]
    ctx.write_tensors("model.safetensors", weights)
    row = {
        "source": source,
        "epochs": epochs,
        "n_params": sum(p.numel() for p in model.parameters()),
        "eval_loss": loss,
        "eval_acc": acc,
        "eval_samples": ctx.data.n_eval,
    }
    ctx.write_table("metrics.parquet", pa.Table.from_pylist([row], schema=METRICS_SCHEMA))


STAGE = Stage(
    name="baseline",
    deps=(),
    params=params,
    run=run,
    outputs=("model.safetensors", "metrics.parquet"),
    summary="float model: load the checkpoint or train, then evaluate",
)
