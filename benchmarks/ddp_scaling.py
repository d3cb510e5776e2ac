"""Data-parallel scaling of float training: images/s at world size 1 (in this process, the
pipeline's ``distributed.world_size: 1`` path) and at world size W (Ray workers with gloo, the
pipeline's data-parallel path, one CPU and torch thread each), same global batch and steps.

Each measurement runs ``hawq.qat.train_float`` for ``steps`` SGD steps of a ``batch``-image
global batch and times steps 2..N (the first warms up) on rank 0. CIFAR ResNet-20 on real
CIFAR-10 images by default. Prints both throughputs and their ratio (ideal: W).

    python benchmarks/ddp_scaling.py [--world 2] [--batch 128] [--steps 6]
        [--data ../shared/data/cifar10/cifar10_subset.npz] [--model cifar_resnet20]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from hawq.qat import QATConfig, train_float
from pipeline.config import DistributedSection, ModelConfig
from pipeline.models import model_factory
from pipeline.stages.parallel import Rank

DEFAULT_DATA = "../shared/data/cifar10/cifar10_subset.npz"


@dataclass(frozen=True, kw_only=True)
class ScalingJob:
    """What each rank trains: a model recipe, the images and the step settings."""

    model: ModelConfig
    x: torch.Tensor
    y: torch.Tensor
    batch: int
    steps: int


def timed_training(job: ScalingJob, rank: Rank) -> float:
    """One rank: ``job.steps`` SGD steps of ``train_float``; images/s over steps 2..N."""
    model = model_factory(job.model)().to(rank.device)
    n = job.batch * job.steps
    stamps: list[float] = []
    config = QATConfig(epochs=1, lr=0.01, batch_size=job.batch, schedule="constant")
    train_float(
        model, (job.x[:n], job.y[:n]), None, config,
        on_step=lambda g, k, capture: stamps.append(time.perf_counter()),
    )  # fmt: skip
    return job.batch * (len(stamps) - 1) / (stamps[-1] - stamps[0])


def images_per_second(job: ScalingJob, world_size: int) -> float:
    """Training throughput of ``job`` at ``world_size`` (1: here; > 1: Ray workers)."""
    if world_size == 1:
        torch.set_num_threads(1)
        return timed_training(job, Rank(rank=0, world_size=1, device=torch.device("cpu")))
    from pipeline.backends.ray.cluster import connect
    from pipeline.backends.ray.config import RayBackendConfig
    from pipeline.backends.ray.data_parallel import WorkerGroup

    stop = connect(RayBackendConfig(num_cpus=world_size, object_store_mb=512))
    try:
        group = WorkerGroup(DistributedSection(world_size=world_size), threads=1)
        try:
            return group.run(timed_training, job, None, None, 0)
        finally:
            group.close()
    finally:
        if stop is not None:
            stop()


def _images(path: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    with np.load(path) as d:
        x = torch.from_numpy(d["xtr"][:n]).float() / 255.0
        y = torch.from_numpy(d["ytr"][:n]).long()
    mean, std = x.mean((0, 2, 3), keepdim=True), x.std((0, 2, 3), keepdim=True)
    return (x - mean) / std, y


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--model", default="cifar_resnet20")
    args = ap.parse_args(argv)
    x, y = _images(args.data, args.batch * args.steps)
    job = ScalingJob(
        model=ModelConfig(name=args.model, num_classes=10, in_channels=3),
        x=x, y=y, batch=args.batch, steps=args.steps,
    )  # fmt: skip
    one = images_per_second(job, 1)
    many = images_per_second(job, args.world)
    out = {"model": args.model, "batch": args.batch, "steps": args.steps, "world": args.world,
           "images_per_s": {1: one, args.world: many}, "ratio": many / one}  # fmt: skip
    print(f"{args.model}, global batch {args.batch}, {args.steps} steps (timed 2..{args.steps})")
    print(f"world size 1: {one:8.1f} images/s (in-process, 1 thread)")
    print(f"world size {args.world}: {many:8.1f} images/s (Ray workers, gloo, 1 thread each)")
    print(f"scaling ratio {many / one:.2f} (ideal {args.world})")
    return out


if __name__ == "__main__":
    main()
