"""``hawq report``: terminal tables, PNG plots and one self-contained ``report.html``.

Read from the run dir alone. Tables: per-block sensitivity with the S the allocation used,
W/A bits, pins, Omega and fine-tuning stage; the allocation; loss and accuracy (95% Wilson
interval) per phase. Plots: see :mod:`pipeline.report_plots`. Column names are those of the
stage files, explained in :data:`GLOSSARY` (the README's glossary). Whatever a partial run has
not produced yet is left out.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hawq import BitConfig
from hawq.optional import available, install_hint
from pipeline.atomic import atomic_write_bytes, atomic_write_text
from pipeline.config import RunConfig, load_config
from pipeline.report_html import render_html
from pipeline.report_plots import (
    accuracy_plot,
    bits_plot,
    pareto_plot,
    png_bytes,
    sensitivity_plot,
)
from pipeline.run_summary import json_ready, run_summary, stage_rows
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


GLOSSARY: dict[str, str] = {
    "block": "a unit of the Hessian analysis and the allocation: one Conv/Linear layer "
    "(hessian.grouping: layer) or a residual block; its modules share the weight bits",
    "n_params": "parameters of the block (n_i)",
    "eigenvalue": "top Hessian eigenvalue of the block (lambda_i)",
    "trace": "Hutchinson estimate of the block's Hessian trace, ± its standard error "
    "(trace_stderr)",
    "sensitivity": "S_i, what the allocation ranks blocks by: trace / n_i or eigenvalue / n_i "
    "(allocation.sensitivity)",
    "weight_bits": "bits of the layer's weights (W)",
    "act_bits": "bits of the layer's input activations (A)",
    "pinned": "bits fixed by allocation.pin, not chosen by the allocation",
    "omega": "Omega_i = S_i-weighted squared quantization error of the block's weights at its "
    "bits; fine-tuning goes in descending Omega",
    "ft_stage": "fine-tuning stage index (0-based) in which the block is quantized and trained; "
    "not a pipeline stage (baseline, hessian, ...)",
    "phase": "float = the baseline model; ptq = all blocks quantized, calibrated, no training; "
    "finetune = after fine-tuning stage ft_stage; final = the fine-tuned quantized model",
    "eval_acc": "top-1 accuracy on the evaluation set (NaN / '-' when the targets are not "
    "classes); eval_acc_low .. eval_acc_high is its 95% Wilson interval on eval_samples",
    "eval_loss": "mean task loss on the evaluation set (cross-entropy, or the config's loss)",
    "size_mb": "model size in MB (2^20 bytes) with the allocated bits: quantized weights plus "
    "everything kept in float (biases, BN, scales)",
    "target_size_mb": "the size limit the allocation had to meet (allocation.size_limit_mb, or "
    "allocation.compression converted to MB)",
    "weight_compression": "32 * sum n / sum b n over Conv/Linear weights (the papers' W-Comp; "
    "what allocation.compression targets)",
    "activation_compression": "mean over Conv/Linear layers of 32 / act_bits (A-Comp)",
    "model_compression": "float32 size of the whole model / size_mb",
    "total_omega": "sum of the blocks' Omega_i: the second-order perturbation the allocation "
    "minimises",
    "bops": "bit operations per sample, sum_i MACs_i * weight_bits_i * act_bits_i (shown in GBOPs)",
}


@dataclass(frozen=True)
class Table:
    """A report table: the terminal and the HTML render the same cells."""

    title: str
    headers: list[str]
    rows: list[list[object]]

    def text(self) -> str:
        return format_table(self.title, self.headers, self.rows)


def _bit_config(store: RunStore) -> BitConfig | None:
    path = store.stage_dir("allocate") / "bit_config.yaml"
    return BitConfig.from_yaml(path.read_text()) if path.exists() else None


def _block_table(store: RunStore, cfg: RunConfig) -> Table | None:
    sens = stage_rows(store, "hessian", "sensitivity.parquet")
    if sens is None:
        return None
    bits = {r["block"]: r for r in stage_rows(store, "allocate", "bits.parquet") or []}
    order = {r["block"]: r for r in stage_rows(store, "order", "order.parquet") or []}
    bit_config = _bit_config(store)
    pins = cfg.allocation.pin
    rows = []
    for r in sens:
        b = bits.get(r["block"], {})
        modules = b.get("modules", r["modules"])
        act = bit_config.resolve(modules[0]).act if bit_config and b else None
        trace = None if r["trace"] is None else fmt_pm(r["trace"], r["trace_stderr"])
        pinned = ",".join(m for m in modules if m in pins)
        ft_stage = order.get(r["block"], {}).get("ft_stage")
        rows.append(
            [r["block"], r["n_params"], r["eigenvalue"], trace, b.get("sensitivity"),
             b.get("bits"), act, pinned, b.get("omega"), ft_stage]
        )  # fmt: skip
    headers = ["block", "n_params", "eigenvalue", "trace ± se", "sensitivity", "weight_bits",
               "act_bits", "pinned", "omega", "ft_stage"]  # fmt: skip
    title = f"Per-block sensitivity (S = {cfg.allocation.sensitivity} / n), bits and order"
    return Table(title, headers, rows)


def _allocation_table(store: RunStore) -> Table | None:
    summary = stage_rows(store, "allocate", "summary.parquet")
    if not summary:
        return None
    s = summary[0]
    keys = ("method", "sensitivity", "size_mb", "target_size_mb", "float_size_mb",
            "weight_compression", "activation_compression", "model_compression",
            "total_omega")  # fmt: skip
    rows = [[k, s[k]] for k in keys] + [["GBOPs", s["bops"] / 1e9]]
    return Table("Allocation", ["quantity", "value"], rows)


def _phase_table(store: RunStore) -> Table | None:
    metrics = stage_rows(store, "evaluate", "metrics.parquet")
    if metrics is None:
        base = stage_rows(store, "baseline", "metrics.parquet")
        if not base:
            return None
        r = base[0]
        return Table(
            "Baseline",
            ["source", "epochs", "n_params", "eval_acc", "eval_loss"],
            [[r["source"], r["epochs"], r["n_params"], r["eval_acc"], r["eval_loss"]]],
        )
    rows = []
    for r in metrics:
        ci = None
        if not math.isnan(r["eval_acc"]):
            ci = f"{fmt(r['eval_acc_low'])} .. {fmt(r['eval_acc_high'])}"
        rows.append(
            [r["phase"], r["ft_stage"] if r["ft_stage"] is not None else "", r["blocks"],
             r["eval_acc"], ci, r["eval_loss"], r["size_mb"], r["weight_compression"]]
        )  # fmt: skip
    n = metrics[0]["eval_samples"]
    headers = ["phase", "ft_stage", "blocks", "eval_acc", "95% interval", "eval_loss", "size_mb",
               "weight_compression"]  # fmt: skip
    return Table(f"Loss and accuracy per phase ({n} evaluation samples)", headers, rows)


def tables(store: RunStore, cfg: RunConfig | None = None) -> list[Table]:
    """The report's tables (those whose inputs exist)."""
    cfg = cfg or load_config(store.config_path)
    made = [_block_table(store, cfg), _allocation_table(store), _phase_table(store)]
    return [t for t in made if t is not None]


