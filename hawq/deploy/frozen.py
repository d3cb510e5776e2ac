"""Frozen fake-quant layers: integer weight codes + scales and fixed activation qparams.

A :class:`FrozenConv2d` / :class:`FrozenLinear` computes exactly what hawq's
``QuantConv2d`` / ``QuantLinear`` compute in eval mode, bit for bit, from the exported tensors
alone (``hawq.quant.modules.export_integer``): the weight is ``codes * scale`` (the product the
weight quantizer forms, ``round(w / s) * s``) and the input goes through ``fake_quantize`` with
the stored ``(scale, zero_point)`` (what ``ActQuant`` derives from its range on every forward).

The same forward, traced by ``torch.onnx.export``, becomes ONNX QDQ (``symbolic`` below):

- weight: an int8 initializer ``<fqn>.weight_int`` -> ``DequantizeLinear(scale, zero_point=0,
  axis=0)`` (per output channel) - the codes use only ``-(2^(b-1)-1)..2^(b-1)-1``;
- input at ``b`` bits: ``[Clip(lo, hi)] -> QuantizeLinear -> DequantizeLinear`` with a uint8
  zero point ``z``. ONNX rounds half to even and saturates to 0..255; for ``b < 8`` the Clip to
  ``[(0 - z) s, (2^b - 1 - z) s]`` (float32) first keeps codes in ``0..2^b - 1``. That equals
  hawq's ``clamp(round(x / s), -z, n - z) * s``: inside the range nothing changes, and a clipped
  bound ``fl(h s) / s`` lies within a few ulps of the integer ``h`` (h <= 255), so it rounds to h.

State-dict keys equal the export file's keys (``weight_int``, ``weight_scale``, ``weight_bits``,
``act_scale``, ``act_zero_point``, ``act_bits``, plus ``weight`` for a float weight, ``bias``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from hawq.quant.primitives import FLOAT_BITS, check_bits, fake_quantize

__all__ = ["FROZEN_TYPES", "FrozenConv2d", "FrozenLinear"]

UINT8, INT8 = 2, 3  # onnx.TensorProto data types (kept here so that hawq imports no onnx)


class _DequantWeight(torch.autograd.Function):
    """``codes * scale`` (scale broadcast over dim 0); ONNX: ``DequantizeLinear`` on int8."""

    @staticmethod
    def forward(ctx, codes, scale):  # type: ignore[override]
        s = scale if scale.dim() == 0 else scale.reshape(-1, *([1] * (codes.dim() - 1)))
        return codes.to(scale.dtype) * s

    @staticmethod
    def symbolic(g, codes, scale):  # pragma: no cover - runs inside torch.onnx.export
        shape = scale.type().sizes()
        if shape:
            zero = g.op("Constant", value_t=torch.zeros(shape, dtype=torch.int8))
            return g.op("DequantizeLinear", codes, scale, zero, axis_i=0)
        zero = g.op("Constant", value_t=torch.zeros((), dtype=torch.int8))
        return g.op("DequantizeLinear", codes, scale, zero)


class _ActQDQ(torch.autograd.Function):
    """hawq's activation fake-quantizer with fixed qparams; ONNX: [Clip] -> Q -> DQ (uint8)."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, bits, lo, hi):  # type: ignore[override]
        z = torch.tensor(float(zero_point), dtype=scale.dtype, device=scale.device)
        return fake_quantize(x, scale, z, 0, 2**bits - 1)

    @staticmethod
    def symbolic(g, x, scale, zero_point, bits, lo, hi):  # pragma: no cover - ONNX export
        if bits < 8:
            lo_c = g.op("Constant", value_t=torch.tensor(lo, dtype=torch.float32))
            hi_c = g.op("Constant", value_t=torch.tensor(hi, dtype=torch.float32))
            x = g.op("Clip", x, lo_c, hi_c)
        zp = g.op("Constant", value_t=torch.tensor(zero_point, dtype=torch.uint8))
        return g.op("DequantizeLinear", g.op("QuantizeLinear", x, scale, zp), scale, zp)


