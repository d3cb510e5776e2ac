"""The whole run config: :class:`RunConfig`, one field per section, and the cross-section rules.

YAML is a strict serialization of :class:`RunConfig`; see ``pipeline.config.loading`` for
loading. Each section validates itself in ``__post_init__`` (via
:class:`pipeline.config.strict.Section`) and :class:`RunConfig` checks the rules that span
sections (model vs data shapes, trace vs sensitivity, shards vs Hessian batches). Each section
that configures a hawq component converts itself with a typed method (``to_hawq`` and friends):
the one place where pipeline settings become hawq configs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.config.allocation import AllocationSection
from pipeline.config.distributed import DistributedSection
from pipeline.config.hessian import BackendSection, HessianSection
from pipeline.config.inputs import DataConfig, ModelConfig, RunSection, check_import_path
from pipeline.config.precision import PrecisionSection
from pipeline.config.strict import Section, fail
from pipeline.config.training import BaselineSection, FinetuneSection


@dataclass(frozen=True, kw_only=True)
class RunConfig(Section):
    """The whole pipeline config; YAML top-level keys are these field names."""

    run: RunSection = field(default_factory=RunSection)
    """Identity and placement of the run."""
    model: ModelConfig
    """The network (required)."""
    data: DataConfig
    """The data (required)."""
    loss: str | None = None
    """Your 'package.module:function' (output, target) -> mean loss, for tasks other than
    classification; null = cross-entropy on logits."""
    baseline: BaselineSection = field(default_factory=BaselineSection)
    """The float model: checkpoint or training."""
    hessian: HessianSection = field(default_factory=HessianSection)
    """Per-block Hessian sensitivity."""
    allocation: AllocationSection
    """Bit allocation (required: it carries the size target)."""
    finetune: FinetuneSection = field(default_factory=FinetuneSection)
    """Quantization-aware fine-tuning."""
    backend: BackendSection = field(default_factory=BackendSection)
    """Where the Hessian stage runs."""
    distributed: DistributedSection = field(default_factory=DistributedSection)
    """Data-parallel baseline training, fine-tuning and evaluation."""
    precision: PrecisionSection = field(default_factory=PrecisionSection)
    """Mixed precision (AMP) and channels_last of training and evaluation."""

    def check(self) -> None:
        if self.loss is not None:
            check_import_path("loss", self.loss, "your loss function")
            if self.finetune.loss == "distill":
                fail("finetune.loss", "'distill' needs classification logits; use 'ce' with loss")
        shape = self.data.shape()
        if shape is not None:
            channels, side, classes = shape
            what = f"data '{self.data.label}'"
            if self.model.in_channels != channels:
                fail("model.in_channels", f"{self.model.in_channels} but {what} has {channels}")
            if self.model.num_classes != classes:
                fail("model.num_classes", f"{self.model.num_classes} but {what} has {classes}")
            if self.model.image_size is not None and self.model.image_size != side:
                fail("model.image_size", f"{self.model.image_size} but {what} is {side}x{side}")
        self.precision.check_devices(self.run.device, self.distributed)
        if self.allocation.sensitivity == "trace" and not self.hessian.trace:
            fail("allocation.sensitivity", "'trace' needs hessian.trace: true")
        batches = -(-self.data.hessian_samples // self.data.hessian_batch_size)
        if self.backend.data_shards is not None and self.backend.data_shards > batches:
            fail(
                "backend.data_shards",
                f"{self.backend.data_shards} exceeds the {batches} Hessian batches "
                "(data.hessian_samples / data.hessian_batch_size); lower it or add samples",
            )
