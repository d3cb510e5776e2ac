"""Section (f) of ``imagenet_scale.py``: the input pipeline and data-parallel scaling, measured.

* Data loading (``data_loading.py``'s ``throughput``): images/s of a streamed, augmented
  training pass (RandomResizedCrop 224 + flip, uint8 until normalised) over generated JPEGs of
  300..500 px, per DataLoader ``num_workers``, beside the model's training images/s of (e), so
  the bottleneck is visible; and how many such workers one (projected) GPU would need.
* DDP (``ddp_scaling.py``'s ``images_per_second``): ResNet-50 float training at 224x224, the
  same global batch at world size 1 (this process) and W (Ray workers, gloo, 1 thread each,
  BatchNorm ``sync``); efficiency ``e(W) = rate_W / (W rate_1)``.

The results are plain dicts (``{"images_per_s": {workers: rate}, ...}`` and
``{"efficiency": {W: e}, ...}``), the form :func:`imagenet_projection.projection_section`
takes; ``--save-costs`` stores them beside the costs so that ``--from-costs`` reuses them
(:func:`input_and_ddp`: measured now or read back, and where they came from).
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

import torch
from imagenet_setup import load_batch

SIDES = (300, 500)  # generated JPEG sides, ImageNet-like


def _int_keys(d: dict) -> dict[int, float]:
    return {int(k): float(v) for k, v in d.items()}


def from_json(saved: dict | None) -> dict | None:
    """A section result read back from JSON (integer keys again)."""
    if not saved:
        return None
    out = dict(saved)
    for key in ("images_per_s", "efficiency"):
        if key in out:
            out[key] = _int_keys(out[key])
    return out


def measure_loading(args) -> dict:
    """Loader images/s per ``--loader-workers`` over ``--loader-images`` generated JPEGs."""
    from data_loading import throughput, write_jpegs

    n = args.loader_images
    root = write_jpegs(Path(args.loader_dir) / f"jpeg{n}", n, SIDES)
    kb = sum(f.stat().st_size for f in (root / "train").rglob("*.jpg")) / n / 1024
    workers = [int(w) for w in args.loader_workers.split(",")]
    rates = {w: throughput(root, w, args.loader_batch, args.loader_passes) for w in workers}
    return {"images_per_s": rates, "images": n, "batch": args.loader_batch,
            "passes": args.loader_passes, "kb_per_image": kb, "cores": os.cpu_count(),
            "load": os.getloadavg()[0]}  # fmt: skip


def measure_ddp(args, x: torch.Tensor, y: torch.Tensor) -> dict:
    """ResNet-50 training images/s at world size 1 and ``--ddp-world`` (same global batch)."""
    from ddp_scaling import ScalingJob, images_per_second

    from pipeline.config import ModelConfig

    world, batch, steps = args.ddp_world, args.ddp_batch, args.ddp_steps
    job = ScalingJob(
        model=ModelConfig(name="torchvision:resnet50", num_classes=1000, in_channels=3),
        x=x[: batch * steps], y=y[: batch * steps], batch=batch, steps=steps,
    )  # fmt: skip
    rates = {1: images_per_second(job, 1), world: images_per_second(job, world)}
    torch.set_num_threads(args.threads)  # world size 1 ran at 1 thread
    return {"images_per_s": rates, "efficiency": {world: rates[world] / (world * rates[1])},
            "batch": batch, "steps": steps, "cores": os.cpu_count(),
            "load": os.getloadavg()[0]}  # fmt: skip


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


def loading_rows(loading: dict, costs, gpu_rate: float | None) -> list[list[str]]:
    """Per worker count: loader images/s, the training images/s of (e), the bottleneck."""
    train = {"float": costs.batch / costs.float_step, "QAT": costs.batch / costs.qat_step}
    rows = []
    for w, rate in sorted(loading["images_per_s"].items()):
        slow = "loader" if rate < train["float"] else "model"
        gpu = "-" if gpu_rate is None else ("loader" if rate < gpu_rate else "model")
        rows.append([str(w), f"{rate:.1f}", f"{train['float']:.1f}", f"{train['QAT']:.1f}",
                     slow, gpu])  # fmt: skip
    return rows


def workers_needed(loading: dict, target_rate: float) -> int:
    """DataLoader workers that ``target_rate`` images/s needs at the 1-worker rate measured
    (workers scale at most linearly, so this is a lower bound)."""
    one = loading["images_per_s"].get(1) or max(loading["images_per_s"].values())
    return math.ceil(target_rate / one)


def emit_section(emit, loading: dict | None, scaling: dict | None, costs, args, source: str):
    """Write section (f): the tables, or what the projection assumes instead."""
    emit(f"\n## (f) input pipeline and data-parallel scaling ({source})\n")
    gpu_float = args.gpu_grad_images_per_s * costs.grad / costs.float_step
    if loading is None:
        emit("- data loading: not measured; the projection assumes the loader keeps up")
    else:
        emit(
            f"Data loading: {loading['images']} generated JPEGs of {SIDES[0]}..{SIDES[1]} px "
            f"(~{loading['kb_per_image']:.0f} KB), streamed from a folder with augmentation "
            f"(RandomResizedCrop 224 + flip), batch {loading['batch']}, {loading['passes']} "
            f"pass(es) per worker count, 1 torch thread; {loading['cores']} cores, load average "
            f"{loading['load']:.1f}. Training images/s: batch / step of (e).\n"
        )
        emit.table(
            ["num_workers", "loader images/s", "float training images/s (e)",
             "QAT training images/s (e)", "bottleneck here",
             f"bottleneck, 1 GPU at {gpu_float:.0f} float images/s (projected)"],
            loading_rows(loading, costs, gpu_float),
        )  # fmt: skip
        emit(
            f"\nFeeding one GPU at {gpu_float:.0f} float training images/s "
            f"(--gpu-grad-images-per-s={args.gpu_grad_images_per_s:g} / the float step's "
            f"{costs.float_step / costs.grad:.2f} gradients) takes >= "
            f"{workers_needed(loading, gpu_float)} DataLoader workers (cores) at this machine's "
            "1-worker rate. The projection (g) caps every device's training and evaluation "
            "rate at the best rate above (this machine's cores), so its GPU rows show a "
            "loader-bound pipeline."
        )
    if scaling is None:
        emit("- DDP scaling: not measured; the projection assumes ideal scaling")
        return
    ((world, eff),) = scaling["efficiency"].items()
    r = scaling["images_per_s"]
    emit(
        f"\nDDP: ResNet-50 float training at 224x224, global batch {scaling['batch']}, "
        f"{scaling['steps']} steps (timed 2..{scaling['steps']}, wall time, rank 0); world size "
        f"1 in this process (1 thread), {world} on Ray workers (gloo, 1 CPU and thread each, "
        f"BatchNorm sync); {scaling['cores']} cores, load average {scaling['load']:.1f}.\n"
    )
    emit.table(
        ["world size", "images/s", "speed-up", "efficiency"],
        [["1", f"{r[1]:.2f}", "1.00", "1.00"],
         [str(world), f"{r[world]:.2f}", f"{r[world] / r[1]:.2f}", f"{eff:.2f}"]],
    )  # fmt: skip
    emit(
        f"\nThe projection (g) divides the training and evaluation stages' ideal 1/D time by "
        f"e = {eff:.2f} (measured at {world}, applied to 8 devices); the Hessian analysis keeps "
        "its own all-reduce model."
    )
