"""Block Hessian analysis: HVP operator, eigen and trace solvers, the sensitivity table.

``operator`` (block-restricted HVPs; ``double_backward`` and ``backward_support`` serve it;
``memory`` estimates one batch's graph and checks the budget, ``graph_cache`` picks the
batches whose graphs are kept),
``eigen`` (power iteration, Lanczos, deflation), ``trace`` (Hutchinson) and ``table``
(``HessianConfig``, ``analyze`` -> one row per block). This package re-exports their public
names.
"""

from hawq.hessian.backward_support import find_double_backward_failures
from hawq.hessian.eigen import EigenResult, lanczos, power_iteration, top_k
from hawq.hessian.graph_cache import batches_to_cache
from hawq.hessian.memory import (
    GraphMemory,
    MemoryBudgetError,
    check_memory_budget,
    estimate_graph_memory,
)
from hawq.hessian.operator import HessianError, HessianOperator
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
from hawq.hessian.trace import (
    TraceResult,
    hutchinson,
    probe_sample,
    probe_samples,
    rademacher_probe,
)

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
    "MemoryBudgetError",
    "TraceResult",
    "analyze",
    "batches_to_cache",
    "block_eigen_row",
    "check_memory_budget",
    "eigen_row",
    "estimate_graph_memory",
    "find_double_backward_failures",
    "hutchinson",
    "lanczos",
    "power_iteration",
    "probe_sample",
    "probe_samples",
    "rademacher_probe",
    "resumed_row",
    "sensitivity_table",
    "top_k",
    "trace_columns",
    "trace_rows",
]
