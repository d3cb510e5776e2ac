"""Omega: the curvature-weighted quantization perturbation of each block, and its inputs.

For block i with weights W_i (n_i parameters in the Hessian block), top Hessian eigenvalue
lambda_i and Hessian trace Tr(H_i), and a weight bit width b:

    perturbation  P_i(b) = ||Q_b(W_i) - W_i||_2^2        (summed over the block's modules)
    sensitivity   S_i    = lambda_i / n_i   ("eigenvalue", HAWQ v1 precision order)
                  S_i    = Tr(H_i) / n_i    ("trace", HAWQ-V2)
    Omega         Omega_i(b) = s_i * P_i(b), with
                  s_i = lambda_i            ("eigenvalue": the second-order bound
                                             dL <= 1/2 lambda_i ||dW_i||^2, HAWQ v1)
                  s_i = Tr(H_i) / n_i       ("trace": E[dW^T H dW] for an isotropic
                                             perturbation of norm ||dW||, HAWQ-V2)

``BlockRecord``/``block_records`` read the rows of a sensitivity table
(``hawq.hessian.table``); bit allocation (``hawq.allocate``) and the fine-tuning order
(``hawq.order``) both build on Omega.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from hawq.quant.primitives import quantize_weight

logger = logging.getLogger(__name__)

SENSITIVITY_MODES = ("eigenvalue", "trace")


@dataclass(frozen=True, kw_only=True)
class BlockRecord:
    """The fields of one sensitivity-table row that allocation and ordering use."""

    block: str
    modules: tuple[str, ...]
    n_params: int
    eigenvalue: float = math.nan
    trace: float = math.nan

    def __post_init__(self) -> None:
        if not self.block:
            raise ValueError("block must be a non-empty string")
        if self.n_params <= 0:
            raise ValueError(f"n_params of block {self.block!r} must be > 0, got {self.n_params}")


def block_records(table: pa.Table | Iterable[Mapping | BlockRecord]) -> list[BlockRecord]:
    """Rows of a sensitivity table (``hawq.hessian.table`` schema) or equivalent mappings."""
    rows = table.to_pylist() if isinstance(table, pa.Table) else list(table)
    out = []
    for row in rows:
        if isinstance(row, BlockRecord):
            out.append(row)
            continue
        missing = {"block", "modules", "n_params"} - set(row)
        if missing:
            raise ValueError(f"sensitivity rows need columns {sorted(missing)}; got {sorted(row)}")
        out.append(
            BlockRecord(
                block=str(row["block"]),
                modules=tuple(row["modules"]),
                n_params=int(row["n_params"]),
                eigenvalue=_float(row.get("eigenvalue")),
                trace=_float(row.get("trace")),
            )
        )
    names = [r.block for r in out]
    if len(set(names)) != len(names):
        raise ValueError(f"block names must be unique, got {names}")
    if not out:
        raise ValueError("the sensitivity table has no rows")
    return out


def _float(x: object) -> float:
    return math.nan if x is None else float(x)


def _curvature(records: Sequence[BlockRecord], mode: str) -> np.ndarray:
    if mode not in SENSITIVITY_MODES:
        raise ValueError(f"sensitivity must be one of {SENSITIVITY_MODES}, got {mode!r}")
    vals = np.array([getattr(r, mode) for r in records], dtype=np.float64)
    bad = [r.block for r, v in zip(records, vals, strict=True) if not math.isfinite(v)]
    if bad:
        raise ValueError(
            f"sensitivity={mode!r} needs a finite {mode} for every block; missing for {bad} "
            f"(compute it in the Hessian analysis or choose the other sensitivity mode)"
        )
    if (vals < 0).any():
        neg = [r.block for r, v in zip(records, vals, strict=True) if v < 0]
        logger.warning("negative %s for blocks %s clipped to 0 (no curvature penalty)", mode, neg)
        vals = np.clip(vals, 0.0, None)
    return vals


def sensitivity(records: Sequence[BlockRecord], mode: str) -> np.ndarray:
    """S_i = lambda_i / n_i (``"eigenvalue"``) or Tr(H_i) / n_i (``"trace"``)."""
    n = np.array([r.n_params for r in records], dtype=np.float64)
    return _curvature(records, mode) / n


def omega_scale(records: Sequence[BlockRecord], mode: str) -> np.ndarray:
    """s_i in Omega_i(b) = s_i ||Q_b(W_i) - W_i||^2: lambda_i or Tr(H_i) / n_i."""
    if mode == "eigenvalue":
        return _curvature(records, mode)
    return sensitivity(records, mode)


def block_weights(model: nn.Module, modules: Sequence[str]) -> list[torch.Tensor]:
    """The ``weight`` tensors of the named Conv/Linear modules (clear error when missing)."""
    named = dict(model.named_modules())
    out = []
    for fqn in modules:
        mod = named.get(fqn)
        weight = getattr(mod, "weight", None)
        if not isinstance(weight, torch.Tensor):
            raise ValueError(f"module {fqn!r} is not in the model or has no weight tensor")
        out.append(weight.detach())
    return out


def perturbation_matrix(
    model: nn.Module,
    modules: Sequence[Sequence[str]],
    bits: Sequence[int],
    *,
    per_channel: bool = True,
    percentile: float | None = None,
    clip_bits: int | None = None,
    mse_clip: bool = False,
) -> np.ndarray:
    """P[i, j] = sum over block i's modules of ||Q_{bits[j]}(W) - W||_2^2 (float64).

    Q is ``quantize_weight`` with these options (clipping as in ``BitConfig``)."""
    kw = {"per_channel": per_channel, "percentile": percentile}
    kw.update(clip_bits=clip_bits, mse_clip=mse_clip)
    out = np.zeros((len(modules), len(bits)), dtype=np.float64)
    with torch.no_grad():
        for i, names in enumerate(modules):
            for w in block_weights(model, names):
                w64 = w.to(torch.float64)
                for j, b in enumerate(bits):
                    q = quantize_weight(w, int(b), **kw)
                    out[i, j] += float(((q.to(torch.float64) - w64) ** 2).sum())
    return out


def omega_matrix(
    model: nn.Module,
    table: pa.Table | Iterable[Mapping | BlockRecord],
    bits: Sequence[int],
    *,
    sensitivity: str = "trace",
    per_channel: bool = True,
    percentile: float | None = None,
    clip_bits: int | None = None,
    mse_clip: bool = False,
) -> np.ndarray:
    """Omega[i, j] = s_i * ||Q_{bits[j]}(W_i) - W_i||^2 (blocks x bit widths)."""
    records = block_records(table)
    scale = omega_scale(records, sensitivity)
    kw = {"per_channel": per_channel, "percentile": percentile}
    kw.update(clip_bits=clip_bits, mse_clip=mse_clip)
    pert = perturbation_matrix(model, [r.modules for r in records], bits, **kw)
    return scale[:, None] * pert
