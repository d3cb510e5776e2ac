"""A float64 CNN with BatchNorm for the data-parallel tests (``model.name: ddp_model:make``).

Its first module casts the (float32) images to float64, so the pipeline trains and evaluates
it in float64, where a world-size-2 run must equal a world-size-1 run to 1e-6.
"""

from __future__ import annotations

import torch
from torch import nn


class ToDouble(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.double()


def make(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """8x8 inputs: conv (BN) -> conv stride 2 (BN) -> linear; three quantizable layers."""
    return nn.Sequential(
        ToDouble(),
        nn.Conv2d(in_channels, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, stride=2, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 4 * 4, num_classes),
    ).double()
