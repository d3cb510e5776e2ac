"""Plots of ``docs/results.md``: accuracy vs size (every allocation a point) and total Omega vs
PTQ accuracy, from the JSON results of ``evaluate_hawq.py``."""

from __future__ import annotations

import os
from pathlib import Path


def plots(res: dict, img_dir: Path, doc_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img_dir.mkdir(parents=True, exist_ok=True)
    name = res["experiment"]["name"]
    rows = res["ptq"]["rows"]
    colors = {"hawq": "tab:green", "anti": "tab:red", "random": "tab:gray", "uniform": "tab:blue"}
    out = []
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for kind, c in colors.items():
        rs = [r for r in rows if r["kind"] == kind]
        ax.scatter(
            [r["size_mb"] for r in rs],
            [100 * r["acc"] for r in rs],
            c=c,
            label=kind,
            s=28,
            alpha=0.8,
        )
    if "qat" in res:
        for kind, c in colors.items():
            rs = [r for r in res["qat"]["runs"] if r["kind"] == kind]
            size = {r["name"]: r["size_mb"] for r in rows}
            pts = [(size.get(r["name"]), 100 * r["acc"]) for r in rs if r["name"] in size]
            if pts:
                ax.scatter(
                    *zip(*pts, strict=True), marker="^", c=c, s=28, label=f"{kind} after QAT"
                )
    ax.axhline(100 * res["float_acc"], color="k", ls="--", lw=1, label="float32")
    ax.set_xlabel("model size (MB)")
    ax.set_ylabel(f"top-1 on {res['n_eval']} test images (%)")
    ax.set_title(f"{name}: accuracy vs size (circles PTQ, triangles QAT)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    p = img_dir / f"{name}_acc_vs_size.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    out.append(p)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    alloc = [r for r in rows if r["kind"] != "uniform"]
    ref = next((r for r in alloc if r["kind"] == "hawq" and r["solver"] == "ilp"), None)
    ref_mb = (ref or alloc[0])["size_mb"] if alloc else 1.0
    same = [r for r in alloc if abs(r["size_mb"] / ref_mb - 1) <= 0.02]  # as in the doc
    for ax, key in zip(axes, ("omega_eigenvalue", "omega_trace"), strict=True):
        for kind, c in colors.items():
            rs = [r for r in same if r["kind"] == kind]
            ax.scatter([r[key] for r in rs], [100 * r["acc"] for r in rs], c=c, label=kind, s=24)
        ax.set_xscale("log")
        ax.set_xlabel(f"total Omega ({key.split('_')[1]})")
        ax.set_ylabel("PTQ top-1 (%)")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{name}: total Omega vs PTQ accuracy (same-size allocations)", fontsize=9)
    fig.tight_layout()
    p = img_dir / f"{name}_omega_vs_acc.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    out.append(p)
    return [f"![{p.stem}]({os.path.relpath(p, doc_dir)})" for p in out]
