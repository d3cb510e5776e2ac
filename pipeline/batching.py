"""Global batches, rank slices and resumable epochs: the batch contract of every data source.

Epoch order: ``torch.randperm(n, generator=gen)`` (the hawq loop seeds ``gen`` per epoch). Global
batch ``s`` holds order positions ``[s B, (s + 1) B)`` (the last one may be shorter). With world
size ``W``, rank ``r`` gets the contiguous slice ``[floor(r b / W), floor((r + 1) b / W))`` of a
global batch of ``b`` samples, so the ranks' slices concatenate to the global batch (a rank's
slice may be empty when ``b < W``) and every rank makes the same number of steps.

:class:`ShuffledBatches` is the ``callable(generator)`` form the hawq training loop takes, plus
``from_step(generator, step)``: the same batches minus the first ``step``, without producing
them (the loop calls it to resume mid-epoch, see :func:`hawq.metrics.batches`).
:class:`BatchSource` gives every data source (``DataBundle``, ``FactoryData``,
``StreamingImages``) the same ``train_batches`` / ``eval_batches`` / ``train_data`` /
``eval_data`` from its sizes and two "take these indices" functions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from hawq.data_parallel import rank_slice

__all__ = [
    "BatchSource",
    "OrderedBatches",
    "ShuffledBatches",
    "check_rank",
    "epoch_generator",
    "rank_bounds",
    "rank_slices",
]

Batch = tuple[torch.Tensor, torch.Tensor]
# (rank slices of the epoch's global batches, the generator after the order was drawn) -> batches
MakeBatches = Callable[[Iterator[np.ndarray], torch.Generator], Iterable[Batch]]


def check_rank(rank: int, world_size: int) -> None:
    """``0 <= rank < world_size``, both integers (ValueError naming the argument otherwise)."""
    for name, value in (("rank", rank), ("world_size", world_size)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an int, got {value!r}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")


def rank_bounds(b: int, rank: int, world_size: int) -> tuple[int, int]:
    """``[floor(rank b / W), floor((rank + 1) b / W))``: rank's part of a batch of ``b``."""
    part = rank_slice(b, rank, world_size)
    return part.start, part.stop


def rank_slices(
    order: np.ndarray, batch_size: int, rank: int = 0, world_size: int = 1, start_step: int = 0
) -> Iterator[np.ndarray]:
    """Rank ``rank``'s slice of every global batch of ``order``, from batch ``start_step`` on."""
    check_rank(rank, world_size)
    if batch_size < 1 or start_step < 0:
        raise ValueError(f"need batch_size >= 1, start_step >= 0: got {batch_size}, {start_step}")
    for i in range(start_step * batch_size, len(order), batch_size):
        batch = order[i : i + batch_size]
        lo, hi = rank_bounds(len(batch), rank, world_size)
        yield batch[lo:hi]


@dataclass(frozen=True, kw_only=True)
class _Epoch:
    """``n`` samples cut into global batches of ``batch_size``; ``rank``'s slices via ``make``."""

    n: int
    batch_size: int
    make: MakeBatches
    rank: int = 0
    world_size: int = 1

    # hawq's loop passes rank=/world_size= under data parallelism (hawq.metrics.batches); the
    # slices are then cut here, before decoding, instead of from decoded global batches
    sharded: ClassVar[bool] = True

    def __post_init__(self) -> None:
        check_rank(self.rank, self.world_size)

    def _where(self, rank: int | None, world_size: int | None) -> tuple[int, int]:
        if rank is None and world_size is None:
            return self.rank, self.world_size
        where = (
            self.rank if rank is None else rank,
            self.world_size if world_size is None else world_size,
        )
        check_rank(*where)
        return where


