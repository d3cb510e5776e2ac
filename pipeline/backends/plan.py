"""The Hessian stage's caching plan: which batches each actor caches, and the default grid.

With ``D`` data shards, actor ``(g, d)`` holds batches ``d, d + D, ...`` and its
``HessianOperator`` keeps the first-order graphs of a prefix of them under its own memory
budget (``hawq.hessian.graph_cache.batches_to_cache``); the others are rebuilt on every HVP
(forward + create-graph backward, ~3-4x a cached HVP; once per chunk of Hutchinson probes).
The plan applies that same rule to the estimated size of one graph (``hawq.hessian.memory``),
so it says before any work how many batches each actor caches and rebuilds and how much memory
it holds. Every block group holds the same shards, so one group's rows describe them all.

Default grid (``data_shards`` not set): the smallest ``D`` whose shards cache every batch,
capped by what the cluster can place (``D x G`` actors of ``cpus_per_actor`` CPUs and
``gpus_per_actor`` GPUs) and by the number of batches; when even the cap cannot cache them
all, the cap (the most that fits).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from hawq.hessian.graph_cache import batches_to_cache
from hawq.hessian.memory import GraphMemory, estimate_graph_memory
from pipeline.backends.base import HessianJob
from pipeline.backends.ray.config import RayBackendConfig

logger = logging.getLogger(__name__)

MB = 2**20


def _mb(nbytes: float) -> str:
    return f"{nbytes / MB:.1f} MB" if nbytes < 10 * MB else f"{nbytes / MB:.0f} MB"


@dataclass(frozen=True, kw_only=True)
class ShardCache:
    """One data shard's batches, how many keep their graph, and the bytes those hold."""

    shard: int
    batches: int
    cached: int
    cached_bytes: int

    @property
    def rebuilt(self) -> int:
        """Batches whose graph is rebuilt on every HVP."""
        return self.batches - self.cached


@dataclass(frozen=True, kw_only=True)
class CachePlan:
    """The ``D x G`` grid, one graph's estimated size, the per-actor budget and each shard."""

    data_shards: int
    block_groups: int
    graph_bytes: int
    """Estimated bytes of one cached graph of the first batch."""
    batch_size: int
    budget_bytes: int | None
    """Per-actor cap on cached graphs (``None``: no cap)."""
    shards: tuple[ShardCache, ...]
    chosen: str = ""
    """Why this ``D`` (empty when the user set it)."""

    @property
    def all_cached(self) -> bool:
        return all(s.rebuilt == 0 for s in self.shards)

    def describe(self) -> str:
        """A few log lines: the grid, the sizes, one line per shard and the outcome."""
        budget = "no cap" if self.budget_bytes is None else _mb(self.budget_bytes)
        lines = [
            f"Hessian plan: grid {self.data_shards} x {self.block_groups} (data shards x block "
            f"groups{self.chosen}); one first-order graph ~{_mb(self.graph_bytes)} "
            f"({self.batch_size} samples); per-actor budget {budget}"
        ]
        for s in self.shards:
            lines.append(
                f"  shard {s.shard}: {s.batches} batch(es), caches {s.cached} "
                f"(~{_mb(s.cached_bytes)}), rebuilds {s.rebuilt} on every HVP"
            )
        total = sum(s.batches for s in self.shards)
        if self.all_cached:
            lines.append(f"  all {total} batches cached")
        else:
            rebuilt = sum(s.rebuilt for s in self.shards)
            most = max(s.batches for s in self.shards)
            lines.append(
                f"  {rebuilt} of {total} batches are rebuilt on every HVP (~3-4x a cached HVP; "
                "once per chunk of trace probes): "
                f"a budget of ~{_mb(self.graph_bytes * most)} per actor, or more data shards "
                "(CPUs for them), caches them all"
            )
        return "\n".join(lines)


