"""Shared by the image data tests: real JPEG ImageFolder trees written with Pillow."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config.inputs import DataConfig


def make_imagefolder(
    root: Path,
    n_train: int,
    n_val: int,
    *,
    classes: int = 3,
    seed: int = 0,
    sides: tuple[int, int] = (20, 48),
) -> Path:
    """``root/{train,val}/class<k>/img<i>.jpg``: images of random sizes in ``sides``, a
    class-coloured gradient plus noise (learnable, and different under crops and flips)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            k = i % classes
            folder = root / split / f"class{k}"
            folder.mkdir(parents=True, exist_ok=True)
            w, h = (int(v) for v in rng.integers(sides[0], sides[1] + 1, 2))
            ramp = np.linspace(0, 1, w)[None, :, None] * np.linspace(0.5, 1, h)[:, None, None]
            tint = np.eye(3)[k % 3][None, None, :]
            img = 200 * ramp * (0.3 + 0.7 * tint) + rng.normal(0, 12, (h, w, 3))
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(
                folder / f"img{i:05d}.jpg", quality=85
            )
    return root


def image_config(path: Path, **changes: Any) -> DataConfig:
    """A streaming, augmented 16x16 ``data`` section over the ImageFolder at ``path``."""
    base = dict(name="imagefolder", path=str(path), image_size=16, resize=18, hessian_samples=8,
                hessian_batch_size=4, streaming=True, augment=True)  # fmt: skip
    return DataConfig(**{**base, **changes})


def corrupt_jpeg(path: Path) -> None:
    """Keep the JPEG header, cut the rest: Pillow identifies the file but cannot decode it."""
    data = path.read_bytes()
    path.write_bytes(data[: min(len(data) // 3, 200)])
