"""Per-block Hessian sensitivity: top eigenvalue(s) and Hutchinson trace, as a Parquet-ready table.

``analyze`` opens one :class:`~hawq.hvp.HessianOperator` over the batches, computes every
block's top eigenvalue (Lanczos or power iteration on ``v -> H_bb v``; HAWQ v1's ``lambda_i``)
and, if ``config.trace``, every block's trace ``Tr(H_bb)`` from shared Hutchinson probes
(HAWQ-V2's ``Tr(H_i)``; ``trace_method="deflated"`` deflates each block's Lanczos basis
first, see ``hawq.hessian.trace_deflated``). Sensitivities are then ``eigenvalue / n_params`` or
``trace / n_params``; this module reports the raw quantities.

Determinism: block ``b``'s start vector is ``randn`` from a generator seeded with
``derive_seed(seed, "eig", b.name)`` (drawn in float64 on the CPU), probe ``p`` from
``derive_seed(seed, "probe", p)``. The same seed, data and thread count give a bitwise
identical table except ``seconds`` (wall time), which determinism checks must ignore.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial

import pyarrow as pa
import torch
from torch import nn
from tqdm.auto import tqdm

from hawq.blocks import Block, derive_seed, partition_blocks
from hawq.eigen import METHODS, EigenResult, top_k
from hawq.hessian.trace_deflated import TRACE_METHODS, Deflation, joint_probe_samples
from hawq.hvp import Batch, HessianOperator, LossFn
from hawq.trace import hutchinson, rademacher_probe

logger = logging.getLogger(__name__)

SENSITIVITY_SCHEMA = pa.schema(
    [
        pa.field("block", pa.string(), nullable=False),
        pa.field("modules", pa.list_(pa.string())),
        pa.field("n_params", pa.int64()),
        pa.field("eigenvalue", pa.float64()),
        pa.field("hvps", pa.int64()),
        pa.field("residual", pa.float64()),
        pa.field("converged", pa.bool_()),
        pa.field("trace", pa.float64()),
        pa.field("trace_stderr", pa.float64()),
        pa.field("trace_probes", pa.int64()),
        pa.field("seed", pa.int64()),
        pa.field("seconds", pa.float64()),
        pa.field("eigenvalues", pa.list_(pa.float64())),
    ]
)
"""One row per block in partition order. ``eigenvalue``/``residual`` describe the top pair
(largest magnitude); ``eigenvalues`` lists all ``top_k``; ``hvps`` counts all of them;
``converged`` is true when every pair converged; trace columns are null if ``trace=False``."""

EIGEN_COLUMNS = (
    "block", "modules", "n_params", "eigenvalue", "eigenvalues", "hvps", "residual",
    "converged", "seed", "seconds",
)  # fmt: skip
TRACE_COLUMNS = ("trace", "trace_stderr", "trace_probes")


def _positive(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, got {type(value).__name__}")
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a positive finite number, got {value}")


def _int_at_least(name: str, value: int, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class HessianConfig:
    """How to estimate block sensitivities (validated on construction)."""

    method: str = "lanczos"
    tol: float = 1e-3
    max_iter: int = 100
    top_k: int = 1
    trace: bool = True
    trace_method: str = "hutchinson"
    """``hutchinson`` (plain probes) or ``deflated`` (Krylov-deflated, needs ``lanczos``)."""
    trace_tol: float = 0.05
    trace_max_probes: int = 200
    trace_min_probes: int = 10
    seed: int = 0
    memory_budget_mb: float | None = 4096.0
    """Cap on cached first-order graphs; ``None`` caches every batch, ``0`` none."""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        _positive("tol", self.tol)
        _int_at_least("max_iter", self.max_iter, 1)
        _int_at_least("top_k", self.top_k, 1)
        if not isinstance(self.trace, bool):
            raise ValueError(f"trace must be a bool, got {self.trace!r}")
        if self.trace_method not in TRACE_METHODS:
            raise ValueError(
                f"trace_method must be one of {TRACE_METHODS}, got {self.trace_method!r}"
            )
        _positive("trace_tol", self.trace_tol)
        _int_at_least("trace_min_probes", self.trace_min_probes, 2)
        _int_at_least("trace_max_probes", self.trace_max_probes, self.trace_min_probes)
        _int_at_least("seed", self.seed, 0)
        if self.seed >= 2**63:
            raise ValueError(f"seed must be < 2**63, got {self.seed}")
        if self.memory_budget_mb is not None:
            if isinstance(self.memory_budget_mb, bool) or not isinstance(
                self.memory_budget_mb, int | float
            ):
                raise ValueError("memory_budget_mb must be a number >= 0 or None")
            if not (self.memory_budget_mb >= 0 and math.isfinite(self.memory_budget_mb)):
                raise ValueError(
                    f"memory_budget_mb must be >= 0 or None, got {self.memory_budget_mb}"
                )

    @property
    def memory_budget_bytes(self) -> int | None:
        return None if self.memory_budget_mb is None else int(self.memory_budget_mb * 2**20)


def block_eigen_row(op: HessianOperator, block: Block, config: HessianConfig) -> dict:
    """The eigen columns of ``block``'s row (see ``EIGEN_COLUMNS``)."""
    return block_eigen(op, block, config)[0]


