"""Per-block Hessian sensitivity: top eigenvalue(s) and Hutchinson trace, as a Parquet-ready table.

``analyze`` opens one :class:`~hawq.hessian.operator.HessianOperator` over the batches, computes
every block's top eigenvalue (Lanczos or power iteration on ``v -> H_bb v``; HAWQ v1's ``lambda_i``)
and, if ``config.trace``, every block's trace ``Tr(H_bb)`` from shared Hutchinson probes
(HAWQ-V2's ``Tr(H_i)``; ``trace_method="deflated"`` deflates each block's Lanczos basis
first, see ``hawq.hessian.trace_deflated``). Sensitivities are then ``eigenvalue / n_params`` or
``trace / n_params``; this module reports the raw quantities.

The rows are assembled by public functions (``eigen_row``, ``resumed_row`` for finished rows of
an earlier run, ``trace_columns`` over per-probe samples, ``sensitivity_table``) that a
distributed backend calls too, so its table is built exactly as ``analyze``'s.

Determinism: block ``b``'s start vector is ``randn`` from a generator seeded with
``derive_seed(seed, "eig", b.name)`` (drawn in float64 on the CPU), probe ``p`` from
``derive_seed(seed, "probe", p)``. The same seed, data and thread count give a bitwise
identical table except ``seconds`` (wall time), which determinism checks must ignore.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial

import pyarrow as pa
import torch
from torch import nn

from hawq.blocks import Block, partition_blocks
from hawq.hessian.eigen import METHODS, EigenResult, top_k
from hawq.hessian.memory import GraphMemory, check_memory_budget, estimate_graph_memory
from hawq.hessian.operator import Batch, HessianOperator, LossFn
from hawq.hessian.trace import hutchinson, probe_samples
from hawq.hessian.trace_deflated import TRACE_METHODS, Deflation
from hawq.optional import progress_bar
from hawq.seeding import derive_seed
from hawq.validation import check_int, check_number, check_seed

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
EIGEN_RESULT_COLUMNS = ("eigenvalue", "eigenvalues", "hvps", "residual", "converged", "seconds")
"""The computed part of an eigen row; the rest describes the block (see ``eigen_row``)."""
TRACE_COLUMNS = ("trace", "trace_stderr", "trace_probes")


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
    trace_probe_chunk: int = 8
    """Probes per batch of joint HVPs: each uncached batch's first-order graph is built once
    per chunk instead of once per probe. Results do not depend on it; a chunk may compute up
    to ``trace_probe_chunk - 1`` probes past the stopping point (wasted HVPs)."""
    seed: int = 0
    memory_budget_mb: float | None = 4096.0
    """Cap on cached first-order graphs; ``None`` caches every batch, ``0`` none (each HVP
    rebuilds them). A positive cap below one batch's graph is an error before any work."""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        check_number("tol", self.tol, low=0, low_open=True)
        check_int("max_iter", self.max_iter, low=1)
        check_int("top_k", self.top_k, low=1)
        if not isinstance(self.trace, bool):
            raise ValueError(f"trace must be a bool, got {self.trace!r}")
        if self.trace_method not in TRACE_METHODS:
            raise ValueError(
                f"trace_method must be one of {TRACE_METHODS}, got {self.trace_method!r}"
            )
        check_number("trace_tol", self.trace_tol, low=0, low_open=True)
        check_int("trace_min_probes", self.trace_min_probes, low=2)
        check_int("trace_max_probes", self.trace_max_probes, low=self.trace_min_probes)
        check_int("trace_probe_chunk", self.trace_probe_chunk, low=1)
        check_seed("seed", self.seed)
        if self.memory_budget_mb is not None:
            check_number("memory_budget_mb", self.memory_budget_mb, low=0)

    @property
    def memory_budget_bytes(self) -> int | None:
        return None if self.memory_budget_mb is None else int(self.memory_budget_mb * 2**20)


