"""hawq: Hessian-aware mixed-precision quantization (the algorithm, usable alone).

The public API in one place; each name lives in a module of one concept (see docs/architecture.md).
"""

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
from hawq.blocks import Block, derive_seed, partition_blocks
from hawq.deploy import export_onnx, load_quantized
from hawq.eigen import EigenResult, lanczos, power_iteration, top_k
from hawq.hvp import HessianError, HessianOperator
from hawq.order import FineTuneOrder, OrderConfig, finetune_order, omega_matrix
from hawq.qat import QATConfig, evaluate, run_qat
from hawq.quant import BitConfig, LayerBits, export_integer, quantize_, quantize_weight
from hawq.sensitivity import SENSITIVITY_SCHEMA, HessianConfig, analyze
from hawq.size import LayerCost, bops, compression_ratio, layer_costs, model_size_mb, size_summary
from hawq.trace import TraceResult, hutchinson, rademacher_probe

__version__ = "0.1.0"

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