def block_eigen(
    op: HessianOperator, block: Block, config: HessianConfig
) -> tuple[dict, EigenResult]:
    """``block``'s eigen row and its top eigen result (with the Lanczos basis)."""
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(derive_seed(config.seed, "eig", block.name))
    v0 = torch.randn(op.dim(block.name), generator=gen, dtype=torch.float64)
    v0 = v0.to(dtype=op.dtype, device=op.device)
    results = top_k(
        partial(op.hvp, block.name),
        v0,
        config.top_k,
        method=config.method,
        tol=config.tol,
        max_iter=config.max_iter,
        generator=gen,
    )
    row = {
        "block": block.name,
        "modules": list(block.module_names),
        "n_params": block.n_params,
        "eigenvalue": results[0].eigenvalue,
        "eigenvalues": [r.eigenvalue for r in results],
        "hvps": sum(r.hvps for r in results),
        "residual": results[0].residual,
        "converged": all(r.converged for r in results),
        "seed": config.seed,
        "seconds": time.perf_counter() - start,
    }
    return row, results[0]


def trace_rows(
    op: HessianOperator,
    config: HessianConfig,
    *,
    progress: bool = False,
    deflation: Deflation | None = None,
) -> dict[str, dict]:
    """The trace columns of every block, from one joint HVP per Rademacher probe.

    With ``deflation`` each probe is projected off the blocks' bases first (see
    ``hawq.hessian.trace_deflated``); without it, plain Hutchinson.
    """
    dims = {b.name: op.dim(b.name) for b in op.blocks}
    bar = tqdm(total=config.trace_max_probes, desc="hutchinson", unit="probe", disable=not progress)

    def sample(p: int) -> dict[str, float]:
        vs = rademacher_probe(dims, config.seed, p, dtype=op.dtype, device=op.device)
        samples = joint_probe_samples(op, vs, deflation)
        bar.update(1)
        return samples

    try:
        results = hutchinson(
            sample,
            list(dims),
            tol=config.trace_tol,
            max_probes=config.trace_max_probes,
            min_probes=config.trace_min_probes,
        )
    finally:
        bar.close()
    return {
        b: {"trace": r.mean, "trace_stderr": r.stderr, "trace_probes": r.probes}
        for b, r in results.items()
    }


def _resumed_row(row: Mapping, block: Block, config: HessianConfig) -> dict:
    missing = [c for c in EIGEN_COLUMNS if c not in row]
    if missing:
        raise ValueError(f"done[{block.name!r}] lacks columns {missing}")
    if row["block"] != block.name or row["seed"] != config.seed:
        raise ValueError(
            f"done[{block.name!r}] is for block {row['block']!r} with seed {row['seed']}, "
            f"not seed {config.seed}"
        )
    return {c: row[c] for c in EIGEN_COLUMNS}


def analyze(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Batch],
    config: HessianConfig | None = None,
    *,
    blocks: Sequence[Block] | None = None,
    grouping: str = "layer",
    done: Mapping[str, Mapping] | None = None,
    on_row: Callable[[dict], None] | None = None,
    progress: bool = True,
) -> pa.Table:
    """Sensitivity table (``SENSITIVITY_SCHEMA``) of every block of ``model``.

    blocks: defaults to ``partition_blocks(model, grouping=grouping)``.
    done: eigen rows already computed (resume), keyed by block name; reused as they are
        (with ``trace_method="deflated"`` their Lanczos bases, not persisted, are rebuilt:
        the same deterministic solve, so the traces equal an uninterrupted run's).
    on_row: called with each newly computed eigen row (not for ``done`` rows), e.g. to
        persist it; trace columns are added to the table after all eigen rows.
    """
    config = HessianConfig() if config is None else config
    if not isinstance(config, HessianConfig):
        raise ValueError(f"config must be a HessianConfig, got {type(config).__name__}")
    blocks = list(partition_blocks(model, grouping=grouping) if blocks is None else blocks)
    done = done or {}
    rows: dict[str, dict] = {}
    deflate = config.trace and config.trace_method == "deflated"
    tops: dict[str, EigenResult] = {}
    with HessianOperator(
        model, loss_fn, batches, blocks, memory_budget_bytes=config.memory_budget_bytes
    ) as op:
        todo = [b for b in blocks if b.name not in done]
        bar = tqdm(
            total=len(blocks),
            initial=len(blocks) - len(todo),
            desc="block eigenvalues",
            unit="block",
            disable=not progress,
        )
        spent = 0.0
        try:
            for b in blocks:
                if b.name in done:
                    rows[b.name] = _resumed_row(done[b.name], b, config)
                    continue
                row, top = block_eigen(op, b, config)
                rows[b.name] = row
                if deflate:
                    tops[b.name] = top
                spent += row["seconds"]
                finished = len([r for r in rows if r not in done])
                logger.info(
                    "block %s: eigenvalue %.6g (%d HVPs, %.2fs; %d/%d left, ETA %.0fs)",
                    b.name, row["eigenvalue"], row["hvps"], row["seconds"],
                    len(todo) - finished, len(todo), spent / finished * (len(todo) - finished),
                )  # fmt: skip
                if on_row is not None:
                    on_row(dict(row))
                bar.update(1)
        finally:
            bar.close()
        deflation = None
        if deflate:
            for b in blocks:
                if b.name not in tops:
                    logger.info("block %s: rebuilding its Lanczos basis for the trace", b.name)
                    tops[b.name] = block_eigen(op, b, config)[1]
            deflation = Deflation.from_eigen({b.name: tops[b.name] for b in blocks})
        traces = (
            trace_rows(op, config, progress=progress, deflation=deflation) if config.trace else {}
        )
    empty = dict.fromkeys(TRACE_COLUMNS)
    return pa.Table.from_pylist(
        [{**rows[b.name], **traces.get(b.name, empty)} for b in blocks], schema=SENSITIVITY_SCHEMA
    )