class _FrozenLayer(nn.Module):
    """Weight (int codes + scale, or float) and input quantizer of one frozen layer."""

    weight_int: torch.Tensor
    weight_scale: torch.Tensor
    act_scale: torch.Tensor
    act_zero_point: torch.Tensor

    def _setup(
        self, tensors: Mapping[str, torch.Tensor], weight_shape: tuple[int, ...], has_bias: bool
    ) -> None:
        """Buffers/parameters from ``tensors`` (keys without the layer prefix), checked."""
        if "weight_int" in tensors:
            self.w_bits = check_bits("weight_bits", int(tensors["weight_bits"]))
            codes, scale = tensors["weight_int"], tensors["weight_scale"].float()
            if tuple(codes.shape) != weight_shape:
                raise ValueError(
                    f"weight_int has shape {tuple(codes.shape)}, expected {weight_shape}"
                )
            qmax = 2 ** (self.w_bits - 1) - 1
            if codes.dtype != torch.int8 or int(codes.abs().max()) > qmax:
                raise ValueError(
                    f"weight_int must be int8 codes in -{qmax}..{qmax} ({self.w_bits} bits)"
                )
            if scale.numel() not in (1, weight_shape[0]) or not bool((scale > 0).all()):
                raise ValueError("weight_scale must be positive, one per output channel or one")
            if not bool(torch.isfinite(scale).all()):
                raise ValueError("weight_scale must be finite")
            self.register_buffer("weight_int", codes.clone())
            self.register_buffer("weight_scale", scale.clone())
            self.register_buffer("weight_bits", torch.tensor(self.w_bits, dtype=torch.int32))
        else:
            self.w_bits = FLOAT_BITS
            self.weight = nn.Parameter(torch.empty(weight_shape), requires_grad=False)
        self.bias = (
            nn.Parameter(torch.empty(weight_shape[0]), requires_grad=False) if has_bias else None
        )
        self.a_bits = FLOAT_BITS
        if "act_scale" in tensors:
            self.a_bits = check_bits("act_bits", int(tensors["act_bits"]))
            s = tensors["act_scale"].float().reshape(())
            z = tensors["act_zero_point"].to(torch.int32).reshape(())
            if not (bool(torch.isfinite(s)) and float(s) > 0):
                raise ValueError(f"act_scale must be positive and finite, got {float(s)}")
            if not 0 <= int(z) <= 2**self.a_bits - 1:
                raise ValueError(f"act_zero_point {int(z)} is outside 0..{2**self.a_bits - 1}")
            self.register_buffer("act_scale", s.clone())
            self.register_buffer("act_zero_point", z.clone())
            self.register_buffer("act_bits", torch.tensor(self.a_bits, dtype=torch.int32))
            n, zf = 2**self.a_bits - 1, float(z)
            # float32 Clip bounds (0 - z) s and (n - z) s of the ONNX graph (see module docstring)
            self._clip = (float(torch.tensor(-zf) * s), float(torch.tensor(n - zf) * s))

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.a_bits == FLOAT_BITS:
            return x
        z = int(self.act_zero_point)
        return _ActQDQ.apply(x, self.act_scale, z, self.a_bits, *self._clip)

    def dequantized_weight(self) -> torch.Tensor:
        if self.w_bits == FLOAT_BITS:
            return self.weight
        return _DequantWeight.apply(self.weight_int, self.weight_scale)

    def _bits_repr(self) -> str:
        return f"w_bits={self.w_bits}, a_bits={self.a_bits}"


class FrozenConv2d(_FrozenLayer):
    """Eval-only ``QuantConv2d`` rebuilt from exported codes/scales (see the module docstring)."""

    def __init__(self, conv: nn.Conv2d, tensors: Mapping[str, torch.Tensor]) -> None:
        super().__init__()
        if conv.padding_mode != "zeros":
            raise ValueError(f"padding_mode {conv.padding_mode!r} is not supported (only 'zeros')")
        self.stride, self.padding = conv.stride, conv.padding
        self.dilation, self.groups = conv.dilation, conv.groups
        self._setup(tensors, tuple(conv.weight.shape), conv.bias is not None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantized_weight()
        x = self.quantized_input(x)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return f"stride={self.stride}, padding={self.padding}, {self._bits_repr()}"


class FrozenLinear(_FrozenLayer):
    """Eval-only ``QuantLinear`` rebuilt from exported codes/scales (see the module docstring)."""

    def __init__(self, linear: nn.Linear, tensors: Mapping[str, torch.Tensor]) -> None:
        super().__init__()
        self._setup(tensors, tuple(linear.weight.shape), linear.bias is not None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quantized_input(x), self.dequantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return self._bits_repr()


FROZEN_TYPES = (FrozenConv2d, FrozenLinear)
