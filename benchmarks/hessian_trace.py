"""Section (e) of ``hessian_bench.py``: HVPs to a 5% trace stderr, plain vs deflated Hutchinson.

One ``HessianOperator`` over the batches; every block's Lanczos eigen solve (as the pipeline
runs it, tol ``--tol``) gives its Krylov basis. Then both estimators consume the same
Rademacher probes ``p = 0, 1, ...`` (``hawq.hessian.trace.rademacher_probe``) under the production
stopping rule (``hutchinson``: ``stderr <= tol |mean|`` after ``min_probes``), each
probe being one joint HVP over all blocks. Reported per block: probes (= HVPs) until its trace
froze, the estimates, and the per-probe variance ratio on the probes both computed; in total:
joint HVPs until every block froze (the cost of the trace phase). HVP counts are deterministic
(no timings), so a loaded machine does not change them.
"""

from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F

from hawq.blocks import Block
from hawq.hessian.operator import HessianOperator
from hawq.hessian.table import HessianConfig, block_eigen
from hawq.hessian.trace import hutchinson, joint_probe_samples, rademacher_probe
from hawq.hessian.trace_deflated import Deflation


def trace_hvps(
    model: torch.nn.Module,
    batches: list,
    blocks: list[Block],
    *,
    tol: float,
    seed: int,
    trace_tol: float = 0.05,
    max_probes: int = 400,
    min_probes: int = 10,
) -> dict:
    """Per-block probes to ``trace_tol`` for both estimators, plus the eigen HVPs spent."""
    config = HessianConfig(tol=tol, max_iter=100, trace=False, seed=seed)
    budget = 64 * 2**30  # cache every graph (and measure them)
    with HessianOperator(model, F.cross_entropy, batches, blocks, memory_budget_bytes=budget) as op:
        tops = {b.name: block_eigen(op, b, config)[1] for b in blocks}
        deflation = Deflation.from_eigen(tops)
        dims = {b.name: op.dim(b.name) for b in blocks}
        cache: dict[str, dict[int, dict[str, float]]] = {"plain": {}, "deflated": {}}

        def sampler(kind: str):
            def sample(p: int) -> dict[str, float]:
                if p not in cache[kind]:
                    vs = rademacher_probe(dims, seed, p, dtype=op.dtype, device=op.device)
                    defl = deflation if kind == "deflated" else None
                    cache[kind][p] = joint_probe_samples(op, vs, defl)
                return cache[kind][p]

            return sample

        names = [b.name for b in blocks]
        kw = dict(tol=trace_tol, max_probes=max_probes, min_probes=min_probes)
        results = {kind: hutchinson(sampler(kind), names, **kw) for kind in cache}
        graph_mb = op.graph_bytes / 2**20
    common = sorted(set(cache["plain"]) & set(cache["deflated"]))
    variance_ratio = {
        b: statistics.variance([cache["plain"][p][b] for p in common])
        / max(statistics.variance([cache["deflated"][p][b] for p in common]), 1e-300)
        for b in names
    }
    return {
        "results": results,
        "joint_hvps": {kind: len(c) for kind, c in cache.items()},
        "variance_ratio": variance_ratio,
        "common_probes": len(common),
        "basis_vectors": {b: q.shape[0] for b, q in deflation.bases.items()},
        "basis_mb": deflation.nbytes / 2**20,
        "eigen_hvps": sum(r.hvps for r in tops.values()),
        "graph_mb": graph_mb,
        "max_probes": max_probes,
        "trace_tol": trace_tol,
    }


def _probes(r, trace: float, cap: int) -> str:
    """Probes to freeze; for a block that did not, ``>cap (~n)`` with ``n`` projected."""
    if r.converged:
        return str(r.probes)
    return f">{cap} (~{needed(r, trace):.0f})"


def needed(r, trace: float, tol: float = 0.05) -> float:
    """Probes to freeze (measured), or projected from the sample variance ``s^2 = n se^2``:
    ``s / sqrt(m) <= tol |trace|`` at ``m = n (se / (tol |trace|))^2``. ``trace`` is one
    estimate for both estimators (the deflated one, the more precise), so that for blocks
    neither froze the ratio of the projections is exactly the variance ratio."""
    if r.converged:
        return r.probes
    return r.probes * (r.stderr / (tol * abs(trace))) ** 2 if trace else float("inf")


def trace_report(blocks: list[Block], out: dict, md_table) -> str:
    """The markdown table and summary of :func:`trace_hvps`."""
    cap = out["max_probes"]
    plain, defl = out["results"]["plain"], out["results"]["deflated"]
    rows = []
    for b in blocks:
        p, d = plain[b.name], defl[b.name]
        ratio = needed(p, d.mean) / needed(d, d.mean)
        rows.append([
            b.name, str(b.n_params), str(out["basis_vectors"][b.name]),
            f"{p.mean:.4g} ± {p.stderr:.2g}", _probes(p, d.mean, cap),
            f"{d.mean:.4g} ± {d.stderr:.2g}", _probes(d, d.mean, cap),
            f"{'~' if not p.converged else ''}{ratio:.2f}x", f"{out['variance_ratio'][b.name]:.1f}",
        ])  # fmt: skip
    hp, hd = out["joint_hvps"]["plain"], out["joint_hvps"]["deflated"]
    ratios = [
        needed(plain[b.name], defl[b.name].mean) / needed(defl[b.name], defl[b.name].mean)
        for b in blocks
    ]
    hp_proj = max(needed(plain[b.name], defl[b.name].mean) for b in blocks)
    hd_proj = max(needed(defl[b.name], defl[b.name].mean) for b in blocks)
    all_p = all(r.converged for r in plain.values())
    all_d = all(r.converged for r in defl.values())
    rows.append([
        "**all blocks (joint HVPs)**", "", "", "",
        f"**{hp if all_p else f'>{cap} (~{hp_proj:.0f})'}**", "",
        f"**{hd if all_d else f'>{cap} (~{hd_proj:.0f})'}**", f"**{hp_proj / hd_proj:.2f}x**", "",
    ])  # fmt: skip
    header = ["block", "params", "k (basis)", "plain trace ± se", "plain HVPs",
              "deflated trace ± se", "deflated HVPs", "HVP ratio", "variance ratio"]  # fmt: skip
    summary = (
        f"\n(e) joint HVPs until every block's trace stderr <= {out['trace_tol']:.0%}: plain "
        f"{hp if all_p else f'>{cap} (projected from its variance: {hp_proj:.0f})'}, deflated "
        f"{hd if all_d else f'>{cap} (projected: {hd_proj:.0f})'} ({hp_proj / hd_proj:.2f}x "
        f"fewer); per block median "
        f"{statistics.median(ratios):.2f}x, min {min(ratios):.2f}x; per-probe variance ratio "
        f"(plain/deflated, {out['common_probes']} common probes) median "
        f"{statistics.median(out['variance_ratio'].values()):.1f}. The bases come from the "
        f"eigenvalue solves ({out['eigen_hvps']} block HVPs, spent by both); they hold "
        f"{out['basis_mb']:.1f} MB; cached graphs {out['graph_mb']:.0f} MB."
    )
    return md_table(header, rows) + "\n" + summary
