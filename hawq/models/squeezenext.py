"""SqueezeNext (Gholami et al., 2018, "SqueezeNext: Hardware-Aware Neural Network Design").

The third network of the HAWQ paper. This follows the authors' Caffe definition of
``1.0-SqNxt-23`` (``amirgholami/SqueezeNext``): every convolution is bias-free and followed by
BatchNorm and ReLU (the shortcut projection too), the classifier has no bias.

* stem: 7x7 conv, stride 2, no padding, 64 x width channels; 3x3 max-pool, stride 2 (ceil).
* four stages of :class:`SqueezeNextBlock` with 32/64/128/256 x width output channels and
  ``blocks`` = (6, 6, 8, 1) units (``23v5``: (2, 4, 14, 1)); the first unit of stages 2-4 has
  stride 2.
* a 1x1 conv to 128 x width channels, global average pooling, a bias-free linear classifier.

Block with input ``C_in``, output ``C_out`` and reduction ``d`` (1 for a stride-2 unit, 4 when
``C_in > C_out``, else 2), ``r = C_in / d``: 1x1 ``C_in -> r`` (carries the stride), 1x1
``r -> r/2``, then the separable pair ``r/2 -> r`` and ``r -> r`` (3x1 then 1x3 in even units,
1x3 then 3x1 in odd ones, as in the reference), 1x1 ``r -> C_out``; the shortcut is the input,
or a 1x1 projection ``C_in -> C_out`` (with the stride) when the shape changes; the sum goes
through a ReLU. 1.0-SqNxt-23 for 1000 classes has 717,280 parameters (0.72M in the paper).

Initialisation: the reference's Caffe "xavier" filler (uniform, variance 1/fan_in), BatchNorm
at scale 1. (Zero-initialising the last BatchNorm scale of each unit, as for ResNets, would
leave the branches dead here: a ReLU follows it, and ReLU'(0) = 0.) The 21 residual sums make
the first layers' train-mode gradients large on small batches of small images (about 750 on
4 images of 64x64, 10^4 at 32x32, 100 at 227x227): use small learning rates there.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

STAGE_CHANNELS = (32, 64, 128, 256)
STEM_CHANNELS = 64
HEAD_CHANNELS = 128
BLOCKS = {"23": (6, 6, 8, 1), "23v5": (2, 4, 14, 1)}


class ConvBNReLU(nn.Sequential):
    """Bias-free conv -> BatchNorm -> ReLU (children ``conv``, ``bn``, ``relu``)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: tuple[int, int],
        stride: int = 1,
        padding: tuple[int, int] = (0, 0),
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)


def _reduction(in_channels: int, out_channels: int, stride: int) -> int:
    if stride != 1:
        return 1
    return 4 if in_channels > out_channels else 2


class SqueezeNextBlock(nn.Module):
    """Two 1x1 squeezes, a separable 3x1 / 1x3 pair, a 1x1 expansion, plus a shortcut.

    ``separable_first`` is ``"3x1"`` or ``"1x3"``: which half of the separable pair comes first.
    """

    def __init__(
        self, in_channels: int, out_channels: int, stride: int = 1, separable_first: str = "3x1"
    ) -> None:
        super().__init__()
        if separable_first not in ("3x1", "1x3"):
            raise ValueError(f"separable_first must be '3x1' or '1x3', got {separable_first!r}")
        r = in_channels // _reduction(in_channels, out_channels, stride)
        if r < 2 or r % 2:
            raise ValueError(f"{in_channels} -> {out_channels} channels leave an odd squeeze {r}")
        tall, wide = ((3, 1), (1, 0)), ((1, 3), (0, 1))
        first, second = (tall, wide) if separable_first == "3x1" else (wide, tall)
        self.squeeze1 = ConvBNReLU(in_channels, r, (1, 1), stride)
        self.squeeze2 = ConvBNReLU(r, r // 2, (1, 1))
        self.separable1 = ConvBNReLU(r // 2, r, first[0], padding=first[1])
        self.separable2 = ConvBNReLU(r, r, second[0], padding=second[1])
        self.expand = ConvBNReLU(r, out_channels, (1, 1))
        self.shortcut: nn.Module = (
            ConvBNReLU(in_channels, out_channels, (1, 1), stride)
            if stride != 1 or in_channels != out_channels
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.squeeze1(x)
        out = self.squeeze2(out)
        out = self.separable1(out)
        out = self.separable2(out)
        return F.relu(self.expand(out) + self.shortcut(x))


class SqueezeNext(nn.Module):
    """SqueezeNext with width multiplier ``width`` and ``blocks`` units per stage.

    Module names: ``stem``, ``stage{1..4}.{j}`` (:class:`SqueezeNextBlock`), ``head``, ``fc``.
    """

    def __init__(
        self,
        blocks: tuple[int, ...] = BLOCKS["23"],
        width: float = 1.0,
        num_classes: int = 1000,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if len(blocks) != len(STAGE_CHANNELS) or min(blocks) < 1:
            raise ValueError(f"blocks must be 4 positive unit counts, got {tuple(blocks)}")
        if not (math.isfinite(width) and width > 0):
            raise ValueError(f"width must be a positive number, got {width}")
        stem = int(STEM_CHANNELS * width)
        self.stem = ConvBNReLU(in_channels, stem, (7, 7), stride=2)
        self.pool = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        channels, unit = stem, 0
        for s, (n_units, out) in enumerate(zip(blocks, STAGE_CHANNELS, strict=True)):
            out = int(out * width)
            stage = nn.Sequential()
            for j in range(n_units):
                stride = 2 if j == 0 and s > 0 else 1
                order = "3x1" if unit % 2 == 0 else "1x3"
                stage.append(SqueezeNextBlock(channels, out, stride, order))
                channels, unit = out, unit + 1
            self.add_module(f"stage{s + 1}", stage)
        head = int(HEAD_CHANNELS * width)
        self.head = ConvBNReLU(channels, head, (1, 1))
        self.fc = nn.Linear(head, num_classes, bias=False)
        for m in self.modules():  # Caffe's "xavier" filler of the reference: U(+-sqrt(3/fan_in))
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.kaiming_uniform_(m.weight, nonlinearity="linear")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.stem(x))
        x = self.stage4(self.stage3(self.stage2(self.stage1(x))))
        x = F.adaptive_avg_pool2d(self.head(x), 1).flatten(1)
        return self.fc(x)


def squeezenext(
    version: str = "23", width: float = 1.0, num_classes: int = 1000, in_channels: int = 3
) -> SqueezeNext:
    """``{width}-SqNxt-{version}``: version ``"23"`` (6, 6, 8, 1) or ``"23v5"`` (2, 4, 14, 1)."""
    if version not in BLOCKS:
        raise ValueError(f"version must be one of {sorted(BLOCKS)}, got {version!r}")
    return SqueezeNext(BLOCKS[version], width, num_classes, in_channels)
