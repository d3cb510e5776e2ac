"""Quantization API in one place: primitives, ``BitConfig``, fake-quant modules, ``quantize_``.

The code lives in ``hawq.quantizers`` (pure functions), ``hawq.bitconfig`` (bit configs) and
``hawq.quant_modules`` (modules, ``quantize_``, ``export_integer``); this module re-exports it.
"""

from hawq.bitconfig import REGEX_PREFIX, BitConfig, LayerBits
from hawq.quant_modules import (
    ActQuant,
    QuantConv2d,
    QuantLinear,
    bit_config_of,
    calibrate_,
    export_integer,
    quantize_,
    quantized_modules,
)
from hawq.quantizers import (
    FLOAT_BITS,
    VALID_BITS,
    act_qparams,
    check_bits,
    ema_update,
    fake_quantize,
    quantize_act,
    quantize_weight,
    quantize_weight_int,
    weight_range,
    weight_scale,
)

__all__ = [
    "FLOAT_BITS",
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
    "ema_update",
    "export_integer",
    "fake_quantize",
    "quantize_",
    "quantize_act",
    "quantize_weight",
    "quantize_weight_int",
    "quantized_modules",
    "weight_range",
    "weight_scale",
]
