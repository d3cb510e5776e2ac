"""Datasets as tensors, split deterministically into Hessian, fine-tuning and evaluation sets.

Splits are pure functions of ``data.seed``: the training pool is a seeded permutation of the
training split (minus a holdout for datasets without a test split, e.g. digits); the Hessian
subset is the first ``hessian_samples`` of the pool and the fine-tuning set its first
``train_size``; the evaluation set comes from the test split (or the holdout), so it never
overlaps either. :attr:`DataBundle.fingerprint` lets a run directory refuse another dataset.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from pipeline.batching import BatchSource
from pipeline.config.inputs import DataConfig, ModelConfig

if TYPE_CHECKING:
    from pipeline.data_factory import FactoryData
    from pipeline.data_images import StreamingImages
from pipeline.config.strict import ConfigError
from pipeline.data_sources import (
    Source,
    check_memory,
    read_cifar10,
    read_digits,
    read_fashion_mnist,
    read_idx,
    read_synthetic,
)

__all__ = [
    "Data",
    "DataBundle",
    "check_model_fits",
    "load_builtin",
    "load_data",
    "read_idx",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HOLDOUT_FRACTION = 0.2  # evaluation share of datasets without a test split
_AUTO_NORM = {"cifar10": "imagenet", "imagefolder": "imagenet", "synthetic": "none"}

Batch = tuple[torch.Tensor, torch.Tensor]
Data = tuple[torch.Tensor, torch.Tensor] | Callable[[torch.Generator], Iterable[Batch]]


@dataclass(frozen=True, kw_only=True, eq=False)
class DataBundle(BatchSource):
    """Normalised float32 ``(N, C, H, W)`` images and int64 labels of every split; batches
    as in :mod:`pipeline.batching` (``train_batches``, ``eval_batches``, rank slices).

    ``*_index`` are positions in the source split (train pool: the training split; eval: the test
    split, or the training split for holdout datasets, see ``eval_from_train``).
    """

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    eval_x: torch.Tensor
    eval_y: torch.Tensor
    hessian: list[Batch]
    num_classes: int
    in_channels: int
    image_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train_index: torch.Tensor
    eval_index: torch.Tensor
    hessian_index: torch.Tensor
    eval_from_train: bool
    location: str
    fingerprint: str

    def sizes(self) -> tuple[int, int]:
        return len(self.train_y), len(self.eval_y)

    def train_data(self, batch_size: int, *, rank: int = 0, world_size: int = 1) -> Data:
        """The fine-tuning set as the hawq training loop takes it: the tensors (the loop cuts
        and shuffles them), or with ``world_size > 1`` rank ``rank``'s slices of the global
        batches of ``batch_size`` (:class:`pipeline.batching.ShuffledBatches`; same order)."""
        if world_size == 1 and rank == 0:
            return self.train_x, self.train_y
        return self.shuffled(batch_size, rank, world_size)

    def eval_data(self, batch_size: int, *, rank: int = 0, world_size: int = 1) -> Data:
        """The evaluation set as ``hawq.evaluate`` and the training loop take it (tensors, or
        rank ``rank``'s slices of the batches in order with ``world_size > 1``)."""
        if world_size == 1 and rank == 0:
            return self.eval_x, self.eval_y
        return self.ordered(batch_size, rank, world_size)

    def example(self, n: int = 1) -> torch.Tensor:
        """The first ``n`` evaluation inputs (shape probes, size and BOPs counts)."""
        return self.eval_x[:n]

    def _take_train(self, slices: Iterator[np.ndarray], gen: torch.Generator) -> Iterator[Batch]:
        return ((self.train_x[j], self.train_y[j]) for j in map(torch.from_numpy, slices))

    def _take_eval(self, slices: Iterator[np.ndarray], gen: torch.Generator) -> Iterator[Batch]:
        return ((self.eval_x[j], self.eval_y[j]) for j in map(torch.from_numpy, slices))


def _read(cfg: DataConfig) -> Source:
    if cfg.name == "digits":
        return read_digits()
    if cfg.name == "fashion_mnist":
        return read_fashion_mnist(cfg.path)
    if cfg.name == "cifar10":
        assert cfg.path is not None  # DataConfig.check guarantees it
        if not os.path.exists(cfg.path):
            raise ConfigError(
                "data.path", f"{cfg.path!r} not found; point it at the npz or batches"
            )
        return read_cifar10(cfg.path)
    return read_synthetic(cfg)


def split_indices(
    cfg: DataConfig, n_train: int, n_test: int | None
) -> tuple[np.ndarray, np.ndarray, bool]:
    """(training pool in draw order, evaluation indices, eval drawn from the train split) of a
    dataset with ``n_train`` training and ``n_test`` test samples (None: no test split)."""
    perm = np.random.default_rng([cfg.seed, 0]).permutation(n_train)
    if n_test is None:
        n_eval = cfg.eval_size or round(HOLDOUT_FRACTION * n_train)
        if n_eval >= n_train:
            raise ConfigError(
                "data.eval_size", f"{n_eval} leaves no training data of {n_train} samples"
            )
        return perm[n_eval:], np.sort(perm[:n_eval]), True
    if cfg.eval_size is None:
        return perm, np.arange(n_test), False
    if cfg.eval_size > n_test:
        raise ConfigError("data.eval_size", f"{cfg.eval_size} exceeds the {n_test} test samples")
    pick = np.random.default_rng([cfg.seed, 1]).permutation(n_test)[: cfg.eval_size]
    return perm, np.sort(pick), False


def pool_sizes(cfg: DataConfig, pool: np.ndarray) -> tuple[int, int]:
    """(samples to load: fine-tuning and Hessian sets, fine-tuning samples) of the pool; fail
    on sizes the pool cannot hold."""
    if cfg.hessian_samples > len(pool):
        raise ConfigError(
            "data.hessian_samples",
            f"{cfg.hessian_samples} exceeds the {len(pool)} training samples available",
        )
    if cfg.train_size is not None and cfg.train_size > len(pool):
        raise ConfigError(
            "data.train_size", f"{cfg.train_size} exceeds the {len(pool)} training samples"
        )
    n_train = cfg.train_size or len(pool)
    return max(n_train, cfg.hessian_samples), n_train


def norm_mode(cfg: DataConfig) -> str:
    """``data.normalization`` with ``auto`` resolved: imagenet, none or dataset."""
    if cfg.normalization == "auto":
        return _AUTO_NORM.get(cfg.name or "", "dataset")
    return cfg.normalization


def norm_stats(
    cfg: DataConfig, x: np.ndarray | None, channels: int
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (mean, std) of ``data.normalization``; 'dataset' needs the training images
    ``x`` (float, ``(N, C, H, W)``)."""
    mode, c = norm_mode(cfg), channels
    if mode == "none":
        return (0.0,) * c, (1.0,) * c
    if mode == "imagenet":
        if c != 3:
            raise ConfigError("data.normalization", f"'imagenet' needs 3 channels, data has {c}")
        return IMAGENET_MEAN, IMAGENET_STD
    if x is None:
        raise ConfigError(
            "data.normalization",
            "'dataset' needs every training image decoded, which streaming does not do. Fix: "
            "use 'imagenet' or 'none', or set data.streaming: false",
        )
    mean = x.mean(axis=(0, 2, 3), dtype=np.float64)
    std = np.maximum(x.std(axis=(0, 2, 3), dtype=np.float64), 1e-8)
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def _normalise(x: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    m = np.asarray(mean, dtype=np.float32)[None, :, None, None]
    s = np.asarray(std, dtype=np.float32)[None, :, None, None]
    return torch.from_numpy(np.ascontiguousarray((x - m) / s, dtype=np.float32))


def _fingerprint(name: str, parts: dict[str, torch.Tensor], meta: tuple) -> str:
    """name-sizes-hash of the labels, a few samples of each split, shapes and normalisation."""
    h = hashlib.sha256(repr((name, meta)).encode())
    for key in sorted(parts):
        t = parts[key]
        h.update(key.encode())
        h.update(repr(tuple(t.shape)).encode())
        sample = t if t.dtype == torch.int64 else torch.cat([t[:4], t[-4:]])
        h.update(sample.contiguous().numpy().tobytes())
    sizes = "-".join(str(len(parts[k])) for k in ("train_y", "eval_y", "hessian_y"))
    return f"{name}-{sizes}-{h.hexdigest()[:16]}"


def load_data(
    cfg: DataConfig, device: torch.device | None = None
) -> DataBundle | FactoryData | StreamingImages:
    """The data ``cfg`` names: a built-in dataset split into tensors, an ImageFolder (streamed
    or decoded into memory, see :mod:`pipeline.data_images`) or the user's factory's datasets
    (streamed, see :mod:`pipeline.data_factory`). ``device``: where streamed batches go."""
    if cfg.factory is not None:
        from pipeline.data_factory import load_factory_data

        return load_factory_data(cfg)
    if cfg.name == "imagefolder":
        from pipeline.data_images import load_imagefolder

        return load_imagefolder(cfg, device or torch.device("cpu"))
    return load_builtin(cfg)


def load_builtin(cfg: DataConfig) -> DataBundle:
    """Read the built-in dataset ``cfg`` names and split it; bad paths or sizes fail before
    decoding."""
    assert cfg.name is not None  # DataConfig.check: name or factory
    src = _read(cfg)
    n_test = None if src.test_y is None else len(src.test_y)
    pool, eval_idx, eval_from_train = split_indices(cfg, len(src.train_y), n_test)
    n_load, n_train = pool_sizes(cfg, pool)
    check_memory(n_load + len(eval_idx), src.shape)
    loaded = src.fetch("train", pool[:n_load])
    x_eval_raw = src.fetch("train" if eval_from_train else "test", eval_idx)
    mean, std = norm_stats(cfg, loaded[:n_train], src.shape[0])
    x_all = _normalise(loaded, mean, std)
    y_all = torch.from_numpy(src.train_y[pool[:n_load]])
    eval_y = src.train_y if eval_from_train else src.test_y
    assert eval_y is not None
    h = cfg.hessian_samples
    hx, hy = x_all[:h], y_all[:h]
    batches = [
        (hx[i : i + cfg.hessian_batch_size].clone(), hy[i : i + cfg.hessian_batch_size].clone())
        for i in range(0, h, cfg.hessian_batch_size)
    ]
    train_x, train_y = x_all[:n_train].clone(), y_all[:n_train].clone()
    ev_x = _normalise(x_eval_raw, mean, std)
    ev_y = torch.from_numpy(eval_y[eval_idx].copy())
    c, height, width = src.shape
    fp = _fingerprint(
        cfg.name,
        {"train_x": train_x, "train_y": train_y, "eval_x": ev_x, "eval_y": ev_y,
         "hessian_x": hx, "hessian_y": hy},
        (src.num_classes, src.shape, mean, std),
    )  # fmt: skip
    bundle = DataBundle(
        name=cfg.name,
        train_x=train_x,
        train_y=train_y,
        eval_x=ev_x,
        eval_y=ev_y,
        hessian=batches,
        num_classes=src.num_classes,
        in_channels=c,
        image_size=(height, width),
        mean=mean,
        std=std,
        train_index=torch.from_numpy(pool[:n_train].copy()),
        eval_index=torch.from_numpy(eval_idx.copy()),
        hessian_index=torch.from_numpy(pool[:h].copy()),
        eval_from_train=eval_from_train,
        location=src.location,
        fingerprint=fp,
    )
    logger.info("data %s", bundle.summary())
    return bundle


def check_model_fits(bundle: DataBundle, model: ModelConfig) -> None:
    """Fail (naming the key) when the model's classes / channels / size differ from the data's."""
    if model.num_classes != bundle.num_classes:
        raise ConfigError(
            "model.num_classes", f"{model.num_classes} but data has {bundle.num_classes} classes"
        )
    if model.in_channels != bundle.in_channels:
        raise ConfigError(
            "model.in_channels", f"{model.in_channels} but data has {bundle.in_channels} channels"
        )
    if model.image_size is not None and (model.image_size,) * 2 != bundle.image_size:
        raise ConfigError(
            "model.image_size", f"{model.image_size} but data images are {bundle.image_size}"
        )
