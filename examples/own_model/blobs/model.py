"""The network: conv -> BN -> ReLU twice, global pooling, a linear head with two outputs."""

from __future__ import annotations

import torch
from torch import nn


class BlobNet(nn.Module):
    """Regresses the (row, col) of a blob, each scaled to [-1, 1]."""

    def __init__(self, in_channels: int = 1, width: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.head = nn.Linear(2 * width * 4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)
        return self.head(x)


def make_model(in_channels: int = 1, width: int = 8) -> nn.Module:
    """The factory hawq calls (``model.name: blobs.model:make_model``)."""
    return BlobNet(in_channels, width)
