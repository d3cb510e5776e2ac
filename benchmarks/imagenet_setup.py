"""What every section of ``imagenet_scale.py`` runs on: the images, ResNet-50 and the timer.

The images are real CIFAR-10 training images upsampled to 224x224 and ImageNet-normalised
(``--data``), else Gaussian noise; ResNet-50 is torchvision's (``weights=None``) with BatchNorm
statistics calibrated on the run's images. :class:`Clock` times one call: process CPU time at
1 CPU thread (steady on a shared machine), else wall time (CUDA synchronised).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


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
