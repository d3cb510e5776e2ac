"""Stage ``allocate``: bits per block under the size/BOPs target (HAWQ v1 rule or ILP).

Writes ``bits.parquet`` (block, modules, n_params, bits, omega, sensitivity),
``bit_config.yaml`` / ``bit_config.parquet`` (per-module bits), ``summary.parquet`` (sizes,
the compression kinds of the README's glossary, the weight-size target, total Omega, BOPs)
and, with ``allocation.pareto_points >= 2``, ``pareto.parquet`` (the frontier of model size
vs. total Omega; hawq's ``limit_mb`` / ``compression`` renamed ``size_limit_mb`` /
``weight_compression``). :func:`check_feasibility` runs before any work (preflight).
"""

from __future__ import annotations

import logging

import pyarrow as pa
from torch import nn

from hawq import AllocConfig, allocate, pareto_frontier, problem_from_model, size_summary
from hawq.allocate import Problem, check_feasible, weight_bit_budget
from hawq.size import MB
from pipeline.atomic import atomic_write_text
from pipeline.config import ConfigError, RunConfig
from pipeline.stages.base import Params, Stage, StageContext, flat

log = logging.getLogger(__name__)

# hawq's frontier columns -> the run's names (one name per compression kind across files)
PARETO_COLUMNS = {"limit_mb": "size_limit_mb", "compression": "weight_compression"}

SUMMARY_SCHEMA = pa.schema(
    [
        ("method", pa.string()),
        ("sensitivity", pa.string()),
        ("size_mb", pa.float64()),
        ("float_size_mb", pa.float64()),
        ("model_compression", pa.float64()),
        ("weight_compression", pa.float64()),
        ("activation_compression", pa.float64()),
        ("target_size_mb", pa.float64()),
        ("total_omega", pa.float64()),
        ("bops", pa.float64()),
        ("float_bops", pa.float64()),
    ]
)


def params(cfg: RunConfig, fingerprint: str) -> Params:
    return flat("allocation", cfg.allocation.to_dict())


def check_feasibility(cfg: RunConfig, model: nn.Module, blocks: list, example) -> None:
    """Fail before any work when pins/ties name no block or the size/BOPs target is infeasible.

    Feasibility does not depend on the curvature, so unit sensitivities stand in for the
    Hessian results here.
    """
    acfg = cfg.allocation.to_hawq()
    records = [
        {"block": b.name, "modules": list(b.module_names), "n_params": b.n_params,
         "eigenvalue": 1.0, "trace": 1.0}
        for b in blocks
    ]  # fmt: skip
    try:
        problem = problem_from_model(model, records, acfg, example_input=example)
        check_feasible(
            problem,
            size_limit_mb=acfg.size_limit_mb,
            compression=acfg.compression,
            bops_limit=acfg.bops_limit,
        )
    except ValueError as exc:
        raise ConfigError("allocation", str(exc)) from None


def _problem(ctx: StageContext) -> tuple[nn.Module, pa.Table, AllocConfig, Problem]:
    model = ctx.float_model()
    table = ctx.read_table("hessian", "sensitivity.parquet")
    acfg = ctx.cfg.allocation.to_hawq()
    example = ctx.data.example(1).to(ctx.device)
    return model, table, acfg, problem_from_model(model, table, acfg, example_input=example)


def run(ctx: StageContext) -> None:
    """Solve the allocation; record bits, bit config, summary and the Pareto frontier."""
    model, _, acfg, problem = _problem(ctx)
    result = allocate(problem, acfg)
    ctx.write_table("bits.parquet", result.table)
    ctx.write_table("bit_config.parquet", result.bit_config.to_table())
    atomic_write_text(ctx.path("bit_config.yaml"), result.bit_config.to_yaml())
    sizes = size_summary(model, result.bit_config, ctx.data.example(1).to(ctx.device))
    budget = weight_bit_budget(
        problem, size_limit_mb=acfg.size_limit_mb, compression=acfg.compression
    )
    target_mb = None if budget is None else (problem.fixed_bytes + budget / 8) / MB
    row = {
        "method": acfg.method,
        "sensitivity": acfg.sensitivity,
        "size_mb": sizes["size_mb"],
        "float_size_mb": sizes["float_size_mb"],
        "model_compression": sizes["compression"],
        "weight_compression": sizes["weight_compression"],
        "activation_compression": sizes["act_compression"],
        "target_size_mb": target_mb,
        "total_omega": result.total_omega,
        "bops": sizes["bops"],
        "float_bops": sizes["float_bops"],
    }
    ctx.write_table("summary.parquet", pa.Table.from_pylist([row], schema=SUMMARY_SCHEMA))
    points = ctx.cfg.allocation.pareto_points
    if points >= 2:
        frontier = pareto_frontier(
            problem, method=acfg.method, bops_limit=acfg.bops_limit, n_points=points
        )
        ctx.write_table("pareto.parquet", frontier.rename_columns(PARETO_COLUMNS))
    log.info(
        "allocation: %s, %.4g MB (weight compression %.3gx), bits %s",
        acfg.method, row["size_mb"], row["weight_compression"], result.bits,
    )  # fmt: skip


STAGE = Stage(
    name="allocate",
    deps=("hessian",),
    params=params,
    run=run,
    outputs=("bits.parquet", "bit_config.yaml", "summary.parquet"),
    summary="bits per block under the size target (+ Pareto frontier)",
)
