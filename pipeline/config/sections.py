"""The run config: one frozen, kw-only dataclass per pipeline component.

YAML is a strict serialization of :class:`RunConfig`; see ``pipeline.config.loading`` for
loading. Each section validates itself in ``__post_init__`` (via
:class:`pipeline.config.strict.Section`) and :class:`RunConfig` checks the rules that span
sections (model vs data shapes, trace vs sensitivity, shards vs Hessian batches). Each section
that configures a hawq component converts itself with a typed method (``to_hawq`` and friends):
the one place where pipeline settings become hawq configs.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from pipeline.config.distributed import DistributedSection
from pipeline.config.inputs import (
    DataConfig,
    ModelConfig,
    RunSection,
    check_import_path,
)
from pipeline.config.precision import PrecisionSection
from pipeline.config.strict import (
    ConfigError,
    Section,
    check_bits,
    check_number,
    check_positive,
    check_seed,
    fail,
)

if TYPE_CHECKING:  # hawq (torch) and the Ray backend config load only when a section converts
    from hawq import AllocConfig, HessianConfig, OrderConfig, QATConfig
    from pipeline.backends.ray.config import RayBackendConfig

_ADDRESS = re.compile(r"^[A-Za-z0-9_.-]+:(\d+)$")
# finetune.order -> hawq.order.OrderConfig.mode
ORDER_MODES = {"omega": "descending", "reverse": "reverse", "random": "random"}


@dataclass(frozen=True, kw_only=True)
class HessianSection(Section):
    """Per-block curvature: top eigenvalue(s) (Lanczos / power) and Hutchinson trace.

    The fields up to ``memory_budget_mb`` mirror ``hawq.hessian.table.HessianConfig``;
    ``grouping`` / ``patterns`` go to ``hawq.blocks.partition_blocks`` and ``dtype`` to the job.
    """

    method: Literal["lanczos", "power"] = "lanczos"
    """Eigen solver of the top eigenvalue(s) per block."""
    tol: float = 1e-3
    """Relative tolerance of the eigen solver (residual / |eigenvalue|)."""
    max_iter: int = 100
    """Most Hessian-vector products per eigenvalue."""
    top_k: int = 1
    """Eigenvalues per block (the largest in magnitude is the 'eigenvalue' column)."""
    trace: bool = True
    """Estimate each block's Hessian trace with Hutchinson probes."""
    trace_method: Literal["hutchinson", "deflated"] = "hutchinson"
    """Trace estimator: plain Hutchinson, or deflated (Lanczos basis removed first; fewer HVPs)."""
    trace_tol: float = 0.05
    """Stop a block's trace when its standard error <= trace_tol * |trace|."""
    trace_max_probes: int = 200
    """Most Hutchinson probes."""
    trace_min_probes: int = 10
    """Fewest Hutchinson probes before the stopping rule applies (>= 2)."""
    trace_probe_chunk: int = 8
    """Probes per first-order graph build (traces do not depend on it; <= chunk-1 extra probes)."""
    seed: int = 0
    """Seed of the eigen start vectors and the Rademacher probes."""
    memory_budget_mb: float | None = 4096.0
    """Cap on cached first-order graphs; null = cache every batch, 0 = rebuild for each HVP.
    Must hold one batch's graph (checked before any work; ResNet-50 at 224: ~82 MB/sample)."""
    grouping: Literal["layer", "residual", "inverted_residual", "fire"] = "layer"
    """Blocks: each Conv/Linear layer, or each residual / inverted-residual / fire module."""
    patterns: tuple[tuple[str, ...], ...] = ()
    """[regex, block_name] pairs tried before the grouping (modules matching go to block_name)."""
    dtype: Literal["float32", "float64"] = "float32"
    """Precision of the Hessian computation."""

    def check(self) -> None:
        for key in (
            "tol",
            "max_iter",
            "top_k",
            "trace_tol",
            "trace_max_probes",
            "trace_probe_chunk",
        ):
            check_positive(key, getattr(self, key))
        check_seed("seed", self.seed)
        check_positive("memory_budget_mb", self.memory_budget_mb, allow_zero=True)
        if self.trace_min_probes < 2:
            fail("trace_min_probes", f"{self.trace_min_probes} must be >= 2 (a variance needs two)")
        if self.trace_min_probes > self.trace_max_probes:
            fail(
                "trace_min_probes",
                f"{self.trace_min_probes} exceeds hessian.trace_max_probes={self.trace_max_probes}",
            )
        if self.trace_method == "deflated" and self.method != "lanczos":
            fail(
                "trace_method",
                "'deflated' deflates the Lanczos bases: needs hessian.method: lanczos",
            )
        for i, pair in enumerate(self.patterns):
            if len(pair) != 2:
                fail(f"patterns[{i}]", f"{list(pair)} must be [regex, block_name]")
            try:
                re.compile(pair[0])
            except re.error as exc:
                fail(f"patterns[{i}][0]", f"{pair[0]!r} is not a valid regex: {exc}")

    def to_hawq(self) -> HessianConfig:
        """The hawq ``HessianConfig`` of these settings (without the pipeline-side ones)."""
        from hawq import HessianConfig

        d = self.to_dict()
        for key in ("grouping", "patterns", "dtype"):  # pipeline-side settings
            del d[key]
        return HessianConfig(**d)


