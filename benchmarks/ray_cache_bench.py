"""Caching that scales with shards: 1 process vs 2 Ray actors under the same per-process budget.

With ``D`` data shards each actor keeps only its own batches' first-order graphs, so a Hessian
set whose graphs exceed one process's ``memory_budget_mb`` becomes fully cached when spread
over actors: the single process rebuilds the batches beyond its budget on every HVP (forward
+ create-graph backward + HVP backward, ~3-4x a cached HVP), the actors rebuild none. Hence
a superlinear speed-up is expected.

Prints the plan first (``pipeline.backends.plan``: batches and cached graphs per process or
actor, estimated memory, from ``hawq.hessian.memory``), then times the same fixed work
(Lanczos to ``--tol`` on every block, exactly ``--probes`` Hutchinson probes) on the local
backend (1 thread) and on ``2 x 1`` Ray actors (data shards, 1 thread each), and the graphs
each actor really cached.

    python benchmarks/ray_cache_bench.py [--data ../shared/data/cifar10] [--batches 16]
        [--batch 128] [--graphs 8] [--probes 4] [--tol 1e-3] [--blocks N] [--max-iter K]

``--blocks`` / ``--max-iter`` shrink the fixed work (evenly spaced blocks, capped Lanczos) for a
loaded machine; the batches and the budget stay as given.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from ray_bench import ThreadedLocal, make_job, ray, run_once  # noqa: E402

from hawq.hessian.memory import estimate_graph_memory  # noqa: E402
from pipeline.backends.plan import cache_plan  # noqa: E402
from pipeline.backends.ray import RayBackendConfig, default_auth_mode  # noqa: E402
from pipeline.backends.ray.backend import RayBackend  # noqa: E402


def reduce_job(job, blocks: int, max_iter: int):
    """``job`` on ``blocks`` evenly spaced blocks (0: all) with Lanczos capped at ``max_iter``."""
    picked = list(job.blocks)
    if blocks:
        idx = sorted({round(i) for i in np.linspace(0, len(picked) - 1, blocks)})
        picked = [picked[i] for i in idx]
    config = dataclasses.replace(job.config, max_iter=max_iter) if max_iter else job.config
    return dataclasses.replace(job, blocks=picked, config=config)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="../shared/data/cifar10")
    p.add_argument("--batches", type=int, default=16)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--graphs", type=int, default=8, help="graphs one process's budget holds")
    p.add_argument("--tol", type=float, default=1e-3)
    p.add_argument("--probes", type=int, default=4)
    p.add_argument("--blocks", type=int, default=0, help="N evenly spaced blocks (0: all 20)")
    p.add_argument("--max-iter", type=int, default=0, help="cap Lanczos iterations (0: none)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    job = reduce_job(make_job(args), args.blocks, args.max_iter)
    memory = estimate_graph_memory(job.instantiate(), job.loss_fn, job.batches[0], job.blocks)
    per_graph = memory.batch_bytes(args.batch)
    budget_mb = (args.graphs + 0.5) * per_graph / 2**20  # holds ``graphs`` graphs, not one more
    job = dataclasses.replace(
        job, config=dataclasses.replace(job.config, memory_budget_mb=budget_mb)
    )
    sizes = [x.shape[0] for x, _ in job.batches]
    budget = job.config.memory_budget_bytes
    print(f"ResNet-20, {len(job.blocks)} blocks, {args.batches} batches x {args.batch} images; "
          f"one graph {per_graph / 2**20:.1f} MB, budget {budget_mb:.0f} MB per process "
          f"({args.graphs} graphs); {args.probes} probes, tol {args.tol}, max_iter "
          f"{job.config.max_iter}; {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.1f}")  # fmt: skip
    print("\nplan, 1 process (local backend, 1 thread):")
    print(cache_plan(sizes, memory, budget, 1).describe())
    print("\nplan, 2 Ray actors (2 data shards, 1 thread each, the same budget each):")
    print(cache_plan(sizes, memory, budget, 2).describe())

    local = ThreadedLocal(1)
    local_s, local_table = run_once(local, job)
    local_cached = local.plan.shards[0].cached if local.plan else "?"
    os.environ["RAY_worker_niceness"] = "0"  # noqa: SIM112 - Ray spells it so
    default_auth_mode()
    ray.init(address="local", num_cpus=4, object_store_memory=256 * 2**20, include_dashboard=False)
    backend = RayBackend(
        RayBackendConfig(data_shards=2, cpus_per_actor=1, memory_budget_mb=budget_mb)
    )
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
    print(f"\nactually cached graphs: {cached} (local process, as planned: {local_cached})")
    print(f"local 1 process x 1 thread: {local_s:.1f} s; 2 actors x 1 thread: {ray_s:.1f} s; "
          f"speed-up {local_s / ray_s:.2f}x on 2 workers ({hvps} HVPs each run; max rel. "
          f"eigenvalue difference {drift:.1e}); load average {os.getloadavg()[0]:.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
