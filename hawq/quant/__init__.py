"""Quantization API in one place: primitives, ``BitConfig``, fake-quant modules, ``quantize_``.

The code lives in ``hawq.quant.primitives`` (pure functions), ``hawq.quant.bitconfig`` (bit
configs) and ``hawq.quant.modules`` (modules, ``quantize_``, ``export_integer``); this package
re-exports it and is the one import path for users.
"""

from hawq.quant.bitconfig import REGEX_PREFIX, BitConfig, LayerBits
from hawq.quant.modules import (
    ActQuant,
    QuantConv2d,
    QuantLinear,
    bit_config_of,
    calibrate_,
    export_integer,
    quantize_,
    quantized_modules,
)
from hawq.quant.primitives import (
    MSE_CLIP_GRID,
    act_qparams,
    clip_range,
    clips_at,
    ema_update,
    fake_quantize,
    mse_clip_ratios,
    quantize_act,
    quantize_weight,
    quantize_weight_int,
    weight_range,
    weight_scale,
)
from hawq.validation import FLOAT_BITS, VALID_BITS, check_bits

__all__ = [
    "FLOAT_BITS",
    "MSE_CLIP_GRID",
    "REGEX_PREFIX",
    "VALID_BITS",
    "ActQuant",
    "BitConfig",
    "LayerBits",
    "QuantConv2d",
    "QuantLinear",
    "act_qparams",
    "bit_config_of",
    "calibrate_",
    "check_bits",
    "clip_range",
    "clips_at",
    "ema_update",
    "export_integer",
    "fake_quantize",
    "mse_clip_ratios",
    "quantize_",
    "quantize_act",
    "quantize_weight",
    "quantize_weight_int",
    "quantized_modules",
    "weight_range",
    "weight_scale",
]