@dataclass(frozen=True, kw_only=True)
class AllocationSection(Section):
    """Bit allocation: HAWQ v1 rule or ILP, under a size (MB or compression) / BOPs limit."""

    method: Literal["v1", "ilp"] = "ilp"
    """v1: HAWQ v1's rule (bits non-increasing in S); ilp: minimise total Omega under the limits."""
    sensitivity: Literal["eigenvalue", "trace"] = "trace"
    """S_i = eigenvalue / n_i or trace / n_i (n_i = the block's parameters)."""
    candidate_bits: tuple[int, ...] = (2, 4, 8)
    """Weight bit widths to choose from (2..8)."""
    size_limit_mb: float | None = None
    """Largest weight size in MB (set this or compression)."""
    compression: float | None = None
    """Weight compression vs float32, e.g. 13.0 (set this or size_limit_mb)."""
    bops_limit: float | None = None
    """Largest bit operations per inference, in GBOPs."""
    act_bits: int = 8
    """Activation bits of every quantized layer."""
    pin: dict[str, int] = field(default_factory=dict)
    """Module name -> weight bits fixed before the allocation (e.g. first and last layer)."""
    tie: tuple[tuple[str, ...], ...] = ()
    """Groups of module names that get the same bits."""
    pareto_points: int = 0
    """Points of the size / Omega frontier to record (0 = skip, else >= 2)."""
    input_act_bits: int | None = 8
    """Activation bits of the network input (the first layer's input); null = act_bits."""
    last_act_bits: int | None = 8
    """Activation bits of the last layer's input; null = act_bits."""
    per_channel: bool = True
    """Weight scales per output channel (else per tensor)."""
    percentile: float | None = None
    """Clip |w| at this percentile before quantizing; null = the maximum."""
    mse_clip: bool = False
    """Clip each output channel at its MSE-optimal ratio of max|w| (instead of the maximum)."""
    clip_bits: int | None = None
    """Clip (percentile or MSE) only at weight bits <= this; null = at every width."""
    size_tolerance: float | None = None
    """Also a lower size bound: weight bits >= (1 - this) x the limit's (e.g. 0.02); null = none."""

    def check(self) -> None:
        if not self.candidate_bits:
            fail("candidate_bits", "needs at least one bit width, e.g. [2, 4, 8]")
        for i, b in enumerate(self.candidate_bits):
            if b not in range(2, 9):
                fail(f"candidate_bits[{i}]", f"{b} is outside 2..8")
        if len(set(self.candidate_bits)) != len(self.candidate_bits):
            fail("candidate_bits", f"{list(self.candidate_bits)} repeats a value")
        check_bits("act_bits", self.act_bits)
        for name, b in self.pin.items():
            check_bits(f"pin[{name!r}]", b)
        for i, group in enumerate(self.tie):
            if len(group) < 2:
                fail(f"tie[{i}]", f"{list(group)} must name at least two modules")
        for key in ("size_limit_mb", "compression", "bops_limit"):
            check_positive(key, getattr(self, key))
        if self.pareto_points < 0 or self.pareto_points == 1:
            fail("pareto_points", f"{self.pareto_points} must be 0 (skip) or >= 2")
        if self.size_limit_mb is not None and self.compression is not None:
            fail("compression", "set either allocation.size_limit_mb or allocation.compression")
        if self.compression is not None and self.compression < 1:
            fail("compression", f"{self.compression} must be >= 1 (e.g. 13 for 13x)")
        if self.size_limit_mb is None and self.compression is None and self.bops_limit is None:
            fail("size_limit_mb", "set one of size_limit_mb, compression or bops_limit")
        check_number("percentile", self.percentile, low=0, high=100, low_open=True)
        tol = self.size_tolerance
        check_number("size_tolerance", tol, low=0, high=1, low_open=True, high_open=True)
        if tol is not None and self.size_limit_mb is None and self.compression is None:
            fail("size_tolerance", "needs allocation.size_limit_mb or allocation.compression")
        for key in ("input_act_bits", "last_act_bits"):
            if getattr(self, key) is not None:
                check_bits(key, getattr(self, key))
        if self.clip_bits is not None and self.clip_bits not in range(2, 9):
            fail("clip_bits", f"{self.clip_bits} must be in 2..8 (or null: clip at every width)")
        if self.mse_clip and self.percentile is not None:
            fail("mse_clip", "set either allocation.percentile or allocation.mse_clip, not both")

    def to_hawq(self) -> AllocConfig:
        """The hawq ``AllocConfig`` (``pin`` -> ``pins``, ``tie`` -> ``ties``, GBOPs -> BOPs).

        A rule that only hawq checks (e.g. a pin outside ``candidate_bits``) raises a
        :class:`ConfigError` at ``allocation``.
        """
        from hawq import AllocConfig

        d = self.to_dict()
        d["pins"], d["ties"] = d.pop("pin"), tuple(tuple(g) for g in d.pop("tie"))
        d["candidate_bits"] = tuple(d["candidate_bits"])
        del d["pareto_points"]
        if d["bops_limit"] is not None:
            d["bops_limit"] *= 1e9  # GBOPs -> BOPs
        try:
            return AllocConfig(**d)
        except ValueError as exc:
            raise ConfigError("allocation", str(exc)) from None


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


