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

This script is the CLI and the order of the sections; each section is its own module:
``imagenet_setup.py`` (images, model, timer), ``imagenet_hessian_cost.py`` (a)-(c),
``imagenet_memory.py`` (d), ``imagenet_training.py`` (e), ``imagenet_input_ddp.py`` (f),
``imagenet_projection.py`` (g), ``imagenet_report.py`` (the markdown and the costs JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from hawq.blocks import partition_blocks

sys.path.insert(0, str(Path(__file__).parent))
from imagenet_hessian_cost import hessian_sections  # noqa: E402
from imagenet_input_ddp import emit_section, input_and_ddp  # noqa: E402
from imagenet_memory import memory_section  # noqa: E402
from imagenet_projection import Costs, hms, projection_section  # noqa: E402
from imagenet_report import Report, save_costs  # noqa: E402
from imagenet_setup import Clock, setup  # noqa: E402
from imagenet_training import training_section  # noqa: E402


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
