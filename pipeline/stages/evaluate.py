"""Stage ``evaluate``: accuracy of the float, PTQ, each fine-tuning stage's and the final model.

Writes ``metrics.parquet``: one row per phase (``float`` baseline, ``ptq`` = all blocks
quantized at once and calibrated without training, ``finetune`` after each QAT stage
``ft_stage``, ``final``) with loss, accuracy and its 95% Wilson interval on the
``eval_samples`` evaluation samples (NaN without class targets), size and weight compression.
"""

from __future__ import annotations

import logging
import math

import pyarrow as pa

from hawq import size_summary
from hawq.metrics import wilson_interval
from hawq.quant.modules import calibrate_
from pipeline.stages.artifacts import (
    calibration_inputs,
    load_bit_config,
    quantized_float_model,
    quantized_model,
)
from pipeline.stages.base import Stage, StageContext, no_params

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


def _ptq(ctx: StageContext) -> tuple[float, float]:
    """Accuracy with every block quantized at once, activation ranges calibrated, no training."""
    model = quantized_float_model(ctx)
    calibrate_(model, calibration_inputs(ctx))
    return ctx.evaluate(model)


def run(ctx: StageContext) -> None:
    """Evaluate the final model; tabulate accuracy along the way."""
    bit_config = load_bit_config(ctx)
    float_model = ctx.float_model()
    example = ctx.data.example(1).to(ctx.device)
    q_size = size_summary(float_model, bit_config, example)
    nan = math.nan
    rows = []
    fl, fa = ctx.evaluate(float_model)
    rows.append(("float", None, "", fl, fa, q_size["float_size_mb"], 1.0))
    pl, pa_ = _ptq(ctx)
    rows.append(("ptq", None, "all", pl, pa_, q_size["size_mb"], q_size["weight_compression"]))
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
    model = quantized_model(ctx)
    loss, acc = ctx.evaluate(model)
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
    params=no_params,
    run=run,
    outputs=("metrics.parquet",),
    summary="accuracy: float, PTQ, per fine-tuning stage, final",
)
