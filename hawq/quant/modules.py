"""Fake-quant modules and the in-place ``quantize_`` transform.

``QuantConv2d``/``QuantLinear`` subclass ``nn.Conv2d``/``nn.Linear`` and reuse the float
module's ``weight``/``bias`` Parameter objects, so ``weight``/``bias`` state-dict keys (and an
optimizer's references) stay the same. Each quantizes its weight on every forward
(``quantize_weight``) and its *input* activation with an ``ActQuant`` child named
``input_quant``: activation quantizers sit at the input of every quantized Conv/Linear
(for a residual block this includes the block input; its ``act`` bits are that layer's
input bits, which is what BOPs = MACs * w_bits * a_bits uses). The first layer's input (the
normalised image) is signed; the asymmetric activation quantizer handles it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any, Self

import torch
import torch.nn.functional as F
from torch import nn

from hawq.data_parallel import sync_min_max
from hawq.precision import Precision
from hawq.quant.bitconfig import BitConfig, LayerBits
from hawq.quant.primitives import (
    CLIP_KEYS,
    act_qparams,
    ema_update,
    quantize_act,
    quantize_weight,
    quantize_weight_int,
)
from hawq.validation import FLOAT_BITS, check_bits, check_number

logger = logging.getLogger(__name__)

__all__ = [
    "ActQuant",
    "QuantConv2d",
    "QuantLinear",
    "bit_config_of",
    "calibrate_",
    "export_integer",
    "is_quantizable",
    "quantize_",
    "quantized_modules",
]


def _batch_range(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(min, max) of ``x``; ``(+inf, -inf)`` for an empty tensor (a rank's empty slice)."""
    if x.numel() == 0:
        return x.new_tensor(float("inf")), x.new_tensor(float("-inf"))
    return torch.aminmax(x)


class ActQuant(nn.Module):
    """Asymmetric activation fake-quantizer with an EMA-tracked range.

    In training mode each batch's (min, max) updates the range
    ``r <- momentum * r + (1 - momentum) * batch`` (the first batch sets it; under data
    parallelism the global batch's, all-reduced over the ranks), then ``x`` is
    quantized over it. In eval mode the stored range is used as-is; before any range was
    observed the input passes through unchanged. Buffers ``running_min``, ``running_max``,
    ``initialized`` live in the state dict. ``bits == 32`` is the identity.
    """

    def __init__(self, bits: int = 8, *, momentum: float = 0.99) -> None:
        super().__init__()
        self.bits = check_bits("act bits", bits)
        self.momentum = check_number("momentum", momentum, low=0, high=1, high_open=True)
        self.register_buffer("running_min", torch.zeros(()))
        self.register_buffer("running_max", torch.zeros(()))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bits == FLOAT_BITS:
            return x
        if self.training:
            with torch.no_grad():
                lo, hi = _batch_range(x.detach())
                lo, hi = sync_min_max(lo.float(), hi.float())  # the global batch's range
                if bool(self.initialized):
                    lo = ema_update(self.running_min, lo, self.momentum)
                    hi = ema_update(self.running_max, hi, self.momentum)
                self.running_min.copy_(lo)
                self.running_max.copy_(hi)
                self.initialized.fill_(True)
        elif not bool(self.initialized):
            return x
        return quantize_act(x, self.running_min, self.running_max, self.bits)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, momentum={self.momentum}"


