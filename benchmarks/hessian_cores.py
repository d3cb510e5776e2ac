"""Section (g) of ``hessian_bench.py``: every tool's own parallelism on ``--cores`` CPU cores.

The same top-eigenvalue work as (c) (``--batches`` batches, every block, ``--tol``), timed for:

* PyHessian 0.1 with 1 intra-op thread and with ``cores`` threads (its only parallelism; the
  fair baseline is the faster of the two, per block and in total);
* hawq Lanczos in one process with 1 thread (the algorithmic ratio, as in (c));
* hawq Lanczos on the real Ray backend (``pipeline.backends.ray``, the pipeline's code path)
  with ``cores`` actors x 1 thread, each holding ``1/cores`` of the batches (data shards, HVPs
  all-reduced). Its time is the whole ``RayBackend.run`` from a fresh backend: actor start-up,
  job transfer, graph builds and every block (``ray.init`` of the local cluster excluded,
  reported separately). It runs once before and once after the interleaved per-block loop of
  the other three, so that a change of machine load shows; the ratios use the slower run.

Errors are against hawq Lanczos at tol 1e-8 (one process), as in (b)/(c).
"""

from __future__ import annotations

import functools
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from hawq.hessian.table import HessianConfig
from hawq.models import cifar_resnet


def with_threads(threads: int, fn: Callable[[], object]) -> None:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fn()
    finally:
        torch.set_num_threads(previous)


def ray_eigen(model, batches, blocks, config: HessianConfig, cores: int) -> dict:
    """Every block's eigen row on ``cores`` Ray actors (data shards, 1 thread each)."""
    from pipeline.backends.base import HessianJob
    from pipeline.backends.ray import RayBackendConfig
    from pipeline.backends.ray.backend import RayBackend

    job = HessianJob(
        build_model=functools.partial(cifar_resnet, 20),
        state_dict=model.state_dict(),
        loss_fn=F.cross_entropy,
        batches=list(batches),
        blocks=list(blocks),
        config=config,
        dtype=torch.float32,
    )
    t0 = time.perf_counter()
    backend = RayBackend(RayBackendConfig(data_shards=cores, cpus_per_actor=1, torch_threads=1))
    try:
        table = backend.run(job, progress=False)
        seconds = time.perf_counter() - t0
        stats = dict(backend.stats)
    finally:
        backend.close()
    rows = {
        r["block"]: {"eigenvalue": r["eigenvalue"], "hvps": r["hvps"], "seconds": r["seconds"]}
        for r in table.to_pylist()
    }
    print(f"  (g) Ray {cores} actors x 1 thread: {seconds:.1f} s", file=sys.stderr, flush=True)
    return {"rows": rows, "seconds": seconds, "stats": stats}


