"""The per-study statistics and tables of ``docs/results.md`` (``results_doc.py`` assembles them).

PTQ: paired bootstrap and McNemar of HAWQ vs anti / random allocations of the same size, and the
rank correlation of total Omega with accuracy; QAT: seed x image paired bootstrap of HAWQ vs the
comparisons; the fine-tuning order: per-stage accuracies and paired final differences. Every
number comes from the per-image correctness vectors the studies saved.
"""

from __future__ import annotations

import json
import math

import numpy as np
from paired_stats import PairedResult, mcnemar, mean_ci, paired_bootstrap, spearman

SAME_SIZE = 0.02  # allocations within 2% of the HAWQ-ILP size count as the same size


def pct(x: float) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}"


def table_md(headers, rows) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def vec(s: str) -> np.ndarray:
    return (np.frombuffer(s.encode(), dtype=np.uint8) - ord("0")).astype(np.int64)


def fmt_paired(r: PairedResult) -> str:
    return f"{100 * r.mean:+.2f} [{100 * r.lo:+.2f}, {100 * r.hi:+.2f}], p = {r.p:.3g}"


def verdict(r: PairedResult) -> str:
    if r.lo > 0:
        return "**HAWQ better** (CI excludes 0)"
    if r.hi < 0:
        return "**HAWQ worse** (CI excludes 0)"
    return "no significant difference (CI contains 0)"


# ----------------------------------------------------------------------------- PTQ
def ptq_stats(res: dict) -> dict:
    """Paired comparisons and rank correlations of the PTQ study."""
    rows = res["ptq"]["rows"]
    by = {r["name"]: r for r in rows}
    sens0 = res["alloc"]["sensitivity"]
    out = {"pairs": [], "spearman": {}}
    ref = by.get(f"hawq-ilp-{sens0}") or rows[0]
    alloc_rows = [r for r in rows if r["kind"] != "uniform"]
    dev = {r["name"]: r["size_mb"] / ref["size_mb"] - 1 for r in alloc_rows}
    same = [r for r in alloc_rows if abs(dev[r["name"]]) <= SAME_SIZE]
    ok = {r["name"] for r in same}
    out["same_size"] = len(same)
    out["off_size"] = sorted((n, d) for n, d in dev.items() if abs(d) > SAME_SIZE)
    for solver in ("v1", "ilp"):
        rand = [vec(r["correct"]) for r in same if r["kind"] == "random" and r["solver"] == solver]
        for sens in ("eigenvalue", "trace"):
            h = by.get(f"hawq-{solver}-{sens}")
            a = by.get(f"anti-{solver}-{sens}")
            if h is None or h["name"] not in ok:
                continue
            hc = vec(h["correct"])
            if a is not None and a["name"] in ok:
                ac = vec(a["correct"])
                n10, n01, p = mcnemar(hc, ac)
                out["pairs"].append(
                    (
                        f"{solver}, {sens}",
                        "anti",
                        paired_bootstrap(hc - ac),
                        f"{n10}/{n01}, p = {p:.3g}",
                    )
                )
            if rand and sens == sens0:
                d = hc - np.mean(rand, axis=0)
                out["pairs"].append(
                    (f"{solver}, {sens}", f"mean of {len(rand)} random", paired_bootstrap(d), "-")
                )
    # random ranks often give the same bits: also over distinct bit assignments only
    distinct = list({json.dumps(r["bits"], sort_keys=True): r for r in same}.values())
    out["spearman_distinct"] = {}
    for key in ("omega_eigenvalue", "omega_trace"):
        for rs, dest in ((same, out["spearman"]), (distinct, out["spearman_distinct"])):
            if len(rs) >= 3:
                rho, p = spearman([r[key] for r in rs], [r["acc"] for r in rs])
                dest[key] = (rho, p, len(rs))
    return out


