"""Stage ``export``: the fine-tuned model as integer weights + scales, its bit config, a table.

Writes ``model_int.safetensors`` (``hawq.deploy.integer_state_dict``: integer codes and scales,
plus the remaining float tensors: biases, BatchNorm; metadata: format and bit config),
``bit_config.yaml`` and ``layers.parquet`` (bits and bytes per quantized layer).
"""

from __future__ import annotations

import json
import logging
import math

import pyarrow as pa

from hawq.deploy import integer_state_dict
from hawq.quant.modules import quantized_modules
from pipeline.atomic import atomic_write_text
from pipeline.stages.artifacts import load_bit_config, quantized_model
from pipeline.stages.base import Stage, StageContext, no_params

log = logging.getLogger(__name__)

EXPORT_FORMAT = "hawq.export/1"
LAYERS_SCHEMA = pa.schema(
    [
        ("module", pa.string()),
        ("weight_bits", pa.int64()),
        ("act_bits", pa.int64()),
        ("n_weights", pa.int64()),
        ("weight_bytes", pa.int64()),
    ]
)


def run(ctx: StageContext) -> None:
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


STAGE = Stage(
    name="export",
    deps=("finetune",),
    params=no_params,
    run=run,
    outputs=("model_int.safetensors", "bit_config.yaml", "layers.parquet"),
    summary="integer weights + scales (safetensors), bit config (YAML)",
)
