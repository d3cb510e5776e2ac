"""Sections (a)-(c) of ``imagenet_scale.py``: what the Hessian analysis costs per block.

(a) one cached block HVP / one forward+backward gradient of the whole model on the same batch
(target: max <= 1.5), and the graph build; (b) Lanczos HVPs to ``--tol`` on an evenly spaced
subset of blocks and the uncached HVP (graph rebuilt) of the same blocks; (c) Hutchinson: one
joint HVP over every block and the probes that ``--trace-tol`` stderr needs, projected from the
per-probe variance. All on one cached operator; the measured costs go to the projection (g).
"""

from __future__ import annotations

import math
import statistics

import numpy as np
import torch
import torch.nn.functional as F
from imagenet_report import Report
from imagenet_setup import Clock

from hawq.hessian.operator import HessianOperator
from hawq.hessian.table import HessianConfig, block_eigen_row
from hawq.hessian.trace import probe_sample


def hvp_vs_grad(model, batch, blocks, op, clock: Clock, reps: int, grad_every: int):
    """Per block: the median cached-HVP time; the gradient times (interleaved with the HVPs,
    before every ``grad_every``-th block); the graph build."""
    x, y = batch

    def grad() -> None:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()

    grad()
    gen = torch.Generator().manual_seed(0)
    vs = {b.name: torch.randn(b.n_params, generator=gen).to(x.device) for b in blocks}
    first = clock(lambda: op.hvp(blocks[0].name, vs[blocks[0].name]))  # builds the graph
    grads, hvps = [], {}
    for i, b in enumerate(blocks):
        times = []
        for _ in range(reps):  # interleaved, so that load changes hit both sides alike
            if i % grad_every == 0:
                grads.append(clock(grad))
            times.append(clock(lambda name=b.name: op.hvp(name, vs[name])))
        hvps[b.name] = statistics.median(times)
    model.zero_grad(set_to_none=True)
    return hvps, grads, max(first - hvps[blocks[0].name], 0.0)


def spread(blocks, k: int):
    idx = sorted({round(i) for i in np.linspace(0, len(blocks) - 1, min(k, len(blocks)))})
    return [blocks[i] for i in idx]


def lanczos_and_rebuild(model, batch, op, subset, clock: Clock, tol: float):
    """Lanczos rows on the cached operator; uncached HVP times (budget 0) of the same blocks."""
    config = HessianConfig(tol=tol, max_iter=100, trace=False, memory_budget_mb=None)
    rows = {b.name: block_eigen_row(op, b, config) for b in subset}
    rebuild = {}
    with HessianOperator(model, F.cross_entropy, [batch], op.blocks, memory_budget_bytes=0) as op0:
        for b in subset:
            v = torch.randn(b.n_params, device=batch[0].device)
            rebuild[b.name] = clock(lambda name=b.name, v=v: op0.hvp(name, v))
        vs = {b.name: torch.randn(b.n_params, device=batch[0].device) for b in op.blocks}
        rebuild_joint = clock(lambda: op0.hvp_joint(vs))
    return rows, rebuild, rebuild_joint


def trace_probes(op, clock: Clock, probes: int, tol: float):
    """Joint HVP time; per block the probes to ``tol`` stderr: ``var / (tol * mean)^2``."""
    dims = {b.name: op.dim(b.name) for b in op.blocks}
    samples, times = [], []
    for p in range(probes):
        times.append(clock(lambda p=p: samples.append(probe_sample(op, dims, 0, p))))
    need = {}
    for b in dims:
        xs = [s[b] for s in samples]
        mean, var = statistics.fmean(xs), statistics.variance(xs)
        need[b] = math.inf if mean == 0 else var / (tol * mean) ** 2
    return statistics.median(times), need


