"""``hawq report``: terminal tables and PNG plots, read from the run dir alone.

Tables: stages, per-block sensitivities with bits and order, the allocation, accuracy per
phase. Plots (matplotlib, Agg): ``sensitivity.png`` (eigenvalue and trace with standard-error
bars per block), ``bits.png`` (bits per layer), ``pareto.png`` (size vs. total Omega with the
chosen point), ``accuracy.png`` (accuracy after each fine-tuning stage vs. float and PTQ).
Whatever a partial run has not produced yet is left out.
"""

from __future__ import annotations

import io
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa

from hawq.optional import available, install_hint, require
from pipeline.atomic import atomic_write_bytes, read_parquet
from pipeline.store import RunStore

log = logging.getLogger(__name__)


def fmt(value: object) -> str:
    """Cell text: floats with 4 significant digits (trailing zeros kept, so a column reads
    evenly: ``0.9900``, ``7.010``; from 1000 on, whole numbers), '-' for missing."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        if math.isfinite(value) and abs(value) >= 1000:
            return f"{value:.0f}"
        return f"{value:#.4g}".removesuffix(".")
    return str(value)


def fmt_pm(value: float, stderr: float | None) -> str:
    """``value ± stderr`` with the error to 2 significant digits and the value to the same
    decimal place (``2.190 ± 0.20`` would overstate; ``2.19 ± 0.20``); a common power of ten
    outside [1e-3, 1e5)."""
    if stderr is None or not math.isfinite(stderr) or stderr <= 0 or not math.isfinite(value):
        return fmt(value) if stderr is None else f"{fmt(value)} ± {fmt(stderr)}"
    big = max(abs(value), stderr)
    exp = math.floor(math.log10(big)) if big >= 1e5 or big < 1e-3 else 0
    v, e = value / 10**exp, stderr / 10**exp
    decimals = 1 - math.floor(math.log10(e))  # negative: round to tens, hundreds, ...
    v, e = round(v, decimals), round(e, decimals)
    text = f"{v:.{max(decimals, 0)}f} ± {e:.{max(decimals, 0)}f}"
    return text if exp == 0 else f"({text})e{exp:+03d}"


def format_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain fixed-width table with a title line."""
    cells = [[fmt(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    line = "  ".join("-" * w for w in widths)
    out = [title, "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)), line]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(out)


def _table(store: RunStore, stage: str, name: str) -> pa.Table | None:
    path = store.stage_dir(stage) / name
    return read_parquet(path) if path.exists() else None


def _save(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def tables(store: RunStore) -> list[str]:
    """The report's terminal tables (those whose inputs exist)."""
    out = []
    sens = _table(store, "hessian", "sensitivity.parquet")
    bits = _table(store, "allocate", "bits.parquet")
    order = _table(store, "order", "order.parquet")
    if sens is not None:
        b = {r["block"]: r for r in bits.to_pylist()} if bits is not None else {}
        o = {r["block"]: r for r in order.to_pylist()} if order is not None else {}
        rows = []
        for r in sens.to_pylist():
            n = r["n_params"]
            tr = r["trace"]
            rows.append(
                [
                    r["block"],
                    n,
                    r["eigenvalue"],
                    r["eigenvalue"] / n,
                    None if tr is None else fmt_pm(tr, r["trace_stderr"]),
                    None if tr is None else tr / n,
                    b.get(r["block"], {}).get("bits"),
                    o.get(r["block"], {}).get("omega"),
                    o.get(r["block"], {}).get("stage"),
                ]
            )
        out.append(
            format_table(
                "Per-block Hessian sensitivity, bits and fine-tuning order",
                [
                    "block",
                    "params",
                    "eigenvalue",
                    "eig/n",
                    "trace ± se",
                    "trace/n",
                    "bits",
                    "omega",
                    "ft stage",
                ],
                rows,
            )  # fmt: skip
        )
    summary = _table(store, "allocate", "summary.parquet")
    if summary is not None:
        s = summary.to_pylist()[0]
        out.append(
            format_table(
                "Allocation",
                [
                    "method",
                    "sensitivity",
                    "size MB",
                    "float MB",
                    "weight compr.",
                    "total omega",
                    "GBOPs",
                    "float GBOPs",
                ],
                [
                    [
                        s["method"],
                        s["sensitivity"],
                        s["size_mb"],
                        s["float_size_mb"],
                        s["weight_compression"],
                        s["total_omega"],
                        s["bops"] / 1e9,
                        s["float_bops"] / 1e9,
                    ]
                ],
            )  # fmt: skip
        )
    metrics = _table(store, "evaluate", "metrics.parquet")
    if metrics is not None:
        rows = [
            [r["phase"], r["stage"] if r["stage"] >= 0 else "", r["blocks"], r["eval_acc"],
             r["eval_loss"], r["size_mb"], r["weight_compression"]]
            for r in metrics.to_pylist()
        ]  # fmt: skip
        out.append(
            format_table(
                "Accuracy per phase (evaluation set)",
                ["phase", "stage", "blocks", "accuracy", "loss", "size MB", "weight compr."],
                rows,
            )
        )
    else:
        base = _table(store, "baseline", "metrics.parquet")
        if base is not None:
            r = base.to_pylist()[0]
            out.append(
                format_table(
                    "Baseline",
                    ["source", "epochs", "params", "accuracy", "loss"],
                    [[r["source"], r["epochs"], r["n_params"], r["eval_acc"], r["eval_loss"]]],
                )
            )
    return out


def plots(store: RunStore, out_dir: Path) -> list[Path]:
    """Write the PNG plots whose inputs exist into ``out_dir``; return their paths."""
    matplotlib = require("matplotlib", feature="the report's plots")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    sens = _table(store, "hessian", "sensitivity.parquet")
    if sens is not None:
        d = sens.to_pydict()
        x = range(len(d["block"]))
        fig, axes = plt.subplots(2, 1, figsize=(max(6, 0.5 * len(x)), 6), sharex=True)
        axes[0].bar(x, d["eigenvalue"], color="tab:blue")
        axes[0].set_ylabel("top eigenvalue")
        if any(t is not None for t in d["trace"]):
            tr = [math.nan if t is None else t for t in d["trace"]]
            se = [0.0 if s is None else s for s in d["trace_stderr"]]
            axes[1].bar(x, tr, yerr=se, capsize=3, color="tab:orange")
        axes[1].set_ylabel("trace (± s.e.)")
        for ax, key in zip(axes, ("eigenvalue", "trace"), strict=True):
            vals = [v for v in d[key] if v is not None]
            if vals and min(vals) > 0 and max(vals) / min(vals) > 20:
                ax.set_yscale("log")
        axes[1].set_xticks(list(x), d["block"], rotation=60, ha="right", fontsize=8)
        axes[0].set_title("Per-block Hessian sensitivity")
        _save(fig, out_dir / "sensitivity.png")
        plt.close(fig)
        written.append(out_dir / "sensitivity.png")
    bits = _table(store, "allocate", "bits.parquet")
    if bits is not None:
        d = bits.to_pydict()
        fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(d["block"])), 3.5))
        ax.bar(range(len(d["block"])), d["bits"], color="tab:green")
        ax.set_xticks(range(len(d["block"])), d["block"], rotation=60, ha="right", fontsize=8)
        ax.set_ylabel("weight bits")
        ax.set_title("Bits per layer")
        _save(fig, out_dir / "bits.png")
        plt.close(fig)
        written.append(out_dir / "bits.png")
    pareto = _table(store, "allocate", "pareto.parquet")
    summary = _table(store, "allocate", "summary.parquet")
    if pareto is not None:
        d = pareto.to_pydict()
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(d["size_mb"], d["total_omega"], "o-", color="tab:gray", label="frontier")
        if summary is not None:
            s = summary.to_pylist()[0]
            ax.plot(s["size_mb"], s["total_omega"], "*", ms=16, color="tab:red", label="chosen")
        ax.set_xlabel("model size (MB)")
        ax.set_ylabel("total Omega")
        ax.set_title("Size vs. second-order perturbation")
        ax.legend()
        _save(fig, out_dir / "pareto.png")
        plt.close(fig)
        written.append(out_dir / "pareto.png")
    metrics = _table(store, "evaluate", "metrics.parquet")
    if metrics is not None:
        rows = metrics.to_pylist()
        ft = [r for r in rows if r["phase"] == "finetune"]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(range(1, len(ft) + 1), [100 * r["eval_acc"] for r in ft], "o-", label="QAT")
        styles = {"float": "--", "ptq": ":"}
        for r in rows:
            if r["phase"] in styles:
                ax.axhline(100 * r["eval_acc"], ls=styles[r["phase"]], color="k", label=r["phase"])
        labels = [f"{i}\n{r['blocks']}" for i, r in enumerate(ft, 1)]
        ax.set_xticks(range(1, len(ft) + 1), labels, fontsize=8)
        ax.set_xlim(0.5, len(ft) + 0.5)
        ax.set_xlabel("fine-tuning stage (blocks quantized in it)")
        ax.set_ylabel("accuracy (%)")
        ax.set_title("Accuracy after each fine-tuning stage")
        ax.legend()
        _save(fig, out_dir / "accuracy.png")
        plt.close(fig)
        written.append(out_dir / "accuracy.png")
    return written


def report(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> str:
    """The report text; PNGs go to ``out_dir`` (default ``RUN_DIR/report``)."""
    store = RunStore(Path(run_dir))
    text = tables(store)
    target = Path(out_dir) if out_dir is not None else store.root / "report"
    if not available("matplotlib"):  # the tables stand alone
        text.append(
            f"Plots: skipped, matplotlib is not installed. Fix: {install_hint('matplotlib')}"
        )
        return "\n\n".join(text)
    written = plots(store, target)
    if written:
        text.append("Plots:\n" + "\n".join(f"  {p}" for p in written))
    return "\n\n".join(text)