class _QuantMixin:
    """Shared state of the quantized Conv/Linear: bits, weight-quantizer options, input_quant."""

    weight: nn.Parameter
    input_quant: ActQuant

    @classmethod
    def _meta_like(cls, float_module: nn.Module) -> Self:
        """An instance shaped like ``float_module`` on the meta device (no storage)."""
        raise NotImplementedError

    @classmethod
    def from_float(
        cls,
        float_module: nn.Module,
        bits: LayerBits,
        *,
        per_channel: bool = True,
        percentile: float | None = None,
        clip_bits: int | None = None,
        mse_clip: bool = False,
        act_momentum: float = 0.99,
    ) -> Self:
        """The quantized twin of ``float_module``: its weight/bias Parameters, device and mode."""
        q = cls._meta_like(float_module)
        q.weight, q.bias = float_module.weight, float_module.bias
        q.weight_bits = check_bits("weight bits", bits.weight)
        q.per_channel = per_channel
        q.percentile = percentile
        q.clip_bits = clip_bits
        q.mse_clip = mse_clip
        q.input_quant = ActQuant(bits.act, momentum=act_momentum).to(float_module.weight.device)
        return q.train(float_module.training)

    @property
    def bits(self) -> LayerBits:
        return LayerBits(self.weight_bits, self.input_quant.bits)

    def set_bits(self, bits: LayerBits) -> None:
        """Change the bit widths in place (the activation range is kept)."""
        self.weight_bits = check_bits("weight bits", bits.weight)
        self.input_quant.bits = check_bits("act bits", bits.act)

    @property
    def clip_options(self) -> dict[str, Any]:
        """Weight-clipping keyword arguments of ``quantize_weight`` (as in ``BitConfig``)."""
        return {k: getattr(self, k) for k in CLIP_KEYS}

    def quantized_weight(self) -> torch.Tensor:
        """``quantize_weight`` of the weight; without autograd (evaluation) the result is
        cached until the weight changes (its version counter), the bits or the options."""
        if torch.is_grad_enabled():
            self._wq_cache = None
            return quantize_weight(
                self.weight, self.weight_bits, per_channel=self.per_channel, **self.clip_options
            )
        w = self.weight
        key = (
            w.data_ptr(),
            w._version,
            self.weight_bits,
            self.per_channel,
            *self.clip_options.values(),
        )
        cache = getattr(self, "_wq_cache", None)
        if cache is None or cache[0] != key:
            q = quantize_weight(
                w, self.weight_bits, per_channel=self.per_channel, **self.clip_options
            )
            self._wq_cache = cache = (key, q)
        return cache[1]

    def extra_repr(self) -> str:
        p = f", percentile={self.percentile}" if self.percentile is not None else ""
        p += ", mse_clip=True" if self.mse_clip else ""
        p += f", clip_bits={self.clip_bits}" if self.clip_bits is not None else ""
        return (
            f"{super().extra_repr()}, w_bits={self.weight_bits}, a_bits={self.input_quant.bits}, "
            f"per_channel={self.per_channel}{p}"
        )


class QuantConv2d(_QuantMixin, nn.Conv2d):
    """``nn.Conv2d`` whose weight and input are fake-quantized on every forward."""

    @classmethod
    def _meta_like(cls, conv: nn.Conv2d) -> QuantConv2d:
        return cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
            device="meta",
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.input_quant(x), self.quantized_weight(), self.bias)


class QuantLinear(_QuantMixin, nn.Linear):
    """``nn.Linear`` whose weight and input are fake-quantized on every forward."""

    @classmethod
    def _meta_like(cls, linear: nn.Linear) -> QuantLinear:
        bias = linear.bias is not None
        return cls(linear.in_features, linear.out_features, bias=bias, device="meta")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.input_quant(x), self.quantized_weight(), self.bias)


QUANT_TYPES = (QuantConv2d, QuantLinear)


def is_quantizable(m: nn.Module) -> bool:
    """Plain Conv2d/Linear (exact types: subclasses such as MHA's out_proj are left alone)."""
    return type(m) in (nn.Conv2d, nn.Linear) or isinstance(m, QUANT_TYPES)


def _selected(fqn: str, modules: Sequence[str] | None) -> bool:
    if modules is None:
        return True
    return any(fqn == n or fqn.startswith(n + ".") for n in modules)


