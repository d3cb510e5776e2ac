"""What the report's plots show, as data (testable), and the matplotlib drawings of it.

- sensitivity: ``S_i`` = the quantity the allocation used (``trace / n_i`` or
  ``eigenvalue / n_i``, from ``bits.parquet``'s ``sensitivity``) with error bars (the trace's
  standard error / n_i; for the eigenvalue its solver residual / n_i) beside the raw eigenvalue
  and trace (± standard error);
- bits: weight and activation bits per quantized layer, pinned layers marked;
- accuracy: accuracy per phase with 95% Wilson intervals on the evaluation set size (the
  loss, without intervals, when the task has no class targets), y axis fitted to the intervals;
- pareto: the size / total-Omega frontier, each point labelled with its size and weight
  compression, the chosen allocation and the size target marked.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any

from hawq import BitConfig
from hawq.metrics import wilson_interval

__all__ = [
    "AccuracyPlot",
    "BitsPlot",
    "ParetoPlot",
    "SensitivityPlot",
    "accuracy_plot",
    "bits_plot",
    "draw",
    "pareto_plot",
    "png_bytes",
    "sensitivity_plot",
]

Rows = list[dict[str, Any]]


def _nan(v: float | None) -> float:
    return math.nan if v is None else float(v)


@dataclass(frozen=True, kw_only=True)
class SensitivityPlot:
    blocks: list[str]
    sensitivity: list[float]  # S_i as the allocation used it
    sensitivity_err: list[float]
    sensitivity_label: str  # e.g. "S = trace / n (used by the allocation)"
    eigenvalue: list[float]
    trace: list[float]
    trace_err: list[float]


@dataclass(frozen=True, kw_only=True)
class BitsPlot:
    layers: list[str]
    weight_bits: list[int]
    act_bits: list[int]
    pinned: list[bool]


@dataclass(frozen=True, kw_only=True)
class AccuracyPlot:
    labels: list[str]  # x tick labels: float, ptq, ft 1 (blocks), ..., final
    values: list[float]  # accuracy in % (or the loss)
    low: list[float]  # interval bounds (NaN: none)
    high: list[float]
    metric: str  # "accuracy (%)" or "loss"
    eval_samples: int
    ylim: tuple[float, float]


@dataclass(frozen=True, kw_only=True)
class ParetoPlot:
    size_mb: list[float]
    total_omega: list[float]
    labels: list[str]  # "0.0223 MB, 7.0x"
    chosen: tuple[float, float, str] | None  # (size_mb, total_omega, label)
    target_size_mb: float | None


def sensitivity_plot(sens: Rows, bits: Rows | None, method: str) -> SensitivityPlot:
    """``method`` = allocation.sensitivity ('trace' or 'eigenvalue')."""
    used = {r["block"]: r["sensitivity"] for r in bits or []}
    s, err = [], []
    for r in sens:
        n = r["n_params"]
        raw = r["trace"] if method == "trace" else r["eigenvalue"]
        s.append(_nan(used.get(r["block"], None if raw is None else raw / n)))
        e = r["trace_stderr"] if method == "trace" else r["residual"]
        err.append(0.0 if e is None else float(e) / n)
    return SensitivityPlot(
        blocks=[r["block"] for r in sens],
        sensitivity=s,
        sensitivity_err=err,
        sensitivity_label=f"S = {method} / n (used by the allocation)",
        eigenvalue=[_nan(r["eigenvalue"]) for r in sens],
        trace=[_nan(r["trace"]) for r in sens],
        trace_err=[0.0 if r["trace_stderr"] is None else r["trace_stderr"] for r in sens],
    )


def bits_plot(bits: Rows, bit_config: BitConfig, pins: dict[str, int]) -> BitsPlot:
    """One bar pair per quantized module, in block order; ``pins`` = allocation.pin."""
    layers = [m for r in bits for m in r["modules"]]
    resolved = [bit_config.resolve(m) for m in layers]
    return BitsPlot(
        layers=layers,
        weight_bits=[b.weight for b in resolved],
        act_bits=[b.act for b in resolved],
        pinned=[m in pins for m in layers],
    )


def accuracy_plot(metrics: Rows) -> AccuracyPlot:
    """From ``evaluate/metrics.parquet`` rows (phases float, ptq, finetune..., final)."""
    n = int(metrics[0]["eval_samples"])
    classification = not all(math.isnan(_nan(r["eval_acc"])) for r in metrics)
    labels, values, low, high = [], [], [], []
    for r in metrics:
        if r["phase"] == "finetune":
            labels.append(f"ft {r['ft_stage'] + 1}\n{r['blocks']}")
        else:
            labels.append(r["phase"])
        if classification:
            acc = _nan(r["eval_acc"])
            lo, hi = wilson_interval(acc * n, n)
            values.append(100 * acc)
            low.append(100 * lo)
            high.append(100 * hi)
        else:
            values.append(_nan(r["eval_loss"]))
            low.append(math.nan)
            high.append(math.nan)
    finite = [v for v in (*values, *low, *high) if math.isfinite(v)]
    lo_, hi_ = (min(finite), max(finite)) if finite else (0.0, 1.0)
    pad = max(0.5, 0.1 * (hi_ - lo_))
    if classification:
        ylim = (max(0.0, lo_ - pad), min(100.0, hi_ + pad))
    else:
        ylim = (max(0.0, lo_ - pad) if lo_ >= 0 else lo_ - pad, hi_ + pad)
    return AccuracyPlot(
        labels=labels,
        values=values,
        low=low,
        high=high,
        metric="accuracy (%)" if classification else "loss",
        eval_samples=n,
        ylim=ylim,
    )


def pareto_plot(pareto: Rows, summary: dict[str, Any] | None) -> ParetoPlot:
    """From ``allocate/pareto.parquet`` rows and the allocation summary (chosen point, target)."""

    def label(size: float, comp: float) -> str:
        return f"{size:.3g} MB, {comp:.3g}x"

    chosen = None
    target = None
    if summary is not None:
        s = summary
        chosen = (s["size_mb"], s["total_omega"], label(s["size_mb"], s["weight_compression"]))
        target = s.get("target_size_mb")
    return ParetoPlot(
        size_mb=[r["size_mb"] for r in pareto],
        total_omega=[r["total_omega"] for r in pareto],
        labels=[label(r["size_mb"], r["weight_compression"]) for r in pareto],
        chosen=chosen,
        target_size_mb=target,
    )


# --------------------------------------------------------------------------- drawing


def _xticks(ax, names: list[str]) -> None:
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)


def _log_if_wide(ax, values: list[float]) -> None:
    vals = [v for v in values if math.isfinite(v)]
    if vals and min(vals) > 0 and max(vals) / min(vals) > 20:
        ax.set_yscale("log")


def _draw_sensitivity(plt, d: SensitivityPlot):
    x = range(len(d.blocks))
    fig, axes = plt.subplots(3, 1, figsize=(max(6, 0.5 * len(d.blocks)), 8), sharex=True)
    axes[0].bar(x, d.sensitivity, yerr=d.sensitivity_err, capsize=3, color="tab:purple")
    axes[0].set_ylabel("S (± s.e. / n)")
    axes[0].set_title(d.sensitivity_label)
    axes[1].bar(x, d.eigenvalue, color="tab:blue")
    axes[1].set_ylabel("top eigenvalue")
    axes[2].bar(x, d.trace, yerr=d.trace_err, capsize=3, color="tab:orange")
    axes[2].set_ylabel("trace (± s.e.)")
    for ax, vals in zip(axes, (d.sensitivity, d.eigenvalue, d.trace), strict=True):
        _log_if_wide(ax, vals)
    _xticks(axes[2], d.blocks)
    return fig


def _draw_bits(plt, d: BitsPlot):
    x = list(range(len(d.layers)))
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(d.layers)), 3.8))
    w = 0.4
    ax.bar([i - w / 2 for i in x], d.weight_bits, w, color="tab:green", label="weight bits (W)")
    ax.bar([i + w / 2 for i in x], d.act_bits, w, color="tab:cyan", label="activation bits (A)")
    for i, pinned in enumerate(d.pinned):
        if pinned:
            ax.annotate("pin", (i - w / 2, d.weight_bits[i]), ha="center", va="bottom", fontsize=8)
    names = [f"{n} (pinned)" if p else n for n, p in zip(d.layers, d.pinned, strict=True)]
    _xticks(ax, names)
    ax.set_ylabel("bits")
    ax.set_ylim(0, max([*d.weight_bits, *d.act_bits, 8]) + 1.5)
    ax.set_title("Bits per layer (W / A); pinned layers marked")
    ax.legend(fontsize=8)
    return fig


def _draw_accuracy(plt, d: AccuracyPlot):
    x = list(range(len(d.labels)))
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(d.labels)), 4))
    if d.metric == "loss":
        ax.plot(x, d.values, "o-")
    else:
        err = [[v - lo for v, lo in zip(d.values, d.low, strict=True)],
               [hi - v for v, hi in zip(d.values, d.high, strict=True)]]  # fmt: skip
        ax.errorbar(x, d.values, yerr=err, fmt="o-", capsize=4)
    ax.set_xticks(x, d.labels, fontsize=8)
    ax.set_ylim(*d.ylim)
    ax.set_ylabel(d.metric)
    what = "95% Wilson intervals, " if d.metric != "loss" else ""
    ax.set_title(f"{d.metric} per phase ({what}{d.eval_samples} evaluation samples)")
    ax.grid(axis="y", alpha=0.3)
    return fig


def _draw_pareto(plt, d: ParetoPlot):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(d.size_mb, d.total_omega, "o-", color="tab:gray", label="frontier")
    for x, y, text in zip(d.size_mb, d.total_omega, d.labels, strict=True):
        ax.annotate(text, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if d.chosen is not None:
        ax.plot(
            d.chosen[0], d.chosen[1], "*", ms=16, color="tab:red", label=f"chosen: {d.chosen[2]}"
        )
    if d.target_size_mb is not None:
        ax.axvline(d.target_size_mb, ls="--", color="tab:red", alpha=0.6,
                   label=f"target {d.target_size_mb:.3g} MB")  # fmt: skip
    _log_if_wide(ax, d.total_omega)
    ax.set_xlabel("model size (MB)")
    ax.set_ylabel("total Omega")
    ax.set_title("Size vs. second-order perturbation")
    ax.legend(fontsize=8)
    return fig


_DRAW = {
    SensitivityPlot: _draw_sensitivity,
    BitsPlot: _draw_bits,
    AccuracyPlot: _draw_accuracy,
    ParetoPlot: _draw_pareto,
}


def draw(data: Any):
    """The matplotlib figure of a plot's data (Agg backend)."""
    from hawq.optional import require

    matplotlib = require("matplotlib", feature="the report's plots")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, _DRAW[type(data)](plt, data)


def png_bytes(data: Any) -> bytes:
    """The plot as PNG bytes."""
    plt, fig = draw(data)
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)
    return buf.getvalue()
