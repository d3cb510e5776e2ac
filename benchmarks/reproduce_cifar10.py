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
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from reproduce_lib import (  # noqa: E402
    ORDER_TEXT,
    VARIANT_TEXT,
    Clock,
    Experiment,
    ExperimentResult,
    Variant,
    ablation_allocation,
    fmt_s,
    load_repro_config,
    pct,
    random_sensitivity,
    reversed_sensitivity,
    smoke_config,
    uniform_allocation,
)
from reproduce_report import write_doc  # noqa: E402

from hawq.allocate import Allocation, allocate, problem_from_model  # noqa: E402
from hawq.hessian.table import analyze  # noqa: E402
from hawq.order import finetune_order  # noqa: E402
from hawq.qat import EpochRecord, evaluate, run_qat, train_float  # noqa: E402
from hawq.quant import BitConfig, calibrate_, quantize_  # noqa: E402
from hawq.size import size_summary  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.data import DataBundle, load_data  # noqa: E402
from pipeline.models import build_model, loss_fn_for  # noqa: E402

CALIBRATION_BATCHES = 4


# ----------------------------------------------------------------------------- steps
def train_baseline(model: nn.Module, data: DataBundle, cfg, clock: Clock) -> list[EpochRecord]:
    """Train from scratch (the baseline section) as the pipeline's baseline stage does."""
    b = cfg.baseline
    qcfg = b.to_hawq(seed=cfg.run.seed, eval_batch_size=cfg.data.batch_size)
    t0 = time.perf_counter()

    def on_epoch(rec: EpochRecord, _state) -> None:
        eta = (time.perf_counter() - t0) / (rec.global_epoch + 1) * (b.train_epochs - rec.epoch - 1)
        clock.log(
            f"  baseline epoch {rec.epoch + 1}/{b.train_epochs}: loss {rec.train_loss:.3f} "
            f"eval acc {pct(rec.eval_acc)}% (ETA {eta:.0f}s)"
        )

    return train_float(
        model,
        (data.train_x, data.train_y),
        (data.eval_x, data.eval_y),
        qcfg,
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
    ocfg = replace(cfg.finetune, order=v.order).order_to_hawq(cfg.allocation, seed=cfg.run.seed)
    order = finetune_order(m, table, v.alloc.bits, ocfg)
    qcfg = cfg.finetune.to_hawq(seed=cfg.run.seed, eval_batch_size=cfg.data.batch_size)
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
        baseline_history = train_baseline(model, data, cfg, clock)
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
    acfg = cfg.allocation.to_hawq()
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
    qcfg = cfg.finetune.to_hawq(seed=cfg.run.seed, eval_batch_size=cfg.data.batch_size)
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