def eigen_row(block: Block, config: HessianConfig, computed: Mapping) -> dict:
    """``block``'s eigen row (``EIGEN_COLUMNS``): its name, modules, size and the seed, plus
    the ``EIGEN_RESULT_COLUMNS`` of ``computed`` (e.g. what a remote worker sent back)."""
    return {
        "block": block.name,
        "modules": list(block.module_names),
        "n_params": block.n_params,
        **{c: computed[c] for c in EIGEN_RESULT_COLUMNS},
        "seed": config.seed,
    }


def resumed_row(row: Mapping, block: Block, config: HessianConfig) -> dict:
    """A finished eigen row of ``block`` (from a previous run), checked and reduced to
    ``EIGEN_COLUMNS``; ``ValueError`` if it lacks columns or is for another block or seed."""
    missing = [c for c in EIGEN_COLUMNS if c not in row]
    if missing:
        raise ValueError(f"done[{block.name!r}] lacks columns {missing}")
    if row["block"] != block.name or row["seed"] != config.seed:
        raise ValueError(
            f"done[{block.name!r}] is for block {row['block']!r} with seed {row['seed']}, "
            f"not seed {config.seed}"
        )
    return {c: row[c] for c in EIGEN_COLUMNS}


def block_eigen_row(op: HessianOperator, block: Block, config: HessianConfig) -> dict:
    """Compute ``block``'s eigen row (``EIGEN_COLUMNS``): top-k eigenpairs of ``H_bb``."""
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
    computed = {
        "eigenvalue": results[0].eigenvalue,
        "eigenvalues": [r.eigenvalue for r in results],
        "hvps": sum(r.hvps for r in results),
        "residual": results[0].residual,
        "converged": all(r.converged for r in results),
        "seconds": time.perf_counter() - start,
    }
    return eigen_row(block, config, computed), results[0]


def trace_columns(
    sample_fn: Callable[[int], Mapping[str, float]], blocks: Sequence[str], config: HessianConfig
) -> dict[str, dict]:
    """The ``TRACE_COLUMNS`` of every block: ``hutchinson`` over the per-probe samples
    ``sample_fn(p)`` (``probe_sample`` here or on remote workers), stopped by ``config``."""
    results = hutchinson(
        sample_fn,
        blocks,
        tol=config.trace_tol,
        max_probes=config.trace_max_probes,
        min_probes=config.trace_min_probes,
    )
    return {
        b: {"trace": r.mean, "trace_stderr": r.stderr, "trace_probes": r.probes}
        for b, r in results.items()
    }


ProbeCallback = Callable[[int, dict[str, float]], None]


def resumable_samples(
    samples_fn: Callable[[Sequence[int]], Sequence[Mapping[str, float]]],
    done: Mapping[int, Mapping[str, float]] | None = None,
    on_sample: ProbeCallback | None = None,
    *,
    chunk: int = 1,
    limit: int,
) -> Callable[[int], Mapping[str, float]]:
    """``sample_fn(p)`` for ``hutchinson``: probe ``p``'s samples from ``done`` when there (an
    earlier, interrupted run), else from one ``samples_fn(ps)`` call over ``p`` and the next
    probes below ``limit`` not in ``done``, ``chunk`` in all; each computed probe goes to
    ``on_sample(q, samples)`` (to persist it). Same samples in the same order whatever
    ``chunk`` and ``done``: the same traces, bit for bit."""
    check_int("chunk", chunk, low=1)
    done = dict(done or {})
    fresh: dict[int, Mapping[str, float]] = {}

    def sample(p: int) -> Mapping[str, float]:
        if p in done:
            return done[p]
        if p not in fresh:
            ps = [q for q in range(p, max(limit, p + 1)) if q not in done][:chunk]
            for q, out in zip(ps, samples_fn(ps), strict=True):
                fresh[q] = out
                if on_sample is not None:
                    on_sample(q, dict(out))
        return fresh.pop(p)

    return sample