def cache_plan(
    batch_sizes: Sequence[int],
    memory: GraphMemory,
    budget_bytes: int | None,
    data_shards: int,
    block_groups: int = 1,
    chosen: str = "",
) -> CachePlan:
    """The plan of a ``data_shards x block_groups`` grid over batches of ``batch_sizes``."""
    if not 1 <= data_shards <= len(batch_sizes):
        raise ValueError(f"data_shards must be in 1..{len(batch_sizes)}, got {data_shards}")
    shards = []
    for d in range(data_shards):
        sizes = list(batch_sizes[d::data_shards])
        first = memory.batch_bytes(sizes[0])
        cached = batches_to_cache(sizes, first, budget_bytes)
        shards.append(
            ShardCache(shard=d, batches=len(sizes), cached=cached,
                       cached_bytes=int(first * sum(sizes[:cached]) / sizes[0]))
        )  # fmt: skip
    return CachePlan(
        data_shards=data_shards,
        block_groups=block_groups,
        graph_bytes=memory.batch_bytes(batch_sizes[0]),
        batch_size=batch_sizes[0],
        budget_bytes=budget_bytes,
        shards=tuple(shards),
        chosen=chosen,
    )


def max_data_shards(
    resources: Mapping[str, float], *, block_groups: int, cpus_per_actor: float,
    gpus_per_actor: float,
) -> int:  # fmt: skip
    """The most data shards ``block_groups`` groups can place on ``resources`` (>= 1)."""
    limit = math.inf
    for key, per_actor in (("CPU", cpus_per_actor), ("GPU", gpus_per_actor)):
        if per_actor > 0:
            limit = min(limit, math.floor(resources.get(key, 0.0) / (block_groups * per_actor)))
    return max(1, int(min(limit, 2**31)))


def default_data_shards(
    batch_sizes: Sequence[int],
    memory: GraphMemory,
    budget_bytes: int | None,
    *,
    max_shards: int,
    block_groups: int = 1,
) -> CachePlan:
    """The plan of the smallest ``D <= max_shards`` whose shards cache every batch, else of
    ``D = min(max_shards, batches)``."""
    cap = max(1, min(max_shards, len(batch_sizes)))
    for d in range(1, cap + 1):
        plan = cache_plan(batch_sizes, memory, budget_bytes, d, block_groups)
        if plan.all_cached:
            why = "; data_shards chosen: the fewest whose caches hold every batch"
            return cache_plan(batch_sizes, memory, budget_bytes, d, block_groups, why)
    why = "; data_shards chosen: the most the cluster can place, too few to cache every batch"
    return cache_plan(batch_sizes, memory, budget_bytes, cap, block_groups, why)


def grid_plan(
    job: HessianJob, config: RayBackendConfig, resources: Mapping[str, float]
) -> CachePlan:
    """The plan of ``config``'s grid for ``job`` (one graph measured on the CPU from the first
    batch's first samples), choosing ``data_shards`` when it is ``None`` for a cluster with
    ``resources`` free (``{"CPU": ..., "GPU": ...}``)."""
    if not job.batches:
        raise ValueError("the Hessian job has no batches (data.hessian_samples)")
    sizes = [x.shape[0] for x, _ in job.batches]
    memory = estimate_graph_memory(job.instantiate(), job.loss_fn, job.batches[0], job.blocks)
    budget = job.config.memory_budget_bytes
    if config.memory_budget_mb is not None:
        budget = int(config.memory_budget_mb * MB)
    if config.data_shards is not None:
        return cache_plan(sizes, memory, budget, config.data_shards, config.block_groups)
    cap = max_data_shards(resources, block_groups=config.block_groups,
                          cpus_per_actor=config.cpus_per_actor,
                          gpus_per_actor=config.gpus_per_actor)  # fmt: skip
    return default_data_shards(sizes, memory, budget, max_shards=cap,
                               block_groups=config.block_groups)  # fmt: skip


def log_plan(plan: CachePlan) -> None:
    """Log the plan (a warning when some batches are rebuilt on every HVP)."""
    logger.log(logging.INFO if plan.all_cached else logging.WARNING, "%s", plan.describe())
