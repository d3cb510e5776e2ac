"""torchvision ResNet-50 at 224x224: Hessian cost per block, memory, training steps, projections.

Usage (from the repository root; issues 11 and 15)::

    python benchmarks/imagenet_scale.py --data ../shared/data/cifar10 \\
        --out docs/benchmarks/imagenet_scale.md            # CPU, 1 thread, batch 8
    python benchmarks/imagenet_scale.py --device cuda [--amp] --batch 64 --out gpu.md

Prints, from one run (ResNet-50 ``weights=None``; BatchNorm statistics calibrated on the
run's images; the images are real CIFAR-10 training images upsampled to 224x224 with
``--data``, else Gaussian noise):

(a) per block (54 Conv/Linear layers): one cached block HVP / one forward+backward gradient
    of the whole model on the same batch (target: max <= 1.5), and the graph build;
(b) Lanczos HVPs to ``--tol`` per block, on an evenly spaced subset of blocks (``--lanczos-
    blocks``), and the uncached HVP (graph rebuilt) of the same blocks;
(c) Hutchinson: one joint HVP over every block, and the probes that 5% stderr needs,
    projected from the per-probe variance of ``--probes`` probes;
(d) memory of one batch's graph per batch size (``imagenet_memory.py``: peak RSS per cached
    graph and per rebuild, each in a fresh process; batch sizes not measured are projected
    from the linear fit, and said so);
(e) one training step, QAT (W4A8, conv1/fc W8A8) vs float, and evaluation forwards;
(f) data-loading images/s vs DataLoader workers on generated 224 px JPEGs against (e)'s
    training images/s, and DDP images/s of ResNet-50 at world size 1 vs 2
    (``imagenet_input_ddp.py`` over ``data_loading.py`` / ``ddp_scaling.py``);
(g) projected wall time of the full analysis (4,096 samples: eigenvalues + traces) and of the
    full pipeline (1 epoch per stage on 1.28M images) on 1 and 8 devices
    (``imagenet_projection.py``), with (f)'s loader rate as a cap on each device's training
    and evaluation rate and (f)'s DDP efficiency on those stages. Only the device the script runs on
    is measured; other devices are projected from one assumed gradient throughput
    (``--gpu-grad-images-per-s``).

``--save-costs`` keeps the measured costs and (f)'s figures; ``--from-costs`` redoes (g) from
them (and (f) too with ``--input-and-ddp measure``) without the 14-minute (a)-(e).

On CPU with ``--threads 1`` the ratios use process CPU time (steady on a shared machine);
otherwise wall time (CUDA synchronised). ``--amp`` applies autocast (bfloat16) to the training
and evaluation steps only; the Hessian runs in float32.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from hawq.blocks import partition_blocks
from hawq.hessian.operator import HessianOperator
from hawq.hessian.table import HessianConfig, block_eigen_row
from hawq.hessian.trace import probe_sample
from hawq.quant import BitConfig, LayerBits, quantize_

sys.path.insert(0, str(Path(__file__).parent))
from imagenet_input_ddp import emit_section, from_json, measure_ddp, measure_loading  # noqa: E402
from imagenet_memory import linear_fit, measure_all  # noqa: E402
from imagenet_projection import Costs, hms, projection_section  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast for training/eval")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data", type=Path, default=None, help="dir with cifar10_subset.npz")
    p.add_argument("--blocks", type=int, default=0, help="time only N blocks (0: all)")
    p.add_argument("--reps", type=int, default=1, help="HVPs per block")
    p.add_argument("--grad-every", type=int, default=3, help="a gradient before every N-th block")
    p.add_argument("--lanczos-blocks", type=int, default=6)
    p.add_argument("--tol", type=float, default=1e-3)
    p.add_argument("--probes", type=int, default=8)
    p.add_argument("--trace-tol", type=float, default=0.05)
    p.add_argument("--trace-max-probes", type=int, default=200)
    p.add_argument("--probe-chunk", type=int, default=8, help="(g): probes per graph build")
    p.add_argument("--memory-batches", default="8,16,32", help="'' skips (d)")
    p.add_argument("--train-reps", type=int, default=3)
    p.add_argument("--samples", type=int, default=4096)
    p.add_argument("--qat-stages", type=int, default=5, help="18 residual blocks / 4 per stage")
    p.add_argument(
        "--gpu-grad-images-per-s",
        type=float,
        default=1500.0,
        help="assumed ResNet-50 float32 gradient throughput of one H200-class GPU",
    )
    p.add_argument("--gpu-graph-memory-gb", type=float, default=120.0)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--save-costs", type=Path, default=None, help="JSON of the measured costs")
    p.add_argument("--from-costs", type=Path, default=None, help="only (f)/(g), from --save-costs")
    p.add_argument(
        "--input-and-ddp",
        choices=["measure", "saved", "off"],
        default=None,
        help="(f): measure (default), saved (--from-costs' figures; default there), off (assume "
        "the loader keeps up and ideal scaling)",
    )
    p.add_argument("--loader-images", type=int, default=192)
    p.add_argument("--loader-workers", default="0,1,2")
    p.add_argument("--loader-batch", type=int, default=32)
    p.add_argument("--loader-passes", type=int, default=2)
    p.add_argument("--loader-dir", default="/tmp/hawq-data-bench")
    p.add_argument("--ddp-world", type=int, default=2)
    p.add_argument("--ddp-batch", type=int, default=8)
    p.add_argument("--ddp-steps", type=int, default=5, help="steps 2..N are timed")
    return p.parse_args(argv)


def load_batch(args: argparse.Namespace, n: int, offset: int = 0):
    """``n`` images at 224x224 (CIFAR-10 upsampled, ImageNet-normalised) and their labels."""
    if args.data is None:
        gen = torch.Generator().manual_seed(offset)
        x = torch.randn(n, 3, 224, 224, generator=gen)
        return x, torch.randint(0, 1000, (n,), generator=gen)
    arrays = np.load(args.data / "cifar10_subset.npz")
    x = torch.from_numpy(arrays["xtr"][offset : offset + n]).float().div_(255)
    x = F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False)
    x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    return x, torch.from_numpy(arrays["ytr"][offset : offset + n]).long()


class Clock:
    """Seconds of one call: process CPU time at 1 CPU thread (steady on a shared machine),
    else wall time (CUDA synchronised)."""

    def __init__(self, device: torch.device, threads: int) -> None:
        self.device = device
        self.use_cpu = device.type == "cpu" and threads == 1
        self.name = "process CPU time (1 thread)" if self.use_cpu else "wall time"

    def __call__(self, fn: Callable[[], object]) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        w, c = time.perf_counter(), time.process_time()
        fn()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return (time.process_time() - c) if self.use_cpu else (time.perf_counter() - w)


def md_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


# ------------------------------------------------------------------------------- (a)-(c)
def hvp_vs_grad(model, batch, blocks, op, clock: Clock, reps: int, grad_every: int):
    """Per block: the median cached-HVP time; the gradient times (interleaved with the HVPs,
    before every ``grad_every``-th block); the graph build."""
    x, y = batch

    def grad() -> None:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()

    grad()
    gen = torch.Generator().manual_seed(0)
    vs = {b.name: torch.randn(b.n_params, generator=gen).to(x.device) for b in blocks}
    first = clock(lambda: op.hvp(blocks[0].name, vs[blocks[0].name]))  # builds the graph
    grads, hvps = [], {}
    for i, b in enumerate(blocks):
        times = []
        for _ in range(reps):  # interleaved, so that load changes hit both sides alike
            if i % grad_every == 0:
                grads.append(clock(grad))
            times.append(clock(lambda name=b.name: op.hvp(name, vs[name])))
        hvps[b.name] = statistics.median(times)
    model.zero_grad(set_to_none=True)
    return hvps, grads, max(first - hvps[blocks[0].name], 0.0)


def spread(blocks, k: int):
    idx = sorted({round(i) for i in np.linspace(0, len(blocks) - 1, min(k, len(blocks)))})
    return [blocks[i] for i in idx]


def lanczos_and_rebuild(model, batch, op, subset, clock: Clock, tol: float):
    """Lanczos rows on the cached operator; uncached HVP times (budget 0) of the same blocks."""
    config = HessianConfig(tol=tol, max_iter=100, trace=False, memory_budget_mb=None)
    rows = {b.name: block_eigen_row(op, b, config) for b in subset}
    rebuild = {}
    with HessianOperator(model, F.cross_entropy, [batch], op.blocks, memory_budget_bytes=0) as op0:
        for b in subset:
            v = torch.randn(b.n_params, device=batch[0].device)
            rebuild[b.name] = clock(lambda name=b.name, v=v: op0.hvp(name, v))
        vs = {b.name: torch.randn(b.n_params, device=batch[0].device) for b in op.blocks}
        rebuild_joint = clock(lambda: op0.hvp_joint(vs))
    return rows, rebuild, rebuild_joint


def trace_probes(op, clock: Clock, probes: int, tol: float):
    """Joint HVP time; per block the probes to ``tol`` stderr: ``var / (tol * mean)^2``."""
    dims = {b.name: op.dim(b.name) for b in op.blocks}
    samples, times = [], []
    for p in range(probes):
        times.append(clock(lambda p=p: samples.append(probe_sample(op, dims, 0, p))))
    need = {}
    for b in dims:
        xs = [s[b] for s in samples]
        mean, var = statistics.fmean(xs), statistics.variance(xs)
        need[b] = math.inf if mean == 0 else var / (tol * mean) ** 2
    return statistics.median(times), need


# ------------------------------------------------------------------------------- (e), (f)
def training_steps(model, batch, args: argparse.Namespace, clock: Clock) -> dict[str, float]:
    """Median float / QAT training step and no-grad forward times (interleaved)."""
    x, y = batch
    amp = torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=args.amp)
    fp = copy.deepcopy(model).train()
    qm = copy.deepcopy(model).train()
    bits = BitConfig(
        weight_bits=4, act_bits=8, layers={"conv1": LayerBits(8, 8), "fc": LayerBits(8, 8)}
    )
    quantize_(qm, bits)
    nets = {"float": fp, "qat": qm}
    opts = {k: torch.optim.SGD(m.parameters(), lr=1e-4, momentum=0.9) for k, m in nets.items()}

    def step(k: str) -> None:
        with amp:
            loss = F.cross_entropy(nets[k](x), y)
        opts[k].zero_grad(set_to_none=True)
        loss.backward()
        opts[k].step()

    def forward(k: str) -> None:
        nets[k].eval()
        with torch.no_grad(), amp:
            nets[k](x)
        nets[k].train()

    out: dict[str, list[float]] = {}
    for k in nets:  # warm-up (and the observers' first ranges)
        step(k)
    for r in range(args.train_reps):
        for k in ("float", "qat") if r % 2 == 0 else ("qat", "float"):
            out.setdefault(f"{k}_step", []).append(clock(lambda k=k: step(k)))
            out.setdefault(f"eval_{k}", []).append(clock(lambda k=k: forward(k)))
    return {k: statistics.median(v) for k, v in out.items()}


def data_loading_section(args: argparse.Namespace) -> dict | None:
    """(f) ``benchmarks/data_loading.py``: ``{"images_per_s": {workers: images/s}, ...}`` of
    augmented 224x224 training passes over generated JPEGs; the projection caps each device's
    training and evaluation rate at the best of them. ``None`` (``--input-and-ddp off``): the
    loader keeps up.
    """
    return None if args.input_and_ddp == "off" else measure_loading(args)


def ddp_scaling_section(args: argparse.Namespace) -> dict | None:
    """(f) ``benchmarks/ddp_scaling.py``: ``{"efficiency": {W: t_1 / (W t_W)}, ...}`` of
    ResNet-50 float training at ``--ddp-world`` (CPU, gloo); the projection divides the
    training and evaluation stages' ideal ``1 / D`` times by it. ``None`` (``--input-and-ddp
    off``): ideal scaling."""
    if args.input_and_ddp == "off":
        return None
    x, y = load_batch(args, args.ddp_batch * args.ddp_steps)
    return measure_ddp(args, x, y)


def input_and_ddp(args: argparse.Namespace, saved: dict | None) -> tuple[tuple, str, str]:
    """(f)'s figures, a note on their source and the date they were measured: measured now,
    or those of ``saved`` (a ``--save-costs`` file)."""
    mode = args.input_and_ddp or ("saved" if saved is not None else "measure")
    if mode == "saved":
        hooks = (from_json(saved.get("data_loading")), from_json(saved.get("ddp_scaling")))
        if hooks != (None, None):
            date = saved.get("input_and_ddp_measured", "?")
            return hooks, f"saved in {args.from_costs}, measured {date}", date
        args.input_and_ddp = "measure"  # the file has none: measure them
    hooks = (data_loading_section(args), ddp_scaling_section(args))
    if hooks == (None, None):
        return hooks, "not measured", ""
    date = time.strftime("%Y-%m-%d")
    return hooks, f"measured in this run, {date}", date


# ------------------------------------------------------------------------------------ main
class Report:
    """Markdown lines, printed as they come and written (atomically) at the end."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, text: str = "") -> None:
        print(text, flush=True)
        self.lines.append(text)

    def table(self, header: list[str], rows: list[list]) -> None:
        self(md_table(header, rows))

    def write(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("\n".join(self.lines) + "\n")
        os.replace(tmp, path)


def setup(args: argparse.Namespace, device: torch.device):
    """ResNet-50 (weights=None) with BatchNorm statistics of the run's images; one batch."""
    import torchvision

    model = torchvision.models.resnet50(weights=None).to(device)
    calib = load_batch(args, 2 * args.batch, offset=args.batch)[0].to(device)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average
    with torch.no_grad():
        for chunk in calib.split(args.batch):
            model.train()(chunk)
    x, y = load_batch(args, args.batch)
    return model.eval(), (x.to(device), y.to(device))


def hessian_sections(args, model, batch, blocks, clock: Clock, emit: Report) -> dict:
    """(a), (b), (c) on one cached operator; returns the measured costs."""
    timed = blocks[: args.blocks] if args.blocks else blocks
    with HessianOperator(model, F.cross_entropy, [batch], blocks, memory_budget_bytes=None) as op:
        hvps, grads, build = hvp_vs_grad(model, batch, timed, op, clock, args.reps, args.grad_every)
        subset = spread(timed, args.lanczos_blocks)
        rows, rebuild, rebuild_joint = lanczos_and_rebuild(
            model, batch, op, subset, clock, args.tol
        )
        joint, need = trace_probes(op, clock, args.probes, args.trace_tol)
    grad = statistics.median(grads)
    lanczos = {b: int(r["hvps"]) for b, r in rows.items()}
    all_hvps = statistics.fmean(lanczos.values()) * len(blocks)
    n = {b.name: b.n_params for b in blocks}
    ratio = {b: h / grad for b, h in hvps.items()}
    emit(f"## (a) block HVP / gradient, {len(timed)} of {len(blocks)} blocks (target: max <= 1.5)")
    emit(
        f"\nGradient (forward+backward of the whole model): median {grad * 1e3:.0f} ms over "
        f"{len(grads)} runs (min {min(grads) * 1e3:.0f}, max {max(grads) * 1e3:.0f}). The graph "
        f"all blocks share is built once: {build * 1e3:.0f} ms = {build / grad:.2f} gradients, "
        f"amortised over ~{all_hvps:.0f} Lanczos HVPs ((b)'s mean x {len(blocks)} blocks).\n"
    )
    emit.table(
        ["block", "params", "HVP ms", "HVP / grad", "(HVP + build / HVPs) / grad"],
        [
            [b, n[b], f"{h * 1e3:.0f}", f"{ratio[b]:.2f}", f"{(h + build / all_hvps) / grad:.2f}"]
            for b, h in hvps.items()
        ],
    )
    worst = max(ratio, key=ratio.get)
    met = "met" if ratio[worst] <= 1.5 else "NOT met"
    emit(
        f"\n**HVP / gradient: max {ratio[worst]:.2f} ({worst}), median "
        f"{statistics.median(ratio.values()):.2f}; target <= 1.5 {met} for every timed block.**"
    )
    emit(f"\n## (b) Lanczos HVPs to tol {args.tol} on {len(subset)} blocks, 1 batch\n")
    emit.table(
        [
            "block",
            "params",
            "eigenvalue",
            "HVPs",
            "converged",
            "cached HVP / grad",
            "uncached HVP (graph rebuilt) / grad",
        ],
        [
            [
                b,
                n[b],
                f"{r['eigenvalue']:.4g}",
                r["hvps"],
                r["converged"],
                f"{ratio[b]:.2f}",
                f"{rebuild[b] / grad:.2f}",
            ]
            for b, r in rows.items()
        ],
    )
    emit(
        f"\nMean {statistics.fmean(lanczos.values()):.1f} HVPs per block (used for the "
        f"{len(blocks) - len(lanczos)} blocks not solved here). One uncached joint HVP (graph "
        f"rebuilt w.r.t. every block): {rebuild_joint / grad:.2f} gradients."
    )
    finite = sorted(v for v in need.values() if math.isfinite(v))
    slowest = math.ceil(finite[-1]) if finite else args.trace_max_probes
    emit(f"\n## (c) Hutchinson traces: {args.probes} probes, one joint HVP each\n")
    emit(
        f"Joint HVP over all {len(blocks)} blocks: {joint * 1e3:.0f} ms = {joint / grad:.2f} "
        f"gradients. Probes to {args.trace_tol:.0%} stderr projected from the per-probe variance "
        f"(`var / (tol * mean)^2`): median block {statistics.median(finite):.0f}, slowest "
        f"block {slowest} ({max(need, key=need.get)}). The projection (g) uses min(slowest, "
        f"trace_max_probes={args.trace_max_probes}), the shipped cap, and shows the analysis "
        "with the median block's count too (plain Hutchinson; the deflated estimator needs fewer)."
    )
    return {
        "batch": args.batch,
        "grad": grad,
        "hvp": hvps,
        "rebuild": rebuild,
        "build": build,
        "joint": joint,
        "rebuild_joint": rebuild_joint,
        "lanczos": lanczos,
        "block_params": n,
        "probes": {
            "cap": min(slowest, args.trace_max_probes),
            "median": math.ceil(statistics.median(finite)) if finite else slowest,
        },
    }


def memory_section(args, device: torch.device, emit: Report) -> tuple[float, float]:
    """(d): the measured rows and fits; returns the cached fit (bytes per sample, fixed)."""
    rows = measure_all([int(s) for s in args.memory_batches.split(",")], device, args.threads)
    ok = [r for r in rows if "error" not in r]
    unit = "peak RSS" if device.type == "cpu" else "peak CUDA memory"
    emit(f"\n## (d) memory of one batch's graph: {unit} above the set-up, a fresh process each\n")
    emit.table(
        [
            "batch",
            "graph",
            "peak MB",
            "resident while cached MB",
            "saved tensors MB (operator's count)",
            "estimate MB (1+2-sample fit)",
        ],
        [
            [r["batch"], r["mode"], "failed: " + r["error"], "", "", ""]
            if "error" in r
            else [
                r["batch"],
                r["mode"],
                f"{r['peak_mb']:.0f}",
                f"{r['kept_mb']:.0f}" if r["mode"] == "cached" else "-",
                f"{r['counted_mb']:.0f}" if r["mode"] == "cached" else "-",
                f"{r['estimate_mb']:.0f}",
            ]
            for r in rows
        ],
    )
    cols = {"peak MB per cached graph": ("cached", "peak_mb"),
            "resident MB per cached graph": ("cached", "kept_mb"),
            "peak MB per rebuild": ("rebuild", "peak_mb")}  # fmt: skip
    fits = {c: linear_fit([r for r in ok if r["mode"] == m], k) for c, (m, k) in cols.items()}
    emit("\nPer batch size (batch sizes not run here are PROJECTED from the linear fit):\n")
    cells = []
    for size in (32, 64, 128):
        row = [size]
        for c, (m, k) in cols.items():
            got = [r[k] for r in ok if r["batch"] == size and r["mode"] == m]
            a, b = fits[c]
            row.append(f"{got[0]:.0f} (measured)" if got else f"~{a * size + b:.0f} (projected)")
        cells.append(row)
    emit.table(["batch", *cols], cells)
    for c, (a, b) in fits.items():
        emit(f"- fit, {c}: {a:.1f} MB per sample + {b:.0f} MB")
    if ok:
        emit(
            f"- `estimate_graph_memory` (1+2 samples): {ok[0]['per_sample_mb']:.1f} MB per sample "
            f"+ {ok[0]['fixed_mb']:.0f} MB of gradients (the operator's accounting, which the "
            "budget check uses; the projection (g) uses the resident fit)"
        )
    a, b = fits["resident MB per cached graph"]
    return a * 2**20, b * 2**20


def training_section(args, model, batch, clock: Clock, emit: Report) -> dict[str, float]:
    """(e)."""
    steps = training_steps(model, batch, args, clock)
    emit(
        f"\n## (e) training and evaluation steps, batch {args.batch} (median of "
        f"{args.train_reps}, interleaved)\n"
    )
    emit.table(
        ["step", "ms", "images/s", "/ float"],
        [
            [
                k,
                f"{v * 1e3:.0f}",
                f"{args.batch / v:.1f}",
                f"{v / steps[k.replace('qat', 'float')]:.2f}",
            ]
            for k, v in steps.items()
        ],
    )
    return steps


def save_costs(path: Path, costs: Costs, probes: dict, hooks: tuple, date: str) -> None:
    """The measured costs and (f)'s figures (with the date they were measured), as JSON."""
    loading, scaling = hooks
    out = {"costs": dataclasses.asdict(costs), "probes": probes, "data_loading": loading,
           "ddp_scaling": scaling, "input_and_ddp_measured": date}  # fmt: skip
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(out, indent=1))
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    clock, emit, started = Clock(device, args.threads), Report(), time.perf_counter()
    if args.from_costs is not None:
        saved = json.loads(args.from_costs.read_text())
        costs = Costs(**saved["costs"])
        emit(f"# ResNet-50 projections from the measurements saved in {args.from_costs}\n")
        emit(f"Command: `python benchmarks/imagenet_scale.py {' '.join(argv or sys.argv[1:])}`")
        hooks, source, date = input_and_ddp(args, saved)
        emit_section(emit, *hooks, costs, args, source)
        if args.save_costs is not None:
            save_costs(args.save_costs, costs, saved["probes"], hooks, date)
        projection_section(args, device.type == "cuda", costs, saved["probes"], emit, hooks)
        emit(f"\nWall time {hms(time.perf_counter() - started)}.")
        if args.out is not None:
            emit.write(args.out)
        return
    model, batch = setup(args, device)
    blocks = partition_blocks(model)
    data = (
        f"CIFAR-10 training images upsampled to 224x224 ({args.data})"
        if args.data
        else "Gaussian noise"
    )
    emit("# torchvision ResNet-50 at 224x224: Hessian cost, memory, training, projections\n")
    emit(f"Command: `python benchmarks/imagenet_scale.py {' '.join(argv or sys.argv[1:])}`\n")
    emit(
        f"torch {torch.__version__}, {device}, {args.threads} thread(s), batch {args.batch}, "
        f"AMP {'on (training/eval only)' if args.amp else 'off'}; weights=None, BatchNorm "
        f"statistics from {2 * args.batch} images; data: {data}. Timer: {clock.name}. "
        f"Load average at start {os.getloadavg()[0]:.1f}.\n"
    )
    measured = hessian_sections(args, model, batch, blocks, clock, emit)
    probes = measured.pop("probes")
    per_sample, fixed = memory_section(args, device, emit)
    steps = training_section(args, model, batch, clock, emit)
    costs = Costs(
        **measured,
        per_sample_bytes=per_sample,
        fixed_bytes=fixed,
        float_step=steps["float_step"],
        qat_step=steps["qat_step"],
        eval_float=steps["eval_float"],
        eval_qat=steps["eval_qat"],
    )
    hooks, source, date = input_and_ddp(args, None)
    emit_section(emit, *hooks, costs, args, source)
    if args.save_costs is not None:
        save_costs(args.save_costs, costs, probes, hooks, date)
    projection_section(args, device.type == "cuda", costs, probes, emit, hooks)
    emit(
        f"\nBenchmark wall time {hms(time.perf_counter() - started)}; load average at the end "
        f"{os.getloadavg()[0]:.1f}."
    )
    if args.out is not None:
        emit.write(args.out)


if __name__ == "__main__":
    main()
