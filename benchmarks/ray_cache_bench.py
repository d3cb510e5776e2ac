"""Caching that scales with shards: 1 process vs 2 Ray actors under the same per-process budget.

With ``D`` data shards each actor keeps only its own batches' first-order graphs, so a Hessian
set whose graphs exceed one process's ``memory_budget_mb`` becomes fully cached when spread
over actors: the single process rebuilds the batches beyond its budget on every HVP (forward
+ create-graph backward + HVP backward, ~3-4x a cached HVP), the actors rebuild none. Hence
a superlinear speed-up is expected.

Prints the plan first (batches and cached graphs per process/actor, estimated memory, from
the measured size of one batch's graph), then times the same fixed work (Lanczos to ``--tol``
on every block, exactly ``--probes`` Hutchinson probes) on the local backend (1 thread) and on
``2 x 1`` Ray actors (data shards, 1 thread each), and the graphs each actor really cached.

    python benchmarks/ray_cache_bench.py [--data ../shared/data/cifar10] [--batches 16]
        [--batch 128] [--graphs 8] [--probes 4] [--tol 1e-3]
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from ray_bench import ThreadedLocal, make_job, ray, run_once  # noqa: E402

from hawq.hessian.operator import HessianOperator  # noqa: E402
from pipeline.backends.ray import RayBackendConfig, default_auth_mode  # noqa: E402
from pipeline.backends.ray.backend import RayBackend  # noqa: E402


def graph_mb(job) -> float:
    """Measured size of one batch's cached first-order graph (``HessianOperator.graph_bytes``)."""
    model = job.instantiate()
    with HessianOperator(model, job.loss_fn, job.batches[:1], job.blocks,
                         memory_budget_bytes=2**40) as op:  # fmt: skip
        name = job.blocks[0].name
        op.hvp(name, torch.ones(op.dim(name), dtype=op.dtype))  # graphs are built on first use
        return op.graph_bytes / 2**20


def plan(n_batches: int, shards: int, budget_mb: float, per_graph_mb: float) -> list[tuple]:
    """Rows ``(who, batches, cached, rebuilt per HVP, cached MB)`` for ``shards`` processes."""
    fits = int(budget_mb // per_graph_mb)
    rows = []
    for d in range(shards):
        mine = len(range(d, n_batches, shards))
        cached = min(mine, fits)
        rows.append((f"actor {d}" if shards > 1 else "process", mine, cached, mine - cached,
                     cached * per_graph_mb))  # fmt: skip
    return rows


def print_plan(title: str, rows: list[tuple]) -> None:
    print(f"\n{title}\n{'who':10s} {'batches':>8s} {'cached':>7s} {'rebuilt/HVP':>12s} "
          f"{'cached MB':>10s}")  # fmt: skip
    for who, mine, cached, rebuilt, mb in rows:
        print(f"{who:10s} {mine:8d} {cached:7d} {rebuilt:12d} {mb:10.0f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="../shared/data/cifar10")
    p.add_argument("--batches", type=int, default=16)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--graphs", type=int, default=8, help="graphs one process's budget holds")
    p.add_argument("--tol", type=float, default=1e-3)
    p.add_argument("--probes", type=int, default=4)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    job = make_job(args)
    per_graph = graph_mb(job)
    budget = (args.graphs + 0.5) * per_graph  # holds ``graphs`` graphs, not one more
    job = dataclasses.replace(job, config=dataclasses.replace(job.config, memory_budget_mb=budget))
    print(f"ResNet-20, {len(job.blocks)} blocks, {args.batches} batches x {args.batch} images; "
          f"one graph {per_graph:.1f} MB, budget {budget:.0f} MB per process "
          f"({args.graphs} graphs); {args.probes} probes, tol {args.tol}; {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    print_plan(
        "plan, 1 process (local backend, 1 thread):", plan(args.batches, 1, budget, per_graph)
    )
    print_plan("plan, 2 Ray actors (2 data shards, 1 thread each, the same budget each):",
               plan(args.batches, 2, budget, per_graph))  # fmt: skip

    local_s, local_table = run_once(ThreadedLocal(1), job)
    os.environ["RAY_worker_niceness"] = "0"  # noqa: SIM112 - Ray spells it so
    default_auth_mode()
    ray.init(address="local", num_cpus=4, object_store_memory=256 * 2**20, include_dashboard=False)
    backend = RayBackend(RayBackendConfig(data_shards=2, cpus_per_actor=1, memory_budget_mb=budget))
    try:
        ray_s, ray_table = run_once(backend, job)
        counters = ray.get([a.counters.remote() for a in backend.actors[0]])
    finally:
        backend.close()
        ray.shutdown()
    drift = max(
        abs(a - b) / abs(b)
        for a, b in zip(ray_table.column("eigenvalue").to_pylist(),
                        local_table.column("eigenvalue").to_pylist(), strict=True)
    )  # fmt: skip
    hvps = sum(local_table.column("hvps").to_pylist()) + args.probes
    cached = ", ".join(f"actor {d}: {c['cached_batches']}" for d, c in enumerate(counters))
    print(f"\nactually cached graphs: {cached}")
    print(f"local 1 process x 1 thread: {local_s:.1f} s; 2 actors x 1 thread: {ray_s:.1f} s; "
          f"speed-up {local_s / ray_s:.2f}x on 2 workers ({hvps} HVPs each run; max rel. "
          f"eigenvalue difference {drift:.1e}); load average {os.getloadavg()[0]:.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
