"""Stages ``evaluate`` (accuracy of float, PTQ, each fine-tuning stage, final) and ``export``.

``evaluate`` writes ``metrics.parquet``: one row per phase (``float`` baseline, ``ptq`` = all
blocks quantized at once and calibrated without training, ``finetune`` after each QAT stage,
``final``) with accuracy, loss, size and compression. ``export`` writes
``model_int.safetensors`` (``hawq.quant.export_integer`` codes and scales, plus the remaining
float tensors: biases, BatchNorm), ``bit_config.yaml`` and ``layers.parquet`` (bits and bytes
per quantized layer).
"""

from __future__ import annotations

import json
import logging
import math

import pyarrow as pa

from hawq.deploy import integer_state_dict
from hawq.qat import evaluate
from hawq.quant_modules import calibrate_, quantize_, quantized_modules
from hawq.size import size_summary
from pipeline.atomic import atomic_write_text
from pipeline.config import RunConfig
from pipeline.stages.allocate import load_bit_config
from pipeline.stages.base import Params, StageContext
from pipeline.stages.finetune import calibration_inputs, qat_stages, quantized_model

log = logging.getLogger(__name__)

EXPORT_FORMAT = "hawq.export/1"
METRICS_SCHEMA = pa.schema(
    [
        ("phase", pa.string()),
        ("stage", pa.int64()),
        ("blocks", pa.string()),
        ("eval_loss", pa.float64()),
        ("eval_acc", pa.float64()),
        ("size_mb", pa.float64()),
        ("weight_compression", pa.float64()),
    ]
)
LAYERS_SCHEMA = pa.schema(
    [
        ("module", pa.string()),
        ("weight_bits", pa.int64()),
        ("act_bits", pa.int64()),
        ("n_weights", pa.int64()),
        ("weight_bytes", pa.int64()),
    ]
)


def no_params(cfg: RunConfig, fingerprint: str) -> Params:
    """Stages with no settings of their own (their keys follow the upstream keys)."""
    return {}


def _ptq(ctx: StageContext) -> tuple[float, float]:
    """Accuracy with every block quantized at once, activation ranges calibrated, no training."""
    model = ctx.float_model()
    quantize_(model, load_bit_config(ctx), modules=[m for st in qat_stages(ctx) for m in st])
    calibrate_(model, calibration_inputs(ctx))
    return evaluate(model, (ctx.data.eval_x, ctx.data.eval_y), batch_size=ctx.cfg.data.batch_size)


def run_evaluate(ctx: StageContext) -> None:
    """Evaluate the final model; tabulate accuracy along the way."""
    bs = ctx.cfg.data.batch_size
    evald = (ctx.data.eval_x, ctx.data.eval_y)
    bit_config = load_bit_config(ctx)
    float_model = ctx.float_model()
    example = ctx.data.eval_x[:1].to(ctx.device)
    q_size = size_summary(float_model, bit_config, example)
    nan = math.nan
    rows = []
    fl, fa = evaluate(float_model, evald, batch_size=bs)
    rows.append(("float", -1, "", fl, fa, q_size["float_size_mb"], 1.0))
    pl, pa_ = _ptq(ctx)
    rows.append(("ptq", -1, "all", pl, pa_, q_size["size_mb"], q_size["weight_compression"]))
    order = ctx.read_table("order", "order.parquet").to_pydict()
    epochs = ctx.read_table("finetune", "epochs.parquet").to_pylist()
    last = {}
    for r in epochs:
        last[r["stage"]] = r
    for s in sorted(last):
        blocks = [b for b, st in zip(order["block"], order["stage"], strict=True) if st == s]
        r = last[s]
        rows.append(("finetune", s, ",".join(blocks), r["eval_loss"], r["eval_acc"], nan, nan))
    model = quantized_model(ctx)
    loss, acc = evaluate(model, evald, batch_size=bs)
    rows.append(("final", -1, "all", loss, acc, q_size["size_mb"], q_size["weight_compression"]))
    names = METRICS_SCHEMA.names
    table = pa.Table.from_pylist([dict(zip(names, r, strict=True)) for r in rows], METRICS_SCHEMA)
    ctx.write_table("metrics.parquet", table)
    log.info(
        "final accuracy %.4f (float %.4f, PTQ %.4f) at %.4g MB, weight compression %.3gx",
        acc, fa, pa_, q_size["size_mb"], q_size["weight_compression"],
    )  # fmt: skip


def run_export(ctx: StageContext) -> None:
    """Write the integer model, its bit config and a per-layer table."""
    model = quantized_model(ctx)
    bit_config = load_bit_config(ctx)
    tensors = integer_state_dict(model)  # codes + scales + other float tensors
    meta = {"format": EXPORT_FORMAT, "bit_config": json.dumps(bit_config.to_dict())}
    ctx.write_tensors("model_int.safetensors", tensors, **meta)
    atomic_write_text(ctx.path("bit_config.yaml"), bit_config.to_yaml())
    rows = []
    for name, m in quantized_modules(model).items():
        n = m.weight.numel()
        rows.append(
            {
                "module": name,
                "weight_bits": m.weight_bits,
                "act_bits": m.input_quant.bits,
                "n_weights": n,
                "weight_bytes": math.ceil(n * m.weight_bits / 8),
            }
        )
    ctx.write_table("layers.parquet", pa.Table.from_pylist(rows, schema=LAYERS_SCHEMA))
    log.info("exported %d tensors to %s", len(tensors), ctx.path("model_int.safetensors"))