@dataclass(frozen=True, kw_only=True)
class ShuffledBatches(_Epoch):
    """A training epoch in the order ``gen`` draws: ``callable(generator)`` + ``from_step``."""

    def __call__(
        self, gen: torch.Generator, *, rank: int | None = None, world_size: int | None = None
    ) -> Iterable[Batch]:
        return self.from_step(gen, 0, rank=rank, world_size=world_size)

    def from_step(
        self,
        gen: torch.Generator,
        step: int,
        *,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> Iterable[Batch]:
        """The epoch's batches from global batch ``step`` on (earlier ones are not produced);
        ``rank``/``world_size`` override the ones this epoch was made for."""
        order = torch.randperm(self.n, generator=gen).numpy()
        slices = rank_slices(order, self.batch_size, *self._where(rank, world_size), step)
        return self.make(slices, gen)


@dataclass(frozen=True, kw_only=True)
class OrderedBatches(_Epoch):
    """The samples in order (evaluation); called with any generator (ignored) or none."""

    def __call__(
        self,
        gen: torch.Generator | None = None,
        *,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> Iterable[Batch]:
        where = self._where(rank, world_size)
        slices = rank_slices(np.arange(self.n), self.batch_size, *where)
        return self.make(slices, torch.Generator())


class BatchSource:
    """The batch methods every data source shares, from its ``sizes()`` and ``_take_train`` /
    ``_take_eval(slices, generator)`` (the batches of those index slices)."""

    name: str
    hessian: list[Batch]
    location: str
    fingerprint: str

    def sizes(self) -> tuple[int, int]:
        """(fine-tuning samples, evaluation samples)."""
        raise NotImplementedError

    @property
    def n_train(self) -> int:
        return self.sizes()[0]

    @property
    def n_eval(self) -> int:
        return self.sizes()[1]

    @property
    def hessian_samples(self) -> int:
        return sum(len(y) for _, y in self.hessian)

    def summary(self) -> dict[str, object]:
        """Sizes and provenance, for manifests and logs."""
        out: dict[str, object] = {
            "name": self.name,
            "train": self.n_train,
            "eval": self.n_eval,
            "hessian": self.hessian_samples,
            "hessian_batches": len(self.hessian),
        }
        if getattr(self, "image_size", None) is not None:  # images of a known shape
            out["num_classes"] = getattr(self, "num_classes", None)
            out["shape"] = [getattr(self, "in_channels", None), *self.image_size]
        return {**out, "location": self.location, "fingerprint": self.fingerprint}

    def _take_train(self, slices: Iterator[np.ndarray], gen: torch.Generator) -> Iterable[Batch]:
        raise NotImplementedError

    def _take_eval(self, slices: Iterator[np.ndarray], gen: torch.Generator) -> Iterable[Batch]:
        raise NotImplementedError

    def shuffled(self, batch_size: int, rank: int = 0, world_size: int = 1) -> ShuffledBatches:
        """Training epochs as the hawq loop takes them (rank ``rank``'s slices)."""
        return ShuffledBatches(
            n=self.n_train, batch_size=batch_size, make=self._take_train, rank=rank,
            world_size=world_size,
        )  # fmt: skip

    def ordered(self, batch_size: int, rank: int = 0, world_size: int = 1) -> OrderedBatches:
        """The evaluation set in order (rank ``rank``'s slices)."""
        return OrderedBatches(
            n=self.n_eval, batch_size=batch_size, make=self._take_eval, rank=rank,
            world_size=world_size,
        )  # fmt: skip

    def train_data(self, batch_size: int, *, rank: int = 0, world_size: int = 1):
        """``callable(generator)`` (with ``from_step``): rank ``rank``'s slices of the
        shuffled global batches of ``batch_size``; the hawq training loop's streaming form."""
        return self.shuffled(batch_size, rank, world_size)

    def eval_data(self, batch_size: int, *, rank: int = 0, world_size: int = 1):
        """``callable(generator)``: rank ``rank``'s slices of the evaluation batches, in order."""
        return self.ordered(batch_size, rank, world_size)

    def train_batches(
        self,
        batch_size: int,
        *,
        seed: int,
        epoch: int = 0,
        rank: int = 0,
        world_size: int = 1,
        start_step: int = 0,
    ) -> Iterator[Batch]:
        """Rank ``rank``'s slice of each shuffled global batch from ``start_step`` on (earlier
        batches are not produced); a pure function of (seed, epoch, rank, world_size)."""
        stream = self.shuffled(batch_size, rank, world_size)
        return iter(stream.from_step(epoch_generator(seed, epoch), start_step))

    def eval_batches(
        self, batch_size: int, *, rank: int = 0, world_size: int = 1
    ) -> Iterator[Batch]:
        """Rank ``rank``'s slice of each evaluation batch, in order."""
        return iter(self.ordered(batch_size, rank, world_size)())


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator of ``train_batches(seed=, epoch=)`` (all data sources)."""
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
