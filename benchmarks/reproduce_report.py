"""Write ``docs/results.md`` and its plots from the results of ``reproduce_cifar10.py``.

Tables in the layout of HAWQ v1's Table 1 (with 95% Wilson intervals), the acceptance checks,
accuracy-vs-size and fine-tuning-order plots, wall times. Only formatting: every number comes
from the :class:`ExperimentResult` values of the run.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch
from reproduce_lib import (
    PAPER_ROWS,
    ExperimentResult,
    ReproConfig,
    Variant,
    epochs_to_reach,
    fmt_s,
    pct,
    table_md,
    wilson,
)

ROOT = Path(__file__).resolve().parents[1]


def _ci(acc: float, n: int) -> str:
    lo, hi = wilson(round(acc * n), n)
    return f"{100 * acc:.2f} [{100 * lo:.2f}, {100 * hi:.2f}]"


def _wbits(v: Variant, pinned: set[str]) -> str:
    free = sorted({b for k, b in v.alloc.bits.items() if k not in pinned})
    pins = sorted({b for k, b in v.alloc.bits.items() if k in pinned})
    text = str(free[0]) if len(free) == 1 else "MP " + "/".join(map(str, free))
    return text + (f" (pinned: {'/'.join(map(str, pins))})" if pins else "")


def plots(r: ExperimentResult, img_dir: Path) -> list[Path]:
    """Accuracy vs size (per allocation) and per-epoch loss/accuracy (per order)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img_dir.mkdir(parents=True, exist_ok=True)
    out = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for v in r.variants:
        lo, hi = wilson(round(v.acc * r.n_eval), r.n_eval)
        x = v.summary["size_mb"]
        ax.errorbar(
            [x], [100 * v.acc], yerr=[[100 * (v.acc - lo)], [100 * (hi - v.acc)]], fmt="o",
            capsize=3, label=v.name,
        )  # fmt: skip
    ax.axhline(100 * r.fp_acc, color="k", ls="--", lw=1, label="float32")
    ax.set_xlabel("model size (MB)")
    ax.set_ylabel(f"top-1 on {r.n_eval} test images (%)")
    ax.set_title(f"{r.exp.name}: accuracy vs size after QAT (95% Wilson CI)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    p = img_dir / f"{r.exp.name}_acc_vs_size.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    out.append(p)

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for v in r.orders:
        ep = [h.global_epoch + 1 for h in v.history]
        axes[0].plot(ep, [h.train_loss for h in v.history], marker="o", label=v.label)
        axes[1].plot(ep, [100 * h.eval_acc for h in v.history], marker="o", label=v.label)
    axes[0].set_ylabel("training loss")
    axes[1].set_ylabel("test top-1 (%)")
    axes[1].axhline(100 * r.fp_acc, color="k", ls="--", lw=1, label="float32")
    for ax in axes:
        ax.set_xlabel("fine-tuning epoch")
    axes[1].legend(fontsize=7)
    fig.suptitle(f"{r.exp.name}: fine-tuning order (HAWQ bits)", fontsize=9)
    fig.tight_layout()
    p = img_dir / f"{r.exp.name}_order_curves.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    out.append(p)
    return out


def experiment_md(r: ExperimentResult, doc_dir: Path, img_dir: Path) -> str:
    """The markdown section of one experiment."""
    imgs = plots(r, img_dir)
    n = r.n_eval
    fp = r.fp_summary
    lines = [f"## {r.exp.title}", ""]
    lines.append(
        f"Run `{r.exp.name}`: pipeline config `{r.exp.config}` with overrides "
        f"`{' '.join(r.overrides) or '(none)'}`. Hessian on {r.n_hessian} training images; "
        f"QAT on {r.n_train} training images ({r.qat.epochs} epoch(s) per stage, lr {r.qat.lr}, "
        f"loss {r.qat.loss}); evaluation on {n} test images. Target weight compression "
        f"{r.target:.2f}x."
    )
    if r.baseline_history:
        h = r.baseline_history
        lines.append(
            f"\nFloat baseline trained from scratch: {len(h)} epochs on {r.n_train} images "
            f"(final training loss {h[-1].train_loss:.3f})."
        )
    lines += ["", "### Table 1 layout (top-1 with 95% Wilson interval)", ""]
    rows = []
    if r.exp.name.startswith("resnet20_cifar10"):
        rows += [list(p) for p in PAPER_ROWS]
    rows.append(
        ["Baseline (FP32), this run", "32", "32", "1.00x", "1.00x", f"{fp['size_mb']:.4f}",
         _ci(r.fp_acc, n), "-"]
    )  # fmt: skip
    for v in r.variants:
        s = v.summary
        rows.append(
            [v.label, _wbits(v, r.pinned), str(r.act_bits), f"{s['weight_compression']:.2f}x",
             f"{s['act_compression']:.2f}x", f"{s['size_mb']:.4f}", _ci(v.acc, n), pct(v.ptq_acc)]
        )  # fmt: skip
    for row in rows:
        if len(row) == 7:
            row.append("-")
    lines.append(
        table_md(
            [
                "method",
                "W bits",
                "A bits",
                "W-Comp",
                "A-Comp",
                "size (MB)",
                "top-1 % [95% CI]",
                "PTQ top-1 % (before QAT)",
            ],
            rows,
        )  # fmt: skip
    )
    lines.append(
        "\nW-Comp: 32 x (Conv/Linear weights) / their bits. A-Comp: mean over layers of 32 / "
        "input-activation bits (the first conv's input is quantized too). Size: packed weights + "
        "per-channel scales + float32 biases/BN (`hawq.size`). MP = mixed precision. "
        "The paper's rows use the full 10,000-image test set and full training; ours do not."
    )
    lines += ["", "Bits per block:", ""]
    blocks = [s["block"] for s in r.sens]
    lines.append(
        table_md(
            ["variant", *blocks],
            [[v.name, *[v.alloc.bits.get(b, 32) for b in blocks]] for v in r.variants],
        )
    )
    lines += ["", "### Hessian sensitivity", ""]
    hawq = r.variants[0]
    om = {row["block"]: row["omega"] for row in hawq.alloc.table.to_pylist()}
    lines.append(
        table_md(
            [
                "block",
                "params",
                "top eigenvalue",
                "S = lambda/n",
                "trace (+- stderr)",
                "probes",
                "HAWQ bits",
                "Omega at bits",
            ],
            [
                [
                    s["block"],
                    s["n_params"],
                    f"{s['eigenvalue']:.4g}",
                    f"{s['eigenvalue'] / s['n_params']:.3g}",
                    "-" if s["trace"] is None else f"{s['trace']:.4g} +- {s['trace_stderr']:.2g}",
                    s["trace_probes"],
                    hawq.alloc.bits.get(s["block"]),
                    f"{om.get(s['block'], 0):.3g}",
                ]
                for s in r.sens
            ],
        )  # fmt: skip
    )
    lines += ["", "### Fine-tuning order (HAWQ bits)", ""]
    finals = [v.acc for v in r.orders]
    target = min(finals)
    erows = []
    for v in r.orders:
        accs = [h.eval_acc for h in v.history]
        erows.append(
            [v.label, " / ".join(pct(a) for a in accs),
             " / ".join(f"{h.train_loss:.3f}" for h in v.history), _ci(v.acc, n),
             epochs_to_reach(accs, target) or "never"]
        )  # fmt: skip
    lines.append(
        table_md(
            [
                "order",
                "test top-1 % per epoch",
                "training loss per epoch",
                "final top-1 [95% CI]",
                f"epochs to reach {pct(target)}%",
            ],
            erows,
        )  # fmt: skip
    )
    lines.append(
        "\nEach epoch of stage s trains with the blocks of stages 1..s quantized (earlier ones "
        "frozen), so accuracies before the last stage describe partly quantized models."
    )
    lines += ["", "### Plots", ""]
    for p in imgs:
        lines.append(f"![{p.stem}]({os.path.relpath(p, doc_dir)})")
    lines += ["", "### Wall time", ""]
    lines.append(table_md(["part", "wall time"], [[k, fmt_s(s)] for k, s in r.parts.items()]))
    return "\n".join(lines)


def acceptance_md(r: ExperimentResult) -> str:
    """The issue's acceptance lines, checked against this run's numbers."""
    n = r.n_eval
    hawq = r.variants[0]
    out = [f"- **{r.exp.name}**:"]
    gap = 100 * (r.fp_acc - hawq.acc)
    out.append(
        f"  - HAWQ at {hawq.summary['weight_compression']:.2f}x W-Comp / A4: {pct(hawq.acc)}% vs "
        f"float {pct(r.fp_acc)}% (gap {gap:.2f} points): "
        f"{'holds' if gap <= 1.5 else 'does NOT hold'} (within 1.5 points)."
    )
    for v in r.variants[1:]:
        if v.name == "uniform4":
            continue
        d = 100 * (hawq.acc - v.acc)
        lo, hi = wilson(round(v.acc * n), n)
        hlo, hhi = wilson(round(hawq.acc * n), n)
        overlap = " (the 95% intervals overlap)" if hlo <= hi and lo <= hhi else ""
        verdict = "beats" if d > 0 else "does NOT beat"
        out.append(
            f"  - HAWQ {verdict} {v.label} ({v.summary['weight_compression']:.2f}x): "
            f"{pct(hawq.acc)}% vs {pct(v.acc)}% ({d:+.2f} points){overlap}."
        )
    om = r.orders[0]
    for v in r.orders[1:]:
        target = min(om.acc, v.acc)
        a = epochs_to_reach([h.eval_acc for h in om.history], target)
        b = epochs_to_reach([h.eval_acc for h in v.history], target)
        faster = a is not None and (b is None or a < b)
        same = a == b
        word = "fewer" if faster else "the same number of" if same else "MORE"
        out.append(
            f"  - Omega order reaches {pct(target)}% in epoch {a}, {v.label} in epoch {b}: "
            f"{word} epochs; final {pct(om.acc)}% vs {pct(v.acc)}%."
        )
    return "\n".join(out)


def device_text(dev: torch.device, threads: int) -> str:
    """Where the run ran, for the doc: the GPU's name, or the CPU thread count."""
    host = f"{platform.machine()}, {os.cpu_count()} CPUs visible; torch {torch.__version__}"
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
        return f"on GPU {name} (CUDA {torch.version.cuda}; {threads} torch CPU threads, {host})"
    return f"on CPU, {threads} torch threads ({host})"


def write_doc(
    cfg: ReproConfig,
    results: list[ExperimentResult],
    argv: list[str],
    wall: float,
    smoke: bool,
    dev: torch.device | None = None,
) -> Path:
    """Write the results document (and plots); return its path."""
    doc = Path(cfg.doc) if Path(cfg.doc).is_absolute() else ROOT / cfg.doc
    img_dir = Path(cfg.img_dir) if Path(cfg.img_dir).is_absolute() else ROOT / cfg.img_dir
    doc.parent.mkdir(parents=True, exist_ok=True)
    cmd = " ".join(["benchmarks/reproduce_cifar10.py", *argv])
    lines = [
        "# HAWQ reproduction at reduced scale (CIFAR-10 ResNet-20/56, Fashion-MNIST)",
        "",
        "Written by `benchmarks/reproduce_cifar10.py` (do not edit by hand)."
        + (" **SMOKE RUN: tiny sizes, numbers are not meaningful.**" if smoke else ""),
        "",
        f"Command: `python {cmd}`. Total wall time {fmt_s(wall)} "
        f"{device_text(dev or torch.device('cpu'), cfg.threads)}. Timings are from one run and "
        "include any load from other processes on the machine.",
        "",
        *([cfg.note.strip(), ""] if cfg.note.strip() else []),
        "Method (HAWQ v1): per-block (conv1, each BasicBlock, linear) top Hessian eigenvalue by "
        "Lanczos and Hutchinson trace on a subset of training images (BatchNorm in eval mode); "
        "precision order S_i = lambda_i / n_i; bits from {2, 4, 8} by the v1 rule (non-increasing "
        "in S, least total Omega_i = lambda_i ||Q(W_i) - W_i||^2) under the weight-compression "
        "target; first conv and last linear pinned at 8 bits (as in HAWQ-V3); all activations "
        "(Conv/Linear inputs) at 4 bits; block-wise QAT in descending Omega, earlier stages "
        "frozen. Ablations at the same budget: *reversed* and *random* use the same v1 rule "
        "with the precision order reversed / randomly permuted and pick the largest size under "
        "the limit (no Hessian information); *uniform* puts every free block at 4 or 2 bits.",
        "",
        "Published numbers (HAWQ v1, ResNet-20 on CIFAR-10, full data): FP 92.37%, HAWQ 92.22% "
        "at 13.11x W-Comp and 8x A-Comp (0.083 MB), DNAS 92.00%.",
        "",
        "## Acceptance (from the issue), checked on this run",
        "",
        *[acceptance_md(r) for r in results],
        "",
    ]
    done = {r.exp.name for r in results}
    missing = [e.name for e in cfg.experiments if e.name not in done]
    if missing:
        lines += [
            f"**Not run (the run stopped or has not reached them yet): {', '.join(missing)}.**",
            "",
        ]
    for r in results:
        lines += [experiment_md(r, doc.parent, img_dir), ""]
    lines += [
        "## Wall time per part",
        "",
        table_md(
            ["experiment", "part", "wall time"],
            [[r.exp.name, k, fmt_s(s)] for r in results for k, s in r.parts.items()],
        ),
        "",
        f"Total: {fmt_s(wall)}.",
        "",
    ]
    doc.write_text("\n".join(lines))
    return doc
