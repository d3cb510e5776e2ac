"""Plots of ``docs/results.md``: accuracy vs size (every allocation a point), total Omega vs
PTQ accuracy, and QAT / fine-tuning-order accuracy per seed, from the JSON results of
``evaluate_hawq.py``."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

COLORS = {"hawq": "tab:green", "anti": "tab:red", "random": "tab:gray", "uniform": "tab:blue"}


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, doc_dir: Path) -> str:
    """Write ``fig`` to ``path`` (its folder created), close it; the Markdown link from the doc."""
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"![{path.stem}]({os.path.relpath(path, doc_dir)})"


def qat_plot(res: dict, img_dir: Path, doc_dir: Path) -> str:
    """Top-1 per seed of every QAT arm and every fine-tuning order (one column each, the mean
    as a bar), with float32 as a line; returns the Markdown image link."""
    plt = _pyplot()
    name = res["experiment"]["name"]
    runs = res["qat"]["runs"]
    groups = []
    for n in dict.fromkeys(r["name"] for r in runs):
        rs = [r for r in runs if r["name"] == n]
        groups.append((f"{n} ({rs[0]['weight_compression']:.2f}x)", rs[0]["kind"], rs))
    order = res.get("order", {}).get("runs", [])
    for mode in dict.fromkeys(r["order"] for r in order if r["order"] != "descending"):
        groups.append((f"order: {mode}", "order", [r for r in order if r["order"] == mode]))
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(groups) + 1.5), 3.8))
    for i, (_, kind, rs) in enumerate(groups):
        accs = [100 * r["acc"] for r in rs]
        c = COLORS.get(kind, "tab:purple")
        jitter = np.linspace(-0.12, 0.12, len(accs)) if len(accs) > 1 else [0.0]
        ax.scatter(i + np.asarray(jitter), accs, c=c, s=22, alpha=0.85, zorder=3)
        ax.hlines(np.mean(accs), i - 0.3, i + 0.3, colors=c, lw=2, zorder=2)
    ax.axhline(100 * res["float_acc"], color="k", ls="--", lw=1, label="float32")
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([g[0] for g in groups], rotation=30, ha="right", fontsize=7)
    ax.set_ylabel(f"top-1 on {res['n_eval']} test images (%)")
    ax.set_title(f"{name}: QAT top-1 per seed (points) and mean (bar); orders: HAWQ's bits",
                 fontsize=9)  # fmt: skip
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, img_dir / f"{name}_qat_seeds.png", doc_dir)


def plots(res: dict, img_dir: Path, doc_dir: Path) -> list[str]:
    plt = _pyplot()
    name = res["experiment"]["name"]
    rows = res["ptq"]["rows"]
    out = []
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for kind, c in COLORS.items():
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
        for kind, c in COLORS.items():
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
    out.append(_save(fig, img_dir / f"{name}_acc_vs_size.png", doc_dir))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    alloc = [r for r in rows if r["kind"] != "uniform"]
    ref = next((r for r in alloc if r["kind"] == "hawq" and r["solver"] == "ilp"), None)
    ref_mb = (ref or alloc[0])["size_mb"] if alloc else 1.0
    same = [r for r in alloc if abs(r["size_mb"] / ref_mb - 1) <= 0.02]  # as in the doc
    for ax, key in zip(axes, ("omega_eigenvalue", "omega_trace"), strict=True):
        for kind, c in COLORS.items():
            rs = [r for r in same if r["kind"] == kind]
            ax.scatter([r[key] for r in rs], [100 * r["acc"] for r in rs], c=c, label=kind, s=24)
        ax.set_xscale("log")
        ax.set_xlabel(f"total Omega ({key.split('_')[1]})")
        ax.set_ylabel("PTQ top-1 (%)")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{name}: total Omega vs PTQ accuracy (same-size allocations)", fontsize=9)
    fig.tight_layout()
    out.append(_save(fig, img_dir / f"{name}_omega_vs_acc.png", doc_dir))
    return out