def plot_data(store: RunStore, cfg: RunConfig | None = None) -> dict[str, Any]:
    """Plot name -> the data it shows (:mod:`pipeline.report_plots`), for existing inputs."""
    cfg = cfg or load_config(store.config_path)
    out: dict[str, Any] = {}
    sens = stage_rows(store, "hessian", "sensitivity.parquet")
    bits = stage_rows(store, "allocate", "bits.parquet")
    if sens is not None:
        out["sensitivity"] = sensitivity_plot(sens, bits, cfg.allocation.sensitivity)
    bit_config = _bit_config(store)
    if bits is not None and bit_config is not None:
        out["bits"] = bits_plot(bits, bit_config, cfg.allocation.pin)
    pareto = stage_rows(store, "allocate", "pareto.parquet")
    if pareto:
        summary = stage_rows(store, "allocate", "summary.parquet")
        out["pareto"] = pareto_plot(pareto, summary[0] if summary else None)
    metrics = stage_rows(store, "evaluate", "metrics.parquet")
    if metrics:
        out["accuracy"] = accuracy_plot(metrics)
    return out


def report(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> str:
    """The report text; PNGs and ``report.html`` go to ``out_dir`` (default RUN_DIR/report)."""
    store = RunStore(Path(run_dir))
    cfg = load_config(store.config_path)
    made = tables(store, cfg)
    text = [t.text() for t in made]
    target = Path(out_dir) if out_dir is not None else store.root / "report"
    images: list[tuple[str, bytes]] = []
    if available("matplotlib"):
        for name, data in plot_data(store, cfg).items():
            png = png_bytes(data)
            atomic_write_bytes(target / f"{name}.png", png)
            images.append((name, png))
    else:  # the tables stand alone
        text.append(
            f"Plots: skipped, matplotlib is not installed. Fix: {install_hint('matplotlib')}"
        )
    summary = run_summary(store, cfg)
    html = render_html(f"hawq report: {cfg.run.name}", made, images, GLOSSARY, summary)
    atomic_write_text(target / "report.html", html)
    files = [target / f"{name}.png" for name, _ in images] + [target / "report.html"]
    text.append("Files:\n" + "\n".join(f"  {p}" for p in files))
    return "\n\n".join(text)


def report_json(run_dir: str | os.PathLike) -> dict[str, Any]:
    """``hawq report --json``: the run summary and every table as lists of row objects."""
    store = RunStore(Path(run_dir))
    out: dict[str, Any] = {"run_dir": str(store.root), "summary": run_summary(store)}
    for key, (stage, name) in {
        "blocks": ("hessian", "sensitivity.parquet"),
        "bits": ("allocate", "bits.parquet"),
        "allocation": ("allocate", "summary.parquet"),
        "order": ("order", "order.parquet"),
        "phases": ("evaluate", "metrics.parquet"),
    }.items():
        rows = stage_rows(store, stage, name)
        if rows is not None:
            out[key] = [{k: v for k, v in r.items() if k != "stage_key"} for r in rows]
    return json_ready(out)