def cores_section(model, batches, blocks, args, runners: dict, emit, md_table, rel) -> None:
    """Runs (g) and emits its table and summary. ``runners`` builds the in-process methods:
    ``ref``, ``hawq`` (a HawqRunner factory taking a config) and ``pyhessian`` (a factory)."""
    import ray

    from pipeline.backends.ray import default_auth_mode

    cores = args.cores
    config = HessianConfig(tol=args.tol, max_iter=100, trace=False, seed=args.seed)
    load = [os.getloadavg()[0]]
    ref = runners["hawq"](HessianConfig(tol=1e-8, max_iter=100, trace=False, seed=args.seed))
    for b in blocks:
        with_threads(1, functools.partial(ref.run, b))
    ref.close()

    os.environ["RAY_worker_niceness"] = "0"  # noqa: SIM112 - Ray spells it so
    default_auth_mode()
    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=cores, object_store_memory=256 * 2**20,
             include_dashboard=False)  # fmt: skip
    init_s = time.perf_counter() - t0
    try:
        ray_runs = [ray_eigen(model, batches, blocks, config, cores)]
        load.append(os.getloadavg()[0])
        methods = {
            "pyh1": (1, runners["pyhessian"]()),
            f"pyh{cores}": (cores, runners["pyhessian"]()),
            "hawq1": (1, runners["hawq"](config)),
        }
        for b in blocks:  # interleaved, so that load changes hit every method alike
            for threads, runner in methods.values():
                with_threads(threads, functools.partial(runner.run, b))
            done = ", ".join(f"{k} {r.rows[b.name]['eigenvalue']:.6g} "
                             f"{r.rows[b.name]['seconds']:.1f} s"
                             for k, (_, r) in methods.items())  # fmt: skip
            print(f"  (g) {b.name}: {done}", file=sys.stderr, flush=True)
        methods["hawq1"][1].close()
        load.append(os.getloadavg()[0])
        ray_runs.append(ray_eigen(model, batches, blocks, config, cores))
        load.append(os.getloadavg()[0])
    finally:
        ray.shutdown()

    pyh = {k: methods[k][1] for k in ("pyh1", f"pyh{cores}")}
    hawq1 = methods["hawq1"][1]
    ray_slow = max(ray_runs, key=lambda r: r["seconds"])
    errs: dict[str, list[float]] = {k: [] for k in (*pyh, "hawq1", "ray")}
    rows, drift = [], 0.0
    for b in blocks:
        r = ref.rows[b.name]["eigenvalue"]
        row = [b.name, str(b.n_params), f"{r:.6g}"]
        cells = [(k, res.rows[b.name]) for k, res in pyh.items()]
        cells += [("hawq1", hawq1.rows[b.name]), ("ray", ray_slow["rows"][b.name])]
        for key, e in cells:
            errs[key].append(rel(e["eigenvalue"], r))
            row += [f"{e['eigenvalue']:.6g} ({errs[key][-1]:.1e})", f"{e['seconds']:.2f}"]
        best = min(res.rows[b.name]["seconds"] for res in pyh.values())
        row.append(f"{best / hawq1.rows[b.name]['seconds']:.1f}x")
        row.append(f"{best / ray_slow['rows'][b.name]['seconds']:.1f}x")
        rows.append(row)
        for run in ray_runs:
            e = run["rows"][b.name]["eigenvalue"]
            drift = max(drift, rel(e, hawq1.rows[b.name]["eigenvalue"]))
    best_per_block = sum(min(res.rows[b.name]["seconds"] for res in pyh.values()) for b in blocks)
    totals = {k: res.seconds for k, res in pyh.items()}
    rows.append(["**total**", "", "", "", f"**{totals['pyh1']:.1f}**", "",
                 f"**{totals[f'pyh{cores}']:.1f}**", "", f"**{hawq1.seconds:.1f}**", "",
                 f"**{ray_slow['seconds']:.1f}** (run)",
                 f"{best_per_block / hawq1.seconds:.1f}x",
                 f"{best_per_block / ray_slow['seconds']:.1f}x (run)"])  # fmt: skip
    header = ["block", "params", "reference λ", "PyHessian 1 thread λ (rel err)", "s",
              f"PyHessian {cores} threads λ (rel err)", "s", "hawq Lanczos 1 process x 1 thread",
              "s", f"hawq Lanczos Ray {cores} actors x 1 thread", "s (actor)",
              "PyHessian best / hawq 1 thread", "PyHessian best / hawq Ray"]  # fmt: skip
    emit(f"\n## (g) top eigenvalue per block, {len(batches)} batches, {cores} cores, each tool's "
         "own parallelism\n")  # fmt: skip
    emit(md_table(header, rows))
    best_total = min(totals.values())
    best_name = min(totals, key=totals.get)
    lines = [
        f"(g) {len(batches)} batches x {batches[0][0].shape[0]}, {len(blocks)} blocks, tol "
        f"{args.tol}, {os.cpu_count()} cores; load average (1 min) before / after Ray 1 / "
        f"after the loop / after Ray 2: " + " / ".join(f"{x:.1f}" for x in load),
        f"  PyHessian: 1 thread {totals['pyh1']:.1f} s, {cores} threads "
        f"{totals[f'pyh{cores}']:.1f} s; faster setting in total: {best_name} "
        f"{best_total:.1f} s; per-block best summed: {best_per_block:.1f} s",
        f"  hawq Lanczos 1 process x 1 thread: {hawq1.seconds:.1f} s",
        f"  hawq Lanczos Ray {cores} actors x 1 thread (RayBackend.run, fresh actors): "
        + ", ".join(f"{r['seconds']:.1f} s" for r in ray_runs)
        + f" (runs before / after the loop; setup {ray_slow['stats']['seconds_setup']:.1f} s, "
        f"eigen {ray_slow['stats']['seconds_eigen']:.1f} s in the slower; ray.init "
        f"{init_s:.1f} s not counted)",
        f"  user-level ratio, PyHessian best (per-block best summed) / hawq Ray (slower run): "
        f"{best_per_block / ray_slow['seconds']:.2f}x (faster PyHessian setting in total: "
        f"{best_total / ray_slow['seconds']:.2f}x)",
        f"  algorithmic ratio, PyHessian 1 thread / hawq 1 thread: "
        f"{totals['pyh1'] / hawq1.seconds:.2f}x",
        f"  max rel. eigenvalue difference Ray vs hawq 1 process: {drift:.1e}",
    ]
    names = {"pyh1": "PyHessian 1 thread", f"pyh{cores}": f"PyHessian {cores} threads",
             "hawq1": "hawq 1 process", "ray": f"hawq Ray {cores} actors"}  # fmt: skip
    for key, e in errs.items():
        lines.append(f"  rel. error vs reference, {names[key]}: max {max(e):.1e}, "
                     f"median {statistics.median(e):.1e}")  # fmt: skip
    hvps = {k: sum(r["hvps"] for r in res.rows.values()) for k, res in pyh.items()}
    hvps["hawq1"] = sum(r["hvps"] for r in hawq1.rows.values())
    hvps["ray"] = sum(r["hvps"] for r in ray_slow["rows"].values())
    lines.append("  HVPs in all: " + ", ".join(f"{names[k]} {v}" for k, v in hvps.items()))
    lines.append(f"  reference (Lanczos tol 1e-8, 1 thread) took {ref.seconds:.1f} s")
    emit("\n" + "\n".join(lines))