def trace_rows(
    op: HessianOperator,
    config: HessianConfig,
    *,
    progress: bool = False,
    deflation: Deflation | None = None,
    probes: Mapping[int, Mapping[str, float]] | None = None,
    on_probe: ProbeCallback | None = None,
) -> dict[str, dict]:
    """The trace columns of every block, from one joint HVP per Rademacher probe, computed
    ``config.trace_probe_chunk`` probes at a time (each batch's graph built once per chunk).

    With ``deflation`` each probe is projected off the blocks' bases first (see
    ``hawq.hessian.trace_deflated``); without it, plain Hutchinson. probes: per-probe samples
    already computed (resume); on_probe: called with each new one.
    """
    dims = {b.name: op.dim(b.name) for b in op.blocks}
    bar = progress_bar(
        total=config.trace_max_probes, desc="hutchinson", unit="probe", disable=not progress
    )

    def samples(ps: Sequence[int]) -> list[dict[str, float]]:
        out = probe_samples(op, dims, config.seed, ps, deflation)
        bar.update(len(ps))
        return out

    sample_fn = resumable_samples(
        samples, probes, on_probe, chunk=config.trace_probe_chunk, limit=config.trace_max_probes
    )
    try:
        return trace_columns(sample_fn, list(dims), config)
    finally:
        bar.close()


def sensitivity_table(
    blocks: Sequence[Block], rows: Mapping[str, Mapping], traces: Mapping[str, Mapping]
) -> pa.Table:
    """The ``SENSITIVITY_SCHEMA`` table: eigen ``rows`` and ``traces`` (null when absent) by
    block name, in ``blocks`` order."""
    empty = dict.fromkeys(TRACE_COLUMNS)
    return pa.Table.from_pylist(
        [{**rows[b.name], **traces.get(b.name, empty)} for b in blocks], schema=SENSITIVITY_SCHEMA
    )


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
    probes: Mapping[int, Mapping[str, float]] | None = None,
    on_probe: ProbeCallback | None = None,
    progress: bool = True,
    graph_memory: GraphMemory | None = None,
) -> pa.Table:
    """Sensitivity table (``SENSITIVITY_SCHEMA``) of every block of ``model``.

    blocks: defaults to ``partition_blocks(model, grouping=grouping)``.
    done: eigen rows already computed (resume), keyed by block name; reused as they are
        (with ``trace_method="deflated"`` their Lanczos bases, not persisted, are rebuilt:
        the same deterministic solve, so the traces equal an uninterrupted run's).
    on_row: called with each newly computed eigen row (not for ``done`` rows), e.g. to
        persist it; trace columns are added to the table after all eigen rows.
    probes / on_probe: the same for the Hutchinson probes (``{probe: {block: sample}}``).

    A positive ``config.memory_budget_mb`` that cannot hold one batch's first-order graph is a
    ``hawq.hessian.memory.MemoryBudgetError`` (a ``ValueError``) before any work; the check
    uses ``graph_memory`` when the caller has already estimated it (same model, loss, blocks).
    """
    config = HessianConfig() if config is None else config
    if not isinstance(config, HessianConfig):
        raise ValueError(f"config must be a HessianConfig, got {type(config).__name__}")
    blocks = list(partition_blocks(model, grouping=grouping) if blocks is None else blocks)
    batches = list(batches)
    done = done or {}
    rows: dict[str, dict] = {}
    deflate = config.trace and config.trace_method == "deflated"
    tops: dict[str, EigenResult] = {}
    with HessianOperator(
        model, loss_fn, batches, blocks, memory_budget_bytes=config.memory_budget_bytes
    ) as op:
        if config.memory_budget_mb:  # batches validated by the operator, no graph built yet
            memory = graph_memory or estimate_graph_memory(model, loss_fn, batches[0], blocks)
            largest = max(x.shape[0] for x, _ in batches)
            check_memory_budget(memory, largest, config.memory_budget_mb)
        todo = [b for b in blocks if b.name not in done]
        bar = progress_bar(
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
                    rows[b.name] = resumed_row(done[b.name], b, config)
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
            trace_rows(
                op,
                config,
                progress=progress,
                deflation=deflation,
                probes=probes,
                on_probe=on_probe,
            )
            if config.trace
            else {}
        )
    return sensitivity_table(blocks, rows, traces)
