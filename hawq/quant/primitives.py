"""Quantizer primitives: pure functions of tensors, tested bit-exactly against their formulas.

Weights (symmetric, signed, per output channel or per tensor), for ``b`` in 2..8::

    qmax  = 2^(b-1) - 1                   levels -qmax..qmax (no -2^(b-1): symmetric)
    r     = max|w|            (default: max-scaling, nothing clipped), or with clipping
            the p-th percentile of |w|, or c* max|w| with the MSE-optimal ratio
            c* = argmin_{c in grid} ||Q_{c max|w|}(w) - w||^2 (per channel; ``mse_clip``);
            ``clip_bits`` limits clipping to widths b <= clip_bits (e.g. 2: only 2-bit layers)
    s     = r / qmax          (s = 1 where r = 0, so an all-zero channel stays zero)
    q     = clamp(round(w / s), -qmax, qmax)       w_hat = q * s

Activations (asymmetric, unsigned codes; a range [lo, hi] widened to contain 0)::

    n  = 2^b - 1     s = (hi - lo) / n     z = clamp(round(-lo / s), 0, n)
    q  = clamp(round(x / s) + z, 0, n)     x_hat = (q - z) * s

``round`` is ``torch.round`` (half to even). ``bits == 32`` means float: the identity.
Gradients use the straight-through estimator: d x_hat / d x = 1 where the unrounded code
``x / s + z`` lies inside ``[qmin, qmax]`` (i.e. ``x / s`` in ``[qmin - z, qmax - z]``) and 0
outside (clipped values get no gradient). Weights scaled by max|w| clip nothing, so their
gradient is the identity everywhere. Scales and ranges are constants (no gradient).
"""

from __future__ import annotations

import torch

from hawq.precision import quantizer_float32
from hawq.validation import (
    FLOAT_BITS,
    check_bits,
    check_clip_bits,
    check_number,
    check_percentile,
)

# Clip ratios searched by ``mse_clip_ratios``: 1.00, 0.99, ..., 0.30 (descending: ties keep
# the largest ratio, so a channel that clipping cannot help stays max-scaled).
MSE_CLIP_GRID: tuple[float, ...] = tuple(k / 100 for k in range(100, 29, -1))
# The weight-clipping keyword arguments of ``quantize_weight`` / ``weight_scale``.
CLIP_KEYS = ("percentile", "clip_bits", "mse_clip")

__all__ = [
    "CLIP_KEYS",
    "MSE_CLIP_GRID",
    "act_qparams",
    "clip_range",
    "clips_at",
    "ema_update",
    "fake_quantize",
    "mse_clip_ratios",
    "quantize_act",
    "quantize_weight",
    "quantize_weight_int",
    "weight_range",
    "weight_scale",
]


def _quantile_lastdim(a: torch.Tensor, q: float) -> torch.Tensor:
    """Quantile along the last dim, linear interpolation (numpy's default ``linear`` method)."""
    n = a.shape[-1]
    srt = torch.sort(a, dim=-1).values
    pos = q * (n - 1)
    lo = int(pos)
    hi = min(lo + 1, n - 1)
    frac = pos - lo
    if frac == 0.0:
        return srt[..., lo]
    return srt[..., lo] + (srt[..., hi] - srt[..., lo]) * frac


def weight_range(
    w: torch.Tensor, *, per_channel: bool = True, percentile: float | None = None
) -> torch.Tensor:
    """Clipping range r: max|w| (or its ``percentile``), shape (C_out,) per channel, else ()."""
    check_percentile("percentile", percentile)
    a = w.detach().abs()
    a = a.reshape(a.shape[0], -1) if per_channel and a.dim() > 1 else a.reshape(-1)
    if percentile is None or percentile == 100.0:
        return a.amax(dim=-1)
    return _quantile_lastdim(a, float(percentile) / 100.0)


