"""Task loss and accuracy of a model on batches: what training and evaluation report.

The loss is cross-entropy on logits unless a ``loss_fn(output, target) -> scalar`` (the mean
over the batch) is given, e.g. a regression or segmentation loss. Accuracy is defined for
classification-like targets only: integer targets whose shape is the output's without dim 1
(``(N,)`` for ``(N, C)`` logits, ``(N, H, W)`` for ``(N, C, H, W)`` per-pixel logits); it is
the fraction of target elements equal to the argmax over dim 1, and NaN for other targets.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from hawq.data_parallel import all_reduce_sums, rank_slice, world
from hawq.precision import Precision, full_precision

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]
Data = tuple[torch.Tensor, torch.Tensor] | Callable[[torch.Generator], Batches]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

__all__ = [
    "Data",
    "LossFn",
    "batches",
    "count_correct",
    "evaluate",
    "model_device",
    "task_loss",
    "wilson_interval",
]


def _tensor_batches(
    data: tuple[torch.Tensor, torch.Tensor],
    batch_size: int,
    generator: torch.Generator | None,
    drop_last: bool = False,
    start: int = 0,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    x, y = data
    n = x.shape[0]
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    for i in range(start * batch_size, n - n % batch_size if drop_last else n, batch_size):
        j = order[i : i + batch_size]
        yield x[j], y[j]


def _rank_slices(global_batches: Batches, rank: int, world_size: int) -> Batches:
    for xb, yb in global_batches:
        s = rank_slice(yb.shape[0], rank, world_size)
        yield xb[s], yb[s]


def batches(
    data: Data,
    batch_size: int,
    gen: torch.Generator,
    shuffle: bool,
    drop_last: bool,
    *,
    start: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> Batches:
    """``(x, y)`` batches of ``data`` from global batch ``start`` on: tensors are cut here
    (shuffled by ``gen``), a callable ``data(gen)`` yields its own batches (e.g. a ``DataLoader``
    over a ``Dataset``).

    Resuming (``start > 0``): a callable that also has ``from_step(gen, start)`` (e.g.
    ``pipeline.batching.ShuffledBatches``) skips without producing the first ``start`` batches;
    otherwise they are drawn and dropped.
    Data parallelism (``world_size > 1``): each global batch is cut to rank ``rank``'s contiguous
    slice (:func:`hawq.data_parallel.rank_slice`); a callable with a true ``sharded`` attribute
    takes ``rank=``/``world_size=`` keywords and yields only its slices (a streaming source
    that decodes only its own share).
    """
    if callable(data):
        kw = {}
        if world_size > 1 and getattr(data, "sharded", False):
            kw = {"rank": rank, "world_size": world_size}
        if start and hasattr(data, "from_step"):
            out = data.from_step(gen, start, **kw)
        else:
            out = data(gen, **kw)
            out = itertools.islice(out, start, None) if start else out
        return out if kw or world_size == 1 else _rank_slices(out, rank, world_size)
    if not (isinstance(data, tuple | list) and len(data) == 2):
        raise ValueError("data must be a tuple (X, y) of tensors or a callable(generator)")
    cut = _tensor_batches(tuple(data), batch_size, gen if shuffle else None, drop_last, start)
    return cut if world_size == 1 else _rank_slices(cut, rank, world_size)


def task_loss(out: torch.Tensor, y: torch.Tensor, loss_fn: LossFn | None) -> torch.Tensor:
    """Mean loss of a batch: ``loss_fn(out, y)`` or cross-entropy on logits."""
    return F.cross_entropy(out, y) if loss_fn is None else loss_fn(out, y)


def count_correct(out: torch.Tensor, y: torch.Tensor) -> tuple[int, int] | None:
    """(correct, total) target elements for classification-like targets, else None."""
    if y.is_floating_point() or y.is_complex() or out.dim() < 2:
        return None
    if out.shape[:1] + out.shape[2:] != y.shape:
        return None
    return int((out.detach().argmax(1) == y).sum()), y.numel()


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (CPU for a model without parameters)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: Data,
    *,
    batch_size: int = 512,
    loss_fn: LossFn | None = None,
    precision: Precision | None = None,
) -> tuple[float, float]:
    """Mean loss (per sample) and accuracy (NaN for non-classification targets) of ``model``
    in eval mode (its mode is restored). Under data parallelism (:mod:`hawq.data_parallel`)
    each rank evaluates its slices and the sums are all-reduced: every rank gets the result.
    ``precision``: forward passes under its autocast (the loss in float32) and memory format
    (a channels_last ``precision`` converts ``model`` in place)."""
    was = model.training
    model.eval()
    dev = model_device(model)
    precision = Precision() if precision is None else precision
    precision.model(model)
    rank, world_size = world()
    loss, correct, total, n = 0.0, 0, 0, 0
    classification = True
    try:
        for xb, yb in batches(
            data, batch_size, torch.Generator(), False, False, rank=rank, world_size=world_size
        ):
            if yb.shape[0] == 0:  # an empty slice of a small global batch
                continue
            xb, yb = precision.inputs(xb, dev), yb.to(dev)
            with precision.autocast(dev):
                out = model(xb)
            out = full_precision(out)
            if loss_fn is None:
                loss += F.cross_entropy(out, yb, reduction="sum").item()
            else:
                loss += float(loss_fn(out, yb)) * yb.shape[0]
            counts = count_correct(out, yb)
            classification = classification and counts is not None
            if counts is not None:
                correct, total = correct + counts[0], total + counts[1]
            n += yb.shape[0]
    finally:
        model.train(was)
    if world_size > 1:
        sums = all_reduce_sums([loss, correct, total, n, float(not classification)], dev)
        loss, correct, total, n = sums[0], round(sums[1]), round(sums[2]), round(sums[3])
        classification = sums[4] == 0
    if n == 0:
        raise ValueError("evaluation data is empty")
    return loss / n, correct / total if classification and total else math.nan


def wilson_interval(successes: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval of a proportion ``successes / n`` (default 95%):
    ``(p + z^2/2n -+ z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n)``; NaNs for n = 0 or NaN."""
    if n <= 0 or math.isnan(successes):
        return math.nan, math.nan
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)