@dataclass(frozen=True, kw_only=True)
class BackendSection(Section):
    """Where the Hessian stage runs: in-process or on Ray actors (data shards x block groups)."""

    kind: Literal["local", "ray"] = "local"
    """local: in this process; ray: on a grid of Ray actors."""
    address: str | None = None
    """Ray head 'host:port' to join; null starts a private local Ray."""
    data_shards: int | None = None
    """Ray: actors that split the Hessian batches (their HVPs are all-reduced); null: the
    fewest whose per-actor caches hold every batch's graph, as many as the cluster fits."""
    block_groups: int = 1
    """Ray: groups of actors that take different blocks."""
    cpus_per_actor: float = 1.0
    """Ray: CPUs reserved per actor."""
    gpus_per_actor: float = 0.0
    """Ray: GPUs per actor; > 0 runs the HVPs on CUDA. Below 1 (e.g. 0.25: four actors share a
    GPU, for small models) the actors all-reduce with gloo; whole GPUs use nccl."""
    memory_budget_mb: float | None = None
    """Ray: per-actor cap on cached first-order graphs; null = hessian.memory_budget_mb."""

    def check(self) -> None:
        for key in ("data_shards", "block_groups", "cpus_per_actor", "memory_budget_mb"):
            check_positive(key, getattr(self, key))
        check_positive("gpus_per_actor", self.gpus_per_actor, allow_zero=True)
        if self.gpus_per_actor and self.kind != "ray":
            fail("gpus_per_actor", "only applies to backend.kind: ray (local runs on run.device)")
        if self.gpus_per_actor > 1 and self.gpus_per_actor != int(self.gpus_per_actor):
            fail("gpus_per_actor", f"{self.gpus_per_actor} above 1 must be a whole number")
        if self.address is not None:
            if self.kind != "ray":
                fail("address", "only applies to backend.kind: ray")
            m = _ADDRESS.match(self.address)
            if not m or not 0 < int(m.group(1)) < 65536:
                fail("address", f"{self.address!r} must be 'host:port' (e.g. 10.0.0.1:6379)")

    def to_ray(self) -> RayBackendConfig:
        """The Ray backend's config; a private local Ray gets enough CPUs for the actor grid."""
        from pipeline.backends.ray.config import RayBackendConfig, available_cpus

        need = math.ceil((self.data_shards or 1) * self.block_groups * self.cpus_per_actor)
        return RayBackendConfig(
            address=self.address,
            data_shards=self.data_shards,
            block_groups=self.block_groups,
            cpus_per_actor=self.cpus_per_actor,
            gpus_per_actor=self.gpus_per_actor,
            memory_budget_mb=self.memory_budget_mb,
            num_cpus=None if self.address else max(need, available_cpus()),
        )


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