def _rows(w: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """``w`` as (C_out, -1) per channel, else (1, -1)."""
    return w.reshape(w.shape[0], -1) if per_channel and w.dim() > 1 else w.reshape(1, -1)


def mse_clip_ratios(
    w: torch.Tensor,
    bits: int,
    *,
    per_channel: bool = True,
    grid: tuple[float, ...] = MSE_CLIP_GRID,
) -> torch.Tensor:
    """Per channel, the ratio c in ``grid`` minimising ``||Q(w; r = c max|w|) - w||^2``.

    Q is the symmetric ``bits``-bit quantizer with range r (s = r / qmax, values clamped to
    +-qmax). Errors are summed in float64; ties go to the earlier grid entry. Shape (C_out,)
    per channel, else (). Pure function (no gradient).
    """
    bits = check_bits("bits", bits)
    if bits == FLOAT_BITS:
        raise ValueError("bits=32 is float: there is nothing to clip")
    if not grid or any(not 0 < c <= 1 for c in grid):
        raise ValueError(f"grid must be non-empty ratios in (0, 1], got {grid!r}")
    qmax = 2 ** (bits - 1) - 1
    a = _rows(w.detach(), per_channel)
    m = a.abs().amax(dim=-1)
    c = torch.tensor(grid, dtype=a.dtype, device=a.device)[:, None]  # (G, 1)
    r = m[None, :] * c  # (G, C): the same float products as max|w| * ratio in clip_range
    s = torch.where(r > 0, r / qmax, torch.ones_like(r))[..., None]  # (G, C, 1)
    q = torch.clamp(torch.round(a[None] / s), -qmax, qmax) * s  # all grid points at once
    err = ((q.to(torch.float64) - a.to(torch.float64)[None]) ** 2).sum(dim=-1)  # (G, C)
    best = torch.argmin(err, dim=0)  # first minimum: the larger ratio
    ratios = torch.tensor(grid, dtype=w.dtype, device=w.device)[best]
    return ratios if per_channel and w.dim() > 1 else ratios.reshape(())


def clips_at(
    bits: int, *, percentile: float | None = None, clip_bits: int | None = None, mse_clip=False
) -> bool:
    """Whether a ``bits``-bit weight is clipped (percentile < 100 or MSE, at bits <= clip_bits)."""
    if clip_bits is not None and bits > clip_bits:
        return False
    return bool(mse_clip) or (percentile is not None and percentile != 100.0)


def clip_range(
    w: torch.Tensor,
    bits: int,
    *,
    per_channel: bool = True,
    percentile: float | None = None,
    clip_bits: int | None = None,
    mse_clip: bool = False,
) -> torch.Tensor:
    """The range r of the ``bits``-bit weight quantizer: max|w| unless ``clips_at`` says to
    clip, then the ``percentile`` of |w| or ``max|w| * mse_clip_ratios(w, bits)``."""
    check_percentile("percentile", percentile)
    check_clip_bits("clip_bits", clip_bits)
    if mse_clip and percentile is not None:
        raise ValueError("give either percentile or mse_clip, not both")
    kw = {"percentile": percentile, "clip_bits": clip_bits, "mse_clip": mse_clip}
    if not clips_at(bits, **kw):
        return weight_range(w, per_channel=per_channel)
    if mse_clip:
        ratios = mse_clip_ratios(w, bits, per_channel=per_channel)
        return weight_range(w, per_channel=per_channel) * ratios
    return weight_range(w, per_channel=per_channel, percentile=percentile)


@quantizer_float32
def weight_scale(
    w: torch.Tensor,
    bits: int,
    *,
    per_channel: bool = True,
    percentile: float | None = None,
    clip_bits: int | None = None,
    mse_clip: bool = False,
) -> torch.Tensor:
    """Scale s = r / (2^(b-1) - 1) (1 where r = 0; r from ``clip_range``); (C_out,) or ()."""
    bits = check_bits("bits", bits)
    if bits == FLOAT_BITS:
        raise ValueError("bits=32 is float: there is no scale")
    r = clip_range(
        w,
        bits,
        per_channel=per_channel,
        percentile=percentile,
        clip_bits=clip_bits,
        mse_clip=mse_clip,
    )
    qmax = 2 ** (bits - 1) - 1
    return torch.where(r > 0, r / qmax, torch.ones_like(r))


def _broadcast(scale: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if scale.dim() == 0:
        return scale
    return scale.reshape(-1, *([1] * (like.dim() - 1)))


class _FakeQuantSTE(torch.autograd.Function):
    """x_hat = clamp(round(x / s), lo, hi) * s with integer bounds lo = qmin - z, hi = qmax - z.

    Same as ``(clamp(round(x/s) + z, qmin, qmax) - z) * s`` (z integer; round and clamp commute
    for integer bounds). Five passes: divide, clamp, compare (STE mask), round, multiply.
    """

    @staticmethod
    def forward(ctx, x, scale, lo, hi):  # type: ignore[override]
        v = x / scale
        if lo is None:  # nothing can be clipped: identity gradient, no mask
            ctx.save_for_backward(None)
            return v.round_().mul_(scale)
        c = torch.clamp(v, lo, hi)
        ctx.save_for_backward(torch.eq(c, v) if ctx.needs_input_grad[0] else None)
        del v
        return c.round_().mul_(scale)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (mask,) = ctx.saved_tensors
        if mask is None:
            return grad, None, None, None
        return torch.where(mask, grad, 0.0), None, None, None


@quantizer_float32
def fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    qmin: int,
    qmax: int,
) -> torch.Tensor:
    """``(clamp(round(x/s) + z, qmin, qmax) - z) * s`` for broadcastable ``scale``/``zero_point``
    (z integer-valued; None = 0). STE gradient: 1 where ``qmin <= x/s + z <= qmax``, else 0."""
    scale = scale.detach()
    z = 0 if zero_point is None else zero_point.detach().to(scale.dtype)
    if scale.dim() == 0 and scale.device.type == "cpu":
        # CPU: Python scalars take TensorIterator's fast path (~4x faster than 0-dim
        # tensors for the divide and clamp); float32 values convert exactly
        s, z = float(scale), float(z)
        return _FakeQuantSTE.apply(x, s, qmin - z, qmax - z)
    return _FakeQuantSTE.apply(x, scale, qmin - z, qmax - z)


@quantizer_float32
def quantize_weight(
    w: torch.Tensor,
    bits: int,
    *,
    per_channel: bool = True,
    percentile: float | None = None,
    clip_bits: int | None = None,
    mse_clip: bool = False,
) -> torch.Tensor:
    """Fake-quantized weight ``q * s`` (same shape and dtype; STE gradient; bits 32 = identity)."""
    bits = check_bits("bits", bits)
    if bits == FLOAT_BITS:
        check_percentile("percentile", percentile)
        return w
    qmax = 2 ** (bits - 1) - 1
    kw = {"percentile": percentile, "clip_bits": clip_bits, "mse_clip": mse_clip}
    s = _broadcast(weight_scale(w, bits, per_channel=per_channel, **kw), w)
    if not clips_at(bits, **kw):
        # |w| <= r = qmax * s, so |w / s| rounds to <= qmax: no clamp, and no weight is
        # clipped (a clamp could zero the gradient of max|w| when w / s = qmax + 1 ulp)
        return _FakeQuantSTE.apply(w, s.detach(), None, None)
    return fake_quantize(w, s, None, -qmax, qmax)


@quantizer_float32
def quantize_weight_int(
    w: torch.Tensor,
    bits: int,
    *,
    per_channel: bool = True,
    percentile: float | None = None,
    clip_bits: int | None = None,
    mse_clip: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer codes (int8, in -(2^(b-1)-1)..2^(b-1)-1) and scales: ``w_hat = codes * s``."""
    bits = check_bits("bits", bits)
    if bits == FLOAT_BITS:
        raise ValueError("bits=32 is float: there are no integer codes")
    qmax = 2 ** (bits - 1) - 1
    kw = {"percentile": percentile, "clip_bits": clip_bits, "mse_clip": mse_clip}
    s = weight_scale(w, bits, per_channel=per_channel, **kw)
    with torch.no_grad():
        q = torch.round(w.detach() / _broadcast(s, w)).clamp_(-qmax, qmax)
    return q.to(torch.int8), s


def act_qparams(
    lo: torch.Tensor | float, hi: torch.Tensor | float, bits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of unsigned ``bits``-bit codes for the range [min(lo,0), max(hi,0)].

    s = (hi - lo) / (2^b - 1) (1 for an empty range), z = clamp(round(-lo / s), 0, 2^b - 1).
    Both are returned as float tensors (z holds an integer value).
    """
    bits = check_bits("bits", bits)
    if bits == FLOAT_BITS:
        raise ValueError("bits=32 is float: there are no quantization parameters")
    lo_t = torch.as_tensor(lo, dtype=torch.float32).clamp(max=0.0)
    hi_t = torch.as_tensor(hi, dtype=torch.float32).clamp(min=0.0)
    n = 2**bits - 1
    width = hi_t - lo_t
    scale = torch.where(width > 0, width / n, torch.ones_like(width))
    zero_point = torch.round(-lo_t / scale).clamp(0, n)
    return scale, zero_point


@quantizer_float32
def quantize_act(
    x: torch.Tensor, lo: torch.Tensor | float, hi: torch.Tensor | float, bits: int
) -> torch.Tensor:
    """Fake-quantize activations to unsigned ``bits``-bit codes over [lo, hi] (STE gradient)."""
    bits = check_bits("bits", bits)
    if bits == FLOAT_BITS:
        return x
    scale, zp = act_qparams(lo, hi, bits)
    return fake_quantize(x, scale.to(x.device), zp.to(x.device), 0, 2**bits - 1)


def ema_update(running: torch.Tensor, observed: torch.Tensor, momentum: float) -> torch.Tensor:
    """Exponential moving average: ``momentum * running + (1 - momentum) * observed``."""
    check_number("momentum", momentum, low=0, high=1, high_open=True)
    return running * momentum + observed * (1.0 - momentum)
