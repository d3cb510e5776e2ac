"""An allocation's result as data: the block bit table and its per-module ``BitConfig``.

``bits_table`` lists, per block in partition order, its modules, weight count, bits, Omega at
those bits and sensitivity (``ALLOCATION_SCHEMA``); ``to_bit_config`` expands such a table to
``LayerBits(bits, act)`` per module, the network input and the last layer's input at their own
activation bits. Both are re-exported by :mod:`hawq.allocate`, the one allocation entry point.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from hawq.bit_problem import Problem
from hawq.quant.bitconfig import BitConfig, LayerBits

__all__ = ["ALLOCATION_SCHEMA", "bits_table", "to_bit_config"]

ALLOCATION_SCHEMA = pa.schema(
    [
        ("block", pa.string()),
        ("modules", pa.list_(pa.string())),
        ("n_params", pa.int64()),
        ("bits", pa.int64()),
        ("omega", pa.float64()),
        ("sensitivity", pa.float64()),
    ]
)


def bits_table(problem: Problem, bits: np.ndarray) -> pa.Table:
    """The block bit table (``ALLOCATION_SCHEMA``) of ``bits``, one per block of ``problem``."""
    cols = [problem.bits.index(int(b)) for b in bits]
    return pa.table(
        {
            "block": problem.blocks,
            "modules": [list(r.modules) for r in problem.records],
            "n_params": [r.n_params for r in problem.records],
            "bits": [int(b) for b in bits],
            "omega": problem.omega[np.arange(len(cols)), cols],
            "sensitivity": problem.sensitivity,
        },
        schema=ALLOCATION_SCHEMA,
    )


def to_bit_config(
    table: pa.Table,
    *,
    act_bits: int = 8,
    input_act_bits: int | None = None,
    last_act_bits: int | None = None,
    default: LayerBits | None = None,
    per_channel: bool = True,
    percentile: float | None = None,
    clip_bits: int | None = None,
    mse_clip: bool = False,
) -> BitConfig:
    """Expand a block bit table (columns modules, bits) to per-module ``LayerBits(b, act)``.

    The first module of the first row (the network input) gets ``input_act_bits`` and the
    last module of the last row ``last_act_bits`` as input bits (None = ``act_bits``); rows
    are in partition (= module) order. Modules in no block get ``default`` (float, 32/32).
    """
    default = default or LayerBits(32, 32)
    cols = table.select(["modules", "bits"]).to_pydict()
    mods = [m for ms in cols["modules"] for m in ms]
    act = {m: act_bits for m in mods}
    if mods and input_act_bits is not None:
        act[mods[0]] = input_act_bits
    if mods and last_act_bits is not None:
        act[mods[-1]] = last_act_bits
    layers = {
        m: LayerBits(int(b), act[m])
        for ms, b in zip(cols["modules"], cols["bits"], strict=True)
        for m in ms
    }
    return BitConfig(
        weight_bits=default.weight,
        act_bits=default.act,
        layers=layers,
        per_channel=per_channel,
        percentile=percentile,
        clip_bits=clip_bits,
        mse_clip=mse_clip,
    )
