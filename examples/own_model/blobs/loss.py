"""The task loss: mean squared error over the batch (what hawq's Hessian and QAT use)."""

from __future__ import annotations

import torch


def mse(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``mean((output - target)^2)``: a scalar, the mean over the batch."""
    return torch.mean((output - target) ** 2)
