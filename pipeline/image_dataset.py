"""Decoding images in DataLoader workers: uint8 batches, bad images reported, then the device.

A sample key is ``(i, seed)``: image ``i`` of an :mod:`pipeline.image_lists` split, with the
training transform seeded by ``numpy.random.default_rng([seed, i])`` (``seed >= 0``) or the
evaluation transform (``seed < 0``). Batches are lists of keys (a ``batch_sampler``), so which
worker decodes a sample changes nothing: the batches are a pure function of the keys, whatever
``num_workers``. Workers return ``uint8`` images and, for an image that cannot be read or
decoded, its problem instead; the main process then fails naming the file
(``data.bad_images: fail``) or drops it from its batch and logs it (``skip``), copies the batch
to the device (pinned memory, ``non_blocking``) and normalises it there in float32.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from pipeline.image_lists import BadPolicy, ImageList, bad_file
from pipeline.image_transforms import (
    DECODE_ERRORS,
    decode_rgb,
    eval_image,
    normalise,
    to_uint8_chw,
    train_image,
)

__all__ = ["ImageDataset", "Key", "checked_batches", "device_batches", "image_loader"]

log = logging.getLogger(__name__)

Key = tuple[int, int]  # (image index in its split, augmentation seed or -1)
EVAL = -1


@dataclass(frozen=True, kw_only=True, eq=False)
class ImageDataset(Dataset):
    """Key ``(i, seed)`` -> ``(uint8 (3, size, size) or None, label, i, problem or None)``."""

    images: ImageList
    size: int
    resize: int

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: Key) -> tuple[torch.Tensor | None, int, int, str | None]:
        i, seed = key
        label = int(self.images.labels[i])
        try:
            im = decode_rgb(self.images.read(i))
        except DECODE_ERRORS as exc:
            return None, label, i, f"could not be read or decoded ({type(exc).__name__}: {exc})"
        if seed < 0:
            im = eval_image(im, self.size, self.resize)
        else:
            im = train_image(im, self.size, np.random.default_rng([seed, i]))
        return to_uint8_chw(im), label, i, None


@dataclass(frozen=True)
class _Collate:
    """Stack the decoded images of a batch; list the undecodable ones as ``(i, problem)``."""

    size: int

    def __call__(self, items: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list]:
        good = [it for it in items if it[3] is None]
        x = (
            torch.stack([it[0] for it in good])
            if good
            else torch.zeros((0, 3, self.size, self.size), dtype=torch.uint8)
        )
        y = torch.tensor([it[1] for it in good], dtype=torch.int64)
        idx = torch.tensor([it[2] for it in good], dtype=torch.int64)
        return x, y, idx, [(it[2], it[3]) for it in items if it[3] is not None]


def image_loader(
    dataset: ImageDataset, batches: Iterable[list[Key]], *, num_workers: int, pin_memory: bool
) -> DataLoader:
    """A DataLoader over the key lists ``batches`` (one pass). Its own generator: creating it
    draws nothing from the global torch RNG (a resumed run's dropout stream stays the same)."""
    return DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=num_workers,
        collate_fn=_Collate(dataset.size),
        pin_memory=pin_memory,
        generator=torch.Generator(),
    )


def checked_batches(
    loader: DataLoader, images: ImageList, bad_images: BadPolicy, what: str
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(uint8 x, labels, image indices)`` per batch; an undecodable image fails naming its
    file, or (``skip``) is dropped and logged, with the count at the end of the pass."""
    skipped = 0
    for x, y, idx, bad in loader:
        for i, problem in bad:
            if bad_images == "fail":
                raise bad_file(images.name(i), problem)
            skipped += 1
            log.warning("%s: skipping %s: %s", what, images.name(i), problem)
        yield x, y, idx
    if skipped:
        log.warning("%s: skipped %d unreadable image(s) in this pass", what, skipped)


def device_batches(
    batches: Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    *,
    device: torch.device,
    mean: tuple[float, ...],
    std: tuple[float, ...],
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Copy each uint8 batch to ``device`` (non-blocking from pinned memory) and normalise it
    there: ``(x / 255 - mean) / std`` in float32."""
    for x, y, _ in batches:
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        yield normalise(x, mean, std), y
