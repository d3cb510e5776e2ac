"""The training sections: float ``baseline`` training and QAT ``finetune`` (and its order).

Both convert to the ``hawq.qat_config.QATConfig`` of the one hawq training loop
(``baseline.to_hawq(...)``, ``finetune.to_hawq(...)``); ``finetune.order_to_hawq(...)`` ->
``hawq.order.OrderConfig``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from pipeline.config.allocation import AllocationSection
from pipeline.config.precision import PrecisionSection
from pipeline.config.strict import Section, check_number, check_positive

if TYPE_CHECKING:  # hawq (torch) loads only when a section converts
    from hawq import OrderConfig, QATConfig

# finetune.order -> hawq.order.OrderConfig.mode
ORDER_MODES = {"omega": "descending", "reverse": "reverse", "random": "random"}


@dataclass(frozen=True, kw_only=True)
class FinetuneSection(Section):
    """Multi-stage quantization-aware fine-tuning in Omega order (``hawq.qat.QATConfig``)."""

    epochs_per_stage: int = 1
    """QAT epochs per fine-tuning stage; 0 = quantize and calibrate only (PTQ)."""
    blocks_per_stage: int = 1
    """Blocks quantized together in one fine-tuning stage."""
    lr: float = 0.01
    """SGD learning rate at the start of each stage."""
    momentum: float = 0.9
    """SGD momentum."""
    weight_decay: float = 1e-4
    """SGD weight decay."""
    schedule: Literal["cosine", "constant", "step"] = "cosine"
    """Learning-rate schedule within a stage."""
    step_size: int = 1
    """Epochs per step of the 'step' schedule."""
    gamma: float = 0.1
    """Learning-rate factor per step of the 'step' schedule."""
    freeze_quantized: bool = True
    """Freeze the layers quantized in earlier stages."""
    loss: Literal["ce", "distill"] = "ce"
    """ce: the task loss (cross-entropy, or the top-level loss); distill: plus KL to the float
    model (classification only)."""
    temperature: float = 4.0
    """Distillation temperature."""
    alpha: float = 0.9
    """Weight of the distillation term (1 - alpha on the task loss)."""
    order: Literal["omega", "reverse", "random"] = "omega"
    """Fine-tuning order: descending Omega (HAWQ), its reverse, or random."""
    batch_size: int = 128
    """Training batch size."""
    checkpoint_every_steps: int = 0
    """Also save the fine-tuning state every N optimizer steps (0: at epoch ends only)."""
    batchnorm: Literal["sync", "frozen", "local"] = "sync"
    """BatchNorm in training: sync = global batch statistics (all-reduced over the
    data-parallel workers), frozen = running statistics, not updated, local = each worker's."""

    def check(self) -> None:
        check_positive("epochs_per_stage", self.epochs_per_stage, allow_zero=True)
        check_positive("checkpoint_every_steps", self.checkpoint_every_steps, allow_zero=True)
        for key in ("blocks_per_stage", "lr", "temperature", "batch_size"):
            check_positive(key, getattr(self, key))
        check_positive("step_size", self.step_size)
        check_positive("weight_decay", self.weight_decay, allow_zero=True)
        check_number("momentum", self.momentum, low=0, high=1, high_open=True)
        check_number("gamma", self.gamma, low=0, high=1, low_open=True)
        check_number("alpha", self.alpha, low=0, high=1)

    def to_hawq(
        self, *, seed: int, eval_batch_size: int, precision: PrecisionSection | None = None
    ) -> QATConfig:
        """The hawq ``QATConfig`` (``epochs_per_stage`` -> ``epochs``; seed: ``run.seed``;
        ``amp`` / ``channels_last``: the run's ``precision`` section)."""
        from hawq import QATConfig

        d = self.to_dict()
        d["epochs"] = max(1, d.pop("epochs_per_stage"))  # 0 runs no QAT at all
        for key in ("blocks_per_stage", "order", "checkpoint_every_steps"):
            del d[key]
        amp = (precision or PrecisionSection()).to_dict()
        return QATConfig(**d, **amp, seed=seed, eval_batch_size=eval_batch_size)

    def order_to_hawq(self, allocation: AllocationSection, *, seed: int) -> OrderConfig:
        """The hawq ``OrderConfig`` of the fine-tuning order (Omega as the allocation sees it)."""
        from hawq import OrderConfig

        return OrderConfig(
            mode=ORDER_MODES[self.order],
            blocks_per_stage=self.blocks_per_stage,
            seed=seed,
            sensitivity=allocation.sensitivity,
            per_channel=allocation.per_channel,
            percentile=allocation.percentile,
            clip_bits=allocation.clip_bits,
            mse_clip=allocation.mse_clip,
        )


@dataclass(frozen=True, kw_only=True)
class BaselineSection(Section):
    """Float baseline: use the checkpoint as is (train_epochs: 0) or train from scratch."""

    train_epochs: int = 0
    """Epochs of float training from scratch; 0 = use model.checkpoint (or the init) as is."""
    lr: float = 0.1
    """SGD learning rate."""
    momentum: float = 0.9
    """SGD momentum."""
    weight_decay: float = 5e-4
    """SGD weight decay."""
    batch_size: int = 128
    """Training batch size."""
    schedule: Literal["cosine", "constant", "step"] = "cosine"
    """Learning-rate schedule ('step' divides by 10 every third of the epochs)."""
    batchnorm: Literal["sync", "frozen", "local"] = "sync"
    """BatchNorm in training (as finetune.batchnorm)."""

    def check(self) -> None:
        check_positive("train_epochs", self.train_epochs, allow_zero=True)
        for key in ("lr", "batch_size"):
            check_positive(key, getattr(self, key))
        check_positive("weight_decay", self.weight_decay, allow_zero=True)
        check_number("momentum", self.momentum, low=0, high=1, high_open=True)

    def to_hawq(
        self, *, seed: int, eval_batch_size: int, precision: PrecisionSection | None = None
    ) -> QATConfig:
        """The hawq ``QATConfig`` that ``hawq.qat.train_float`` trains the float model with
        (``amp`` / ``channels_last``: the run's ``precision`` section).

        ``train_epochs: 0`` trains nothing (the stage does not call it; ``epochs`` is then 1).
        The ``step`` schedule divides the LR by 10 every third of the epochs.
        """
        from hawq import QATConfig

        return QATConfig(
            epochs=max(1, self.train_epochs),
            lr=self.lr,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            batch_size=self.batch_size,
            schedule=self.schedule,
            batchnorm=self.batchnorm,
            step_size=max(1, self.train_epochs // 3),
            seed=seed,
            eval_batch_size=eval_batch_size,
            **(precision or PrecisionSection()).to_dict(),
        )
