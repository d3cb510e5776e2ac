"""Block Hessian analysis: HVP operator, eigen and trace solvers, the sensitivity table.

``operator`` (block-restricted HVPs; ``double_backward`` and ``backward_support`` serve it),
``graph_memory`` (what a cached graph costs), ``eigen`` (power iteration, Lanczos, deflation),
``trace`` (Hutchinson) and ``table`` (``HessianConfig``, ``analyze`` -> one row per block).
This package re-exports their public names.
"""

from hawq.hessian.backward_support import find_double_backward_failures
from hawq.hessian.eigen import EigenResult, lanczos, power_iteration, top_k
from hawq.hessian.graph_memory import GraphMemory, measure_graph_memory
from hawq.hessian.operator import HessianError, HessianOperator, batches_to_cache
from hawq.hessian.table import (
    EIGEN_COLUMNS,
    EIGEN_RESULT_COLUMNS,
    SENSITIVITY_SCHEMA,
    TRACE_COLUMNS,
    HessianConfig,
    analyze,
    block_eigen_row,
    eigen_row,
    resumed_row,
    sensitivity_table,
    trace_columns,
    trace_rows,
)
from hawq.hessian.trace import TraceResult, hutchinson, probe_sample, rademacher_probe

__all__ = [
    "EIGEN_COLUMNS",
    "EIGEN_RESULT_COLUMNS",
    "SENSITIVITY_SCHEMA",
    "TRACE_COLUMNS",
    "EigenResult",
    "GraphMemory",
    "HessianConfig",
    "HessianError",
    "HessianOperator",
    "TraceResult",
    "analyze",
    "batches_to_cache",
    "block_eigen_row",
    "eigen_row",
    "find_double_backward_failures",
    "hutchinson",
    "lanczos",
    "measure_graph_memory",
    "power_iteration",
    "probe_sample",
    "rademacher_probe",
    "resumed_row",
    "sensitivity_table",
    "top_k",
    "trace_columns",
    "trace_rows",
]