def quantize_(
    model: nn.Module, bit_config: BitConfig, *, modules: Iterable[str] | None = None
) -> nn.Module:
    """Replace Conv2d/Linear layers of ``model`` in place by fake-quant layers; return ``model``.

    Each layer gets ``bit_config.resolve(fqn)``. ``modules`` restricts the change to the
    named modules and their descendants (stage-wise QAT); a name that matches no module
    raises ``ValueError``. Layers already quantized get their bits updated in place; a plain
    layer that resolves to (32, 32) is left as it is.
    """
    names = None if modules is None else list(modules)
    all_names = {n for n, _ in model.named_modules()}
    if names is not None:
        unknown = [n for n in names if n not in all_names]
        if unknown:
            raise ValueError(f"modules {unknown} are not submodules of the model")
    targets = [
        (n, m) for n, m in model.named_modules() if is_quantizable(m) and _selected(n, names)
    ]
    for fqn, m in targets:
        bits = bit_config.resolve(fqn)
        if isinstance(m, QUANT_TYPES):
            m.set_bits(bits)
            continue
        if bits.weight == FLOAT_BITS and bits.act == FLOAT_BITS:
            continue
        if fqn == "":
            raise ValueError("quantize_ needs a container: the model itself is a Conv2d/Linear")
        cls = QuantConv2d if isinstance(m, nn.Conv2d) else QuantLinear
        q = cls.from_float(
            m,  # type: ignore[arg-type]
            bits,
            per_channel=bit_config.per_channel,
            **bit_config.clip_options,
            act_momentum=bit_config.act_momentum,
        )
        parent_name, _, child = fqn.rpartition(".")
        setattr(model.get_submodule(parent_name), child, q)
        logger.debug("quantized %s at w%d/a%d", fqn, bits.weight, bits.act)
    return model


def quantized_modules(model: nn.Module) -> dict[str, QuantConv2d | QuantLinear]:
    """The fake-quant layers of ``model`` by fully qualified name, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QUANT_TYPES)}


def bit_config_of(model: nn.Module) -> BitConfig:
    """The bits a (partly) quantized model runs at: exact names, defaults 32 (float)."""
    qm = quantized_modules(model)
    first = next(iter(qm.values()), None)
    return BitConfig(
        weight_bits=FLOAT_BITS,
        act_bits=FLOAT_BITS,
        layers={n: m.bits for n, m in qm.items()},
        per_channel=True if first is None else first.per_channel,
        **({} if first is None else first.clip_options),
        act_momentum=0.99 if first is None else first.input_quant.momentum,
    )


@torch.no_grad()
def calibrate_(
    model: nn.Module, batches: Iterable[torch.Tensor], *, precision: Precision | None = None
) -> nn.Module:
    """Observe activation ranges on ``batches`` (inputs only) with everything else in eval mode.

    Only the ``ActQuant`` modules are put in training mode (BatchNorm statistics stay put);
    all training flags are restored afterwards. ``precision``: the forward passes' autocast and
    memory format (those evaluation will use, so the ranges are of the same activations).
    """
    precision = Precision() if precision is None else precision
    precision.model(model)
    modes = {m: m.training for m in model.modules()}
    model.eval()
    for m in model.modules():
        if isinstance(m, ActQuant):
            m.train()
    try:
        for xb in batches:
            xb = precision.inputs(xb, xb.device)
            with precision.autocast(xb.device):
                model(xb)
    finally:
        for m, t in modes.items():
            m.train(t)
    return model


@torch.no_grad()
def export_integer(model: nn.Module) -> dict[str, torch.Tensor]:
    """Integer weights and quantization parameters of every fake-quant layer.

    Per layer ``fqn`` with weight bits < 32: ``fqn.weight_int`` (int8 codes, the weight's
    shape), ``fqn.weight_scale`` (float32, (C_out,) per channel or () per tensor),
    ``fqn.weight_bits`` (int32 scalar); with act bits < 32 and an observed range:
    ``fqn.act_scale`` (float32), ``fqn.act_zero_point`` (int32), ``fqn.act_bits`` (int32).
    Dequantize with ``weight_int * weight_scale`` (broadcast over dim 0).
    """
    out: dict[str, torch.Tensor] = {}
    for fqn, m in quantized_modules(model).items():
        if m.weight_bits != FLOAT_BITS:
            codes, scale = quantize_weight_int(
                m.weight, m.weight_bits, per_channel=m.per_channel, **m.clip_options
            )
            out[f"{fqn}.weight_int"] = codes.contiguous()
            out[f"{fqn}.weight_scale"] = scale.float().contiguous()
            out[f"{fqn}.weight_bits"] = torch.tensor(m.weight_bits, dtype=torch.int32)
        aq = m.input_quant
        if aq.bits != FLOAT_BITS and bool(aq.initialized):
            s, z = act_qparams(aq.running_min, aq.running_max, aq.bits)
            out[f"{fqn}.act_scale"] = s.float()
            out[f"{fqn}.act_zero_point"] = z.to(torch.int32)
            out[f"{fqn}.act_bits"] = torch.tensor(aq.bits, dtype=torch.int32)
    return out
