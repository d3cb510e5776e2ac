"""Model size, compression ratios and BOPs of a bit config, counted byte by byte.

Size of a model under a ``BitConfig`` (every byte an integer-inference export must keep):

- a Conv2d/Linear weight at ``b < 32`` bits: ``ceil(numel * b / 8)`` bytes of packed codes plus
  one float32 scale per output channel (per tensor: one); at 32 bits: ``4 * numel``;
- a Conv2d/Linear bias: float32 (``4 * numel``);
- an input-activation quantizer (act bits < 32): scale float32 + zero point int32 = 8 bytes;
- every other parameter and floating-point buffer (BatchNorm weight, bias, running mean and
  var, ...): float32. Integer buffers (``num_batches_tracked``) are training bookkeeping and not
  counted, nor are the fake-quant modules' own EMA buffers (counted as the 8 bytes above).

``MB`` is 2^20 bytes, which matches the HAWQ tables: ResNet-50 in float32 counts
(25,557,032 parameters + 53,120 BN running stats) * 4 B = 97.7 MB (the paper: 97.8 MB).
BOPs of one sample = sum over layers of MACs * w_bits * a_bits, with MACs measured by a
forward pass (hooks) on an example input; float layers count 32 bits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from hawq.quant.bitconfig import BitConfig
from hawq.quant.modules import ActQuant, is_quantizable
from hawq.validation import FLOAT_BITS

MB = 2**20
ACT_QPARAM_BYTES = 8

__all__ = [
    "MB",
    "LayerCost",
    "activation_compression_ratio",
    "bops",
    "compression_ratio",
    "layer_costs",
    "model_size_bytes",
    "model_size_mb",
    "size_summary",
    "weight_compression_ratio",
]


@dataclass(frozen=True, kw_only=True)
class LayerCost:
    """One Conv2d/Linear layer: weight and bias element counts, MACs per sample."""

    name: str
    kind: str  # "conv" or "linear"
    params: int
    bias: int
    macs: int
    out_channels: int


def _layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if is_quantizable(m)]


@torch.no_grad()
def layer_costs(model: nn.Module, example_input: torch.Tensor) -> list[LayerCost]:
    """Per-layer costs (module order) from one eval-mode forward of ``example_input``.

    MACs per sample: Conv2d ``out.numel() / N * (C_in / groups) * kh * kw``; Linear
    ``out.numel() / N * in_features`` (N = the input's first dim). A layer called twice sums.
    """
    layers = _layers(model)
    macs = {n: 0 for n, _ in layers}
    handles = []

    def hook(name: str):
        def fn(m: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            per_out = out.numel() // out.shape[0]
            if isinstance(m, nn.Conv2d):
                k = m.kernel_size[0] * m.kernel_size[1] * (m.in_channels // m.groups)
            else:
                k = m.in_features  # type: ignore[assignment]
            macs[name] += per_out * k

        return fn

    for n, m in layers:
        handles.append(m.register_forward_hook(hook(n)))
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        model(example_input)
    finally:
        for h in handles:
            h.remove()
        for m, t in modes.items():
            m.train(t)
    return [
        LayerCost(
            name=n,
            kind="conv" if isinstance(m, nn.Conv2d) else "linear",
            params=m.weight.numel(),
            bias=0 if m.bias is None else m.bias.numel(),
            macs=macs[n],
            out_channels=m.weight.shape[0],
        )
        for n, m in layers
    ]


def model_size_bytes(model: nn.Module, bit_config: BitConfig) -> int:
    """Bytes of ``model`` under ``bit_config`` (see the module docstring for what counts)."""
    total = 0
    seen: set[int] = set()
    for fqn, m in model.named_modules():
        if isinstance(m, ActQuant):
            continue
        if is_quantizable(m):
            bits = bit_config.resolve(fqn)
            w = m.weight
            seen.add(id(w))
            if bits.weight == FLOAT_BITS:
                total += 4 * w.numel()
            else:
                total += math.ceil(w.numel() * bits.weight / 8)
                total += 4 * (w.shape[0] if bit_config.per_channel else 1)
            if bits.act != FLOAT_BITS:
                total += ACT_QPARAM_BYTES
        for t in (*m.parameters(recurse=False), *m.buffers(recurse=False)):
            if id(t) in seen or not t.is_floating_point():
                continue
            seen.add(id(t))
            total += 4 * t.numel()
    return total


def model_size_mb(model: nn.Module, bit_config: BitConfig) -> float:
    """``model_size_bytes / 2^20``."""
    return model_size_bytes(model, bit_config) / MB


def _float_config() -> BitConfig:
    return BitConfig(weight_bits=FLOAT_BITS, act_bits=FLOAT_BITS)


def compression_ratio(model: nn.Module, bit_config: BitConfig) -> float:
    """Whole-model ratio: float32 bytes / bytes under ``bit_config`` (everything counted)."""
    return model_size_bytes(model, _float_config()) / model_size_bytes(model, bit_config)


def weight_compression_ratio(model: nn.Module, bit_config: BitConfig) -> float:
    """Conv/Linear weights only (the papers' "W-Comp"): 32 sum n_i / sum b_i n_i."""
    layers = _layers(model)
    n = sum(m.weight.numel() for _, m in layers)
    nb = sum(m.weight.numel() * bit_config.resolve(f).weight for f, m in layers)
    return 32 * n / nb


def activation_compression_ratio(model: nn.Module, bit_config: BitConfig) -> float:
    """Mean over Conv/Linear layers of 32 / a_bits of their inputs (float inputs count 1)."""
    ratios = [32 / bit_config.resolve(f).act for f, _ in _layers(model)]
    return sum(ratios) / len(ratios)


def bops(costs: Sequence[LayerCost], bit_config: BitConfig) -> int:
    """Bit operations per sample: sum_i MACs_i * w_bits_i * a_bits_i."""
    total = 0
    for c in costs:
        b = bit_config.resolve(c.name)
        total += c.macs * b.weight * b.act
    return total


def size_summary(
    model: nn.Module, bit_config: BitConfig, example_input: torch.Tensor | None = None
) -> dict[str, float]:
    """size_mb, float_size_mb, compression, weight_compression, act_compression (and with an
    example input: macs, bops, float_bops, bops_ratio), for reports."""
    out: dict[str, float] = {
        "size_mb": model_size_mb(model, bit_config),
        "float_size_mb": model_size_mb(model, _float_config()),
        "compression": compression_ratio(model, bit_config),
        "weight_compression": weight_compression_ratio(model, bit_config),
        "act_compression": activation_compression_ratio(model, bit_config),
    }
    if example_input is not None:
        costs = layer_costs(model, example_input)
        out["macs"] = float(sum(c.macs for c in costs))
        out["bops"] = float(bops(costs, bit_config))
        out["float_bops"] = float(bops(costs, _float_config()))
        out["bops_ratio"] = out["float_bops"] / out["bops"]
    return out
