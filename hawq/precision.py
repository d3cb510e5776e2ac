"""Numeric precision of training and evaluation: autocast (AMP), channels_last, exact float32.

:class:`Precision` is what the training loop and ``evaluate`` run under:

- ``amp``: ``none`` (float32), ``bf16`` (CPU or CUDA) or ``fp16`` (CUDA only, with a
  ``GradScaler``: the loss is multiplied by the scale ``S`` before backward, the gradients
  divided by ``S`` before the step, the step skipped and ``S`` halved when a gradient is not
  finite, ``S`` doubled after 2000 finite steps). Forward passes run under ``torch.autocast``;
  the loss is computed in float32 on the float32-cast output; the parameters, gradients,
  optimizer state and BatchNorm statistics stay float32. The fake quantizers compute scales,
  codes and rounding in float32 whatever the autocast state (:func:`quantizer_float32`), so the
  integer codes of a given input do not depend on AMP.
- ``channels_last``: 4-D parameters and inputs in NHWC memory (``torch.channels_last``); the
  same values as NCHW up to the convolution kernels' summation order.

:func:`exact_float32` is the opposite, for the Hessian: autocast off and TF32 off (CUDA
matmuls and cuDNN convolutions in IEEE float32), so HVPs stay in float32 / float64.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

AMP_MODES = ("none", "bf16", "fp16")
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
REDUCED_DTYPES = (torch.float16, torch.bfloat16)
AUTOCAST_DEVICES = ("cpu", "cuda")

__all__ = [
    "AMP_MODES",
    "Precision",
    "exact_float32",
    "full_precision",
    "quantizer_float32",
]

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")


@dataclass(frozen=True, kw_only=True)
class Precision:
    """Autocast dtype and memory format of forward passes (see the module docstring)."""

    amp: str = "none"  # "none" | "bf16" | "fp16"
    channels_last: bool = False

    def __post_init__(self) -> None:
        if self.amp not in AMP_MODES:
            raise ValueError(f"amp must be one of {AMP_MODES}, got {self.amp!r}")
        if not isinstance(self.channels_last, bool):
            raise ValueError(f"channels_last must be a bool, got {self.channels_last!r}")

    @property
    def enabled(self) -> bool:
        """Whether anything differs from plain float32 NCHW."""
        return self.amp != "none" or self.channels_last

    def check_device(self, device: torch.device) -> None:
        """``ValueError`` when ``amp`` cannot run on ``device`` (fp16 needs CUDA)."""
        if self.amp == "fp16" and device.type != "cuda":
            raise ValueError(
                f"amp 'fp16' needs a CUDA device (the model is on {device.type}); "
                "use 'bf16' (CPU and CUDA) or 'none'"
            )

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        """``torch.autocast`` of ``device`` at the ``amp`` dtype (a no-op for ``none``)."""
        if self.amp == "none":
            return contextlib.nullcontext()
        self.check_device(device)
        return torch.autocast(device.type, dtype=AMP_DTYPES[self.amp])

    def grad_scaler(self, device: torch.device) -> torch.amp.GradScaler | None:
        """A fresh ``GradScaler`` for ``fp16`` (default growth/backoff), else None."""
        if self.amp != "fp16":
            return None
        self.check_device(device)
        return torch.amp.GradScaler(device.type)

    def model(self, model: nn.Module) -> nn.Module:
        """``model`` with its 4-D parameters and buffers in channels_last (in place)."""
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        return model

    def inputs(self, x: torch.Tensor, device: torch.device) -> torch.Tensor:
        """``x`` on ``device`` (channels_last when asked and 4-D)."""
        if self.channels_last and x.dim() == 4:
            return x.to(device, memory_format=torch.channels_last)
        return x.to(device)


def full_precision(t: T) -> T:
    """``t`` in float32 when it is a float16 / bfloat16 tensor (an autocast output), else as is
    (float64 stays float64)."""
    if isinstance(t, torch.Tensor) and t.dtype in REDUCED_DTYPES:
        return t.float()  # type: ignore[return-value]
    return t


def quantizer_float32(fn: F) -> F:
    """Run a quantizer ``fn(x, ...)`` in float32: autocast off, a float16/bfloat16 ``x`` cast to
    float32 (differentiably) and a tensor result cast back to ``x``'s dtype. float32/float64
    inputs outside autocast take the direct path (no cast, no context)."""

    @functools.wraps(fn)
    def wrapper(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        dev = x.device.type
        reduced = x.dtype in REDUCED_DTYPES
        autocast = dev in AUTOCAST_DEVICES and torch.is_autocast_enabled(dev)
        if not reduced and not autocast:
            return fn(x, *args, **kwargs)
        off = torch.autocast(dev, enabled=False) if autocast else contextlib.nullcontext()
        with off:
            out = fn(x.float() if reduced else x, *args, **kwargs)
        if reduced and isinstance(out, torch.Tensor) and out.is_floating_point():
            return out.to(x.dtype)
        return out

    return wrapper  # type: ignore[return-value]


_TF32_FLAGS = (torch.backends.cuda.matmul, torch.backends.cudnn.conv)


@contextlib.contextmanager
def exact_float32(device: torch.device) -> Iterator[None]:
    """Inside: no autocast on ``device`` and, on CUDA, IEEE float32 matmuls and convolutions
    (TF32 off; the process-wide flags are restored on exit)."""
    autocast = device.type in AUTOCAST_DEVICES
    with torch.autocast(device.type, enabled=False) if autocast else contextlib.nullcontext():
        if device.type != "cuda":
            yield
            return
        before = [flags.fp32_precision for flags in _TF32_FLAGS]
        for flags in _TF32_FLAGS:
            flags.fp32_precision = "ieee"
        try:
            yield
        finally:
            for flags, value in zip(_TF32_FLAGS, before, strict=True):
                flags.fp32_precision = value