def hessian_sections(args, model, batch, blocks, clock: Clock, emit: Report) -> dict:
    """(a), (b), (c) on one cached operator; returns the measured costs."""
    timed = blocks[: args.blocks] if args.blocks else blocks
    with HessianOperator(model, F.cross_entropy, [batch], blocks, memory_budget_bytes=None) as op:
        hvps, grads, build = hvp_vs_grad(model, batch, timed, op, clock, args.reps, args.grad_every)
        subset = spread(timed, args.lanczos_blocks)
        rows, rebuild, rebuild_joint = lanczos_and_rebuild(
            model, batch, op, subset, clock, args.tol
        )
        joint, need = trace_probes(op, clock, args.probes, args.trace_tol)
    grad = statistics.median(grads)
    lanczos = {b: int(r["hvps"]) for b, r in rows.items()}
    all_hvps = statistics.fmean(lanczos.values()) * len(blocks)
    n = {b.name: b.n_params for b in blocks}
    ratio = {b: h / grad for b, h in hvps.items()}
    emit(f"## (a) block HVP / gradient, {len(timed)} of {len(blocks)} blocks (target: max <= 1.5)")
    emit(
        f"\nGradient (forward+backward of the whole model): median {grad * 1e3:.0f} ms over "
        f"{len(grads)} runs (min {min(grads) * 1e3:.0f}, max {max(grads) * 1e3:.0f}). The graph "
        f"all blocks share is built once: {build * 1e3:.0f} ms = {build / grad:.2f} gradients, "
        f"amortised over ~{all_hvps:.0f} Lanczos HVPs ((b)'s mean x {len(blocks)} blocks).\n"
    )
    emit.table(
        ["block", "params", "HVP ms", "HVP / grad", "(HVP + build / HVPs) / grad"],
        [
            [b, n[b], f"{h * 1e3:.0f}", f"{ratio[b]:.2f}", f"{(h + build / all_hvps) / grad:.2f}"]
            for b, h in hvps.items()
        ],
    )
    worst = max(ratio, key=ratio.get)
    met = "met" if ratio[worst] <= 1.5 else "NOT met"
    emit(
        f"\n**HVP / gradient: max {ratio[worst]:.2f} ({worst}), median "
        f"{statistics.median(ratio.values()):.2f}; target <= 1.5 {met} for every timed block.**"
    )
    emit(f"\n## (b) Lanczos HVPs to tol {args.tol} on {len(subset)} blocks, 1 batch\n")
    emit.table(
        [
            "block",
            "params",
            "eigenvalue",
            "HVPs",
            "converged",
            "cached HVP / grad",
            "uncached HVP (graph rebuilt) / grad",
        ],
        [
            [
                b,
                n[b],
                f"{r['eigenvalue']:.4g}",
                r["hvps"],
                r["converged"],
                f"{ratio[b]:.2f}",
                f"{rebuild[b] / grad:.2f}",
            ]
            for b, r in rows.items()
        ],
    )
    emit(
        f"\nMean {statistics.fmean(lanczos.values()):.1f} HVPs per block (used for the "
        f"{len(blocks) - len(lanczos)} blocks not solved here). One uncached joint HVP (graph "
        f"rebuilt w.r.t. every block): {rebuild_joint / grad:.2f} gradients."
    )
    finite = sorted(v for v in need.values() if math.isfinite(v))
    slowest = math.ceil(finite[-1]) if finite else args.trace_max_probes
    emit(f"\n## (c) Hutchinson traces: {args.probes} probes, one joint HVP each\n")
    emit(
        f"Joint HVP over all {len(blocks)} blocks: {joint * 1e3:.0f} ms = {joint / grad:.2f} "
        f"gradients. Probes to {args.trace_tol:.0%} stderr projected from the per-probe variance "
        f"(`var / (tol * mean)^2`): median block {statistics.median(finite):.0f}, slowest "
        f"block {slowest} ({max(need, key=need.get)}). The projection (g) uses min(slowest, "
        f"trace_max_probes={args.trace_max_probes}), the shipped cap, and shows the analysis "
        "with the median block's count too (plain Hutchinson; the deflated estimator needs fewer)."
    )
    return {
        "batch": args.batch,
        "grad": grad,
        "hvp": hvps,
        "rebuild": rebuild,
        "build": build,
        "joint": joint,
        "rebuild_joint": rebuild_joint,
        "lanczos": lanczos,
        "block_params": n,
        "probes": {
            "cap": min(slowest, args.trace_max_probes),
            "median": math.ceil(statistics.median(finite)) if finite else slowest,
        },
    }
