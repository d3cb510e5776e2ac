"""hawq: Hessian-aware mixed-precision quantization (the algorithm, usable alone).

The public API in one place; each name lives in a module of one concept (see docs/architecture.md).
"""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _dist_version

from hawq.allocate import (
    Allocation,
    AllocConfig,
    InfeasibleAllocation,
    allocate,
    allocate_model,
    pareto_frontier,
    problem_from_model,
    to_bit_config,
)
from hawq.blocks import Block, partition_blocks
from hawq.deploy import export_onnx, load_quantized
from hawq.hessian.eigen import EigenResult, lanczos, power_iteration, top_k
from hawq.hessian.operator import HessianError, HessianOperator
from hawq.hessian.table import SENSITIVITY_SCHEMA, HessianConfig, analyze
from hawq.hessian.trace import TraceResult, hutchinson, rademacher_probe
from hawq.omega import omega_matrix
from hawq.order import FineTuneOrder, OrderConfig, finetune_order
from hawq.precision import Precision
from hawq.qat import QATConfig, evaluate, run_qat
from hawq.quant import BitConfig, LayerBits, export_integer, quantize_, quantize_weight
from hawq.seeding import derive_seed
from hawq.size import LayerCost, bops, compression_ratio, layer_costs, model_size_mb, size_summary

try:  # the version of pyproject.toml, as installed
    __version__ = _dist_version("hawq")
except PackageNotFoundError:  # a source tree on PYTHONPATH that was never installed
    __version__ = "0+unknown"

__all__ = [
    "SENSITIVITY_SCHEMA",
    "AllocConfig",
    "Allocation",
    "BitConfig",
    "Block",
    "EigenResult",
    "FineTuneOrder",
    "HessianConfig",
    "HessianError",
    "HessianOperator",
    "InfeasibleAllocation",
    "LayerBits",
    "LayerCost",
    "OrderConfig",
    "Precision",
    "QATConfig",
    "TraceResult",
    "allocate",
    "allocate_model",
    "analyze",
    "bops",
    "compression_ratio",
    "derive_seed",
    "evaluate",
    "export_integer",
    "export_onnx",
    "finetune_order",
    "hutchinson",
    "lanczos",
    "layer_costs",
    "load_quantized",
    "model_size_mb",
    "omega_matrix",
    "pareto_frontier",
    "partition_blocks",
    "power_iteration",
    "problem_from_model",
    "quantize_",
    "quantize_weight",
    "rademacher_probe",
    "run_qat",
    "size_summary",
    "to_bit_config",
    "top_k",
]
