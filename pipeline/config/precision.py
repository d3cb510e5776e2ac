"""The ``precision`` section: mixed precision and memory format of baseline, finetune, evaluate."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from pipeline.config.distributed import DistributedSection
from pipeline.config.strict import ConfigError, Section

if TYPE_CHECKING:
    from hawq.precision import Precision

FP16_FIX = "Fix: use precision.amp: bf16 (CPU and CUDA) or none"


@dataclass(frozen=True, kw_only=True)
class PrecisionSection(Section):
    """Mixed precision (autocast) and channels_last of training and evaluation.

    Applies to the forward passes of baseline training, fine-tuning and evaluation
    (``hawq.precision.Precision``). Parameters, gradients, optimizer state, losses and the fake
    quantizers' scales and rounding stay float32; the Hessian stage ignores this section (it
    runs in hessian.dtype, without autocast or TF32).
    """

    amp: Literal["none", "bf16", "fp16"] = "none"
    """Autocast dtype: none = float32; bf16 = bfloat16 (CPU or CUDA); fp16 = float16 with a
    gradient scaler (CUDA only: run.device cuda/auto with a GPU, and GPU workers)."""
    channels_last: bool = False
    """4-D parameters and inputs in channels_last (NHWC) memory: faster convolutions on GPUs."""

    def to_hawq(self) -> Precision:
        """The hawq ``Precision``."""
        from hawq.precision import Precision

        return Precision(amp=self.amp, channels_last=self.channels_last)

    def stage_params(self) -> dict[str, object]:
        """The section as stage-key settings when it changes anything (``{}`` at the defaults,
        so the keys of runs without it stay as they were)."""
        if self.amp == "none" and not self.channels_last:
            return {}
        return {"precision.amp": self.amp, "precision.channels_last": self.channels_last}

    def check_devices(self, device: str, workers: DistributedSection) -> None:
        """fp16 needs CUDA wherever training and evaluation run: ``run.device`` (``auto`` is
        checked when the run starts, :func:`check_device`) and the data-parallel workers."""
        if self.amp != "fp16":
            return
        if device == "cpu":
            raise ConfigError(
                "precision.amp", f"'fp16' needs CUDA but run.device is 'cpu'. {FP16_FIX}"
            )
        if workers.world_size > 1 and workers.gpus_per_worker == 0:
            raise ConfigError(
                "precision.amp",
                "'fp16' needs CUDA but the data-parallel workers run on CPUs (distributed."
                f"gpus_per_worker: 0). {FP16_FIX}, or set distributed.gpus_per_worker",
            )

    def check_device(self, device_type: str, *, bf16_supported: bool = True) -> None:
        """The resolved ``run.device`` (``auto``) can run ``amp``: fp16 needs CUDA; bf16 on a
        GPU without bfloat16 support (before Ampere) fails too."""
        if self.amp == "fp16" and device_type != "cuda":
            raise ConfigError(
                "precision.amp",
                f"'fp16' needs CUDA but run.device 'auto' found none here. {FP16_FIX}",
            )
        if self.amp == "bf16" and device_type == "cuda" and not bf16_supported:
            raise ConfigError(
                "precision.amp",
                "'bf16' needs a GPU with bfloat16 support (Ampere or newer). "
                "Fix: use precision.amp: fp16 or none",
            )
