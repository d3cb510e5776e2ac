"""Stage ``baseline``: the float model, loaded from ``model.checkpoint`` or trained, evaluated.

Outputs: ``model.safetensors`` (float state dict), ``metrics.parquet`` (one row), and when
training ``epochs.parquet`` plus ``train_state.safetensors`` (the training state after every
epoch, see :mod:`pipeline.stages.epochs`) so a killed run resumes at the next epoch with
identical results. Training is ``hawq.qat.train_float`` with ``baseline.to_hawq(...)``: the
same SGD loop, LR schedules, seeded data order and RNG handling as fine-tuning.
"""

from __future__ import annotations

import functools
import logging

import pyarrow as pa
import torch
from torch import nn

from hawq import derive_seed
from hawq.qat import train_float
from pipeline.config import RunConfig
from pipeline.models import build_model, model_factory
from pipeline.stages.base import Params, Stage, StageContext, flat
from pipeline.stages.epochs import train_resumably

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
    """Model, data, baseline settings, the run seed and the data fingerprint."""
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
    }


def initial_model(cfg: RunConfig) -> nn.Module:
    """The checkpoint's model, or a fresh one initialised from ``derive_seed(seed, "init")``."""
    if cfg.model.checkpoint is not None:
        return build_model(cfg.model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(cfg.run.seed, "init"))
        return model_factory(cfg.model)()


def train(ctx: StageContext, model: nn.Module) -> None:
    """Train ``baseline.train_epochs`` epochs of SGD, persisting the state after each."""
    cfg = ctx.cfg
    tcfg = cfg.baseline.to_hawq(seed=cfg.run.seed, eval_batch_size=cfg.data.batch_size)
    loop = functools.partial(
        train_float,
        model,
        ctx.data.train_data(tcfg.batch_size),
        ctx.data.eval_data(tcfg.eval_batch_size),
        tcfg,
        loss_fn=ctx.loss_fn(),
    )
    train_resumably(ctx, loop, state_file=STATE, total=tcfg.epochs)


def run(ctx: StageContext) -> None:
    """Load or train the float model, evaluate it, save weights and metrics."""
    cfg = ctx.cfg
    model = initial_model(cfg).to(ctx.device)
    epochs = cfg.baseline.train_epochs
    if epochs > 0:
        train(ctx, model)
    loss, acc = ctx.evaluate(model)
    source = "trained" if epochs else "checkpoint" if cfg.model.checkpoint else "random init"
    log.info("baseline (%s): eval loss %.4f, accuracy %.4f", source, loss, acc)
    ctx.write_tensors("model.safetensors", model.state_dict())
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
