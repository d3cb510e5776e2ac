"""Section (e) of ``hessian_bench.py``: HVPs to a 5% trace stderr, plain vs deflated Hutchinson.

One ``HessianOperator`` over the batches (every graph cached); every block's eigen solve (as
the pipeline runs it, tol ``--tol``) gives its Krylov basis. Then ``probes`` shared Rademacher
probes ``p = 0, 1, ...`` (``hawq.hessian.trace.rademacher_probe``) are each evaluated twice,
plainly and deflated, each time with one joint HVP over all blocks: the two estimators see the
same probes. Per block and estimator this measures the per-probe variance ``s^2``; the HVPs
(= probes) that the production rule (``hutchinson``: stop when ``stderr <= tol |mean|``, after
``min_probes``) needs follow as

    m = max(min_probes, ceil(s^2 / (tol T)^2)),

with one trace estimate ``T`` for both estimators (the deflated mean, the more precise), so the
ratio of the two counts is the measured variance ratio (unless ``min_probes`` binds). Where the
rule already stops within the measured probes, that measured count is printed too. The joint
count (the trace phase stops when every block froze) is the slowest block's. Variances from
``n`` probes carry a relative standard error of about ``sqrt(2 / (n - 1))`` (Gaussian samples;
more with heavy tails), which is the projection's uncertainty. HVP counts are deterministic (no
timings), so a loaded machine does not change them.
"""

from __future__ import annotations

import math
import statistics

import torch
import torch.nn.functional as F

from hawq.blocks import Block
from hawq.hessian.operator import HessianOperator
from hawq.hessian.table import HessianConfig, block_eigen
from hawq.hessian.trace import joint_probe_samples, rademacher_probe
from hawq.hessian.trace_deflated import Deflation

KINDS = ("plain", "deflated")


def trace_hvps(
    model: torch.nn.Module,
    batches: list,
    blocks: list[Block],
    *,
    tol: float,
    seed: int,
    probes: int = 100,
    trace_tol: float = 0.05,
    min_probes: int = 10,
) -> dict:
    """Per-probe samples of both estimators on ``probes`` shared probes, and the eigen HVPs."""
    config = HessianConfig(tol=tol, max_iter=100, trace=False, seed=seed)
    budget = 64 * 2**30  # cache every graph (and measure them)
    with HessianOperator(model, F.cross_entropy, batches, blocks, memory_budget_bytes=budget) as op:
        solved = {b.name: block_eigen(op, b, config) for b in blocks}
        deflation = Deflation.from_eigen({name: top for name, (_, top) in solved.items()})
        dims = {b.name: op.dim(b.name) for b in blocks}
        samples: dict[str, list[dict[str, float]]] = {kind: [] for kind in KINDS}
        for p in range(probes):
            vs = rademacher_probe(dims, seed, p, dtype=op.dtype, device=op.device)
            samples["plain"].append(joint_probe_samples(op, vs))
            samples["deflated"].append(joint_probe_samples(op, vs, deflation))
        graph_mb = op.graph_bytes / 2**20
    return {
        "samples": samples,
        "probes": probes,
        "basis_vectors": {b: q.shape[0] for b, q in deflation.bases.items()},
        "basis_mb": deflation.nbytes / 2**20,
        "eigen_hvps": sum(row["hvps"] for row, _ in solved.values()),
        "graph_mb": graph_mb,
        "trace_tol": trace_tol,
        "min_probes": min_probes,
    }


def frozen_at(xs: list[float], tol: float, min_probes: int) -> int | None:
    """Probes after which the production rule stops (``stderr <= tol |mean|``), or None."""
    for n in range(min_probes, len(xs) + 1):
        head = xs[:n]
        if statistics.stdev(head) / math.sqrt(n) <= tol * abs(statistics.fmean(head)):
            return n
    return None


