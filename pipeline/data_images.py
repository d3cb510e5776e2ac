"""ImageFolder data (a folder tree or a ``hawq pack-data`` pack): streamed, or decoded into RAM.

``prepare`` lists the files (or reads the pack's index), draws the splits of
:mod:`pipeline.data` (same rules as every built-in dataset), decodes only the Hessian set and
fingerprints the file list (relative paths, sizes and mtimes; a pack: its manifest with the
shards' SHA-256), so its time and memory do not grow with the image count beyond the listing.

``data.streaming``: ``true`` streams (:class:`StreamingImages`: batches decoded by DataLoader
workers, uint8 until the device, normalised there); ``false`` decodes the fine-tuning and
evaluation sets into float32 tensors (a :class:`pipeline.data.DataBundle`); ``auto`` streams
when ``data.augment`` is on or those tensors would exceed ``AUTO_STREAM_BYTES`` (a fixed size,
so the choice does not depend on the machine). Without augmentation both give the same batches.

Training batches (``data.augment``): RandomResizedCrop + flip, each sample seeded by (an epoch
seed drawn from the loop's generator after the order, its index), see
:mod:`pipeline.image_dataset`; evaluation and Hessian batches: resize + center crop.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.batching import BatchSource
from pipeline.config.inputs import DataConfig
from pipeline.config.strict import ConfigError
from pipeline.data import (
    Batch,
    DataBundle,
    norm_mode,
    norm_stats,
    pool_sizes,
    split_indices,
)
from pipeline.data_sources import check_memory
from pipeline.image_dataset import EVAL, ImageDataset, checked_batches, device_batches, image_loader
from pipeline.image_lists import BadPolicy, ImageList, read_splits
from pipeline.image_transforms import normalise

__all__ = ["AUTO_STREAM_BYTES", "StreamingImages", "load_imagefolder", "uses_streaming"]

log = logging.getLogger(__name__)

AUTO_STREAM_BYTES = 2**30  # streaming: auto decodes into RAM below 1 GiB of float32 tensors
DECODE_BATCH = 64  # images per DataLoader batch when decoding in order (Hessian, RAM, example)
U8 = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass(frozen=True, kw_only=True, eq=False)
class ImageSpec:
    """How images of a split become tensors: crop ``size``, eval ``resize``, workers, policy."""

    size: int
    resize: int
    num_workers: int
    bad_images: BadPolicy

    def loader(self, images: ImageList, keys, *, pin_memory: bool = False):
        dataset = ImageDataset(images=images, size=self.size, resize=self.resize)
        return image_loader(dataset, keys, num_workers=self.num_workers, pin_memory=pin_memory)

    def decode(self, images: ImageList, index: np.ndarray, what: str) -> Iterator[U8]:
        """uint8 batches of ``images[index]`` in order, evaluation transform."""
        keys = (
            [(int(i), EVAL) for i in index[k : k + DECODE_BATCH]]
            for k in range(0, len(index), DECODE_BATCH)
        )
        return checked_batches(self.loader(images, keys), images, self.bad_images, what)

    def decode_all(self, images: ImageList, index: np.ndarray, what: str) -> U8:
        """``(uint8 x, labels, image indices kept)`` of ``images[index]`` (all in memory)."""
        parts = list(self.decode(images, index, what))
        if not parts:
            empty = torch.zeros(0, dtype=torch.int64)
            return torch.zeros((0, 3, self.size, self.size), dtype=torch.uint8), empty, empty
        return tuple(torch.cat(p) for p in zip(*parts, strict=True))  # type: ignore[return-value]


@dataclass(frozen=True, kw_only=True, eq=False)
class StreamingImages(BatchSource):
    """An ImageFolder streamed from disk: the interface of :class:`pipeline.data.DataBundle`.

    ``train_index`` / ``eval_index`` / ``hessian_index``: image indices in the training /
    evaluation split (the fine-tuning set in pool order). Batches go to ``device``;
    ``train_data`` / ``eval_data`` are the ``callable(generator)`` forms (with ``from_step``)
    and ``train_batches`` / ``eval_batches`` the iterators of :mod:`pipeline.batching`.
    """

    name: str
    train_images: ImageList
    eval_images: ImageList
    train_index: torch.Tensor
    eval_index: torch.Tensor
    hessian_index: torch.Tensor
    hessian: list[Batch]
    spec: ImageSpec
    augment: bool
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    device: torch.device
    location: str
    fingerprint: str
    in_channels: int = 3
    eval_from_train: bool = False

    @property
    def image_size(self) -> tuple[int, int]:
        return (self.spec.size, self.spec.size)

    def sizes(self) -> tuple[int, int]:
        """(fine-tuning, evaluation) images; with ``bad_images: skip`` unreadable ones count."""
        return len(self.train_index), len(self.eval_index)

    def example(self, n: int = 1) -> torch.Tensor:
        """The first ``n`` evaluation inputs (float32, normalised, on the CPU)."""
        x, _, _ = self.spec.decode_all(self.eval_images, self.eval_index[:n].numpy(), "example")
        return normalise(x, self.mean, self.std)

    def _stream(self, images: ImageList, index: torch.Tensor, slices, seed: int, what: str):
        ids = index.numpy()
        keys = ([(int(i), seed) for i in ids[s]] for s in slices)
        cuda = self.device.type == "cuda"
        loader = self.spec.loader(images, keys, pin_memory=cuda)
        batches = checked_batches(loader, images, self.spec.bad_images, what)
        return device_batches(batches, device=self.device, mean=self.mean, std=self.std)

    def _take_train(self, slices, gen: torch.Generator) -> Iterator[Batch]:
        # drawn now (after the order), not when the first batch is asked for
        seed = int(torch.randint(0, 2**62, (1,), generator=gen)) if self.augment else EVAL
        return self._stream(self.train_images, self.train_index, slices, seed, "train")

    def _take_eval(self, slices, gen: torch.Generator) -> Iterator[Batch]:
        return self._stream(self.eval_images, self.eval_index, slices, EVAL, "eval")


def uses_streaming(cfg: DataConfig, n_images: int, size: int) -> bool:
    """``data.streaming`` resolved: ``auto`` streams with augmentation or above the RAM bound."""
    if cfg.streaming != "auto":
        return bool(cfg.streaming)
    return cfg.augment or n_images * 3 * size * size * 4 > AUTO_STREAM_BYTES


def _fingerprint(cfg: DataConfig, counts: tuple[int, ...], meta: tuple, ids: tuple) -> str:
    """``imagefolder-<train>-<eval>-<hessian>-<hash>`` of the file lists (``ids``: content ids),
    the split settings and the transform (``meta``), never of pixels."""
    h = hashlib.sha256(repr((meta, cfg.seed, cfg.train_split, cfg.eval_split, ids)).encode())
    return f"imagefolder-{'-'.join(map(str, counts))}-{h.hexdigest()[:16]}"


def _batches(x: torch.Tensor, y: torch.Tensor, size: int) -> list[Batch]:
    return [(x[i : i + size].clone(), y[i : i + size].clone()) for i in range(0, len(y), size)]


def load_imagefolder(cfg: DataConfig, device: torch.device) -> StreamingImages | DataBundle:
    """List ``data.path`` (folder or pack), draw the splits, decode the Hessian set (streaming)
    or everything (in RAM). Bad paths, sizes and listed files fail before any decoding."""
    try:
        import PIL  # noqa: F401
    except ImportError:
        raise ConfigError("data.name", "imagefolder needs Pillow: pip install pillow") from None
    size = cfg.image_size or 224
    resize = cfg.resize or round(size * 8 / 7)
    if resize < size:
        raise ConfigError("data.resize", f"{resize} is smaller than the crop {size}")
    classes, train, evals = read_splits(
        cfg.path or "", cfg.train_split, cfg.eval_split, cfg.bad_images
    )
    pool, eval_idx, _ = split_indices(cfg, len(train), len(evals))
    n_load, n_train = pool_sizes(cfg, pool)
    spec = ImageSpec(
        size=size, resize=resize, num_workers=cfg.num_workers, bad_images=cfg.bad_images
    )
    ids = (train.content_id, evals.content_id)
    common = {"train": train, "evals": evals, "pool": pool, "eval_idx": eval_idx, "spec": spec}
    if not uses_streaming(cfg, n_load + len(eval_idx), size):
        return _in_memory(cfg, classes, n_load=n_load, n_train=n_train, ids=ids, **common)
    mean, std = norm_stats(cfg, None, 3)
    h = cfg.hessian_samples
    hx, hy, hidx = spec.decode_all(train, pool[:h], "hessian")
    fp = _fingerprint(cfg, (n_train, len(eval_idx), h), (classes, size, resize, mean, std), ids)
    data = StreamingImages(
        name="imagefolder",
        train_images=train,
        eval_images=evals,
        train_index=torch.from_numpy(pool[:n_train].copy()),
        eval_index=torch.from_numpy(eval_idx.copy()),
        hessian_index=hidx,
        hessian=_batches(normalise(hx, mean, std), hy, cfg.hessian_batch_size),
        spec=spec,
        augment=cfg.augment,
        num_classes=len(classes),
        mean=mean,
        std=std,
        device=device,
        location=str(cfg.path),
        fingerprint=fp,
    )
    log.info("data %s", {**data.summary(), "streaming": True})
    return data


def _in_memory(
    cfg: DataConfig, classes: list[str], *, train: ImageList, evals: ImageList, pool: np.ndarray,
    eval_idx: np.ndarray, spec: ImageSpec, n_load: int, n_train: int, ids: tuple,
) -> DataBundle:  # fmt: skip
    """Decode the fine-tuning (+ Hessian) and evaluation sets into normalised float32 tensors."""
    check_memory(n_load + len(eval_idx), (3, spec.size, spec.size))
    tx, ty, tidx = spec.decode_all(train, pool[:n_load], "train")
    ex, ey, eidx = spec.decode_all(evals, eval_idx, "eval")
    kept = np.isin(pool[:n_load], tidx.numpy())  # all True unless bad_images: skip dropped some
    n_tr, h = int(kept[:n_train].sum()), int(kept[: cfg.hessian_samples].sum())
    x = None
    if norm_mode(cfg) == "dataset":
        x = tx[:n_tr].numpy().astype(np.float32) / np.float32(255.0)
    mean, std = norm_stats(cfg, x, 3)
    del x
    x_all = normalise(tx, mean, std)
    del tx
    counts = (n_tr, len(ey), h)
    meta = (classes, spec.size, spec.resize, mean, std)
    bundle = DataBundle(
        name="imagefolder",
        train_x=x_all[:n_tr].clone(),
        train_y=ty[:n_tr].clone(),
        eval_x=normalise(ex, mean, std),
        eval_y=ey,
        hessian=_batches(x_all[:h], ty[:h], cfg.hessian_batch_size),
        num_classes=len(classes),
        in_channels=3,
        image_size=(spec.size, spec.size),
        mean=mean,
        std=std,
        train_index=tidx[:n_tr].clone(),
        eval_index=eidx,
        hessian_index=tidx[:h].clone(),
        eval_from_train=False,
        location=str(cfg.path),
        fingerprint=_fingerprint(cfg, counts, meta, ids),
    )
    log.info("data %s", {**bundle.summary(), "streaming": False})
    return bundle
