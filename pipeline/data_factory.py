"""Your own data: ``data.factory`` returns map-style ``torch.utils.data.Dataset`` objects.

The factory (``package.module:function``, called with ``**data.kwargs``) returns
``(train, eval)`` or ``(train, eval, hessian)`` (a tuple, or a mapping with those keys). Items
are ``(input, target)`` pairs; targets may be class indices (accuracy is reported), per-pixel
class maps or real values (set the top-level ``loss``). Nothing is decoded up front: training
and evaluation stream batches through a ``DataLoader`` (``data.num_workers`` processes) whose
sampler order is a pure function of the training loop's generator, so a resumed run sees the
same batches. Only the Hessian set (``data.hessian_samples`` items: the first of ``hessian``,
or a seeded sample of ``train``) is collated into memory, because every HVP reuses it.

Sizes: ``data.train_size`` / ``data.eval_size`` take the first items of ``train`` / ``eval``.
Datasets should be deterministic (item ``i`` always the same), as the fingerprint and a
bit-identical resume assume.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset, default_collate

from pipeline.batching import BatchSource
from pipeline.config.inputs import DataConfig
from pipeline.config.strict import ConfigError
from pipeline.data import Batch
from pipeline.user_code import import_callable

__all__ = ["FactoryData", "load_factory_data"]

log = logging.getLogger(__name__)

SPLITS = ("train", "eval", "hessian")


@dataclass(frozen=True, kw_only=True, eq=False)
class FactoryData(BatchSource):
    """The user's datasets, cut to the configured sizes; batches are streamed on demand.

    The same interface as :class:`pipeline.data.DataBundle` for the stages: ``train_data`` /
    ``eval_data`` for the hawq loop, ``train_batches`` / ``eval_batches`` (rank slices, see
    :mod:`pipeline.batching`), ``hessian`` batches, ``example``, ``n_eval``, ``fingerprint``.
    """

    name: str
    train: Dataset
    eval: Dataset
    hessian: list[Batch]
    num_workers: int
    location: str
    fingerprint: str
    num_classes: int | None = None  # unknown: the model's output is checked by the loss

    def sizes(self) -> tuple[int, int]:
        return len(self.train), len(self.eval)  # type: ignore[arg-type]

    def _loader(self, dataset: Dataset, batches: Iterable[list[int]]) -> DataLoader:
        """One pass over ``batches`` (index lists); its own generator, so creating it draws
        nothing from the global torch RNG (a resumed run's dropout stream stays the same)."""
        return DataLoader(
            dataset,
            batch_sampler=batches,
            num_workers=self.num_workers,
            collate_fn=default_collate,
            generator=torch.Generator(),
        )

    def _take(self, dataset: Dataset, slices: Iterator[np.ndarray]) -> Iterator[Batch]:
        sizes: list[int] = []

        def index_lists() -> Iterator[list[int]]:
            for s in slices:
                sizes.append(len(s))
                yield s.tolist() or [0]  # DataLoader cannot collate nothing: load item 0 ...

        for k, batch in enumerate(self._loader(dataset, index_lists())):
            yield _no_rows(batch) if sizes[k] == 0 else batch  # ... and cut it to zero rows

    def _take_train(self, slices: Iterator[np.ndarray], gen: torch.Generator) -> Iterator[Batch]:
        return self._take(self.train, slices)

    def _take_eval(self, slices: Iterator[np.ndarray], gen: torch.Generator) -> Iterator[Batch]:
        return self._take(self.eval, slices)

    def example(self, n: int = 1) -> torch.Tensor:
        """The first ``n`` evaluation inputs."""
        x, _ = next(iter(self._loader(self.eval, [list(range(min(n, self.n_eval)))])))
        return x


def _no_rows(value: Any) -> Any:
    """``value`` (a collated batch: tensors in tuples, lists, dicts) with zero rows."""
    if isinstance(value, torch.Tensor):
        return value[:0]
    if isinstance(value, Mapping):
        return {k: _no_rows(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return type(value)(_no_rows(v) for v in value)
    return value


def _unpack(out: Any, factory: str) -> dict[str, Any]:
    if isinstance(out, Mapping):
        unknown = sorted(set(out) - set(SPLITS))
        if unknown or "train" not in out or "eval" not in out:
            raise ConfigError(
                "data.factory",
                f"{factory} returned keys {sorted(out)}; it must return 'train' and 'eval' "
                "(and optionally 'hessian') datasets",
            )
        return {k: out.get(k) for k in SPLITS}
    if isinstance(out, tuple | list) and len(out) in (2, 3):
        return dict(zip(SPLITS, [*out, None][:3], strict=True))
    raise ConfigError(
        "data.factory",
        f"{factory} returned {type(out).__name__}; it must return (train, eval) or "
        "(train, eval, hessian) map-style Datasets",
    )


def _check_dataset(split: str, ds: Any, factory: str) -> int:
    """Length of a map-style dataset whose first item is an (input, target) pair."""
    if not (hasattr(ds, "__len__") and hasattr(ds, "__getitem__")):
        raise ConfigError(
            "data.factory",
            f"{factory}: {split} is a {type(ds).__name__}, not a map-style Dataset "
            "(it needs __len__ and __getitem__)",
        )
    n = len(ds)
    if n == 0:
        raise ConfigError("data.factory", f"{factory}: the {split} dataset is empty")
    item = ds[0]
    if not (isinstance(item, tuple | list) and len(item) == 2):
        raise ConfigError(
            "data.factory",
            f"{factory}: {split}[0] must be an (input, target) pair, got {type(item).__name__}",
        )
    return n


def _first(ds: Dataset, n: int | None, key: str, split: str) -> Dataset:
    size = len(ds)  # type: ignore[arg-type]
    if n is None or n == size:
        return ds
    if n > size:
        raise ConfigError(key, f"{n} exceeds the {size} items of data.factory's {split} dataset")
    return Subset(ds, range(n))


def _hash_items(h: Any, ds: Dataset) -> None:
    """Feed a few items (the first two and the last) of ``ds`` into the hash ``h``."""
    n = len(ds)  # type: ignore[arg-type]
    for i in sorted({0, min(1, n - 1), n - 1}):
        for part in ds[i]:
            t = torch.as_tensor(part)
            h.update(repr((tuple(t.shape), str(t.dtype))).encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())


def load_factory_data(cfg: DataConfig) -> FactoryData:
    """Call ``data.factory``, check what it returned, cut the splits, collate the Hessian set."""
    factory = cfg.factory or ""
    fn = import_callable("data.factory", factory)
    try:
        out = fn(**cfg.kwargs)
    except TypeError as exc:
        raise ConfigError("data.kwargs", f"{factory} rejected the kwargs: {exc}") from None
    parts = _unpack(out, factory)
    sizes = {s: _check_dataset(s, ds, factory) for s, ds in parts.items() if ds is not None}
    train = _first(parts["train"], cfg.train_size, "data.train_size", "train")
    evals = _first(parts["eval"], cfg.eval_size, "data.eval_size", "eval")
    source, split = (parts["hessian"], "hessian") if parts["hessian"] is not None else (None, "")
    if source is None:  # a seeded sample of the training set
        perm = np.random.default_rng([cfg.seed, 0]).permutation(sizes["train"])
        source, split = Subset(parts["train"], perm.tolist()), "train"
    hess = _first(source, cfg.hessian_samples, "data.hessian_samples", split)
    loader = DataLoader(
        hess,
        batch_size=cfg.hessian_batch_size,
        collate_fn=default_collate,
        generator=torch.Generator(),
    )
    hessian = [(x, y) for x, y in loader]
    h = hashlib.sha256(json.dumps([factory, cfg.kwargs], sort_keys=True, default=str).encode())
    for ds in (train, evals, hess):
        h.update(str(len(ds)).encode())  # type: ignore[arg-type]
        _hash_items(h, ds)
    counts = "-".join(str(len(ds)) for ds in (train, evals, hess))  # type: ignore[arg-type]
    data = FactoryData(
        name=cfg.label,
        train=train,
        eval=evals,
        hessian=hessian,
        num_workers=cfg.num_workers,
        location=factory,
        fingerprint=f"factory-{counts}-{h.hexdigest()[:16]}",
    )
    log.info("data %s", data.summary())
    return data