def block_stats(out: dict, name: str) -> dict:
    """Mean, stderr, variance, measured and projected probes to ``trace_tol`` of both kinds."""
    tol, floor = out["trace_tol"], out["min_probes"]
    xs = {kind: [s[name] for s in out["samples"][kind]] for kind in KINDS}
    trace = statistics.fmean(xs["deflated"])
    stats = {}
    for kind, vals in xs.items():
        var = statistics.variance(vals)
        need = math.ceil(var / (tol * trace) ** 2) if trace else math.inf
        stats[kind] = {
            "mean": statistics.fmean(vals),
            "se": math.sqrt(var / len(vals)),
            "var": var,
            "measured": frozen_at(vals, tol, floor),
            "needed": max(floor, need),
        }
    return stats


def _hvps(st: dict) -> str:
    measured = f" (froze at {st['measured']})" if st["measured"] is not None else ""
    return f"{st['needed']}{measured}"


def trace_report(blocks: list[Block], out: dict, md_table) -> str:
    """The markdown table and summary of :func:`trace_hvps`."""
    n = out["probes"]
    rows, ratios, var_ratios = [], [], []
    stats = {b.name: block_stats(out, b.name) for b in blocks}
    for b in blocks:
        p, d = stats[b.name]["plain"], stats[b.name]["deflated"]
        ratio = p["needed"] / d["needed"]
        ratios.append(ratio)
        var_ratios.append(p["var"] / d["var"])
        rows.append([
            b.name, str(b.n_params), str(out["basis_vectors"].get(b.name, 0)),
            f"{p['mean']:.4g} ± {p['se']:.2g}", f"{d['mean']:.4g} ± {d['se']:.2g}",
            f"{p['var']:.3g}", f"{d['var']:.3g}", f"{p['var'] / d['var']:.1f}",
            _hvps(p), _hvps(d), f"{ratio:.1f}x",
        ])  # fmt: skip
    joint = {k: max(stats[b.name][k]["needed"] for b in blocks) for k in KINDS}
    slowest = {k: max(blocks, key=lambda b, k=k: stats[b.name][k]["needed"]).name for k in KINDS}
    rows.append([
        "**all blocks (joint HVPs = the slowest block)**", "", "", "", "", "", "", "",
        f"**{joint['plain']}**", f"**{joint['deflated']}**",
        f"**{joint['plain'] / joint['deflated']:.1f}x**",
    ])  # fmt: skip
    header = [
        "block", "params", "k (basis)", f"plain trace ± se ({n} probes)",
        f"deflated trace ± se ({n} probes)", "plain var/probe", "deflated var/probe",
        "variance ratio", "plain HVPs to 5%", "deflated HVPs to 5%", "HVP ratio",
    ]  # fmt: skip
    rel_se = math.sqrt(2 / (n - 1))
    summary = (
        f"\n(e) {n} shared probes measured (one joint HVP each per estimator). HVPs to a "
        f"{out['trace_tol']:.0%} stderr, max({out['min_probes']}, s^2 / (0.05 T)^2) from the "
        f"measured per-probe variance s^2 (relative uncertainty ~{rel_se:.0%}; 'froze at': "
        f"where the production rule already stopped within the {n} probes). Joint HVPs until "
        f"every block froze: plain {joint['plain']} ({slowest['plain']}), deflated "
        f"{joint['deflated']} ({slowest['deflated']}): {joint['plain'] / joint['deflated']:.1f}x "
        f"fewer. Per block HVP ratio median {statistics.median(ratios):.1f}x, min "
        f"{min(ratios):.1f}x ({blocks[ratios.index(min(ratios))].name}), max {max(ratios):.1f}x; "
        f"variance ratio median {statistics.median(var_ratios):.1f}x, min {min(var_ratios):.1f}x."
        f" The bases come from the eigenvalue solves ({out['eigen_hvps']} block HVPs, spent by "
        f"both); they hold {out['basis_mb']:.1f} MB; cached graphs {out['graph_mb']:.0f} MB."
    )
    return md_table(header, rows) + "\n" + summary
