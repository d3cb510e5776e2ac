"""Stage ``evaluate``: accuracy of the float, PTQ, each fine-tuning stage's and the final model.

Writes ``metrics.parquet``: one row per phase (``float`` baseline, ``ptq`` = all blocks
quantized at once and calibrated without training, ``finetune`` after each QAT stage
``ft_stage``, ``final``) with loss, accuracy and its 95% Wilson interval on the
``eval_samples`` evaluation samples (NaN without class targets), size and weight compression;
``ranks.parquet``: the evaluations run on ``distributed.world_size`` data-parallel ranks (each
evaluates its slices, the sums are all-reduced; see :mod:`pipeline.stages.parallel`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import pyarrow as pa
import torch
from torch import nn

from hawq import BitConfig, evaluate, quantize_, size_summary
from hawq.metrics import wilson_interval
from hawq.precision import Precision
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
)
from pipeline.stages.base import Params, Stage, StageContext
from pipeline.stages.parallel import Rank, rank_data, run_ranks

log = logging.getLogger(__name__)

METRICS_SCHEMA = pa.schema(
    [
        ("phase", pa.string()),
        ("ft_stage", pa.int64()),
        ("blocks", pa.string()),
        ("eval_loss", pa.float64()),
        ("eval_acc", pa.float64()),
        ("eval_acc_low", pa.float64()),
        ("eval_acc_high", pa.float64()),
        ("eval_samples", pa.int64()),
        ("size_mb", pa.float64()),
        ("weight_compression", pa.float64()),
    ]
)

ROW_COLUMNS = (
    "phase",
    "ft_stage",
    "blocks",
    "eval_loss",
    "eval_acc",
    "size_mb",
    "weight_compression",
)


@dataclass(frozen=True, kw_only=True)
class EvaluateJob:
    """What every rank needs: the float model, the bits, the fine-tuned weights, data."""

    float_model: ModelSource
    bit_config: BitConfig
    modules: list[str]  # the blocks of the fine-tuning order (quantized)
    finetuned: dict[str, torch.Tensor]
    calibration: list[torch.Tensor]  # PTQ's activation-range batches
    data: DataBundle | FactoryData
    batch_size: int
    loss_fn: LossFn | None
    precision: Precision


def params(cfg: RunConfig, fingerprint: str) -> Params:
    """The precision of the evaluations (none at the defaults: the key follows upstream)."""
    return cfg.precision.stage_params()


def evaluate_models(job: EvaluateJob, rank: Rank) -> list[tuple[float, float]]:
    """One rank: (loss, accuracy) of the float model, of PTQ (every block quantized at once,
    activation ranges calibrated, no training) and of the fine-tuned model."""
    dev = rank.device

    def quantized() -> nn.Module:
        model = job.float_model.model(dev)
        return quantize_(model, job.bit_config, modules=job.modules)

    def score(model: nn.Module) -> tuple[float, float]:
        data = job.data.eval_data(job.batch_size)
        return evaluate(
            model, data, batch_size=job.batch_size, loss_fn=job.loss_fn, precision=job.precision
        )

    calibration = [x.to(dev) for x in job.calibration]
    ptq = calibrate_(quantized(), calibration, precision=job.precision)
    final = quantized()
    final.load_state_dict(job.finetuned)
    return [score(job.float_model.model(dev)), score(ptq), score(final.eval())]


def run(ctx: StageContext) -> None:
    """Evaluate the final model; tabulate accuracy along the way."""
    bit_config = load_bit_config(ctx)
    float_model = ctx.float_model()
    example = ctx.data.example(1).to(ctx.device)
    q_size = size_summary(float_model, bit_config, example)
    nan = math.nan
    job = EvaluateJob(
        float_model=float_source(ctx),
        bit_config=bit_config,
        modules=[m for st in qat_stages(ctx) for m in st],
        finetuned=ctx.store.read_tensors("finetune", "model.safetensors")[0],
        calibration=[x.cpu() for x in calibration_inputs(ctx)],
        data=rank_data(ctx),
        batch_size=ctx.cfg.data.batch_size,
        loss_fn=ctx.loss_fn(),
        precision=ctx.cfg.precision.to_hawq(),
    )
    (fl, fa), (pl, pa_), (loss, acc) = run_ranks(ctx, evaluate_models, job)
    rows = [
        ("float", None, "", fl, fa, q_size["float_size_mb"], 1.0),
        ("ptq", None, "all", pl, pa_, q_size["size_mb"], q_size["weight_compression"]),
    ]
    ctx.pause("ptq")  # test hook: mid-evaluation, nothing written yet
    order = ctx.read_table("order", "order.parquet").to_pydict()
    epochs = ctx.read_table("finetune", "epochs.parquet").to_pylist()
    last = {}
    for r in epochs:
        last[r["ft_stage"]] = r
    for s in sorted(last):
        blocks = [b for b, st in zip(order["block"], order["ft_stage"], strict=True) if st == s]
        r = last[s]
        rows.append(("finetune", s, ",".join(blocks), r["eval_loss"], r["eval_acc"], nan, nan))
    rows.append(("final", None, "all", loss, acc, q_size["size_mb"], q_size["weight_compression"]))
    n = ctx.data.n_eval
    records = []
    for r in rows:
        rec = dict(zip(ROW_COLUMNS, r, strict=True))
        low, high = wilson_interval(rec["eval_acc"] * n, n)
        records.append({**rec, "eval_acc_low": low, "eval_acc_high": high, "eval_samples": n})
    table = pa.Table.from_pylist(records, schema=METRICS_SCHEMA)
    ctx.write_table("metrics.parquet", table)
    metric, final, fl_, ptq = (
        ("loss", loss, fl, pl) if math.isnan(acc) else ("accuracy", acc, fa, pa_)
    )
    log.info(
        "final %s %.4f (float %.4f, PTQ %.4f) at %.4g MB, weight compression %.3gx",
        metric, final, fl_, ptq, q_size["size_mb"], q_size["weight_compression"],
    )  # fmt: skip


STAGE = Stage(
    name="evaluate",
    deps=("finetune",),
    params=params,
    run=run,
    outputs=("metrics.parquet",),
    summary="accuracy: float, PTQ, per fine-tuning stage, final",
)
