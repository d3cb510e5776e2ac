"""Deployable output: frozen integer layers, loading exported tensors, ONNX QDQ, bit packing.

``load_quantized`` rebuilds the evaluated fake-quant model from exported codes + scales;
``export_onnx`` writes it as an ONNX QDQ model that onnxruntime runs (needs the ``onnx``
extra); ``packed_size_bytes`` measures the weights packed at their real bit widths.
"""

from hawq.deploy.frozen import FROZEN_TYPES, FrozenConv2d, FrozenLinear
from hawq.deploy.loading import (
    freeze_quantized,
    integer_state_dict,
    load_quantized,
    read_exported,
)
from hawq.deploy.onnx_export import ONNX_OPSET, compare_onnx, export_onnx, onnx_session, run_onnx
from hawq.deploy.packing import pack_codes, packed_size_bytes, unpack_codes

__all__ = [
    "FROZEN_TYPES",
    "ONNX_OPSET",
    "FrozenConv2d",
    "FrozenLinear",
    "compare_onnx",
    "export_onnx",
    "freeze_quantized",
    "integer_state_dict",
    "load_quantized",
    "onnx_session",
    "pack_codes",
    "packed_size_bytes",
    "read_exported",
    "run_onnx",
    "unpack_codes",
]
