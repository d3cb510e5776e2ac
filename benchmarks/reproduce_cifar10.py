"""Reduced-scale reproduction of HAWQ v1 (Dong et al., ICCV 2019) on CIFAR-10, with ablations.

For each experiment of ``configs/reproduce_cifar10.yaml`` (ResNet-20 and ResNet-56 from their
pretrained checkpoints on the real CIFAR-10 subset, and a ResNet-20 trained from scratch on
Fashion-MNIST): per-block Hessian eigenvalues and Hutchinson traces, the HAWQ allocation at
the target weight compression with 4-bit activations (first/last layer pinned at 8 bits), the
ablations at the same size budget (uniform 4/2-bit, reversed, random precision orders), block-wise
QAT for each, and the fine-tuning-order ablation (Omega descending vs reverse vs random). Writes
``docs/results.md`` and ``docs/img/*.png``; every number in them is computed by this run.

    .venv/bin/python benchmarks/reproduce_cifar10.py                # full run
    .venv/bin/python benchmarks/reproduce_cifar10.py --smoke --out /tmp/repro   # < 1 min
    python benchmarks/reproduce_cifar10.py --config configs/reproduce_cifar10_gpu.yaml \
        --device cuda --data-root .gpudata --out /tmp/res       # GPU-sized run, data copied

``--data-root DIR`` maps the configs' ``../shared/data/...`` paths (and Fashion-MNIST's default
directory, as ``DIR/fashion-mnist``) to ``DIR/...`` for machines without ``../shared/data``.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import platform
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from reproduce_lib import (  # noqa: E402
    ORDER_TEXT,
    PAPER_ROWS,
    VARIANT_TEXT,
    Clock,
    Experiment,
    ReproConfig,
    ablation_allocation,
    epochs_to_reach,
    fmt_s,
    load_repro_config,
    pct,
    random_sensitivity,
    reversed_sensitivity,
    smoke_config,
    table_md,
    uniform_allocation,
    wilson,
)

from hawq.allocate import Allocation, allocate, problem_from_model  # noqa: E402
from hawq.hessian.table import analyze  # noqa: E402
from hawq.order import finetune_order  # noqa: E402
from hawq.qat import EpochRecord, QATConfig, evaluate, run_qat  # noqa: E402
from hawq.quant import (  # noqa: E402
    BitConfig,  # noqa: E402
    calibrate_,
    quantize_,
)
from hawq.size import size_summary  # noqa: E402
from pipeline.config import alloc_config, load_config, order_config, qat_config  # noqa: E402
from pipeline.data import DataBundle, load_data  # noqa: E402
from pipeline.models import build_model, loss_fn_for  # noqa: E402

CALIBRATION_BATCHES = 4


@dataclass
class Variant:
    """One quantized model: its allocation, order, sizes and accuracies."""

    name: str
    label: str
    alloc: Allocation
    order: str
    summary: dict[str, float]
    ptq_acc: float | None = None
    history: list[EpochRecord] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def acc(self) -> float:
        return self.history[-1].eval_acc if self.history else float("nan")


@dataclass
class ExperimentResult:
    """Everything the report needs about one experiment."""

    exp: Experiment
    overrides: tuple[str, ...]
    n_train: int
    n_eval: int
    n_hessian: int
    fp_acc: float
    fp_summary: dict[str, float]
    baseline_history: list[EpochRecord]
    sens: list[dict]
    variants: list[Variant]
    orders: list[Variant]
    parts: dict[str, float]
    qat: QATConfig
    target: float
    act_bits: int
    pinned: set[str]


# ----------------------------------------------------------------------------- steps
def train_float(model: nn.Module, data: DataBundle, cfg, clock: Clock) -> list[EpochRecord]:
    """Train from scratch (the baseline section) with the QAT loop and an all-float config."""
    b = cfg.baseline
    qcfg = QATConfig(
        epochs=b.train_epochs,
        lr=b.lr,
        momentum=b.momentum,
        weight_decay=b.weight_decay,
        batch_size=b.batch_size,
        schedule=b.schedule,
        freeze_quantized=False,
        seed=cfg.run.seed,
        eval_batch_size=cfg.data.batch_size,
    )
    first = next(n for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear))
    t0 = time.perf_counter()

    def on_epoch(rec: EpochRecord, _state) -> None:
        eta = (time.perf_counter() - t0) / (rec.global_epoch + 1) * (b.train_epochs - rec.epoch - 1)
        clock.log(
            f"  baseline epoch {rec.epoch + 1}/{b.train_epochs}: loss {rec.train_loss:.3f} "
            f"eval acc {pct(rec.eval_acc)}% (ETA {eta:.0f}s)"
        )

    return run_qat(
        model,
        [[first]],
        (data.train_x, data.train_y),
        (data.eval_x, data.eval_y),
        qcfg,
        bit_config=BitConfig(weight_bits=32, act_bits=32),
        on_epoch_end=on_epoch,
    )


def ptq_accuracy(model: nn.Module, bit_config: BitConfig, data: DataBundle, bs: int) -> float:
    """Accuracy after quantizing everything at once (activation ranges from a few batches)."""
    m = quantize_(copy.deepcopy(model), bit_config)
    calib = [data.train_x[i * bs : (i + 1) * bs] for i in range(CALIBRATION_BATCHES)]
    calibrate_(m, [x for x in calib if len(x)])
    return evaluate(m, (data.eval_x, data.eval_y), batch_size=bs)[1]


def finetune(
    model: nn.Module,
    table,
    v: Variant,
    cfg,
    data: DataBundle,
    clock: Clock,
    eta_left: list[int],
    t_start: float,
) -> None:
    """Block-wise QAT of a copy of ``model`` in ``v.order``; fills ``v.history``."""
    m = copy.deepcopy(model)
    mode = {"omega": "descending", "reverse": "reverse", "random": "random"}[v.order]
    order = finetune_order(m, table, v.alloc.bits, replace(order_config(cfg), mode=mode))
    qcfg = qat_config(cfg)
    teacher = copy.deepcopy(model) if qcfg.loss == "distill" else None
    t0 = time.perf_counter()
    total = len(order.stages) * qcfg.epochs

    def on_epoch(rec: EpochRecord, _state) -> None:
        eta_left[0] -= 1
        per_epoch = (time.perf_counter() - t_start) / max(1, eta_left[1] - eta_left[0])
        clock.log(
            f"  {v.name}: stage {rec.stage + 1}/{len(order.stages)} epoch "
            f"{rec.global_epoch + 1}/{total} loss {rec.train_loss:.3f} eval acc "
            f"{pct(rec.eval_acc)}% (part ETA {per_epoch * eta_left[0]:.0f}s)"
        )

    v.history = run_qat(
        m,
        order.stages,
        (data.train_x, data.train_y),
        (data.eval_x, data.eval_y),
        qcfg,
        bit_config=v.alloc.bit_config,
        teacher=teacher,
        on_epoch_end=on_epoch,
    )
    v.seconds = time.perf_counter() - t0


SHARED_DATA = "../shared/data/"


def data_root_overrides(cfg, data_root: str | None) -> list[str]:
    """Overrides mapping `../shared/data/...` (and Fashion-MNIST's default) to ``data_root``."""
    if data_root is None:
        return []
    out = []
    for key, path in (("model.checkpoint", cfg.model.checkpoint), ("data.path", cfg.data.path)):
        if path is not None and str(path).startswith(SHARED_DATA):
            out.append(f"{key}={os.path.join(data_root, str(path)[len(SHARED_DATA) :])}")
    if cfg.data.name == "fashion_mnist" and cfg.data.path is None:
        out.append(f"data.path={os.path.join(data_root, 'fashion-mnist')}")
    return out


def to_device(data: DataBundle, dev: torch.device) -> DataBundle:
    """``data`` with its image/label tensors and Hessian batches on ``dev``."""
    if dev.type == "cpu":
        return data
    return replace(
        data,
        train_x=data.train_x.to(dev),
        train_y=data.train_y.to(dev),
        eval_x=data.eval_x.to(dev),
        eval_y=data.eval_y.to(dev),
        hessian=[(x.to(dev), y.to(dev)) for x, y in data.hessian],
    )


def run_experiment(
    exp: Experiment,
    threads: int,
    clock: Clock,
    device: torch.device | None = None,
    data_root: str | None = None,
) -> ExperimentResult:
    """Hessian, allocations, QAT of every variant and order of ``exp`` on ``device``."""
    dev = torch.device("cpu") if device is None else device
    parts: dict[str, float] = {}
    cwd = os.getcwd()
    os.chdir(ROOT)  # configs name data relative to the repository root
    try:
        cfg = load_config(exp.config, exp.overrides)
        extra = data_root_overrides(cfg, data_root)
        if extra:
            cfg = load_config(exp.config, (*exp.overrides, *extra))
    finally:
        os.chdir(cwd)
    torch.set_num_threads(threads)
    torch.manual_seed(cfg.run.seed)
    clock.log(f"== {exp.name}: {exp.title}")

    t = time.perf_counter()
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        data = to_device(load_data(cfg.data), dev)
        model = build_model(cfg.model).to(dev)
    finally:
        os.chdir(cwd)
    baseline_history: list[EpochRecord] = []
    if cfg.baseline.train_epochs > 0:
        clock.log(f"  training the float baseline ({cfg.baseline.train_epochs} epochs)")
        baseline_history = train_float(model, data, cfg, clock)
    model.eval()
    bs = cfg.data.batch_size
    _, fp_acc = evaluate(model, (data.eval_x, data.eval_y), batch_size=bs)
    parts["data + float baseline"] = time.perf_counter() - t
    clock.log(f"  float accuracy {pct(fp_acc)}% on {len(data.eval_y)} images")

    t = time.perf_counter()
    hcfg = cfg.hessian.to_hawq()
    table = analyze(
        model, loss_fn_for(cfg), data.hessian, hcfg, grouping=cfg.hessian.grouping, progress=False
    )
    parts["Hessian (eigenvalues + traces)"] = time.perf_counter() - t
    sens = table.to_pylist()
    hs = parts["Hessian (eigenvalues + traces)"]
    hvps = sum(s["hvps"] for s in sens)
    clock.log(
        f"  Hessian of {len(sens)} blocks on {data.hessian_samples} images: {fmt_s(hs)} "
        f"({hvps} eigen HVPs, {sens[0]['trace_probes']} trace probes)"
    )

    t = time.perf_counter()
    acfg = alloc_config(cfg)
    example = data.eval_x[:1]
    problem = problem_from_model(model, table, acfg, example_input=example)
    allocs: list[tuple[str, str, Allocation]] = []
    for name in exp.variants:
        if name == "hawq":
            allocs.append(("hawq", VARIANT_TEXT["hawq"], allocate(problem, acfg)))
        elif name in ("uniform4", "uniform2"):
            b = int(name[-1])
            allocs.append((name, VARIANT_TEXT[name], uniform_allocation(problem, acfg, b)))
        elif name == "reversed":
            fake = reversed_sensitivity(problem)
            allocs.append((name, VARIANT_TEXT[name], ablation_allocation(problem, acfg, fake)))
        else:
            for s in exp.random_seeds:
                fake = random_sensitivity(problem, np.random.default_rng([cfg.run.seed, 7919, s]))
                allocs.append(
                    (f"random-{s}", f"random allocation (seed {s})",
                     ablation_allocation(problem, acfg, fake))
                )  # fmt: skip
    variants = []
    for name, label, alloc in allocs:
        summ = size_summary(model, alloc.bit_config)
        v = Variant(name=name, label=label, alloc=alloc, order="omega", summary=summ)
        v.ptq_acc = ptq_accuracy(model, alloc.bit_config, data, bs)
        clock.log(
            f"  {name}: W-Comp {summ['weight_compression']:.2f}x, {summ['size_mb']:.4f} MB, "
            f"bits {list(alloc.bits.values())}, PTQ acc {pct(v.ptq_acc)}%"
        )
        variants.append(v)
    parts["allocation + PTQ evaluation"] = time.perf_counter() - t

    hawq = variants[0]
    orders = [
        Variant(
            name=f"order-{o}",
            label=ORDER_TEXT[o],
            alloc=hawq.alloc,
            order=o,
            summary=hawq.summary,
            ptq_acc=hawq.ptq_acc,
        )
        for o in exp.orders
        if o != "omega"
    ]
    qcfg = qat_config(cfg)
    n_stages = -(-len(hawq.alloc.bits) // cfg.finetune.blocks_per_stage)
    n_runs = len(variants) + len(orders)
    left = [n_runs * n_stages * qcfg.epochs, n_runs * n_stages * qcfg.epochs]
    t = time.perf_counter()
    for v in [*variants, *orders]:
        clock.log(f"  QAT {v.name} ({v.label}, order {v.order})")
        finetune(model, table, v, cfg, data, clock, left, t)
        clock.log(f"  {v.name}: final acc {pct(v.acc)}% ({fmt_s(v.seconds)})")
    parts["block-wise QAT (all variants)"] = time.perf_counter() - t
    omega_run = replace(hawq, name="order-omega", label=ORDER_TEXT["omega"])
    return ExperimentResult(
        exp=exp,
        overrides=exp.overrides,
        n_train=len(data.train_y),
        n_eval=len(data.eval_y),
        n_hessian=data.hessian_samples,
        fp_acc=fp_acc,
        fp_summary=size_summary(model, BitConfig(weight_bits=32, act_bits=32)),
        baseline_history=baseline_history,
        sens=sens,
        variants=variants,
        orders=[omega_run, *orders],
        parts=parts,
        qat=qcfg,
        target=float(acfg.compression or 0.0),
        act_bits=acfg.act_bits,
        pinned={
            problem.blocks[i]
            for u, b in zip(problem.units, problem.unit_bits, strict=True)
            if len(b) == 1
            for i in u
        },
    )


# ----------------------------------------------------------------------------- report
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


def main() -> None:
    """Run the reproduction (``--smoke``: tiny, first experiment only) and write the doc."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "reproduce_cifar10.yaml"))
    ap.add_argument("--smoke", action="store_true", help="tiny run of the first experiment")
    ap.add_argument("--out", default=None, help="output directory (doc + img) instead of docs/")
    ap.add_argument("--only", nargs="*", default=None, help="experiment names to run")
    ap.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto",
        help="where models, data and Hessian batches live (auto: cuda if available)",
    )  # fmt: skip
    ap.add_argument(
        "--data-root", default=None,
        help="replace the configs' ../shared/data/ prefix by this directory (Fashion-MNIST: "
        "DIR/fashion-mnist); default: the configs' paths as they are",
    )  # fmt: skip
    ap.add_argument(
        "--flat", action="store_true", help="write the plots next to the doc (no img/ folder)"
    )
    args = ap.parse_args()
    cfg = load_repro_config(args.config)
    if args.smoke:
        cfg = smoke_config(cfg, Path(args.out or "/tmp/hawq_repro_smoke"))
    elif args.out:
        out = Path(args.out)
        cfg = replace(cfg, doc=str(out / "results.md"), img_dir=str(out / "img"))
    if args.flat:
        cfg = replace(cfg, img_dir=str(Path(cfg.doc).parent))
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: CUDA is not available")
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    dev = torch.device("cuda" if use_cuda else "cpu")
    data_root = None if args.data_root is None else os.path.abspath(args.data_root)
    if args.only:
        unknown = set(args.only) - {e.name for e in cfg.experiments}
        if unknown:
            ap.error(f"unknown experiments {sorted(unknown)}")
        cfg = replace(cfg, experiments=tuple(e for e in cfg.experiments if e.name in args.only))
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("hawq.hessian.table").setLevel(logging.INFO)  # per-block lines with ETA
    clock = Clock()
    clock.log(f"device {dev}" + (f" ({torch.cuda.get_device_name(dev)})" if use_cuda else ""))
    t0 = time.perf_counter()
    results = []
    for i, exp in enumerate(cfg.experiments):
        r = run_experiment(exp, cfg.threads, clock, dev, data_root)
        results.append(r)
        done = time.perf_counter() - t0
        clock.log(
            f"== part {i + 1}/{len(cfg.experiments)} ({exp.name}) done in "
            f"{fmt_s(sum(r.parts.values()))}; elapsed {fmt_s(done)}"
        )
        doc = write_doc(cfg, results, sys.argv[1:], time.perf_counter() - t0, args.smoke, dev)
        clock.log(f"   wrote {doc}")


if __name__ == "__main__":
    main()
