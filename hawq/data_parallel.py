"""Data parallelism of the one training loop over an initialised ``torch.distributed`` group.

When ``torch.distributed`` is initialised with world size ``W > 1``, every rank running
``run_qat`` / ``train_float`` / ``evaluate`` on the same model trains it data-parallel, and the
result equals the single-process one at the same global batch (up to summation order):

- every rank draws the same global order from ``(seed, epoch)`` and keeps the contiguous slice
  ``[r b // W, (r + 1) b // W)`` of each global batch of ``b`` samples (:func:`rank_slice`);
- each rank back-propagates ``(b_r / b) L_r`` (its mean loss over its ``b_r`` samples, ``b``
  all-reduced first), so the sum over the ranks of the gradients, one all-reduce per step
  (:func:`reduce_step`), is the gradient of the global batch mean ``L`` for any split (uneven
  and empty slices included, and through synchronised BatchNorm statistics); the step's loss /
  accuracy counts ride along, so every rank holds the global running sums;
- the fake-quant activation observers all-reduce each batch's (min, max) before their EMA update
  (:func:`sync_min_max`), so the quantizer ranges are those of the global batch;
- BatchNorm (:func:`batchnorm_mode`): ``sync`` normalises with the global batch statistics
  (differentiable all-reduces of the per-channel sums; plain BatchNorm at ``W = 1``),
  ``frozen`` normalises with the running statistics and does not update them (any ``W``; the
  affine weights still train), ``local`` uses each rank's slice (world-size dependent; rank 0's
  buffers are broadcast after every step, as DDP does);
- evaluation is sharded the same way and its sums all-reduced (:func:`all_reduce_sums`).

Every rank must make the same calls in the same order (collectives inside).
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

BATCHNORM_MODES = ("sync", "frozen", "local")

__all__ = [
    "BATCHNORM_MODES",
    "all_reduce_sums",
    "batchnorm_mode",
    "broadcast_buffers",
    "rank_slice",
    "reduce_step",
    "sync_min_max",
    "world",
]


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialised default process group, else ``(0, 1)``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rank_slice(n: int, rank: int, world_size: int) -> slice:
    """Rank ``rank``'s contiguous share ``[rank n // W, (rank + 1) n // W)`` of ``n`` items."""
    return slice(rank * n // world_size, (rank + 1) * n // world_size)


def sync_min_max(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The global (min, max) over the ranks (one all-reduce); unchanged at ``W = 1``."""
    if world()[1] == 1:
        return lo, hi
    both = torch.stack([-lo, hi])
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    return -both[0], both[1]


def all_reduce_sums(values: Sequence[float], device: torch.device | None) -> list[float]:
    """Element-wise sums over the ranks of float64 ``values`` (unchanged at ``W = 1``)."""
    if world()[1] == 1:
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def reduce_step(params: Sequence[torch.Tensor], stats: Sequence[float]) -> list[float]:
    """Sum the parameters' gradients over the ranks in place; return ``stats`` summed too.

    One all-reduce per gradient dtype and one (float64) for the ``stats`` and which parameters
    have a gradient: a parameter keeps a ``None`` gradient only when no rank produced one, as
    a single process would (SGD then skips it).
    """
    params = list(params)
    head = torch.tensor(
        [*stats, *(float(p.grad is not None) for p in params)],
        dtype=torch.float64,
        device=params[0].device if params else None,
    )
    dist.all_reduce(head)
    sums = head.tolist()
    groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for p, has in zip(params, sums[len(stats) :], strict=True):
        if has:
            groups.setdefault((p.dtype, p.device), []).append(p)
        else:
            p.grad = None
    for ps in groups.values():
        flat = torch.cat(
            [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in ps]
        )
        dist.all_reduce(flat)
        offset = 0
        for p in ps:
            p.grad = flat[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
    return sums[: len(stats)]


def broadcast_buffers(model: nn.Module) -> None:
    """Rank 0's BatchNorm buffers to every rank (``local`` BatchNorm after a step)."""
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            for buf in m.buffers(recurse=False):
                dist.broadcast(buf, src=0)


class _SumOverRanks(torch.autograd.Function):
    """``y = sum_r x_r`` on every rank; its backward is the same sum of the incoming gradients
    (each rank's loss depends on every rank's ``x``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        y = x.clone()
        dist.all_reduce(y)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        g = grad.clone()
        dist.all_reduce(g)
        return g


def _sum_all(t: torch.Tensor) -> torch.Tensor:
    """Differentiable sum over the ranks."""
    return _SumOverRanks.apply(t)


def _sync_forward(self: _BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """BatchNorm with the global batch's per-channel mean and (biased) variance (computed in
    float32 for a float16 / bfloat16 ``x``, an autocast activation; returned in its dtype)."""
    if not (self.training or self.running_mean is None):
        return type(self).forward(self, x)
    if x.dtype in (torch.float16, torch.bfloat16):
        return _sync_forward(self, x.float()).to(x.dtype)
    dims = [0, *range(2, x.dim())]
    shape = [1, -1] + [1] * (x.dim() - 2)
    count = x.new_tensor([x.numel() // max(1, x.shape[1])], dtype=torch.float64)
    sums = _sum_all(torch.cat([x.sum(dims).double(), count]))
    n = sums[-1]
    mean = (sums[:-1] / n).to(x.dtype)
    centred = x - mean.view(shape)
    var = (_sum_all(centred.pow(2).sum(dims).double()) / n).to(x.dtype)
    if self.training and self.track_running_stats:
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            f = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
            unbiased = var * (n / max(1.0, float(n) - 1.0)).to(x.dtype)
            self.running_mean.mul_(1 - f).add_(mean.detach(), alpha=f)
            self.running_var.mul_(1 - f).add_(unbiased.detach(), alpha=f)
    y = centred * torch.rsqrt(var + self.eps).view(shape)
    if self.affine:
        y = y * self.weight.view(shape) + self.bias.view(shape)
    return y


def _frozen_forward(self: _BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """BatchNorm with the running statistics, which stay as they are (eval-mode arithmetic)."""
    if self.running_mean is None:
        return type(self).forward(self, x)
    return F.batch_norm(
        x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
    )


@contextlib.contextmanager
def batchnorm_mode(model: nn.Module, mode: str) -> Iterator[None]:
    """Inside, the model's BatchNorm layers follow ``mode`` (see the module docstring).

    ``sync`` at ``W = 1`` and ``local`` leave the layers untouched; otherwise each layer's
    ``forward`` is overridden on the instance and restored on exit (state dicts are unchanged).
    """
    if mode not in BATCHNORM_MODES:
        raise ValueError(f"batchnorm must be one of {BATCHNORM_MODES}, got {mode!r}")
    forward = {"sync": _sync_forward, "frozen": _frozen_forward}.get(mode)
    if forward is None or (mode == "sync" and world()[1] == 1):
        yield
        return
    layers = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    for m in layers:
        m.forward = types.MethodType(forward, m)  # type: ignore[method-assign]
    try:
        yield
    finally:
        for m in layers:
            m.__dict__.pop("forward", None)
