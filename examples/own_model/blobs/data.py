"""Generated data: a Gaussian blob at a random position on noise; the target is its position.

Item ``i`` of a split is a pure function of ``(seed, split, i)``, drawn when it is read.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

SIDE = 8
_SPLIT_IDS = {"train": 0, "eval": 1, "hessian": 2}


class Blobs(Dataset):
    """``n`` images ``(1, 8, 8)`` and float targets ``(2,)``: the blob's row and column."""

    def __init__(self, n: int, split: str, seed: int = 0, noise: float = 0.2) -> None:
        self.n, self.split_id, self.seed, self.noise = n, _SPLIT_IDS[split], seed, noise

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < self.n:
            raise IndexError(i)
        g = torch.Generator().manual_seed((self.seed * 3 + self.split_id) * 1_000_003 + i)
        center = torch.rand(2, generator=g) * (SIDE - 1)
        grid = torch.arange(SIDE, dtype=torch.float32)
        d2 = (grid[:, None] - center[0]) ** 2 + (grid[None, :] - center[1]) ** 2
        image = torch.exp(-d2 / 2.0) + self.noise * torch.randn(SIDE, SIDE, generator=g)
        target = center / (SIDE - 1) * 2 - 1
        return image[None], target


def make_datasets(train: int = 1024, eval: int = 256, hessian: int = 128, seed: int = 0):
    """The factory hawq calls (``data.factory: blobs.data:make_datasets``)."""
    return {
        "train": Blobs(train, "train", seed),
        "eval": Blobs(eval, "eval", seed),
        "hessian": Blobs(hessian, "hessian", seed),
    }
