"""CIFAR ResNet of He et al. (2016), section 4.2, with the parameter-free "option A" shortcut.

State-dict keys follow the widely used ``pytorch_resnet_cifar10`` layout (``conv1``, ``bn1``,
``layer1.0.conv1``, ..., ``linear``) so its pretrained ResNet-20/32/56 checkpoints load as-is.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

DEPTHS = {20: 3, 32: 5, 44: 7, 56: 9, 110: 18}


class OptionAShortcut(nn.Module):
    """Identity when shapes agree; else subsample by 2 and zero-pad channels by planes/4."""

    def __init__(self, pad: int) -> None:
        super().__init__()
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    """conv3x3 -> BN -> ReLU -> conv3x3 -> BN, plus shortcut, then ReLU."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride != 1 or in_planes != planes:
            self.shortcut: nn.Module = OptionAShortcut(planes // 4)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs: 16/32/64 channels in three stages of n blocks."""

    def __init__(self, depth: int = 20, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        if depth not in DEPTHS:
            raise ValueError(f"depth must be one of {sorted(DEPTHS)}, got {depth}")
        n = DEPTHS[depth]
        self.depth = depth
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.in_planes = 16
        self.layer1 = self._make_layer(16, n, stride=1)
        self.layer2 = self._make_layer(32, n, stride=2)
        self.layer3 = self._make_layer(64, n, stride=2)
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.kaiming_normal_(m.weight)

    def _make_layer(self, planes: int, n: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def cifar_resnet(depth: int = 20, num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """Build an untrained CIFAR ResNet of the given depth (20, 32, 44, 56 or 110)."""
    return CifarResNet(depth=depth, num_classes=num_classes, in_channels=in_channels)


def strip_module_prefix(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the ``module.`` prefix that DataParallel adds to every key."""
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_cifar_checkpoint(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a checkpoint (a bare state dict or ``{"state_dict": ...}``) into ``model``.

    Raises ``ValueError`` naming the file when it cannot be read or does not fit the model.
    """
    try:
        obj = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise ValueError(
            f"checkpoint {os.fspath(path)!r} could not be read ({type(exc).__name__}: {exc}); "
            "point the checkpoint path at a state dict saved with torch.save"
        ) from exc
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, Mapping):
        raise ValueError(f"checkpoint {os.fspath(path)!r} holds no state dict")
    try:
        model.load_state_dict(strip_module_prefix(state))
    except RuntimeError as exc:
        raise ValueError(
            f"checkpoint {os.fspath(path)!r} does not fit {type(model).__name__}: {exc}"
        ) from exc
    return model