def ptq_md(res: dict, st: dict) -> list[str]:
    fp = res["float_acc"]
    rows = []
    for r in res["ptq"]["rows"]:
        rows.append(
            [
                r["name"],
                r.get("solver", "-"),
                r.get("sensitivity", "-"),
                f"{r['weight_compression']:.2f}x",
                f"{r['size_mb']:.4f}",
                f"{r['omega_eigenvalue']:.4g}" if "omega_eigenvalue" in r else "-",
                f"{r['omega_trace']:.4g}" if "omega_trace" in r else "-",
                pct(r["acc"]),
                f"{100 * (r['acc'] - fp):+.2f}",
            ]
        )
    out = ["### PTQ: every allocation quantized at once (no training)", ""]
    out.append(
        table_md(
            [
                "allocation",
                "solver",
                "sensitivity",
                "W-Comp",
                "size MB",
                "total Omega (eig)",
                "total Omega (trace)",
                "top-1 %",
                "vs float",
            ],
            rows,
        )
    )
    off = ", ".join(f"{n} ({100 * d:+.1f}%)" for n, d in st["off_size"]) or "none"
    t = res["experiment"].get("size_tolerance")
    tol = "B, B: no lower bound" if t is None else f"{1 - t:.3g} B, B"
    out += [
        "",
        f"{st['same_size']} allocations lie within 2% of the HAWQ-ILP size (every solver "
        f"is asked for weight bits in [{tol}] of the target's budget B, "
        "`size_tolerance`); outside it (the v1 rule's monotone sequences reach no size in "
        "that window; not the same size, excluded from the rank correlation and the paired "
        f"comparisons): {off}.",
        "",
    ]
    out += [
        "Paired on the same test images (HAWQ minus the comparison, in points; bootstrap "
        "95% CI over images, 10,000 replicates; McNemar counts HAWQ-only-right / "
        "other-only-right with the exact p-value):",
        "",
    ]
    out.append(
        table_md(
            ["HAWQ (solver, sensitivity)", "vs", "mean diff [95% CI], p", "McNemar", "verdict"],
            [[a, b, fmt_paired(r), m, verdict(r)] for a, b, r, m in st["pairs"]],
        )
    )
    out += [""]
    for key, (rho, p, n) in st["spearman"].items():
        out.append(
            f"- Spearman(total {key.split('_')[1]} Omega, PTQ accuracy) over {n} "
            f"same-size allocations: rho = {rho:.3f} (p = {p:.2g})."
        )
        if key in st["spearman_distinct"]:
            rho, p, n = st["spearman_distinct"][key]
            out[-1] += (
                f" Over the {n} distinct bit assignments among them: rho = {rho:.3f} (p = {p:.2g})."
            )
    return out


# ----------------------------------------------------------------------------- QAT
def _seed_matrix(runs: list[dict], name: str, seeds: list[int]) -> np.ndarray:
    by = {r["seed"]: vec(r["correct"]) for r in runs if r["name"] == name}
    return np.stack([by[s] for s in seeds])


def _uniform_pairs(runs: list[dict], names: list[str], hawq: str, paired) -> list[str]:
    """``paired`` HAWQ with each uniform-b allocation of the same size: weight bits within
    ``SAME_SIZE`` of HAWQ's, i.e. |W-Comp(HAWQ) / W-Comp(uniform) - 1| <= 2%. Returns the
    descriptions of the uniform allocations of another size (no paired comparison)."""
    wcomp = {r["name"]: r["weight_compression"] for r in runs}
    off_size = []
    for u in (n for n in names if n.startswith("uniform")):
        dev = wcomp[hawq] / wcomp[u] - 1  # uniform's weight bits relative to HAWQ's
        if abs(dev) <= SAME_SIZE:
            paired([u], f"{u} (the same size: weight bits {100 * dev:+.1f}%)")
        else:
            off_size.append(
                f"{u} at {wcomp[u]:.2f}x (weight bits {100 * dev:+.0f}% vs HAWQ's "
                f"{wcomp[hawq]:.2f}x)"
            )
    return off_size


