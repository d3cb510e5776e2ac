"""The settings of the QAT loop (:mod:`hawq.qat`): ``QATConfig`` and its learning-rate schedule.

Per-epoch LR within a stage (e = 0..E-1): cosine ``lr * (1 + cos(pi e / E)) / 2``; step
``lr * gamma^(e // step_size)``; constant ``lr``. ``loss``, ``temperature`` and ``alpha`` choose
the task loss or distillation, ``batchnorm`` the data-parallel BatchNorm mode
(:mod:`hawq.data_parallel`), ``amp`` / ``channels_last`` the :class:`hawq.precision.Precision`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from hawq.data_parallel import BATCHNORM_MODES
from hawq.precision import AMP_MODES, Precision
from hawq.validation import check_int, check_number, check_seed

__all__ = ["QATConfig"]


@dataclass(frozen=True, kw_only=True)
class QATConfig:
    """Hyper-parameters of block-wise QAT (SGD with momentum)."""

    epochs: int = 1  # per stage, >= 1
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 128
    eval_batch_size: int = 512
    drop_last: bool = False
    schedule: str = "cosine"  # "cosine" | "step" | "constant"
    step_size: int = 1  # epochs per step of the "step" schedule
    gamma: float = 0.1
    freeze_quantized: bool = True
    loss: str = "ce"  # "ce" | "distill"
    temperature: float = 4.0
    alpha: float = 0.9
    seed: int = 0
    batchnorm: str = "sync"  # "sync" | "frozen" | "local" (hawq.data_parallel.batchnorm_mode)
    amp: str = "none"  # "none" | "bf16" | "fp16" (CUDA only): autocast of forward passes
    channels_last: bool = False  # 4-D parameters and inputs in channels_last memory

    def __post_init__(self) -> None:
        check_int("epochs", self.epochs, low=1)
        check_number("lr", self.lr, low=0, low_open=True)
        check_number("momentum", self.momentum, low=0, high=1, high_open=True)
        check_number("weight_decay", self.weight_decay, low=0)
        check_int("batch_size", self.batch_size, low=1)
        check_int("eval_batch_size", self.eval_batch_size, low=1)
        check_int("step_size", self.step_size, low=1)
        check_number("gamma", self.gamma, low=0, high=1, low_open=True)
        check_number("temperature", self.temperature, low=0, low_open=True)
        check_number("alpha", self.alpha, low=0, high=1)
        check_seed("seed", self.seed)
        for name in ("drop_last", "freeze_quantized", "channels_last"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.schedule not in ("cosine", "step", "constant"):
            raise ValueError(
                f"schedule must be 'cosine', 'step' or 'constant', got {self.schedule!r}"
            )
        if self.loss not in ("ce", "distill"):
            raise ValueError(f"loss must be 'ce' or 'distill', got {self.loss!r}")
        if self.batchnorm not in BATCHNORM_MODES:
            raise ValueError(f"batchnorm must be one of {BATCHNORM_MODES}, got {self.batchnorm!r}")
        if self.amp not in AMP_MODES:
            raise ValueError(f"amp must be one of {AMP_MODES}, got {self.amp!r}")

    @property
    def precision(self) -> Precision:
        """The :class:`hawq.precision.Precision` of training and evaluation."""
        return Precision(amp=self.amp, channels_last=self.channels_last)

    def lr_at(self, epoch: int) -> float:
        """Learning rate of epoch ``epoch`` (0-based) within a stage."""
        if self.schedule == "cosine":
            return self.lr * 0.5 * (1.0 + math.cos(math.pi * epoch / self.epochs))
        if self.schedule == "step":
            return self.lr * self.gamma ** (epoch // self.step_size)
        return self.lr

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> QATConfig:
        valid = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - valid)
        if unknown:
            raise ValueError(f"unknown QAT config keys {unknown}; valid keys: {sorted(valid)}")
        return cls(**dict(d))