def qat_md(res: dict) -> tuple[list[str], list]:
    q = res["qat"]
    runs = q["runs"]
    names = list(dict.fromkeys(r["name"] for r in runs))
    seeds = sorted({r["seed"] for r in runs})
    rows = []
    for n in names:
        accs = [r["acc"] for r in runs if r["name"] == n]
        m, h = mean_ci(accs)
        first = next(r for r in runs if r["name"] == n)
        rows.append(
            [
                n,
                f"{first['weight_compression']:.2f}x",
                f"{first['omega']:.4g}",
                " / ".join(pct(a) for a in accs),
                f"{pct(m)} +- {pct(h)}",
                f"{100 * (m - res['float_acc']):+.2f}",
            ]
        )
    out = [f"### QAT ({q['solver']} solver, {q['sensitivity']} sensitivity; seeds {seeds})", ""]
    out.append(
        table_md(
            [
                "allocation",
                "W-Comp",
                "total Omega",
                "top-1 % per seed",
                "mean +- 95% CI (t, seeds)",
                "vs float",
            ],
            rows,
        )
    )
    pairs = []
    bits = {r["name"]: r["bits"] for r in runs}
    hawq = next((n for n in names if n.startswith("hawq")), None)
    if hawq is not None:
        seeds_of = {n: {r["seed"] for r in runs if r["name"] == n} for n in names}
        twins = sorted(n for n in names if n != hawq and bits[n] == bits[hawq])

        def paired(others: list[str], label: str) -> None:
            common = sorted(seeds_of[hawq].intersection(*(seeds_of[n] for n in others)))
            if not common:
                return
            hm = _seed_matrix(runs, hawq, common)
            om = np.mean([_seed_matrix(runs, n, common) for n in others], axis=0)
            if len(common) < len(seeds):
                label += f" (seeds {common} only)"
            pairs.append((label, paired_bootstrap(hm - om)))

        anti = next((n for n in names if n.startswith("anti")), None)
        if anti is not None:
            paired([anti], "anti" + (" (the same bits as HAWQ)" if anti in twins else ""))
        rand = [n for n in names if n.startswith("random")]
        if rand:
            same = sum(n in twins for n in rand)
            label = f"mean of {len(rand)} random" + (
                f" ({same} with the same bits as HAWQ)" if same else ""
            )
            paired(rand, label)
        off_size = _uniform_pairs(runs, names, hawq, paired)
        solver_bits = [b for n, b in bits.items() if not n.startswith("uniform")]
        n_distinct = len({json.dumps(b, sort_keys=True) for b in solver_bits})
        out += [
            "",
            f"{n_distinct} distinct bit assignment(s) among these {len(solver_bits)} allocations"
            + (" of the solver (uniform aside)" if len(solver_bits) < len(names) else "")
            + (
                f"; {', '.join(twins)} got exactly HAWQ's bits, so their difference from "
                "HAWQ is zero by construction"
                + (" (at this size the solver has no other choice)." if n_distinct == 1 else ".")
                if twins
                else "."
            ),
        ]
        if off_size:
            out += [
                "",
                "Not the same size as HAWQ (weight bits more than 2% apart), so not compared "
                "with it, only with float: " + "; ".join(off_size) + ".",
            ]
    if not pairs:  # e.g. an experiment training HAWQ alone (qat_arms: [hawq])
        return out, pairs
    out += [
        "",
        "HAWQ minus the comparison, paired by seed and test image (two-way bootstrap: "
        "seeds and images resampled):",
        "",
    ]
    out.append(
        table_md(
            ["vs", "mean diff [95% CI], p", "verdict"],
            [[b, fmt_paired(r), verdict(r)] for b, r in pairs],
        )
    )
    return out, pairs


def order_md(res: dict) -> list[str]:
    o = res["order"]
    runs = o["runs"]
    modes = list(dict.fromkeys(r["order"] for r in runs))
    rows = []
    for mode in modes:
        rs = [r for r in runs if r["order"] == mode]
        n_st = min(len(r["stage_acc"]) for r in rs)
        stages = [mean_ci([r["stage_acc"][k] for r in rs]) for k in range(n_st)]
        m, h = mean_ci([r["acc"] for r in rs])
        rows.append(
            [
                mode,
                len(rs),
                " / ".join(f"{pct(a)} +- {pct(b)}" for a, b in stages),
                f"{pct(m)} +- {pct(h)}",
            ]
        )
    out = [f"### Fine-tuning order (bits of {o['allocation']})", ""]
    out.append(
        table_md(
            [
                "order",
                "seeds",
                "top-1 % after each block stage (mean +- 95% CI)",
                "final (after the all-blocks epoch)",
            ],
            rows,
        )
    )
    seeds = sorted({r["seed"] for r in runs if r["order"] == "descending"})
    if "descending" in modes:
        d = {m: {r["seed"]: vec(r["correct"]) for r in runs if r["order"] == m} for m in modes}
        prs = []
        for mode in modes[1:]:
            common = [s for s in seeds if s in d[mode]]
            if common:
                diff = np.stack([d["descending"][s] - d[mode][s] for s in common])
                r = paired_bootstrap(diff)
                prs.append([f"descending - {mode}", fmt_paired(r)])
        out += ["", table_md(["final accuracy", "mean diff [95% CI], p"], prs)]
    return out
