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
from typing import TYPE_CHECKING, Any, Literal

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

BUILTIN_MODELS = ("cifar_resnet20", "cifar_resnet32", "cifar_resnet56", "mlp", "small_cnn")
# name -> (channels, native image size, classes) of the datasets whose shape is fixed.
DATASET_SHAPES = {"digits": (1, 8, 10), "fashion_mnist": (1, 28, 10), "cifar10": (3, 32, 10)}
_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*$")
_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_ADDRESS = re.compile(r"^[A-Za-z0-9_.-]+:(\d+)$")
# finetune.order -> hawq.order.OrderConfig.mode
ORDER_MODES = {"omega": "descending", "reverse": "reverse", "random": "random"}


@dataclass(frozen=True, kw_only=True)
class RunSection(Section):
    """Identity and placement: run name, seed, run directory, device, torch threads."""

    name: str = "hawq"
    seed: int = 0
    run_dir: str | None = None  # None -> runs/<name>, relative to the working directory
    device: Literal["cpu", "cuda", "auto"] = "auto"
    torch_threads: int | None = None  # None -> torch's default

    def check(self) -> None:
        if not _RUN_NAME.match(self.name):
            fail("name", f"{self.name!r} must be letters, digits, '_', '.' or '-'")
        check_positive("torch_threads", self.torch_threads)
        check_seed("seed", self.seed)

    @property
    def directory(self) -> str:
        """The run directory: ``run_dir`` or ``runs/<name>``."""
        return self.run_dir if self.run_dir is not None else f"runs/{self.name}"


@dataclass(frozen=True, kw_only=True)
class ModelConfig(Section):
    """Which network: built-in, ``torchvision:<name>`` or ``package.module:factory``."""

    name: str  # required
    num_classes: int = 10
    in_channels: int = 3
    image_size: int | None = None  # input height = width; required by "mlp"
    checkpoint: str | None = None  # .th/.pt/.pth state dict or .safetensors
    checkpoint_ignore: tuple[str, ...] = ()  # regexes of checkpoint keys to drop (AuxLogits\..*)
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra factory arguments

    def check(self) -> None:
        n = self.name
        custom = not n.startswith("torchvision:") and n not in BUILTIN_MODELS
        if custom and not _IMPORT_PATH.match(n):
            fail(
                "name",
                f"{n!r} is not a model; use one of {', '.join(BUILTIN_MODELS)}, "
                "'torchvision:<name>' or 'package.module:factory'",
            )
        if n.startswith("torchvision:") and not n.removeprefix("torchvision:").isidentifier():
            fail("name", f"{n!r}: put a torchvision model name after 'torchvision:'")
        if self.num_classes < 2:
            fail("num_classes", f"{self.num_classes} must be >= 2")
        check_positive("in_channels", self.in_channels)
        check_positive("image_size", self.image_size)
        if n == "mlp" and self.image_size is None:
            fail("image_size", "model 'mlp' needs the input size (e.g. 8 for digits)")
        for i, pattern in enumerate(self.checkpoint_ignore):
            try:
                re.compile(pattern)
            except re.error as exc:
                fail(f"checkpoint_ignore[{i}]", f"{pattern!r} is not a valid regex: {exc}")
        if self.checkpoint is not None and not self.checkpoint.endswith(
            (".th", ".pt", ".pth", ".safetensors")
        ):
            fail("checkpoint", f"{self.checkpoint!r} must end in .th, .pt, .pth or .safetensors")


@dataclass(frozen=True, kw_only=True)
class DataConfig(Section):
    """Dataset, sizes of the Hessian / fine-tuning / evaluation sets, batch size, seed."""

    name: Literal["digits", "fashion_mnist", "cifar10", "imagefolder", "synthetic"]  # required
    path: str | None = None  # dataset file/dir; fashion_mnist defaults to the Debian package
    train_size: int | None = None  # fine-tuning samples (None = the whole training pool)
    eval_size: int | None = None  # evaluation samples (None = the whole test split)
    hessian_samples: int = 512  # drawn from the training pool
    hessian_batch_size: int = 128
    batch_size: int = 128  # evaluation batch size
    seed: int = 0
    normalization: Literal["auto", "none", "imagenet", "dataset"] = "auto"
    image_size: int | None = None  # imagefolder crop (default 224) / synthetic side (default 8)
    resize: int | None = None  # imagefolder: shorter side before the crop (default size*8/7)
    channels: int | None = None  # synthetic only (default 1)
    num_classes: int | None = None  # synthetic only (default 10)
    train_split: str = "train"  # imagefolder sub-directories
    eval_split: str = "val"

    def check(self) -> None:
        for key in ("train_size", "eval_size", "image_size", "resize", "channels"):
            check_positive(key, getattr(self, key))
        for key in ("hessian_samples", "hessian_batch_size", "batch_size"):
            check_positive(key, getattr(self, key))
        check_seed("seed", self.seed)
        if self.name in ("cifar10", "imagefolder") and self.path is None:
            what = "the npz / python batches" if self.name == "cifar10" else "the ImageFolder root"
            fail("path", f"data '{self.name}' needs a path to {what}")
        if self.name != "synthetic":
            for key in ("channels", "num_classes"):
                if getattr(self, key) is not None:
                    fail(key, f"only applies to data.name: synthetic (got name {self.name!r})")
        if self.num_classes is not None and self.num_classes < 2:
            fail("num_classes", f"{self.num_classes} must be >= 2")
        if self.name in DATASET_SHAPES and self.image_size is not None:
            fail("image_size", f"{self.name} images have a fixed size; remove data.image_size")

    def shape(self) -> tuple[int, int, int] | None:
        """(channels, image side, classes) when known before loading, else None."""
        if self.name in DATASET_SHAPES:
            return DATASET_SHAPES[self.name]
        if self.name == "synthetic":
            return (self.channels or 1, self.image_size or 8, self.num_classes or 10)
        return None


@dataclass(frozen=True, kw_only=True)
class HessianSection(Section):
    """Per-block curvature: top eigenvalue(s) (Lanczos / power) and Hutchinson trace.

    The fields up to ``memory_budget_mb`` mirror ``hawq.hessian.table.HessianConfig``;
    ``grouping`` / ``patterns`` go to ``hawq.blocks.partition_blocks`` and ``dtype`` to the job.
    """

    method: Literal["lanczos", "power"] = "lanczos"
    tol: float = 1e-3
    max_iter: int = 100
    top_k: int = 1
    trace: bool = True
    trace_tol: float = 0.05
    trace_max_probes: int = 200
    trace_min_probes: int = 10
    seed: int = 0
    memory_budget_mb: float | None = 4096.0  # cached first-order graphs; null = all, 0 = none
    grouping: Literal["layer", "residual"] = "layer"
    patterns: tuple[tuple[str, ...], ...] = ()  # [regex, block_name] pairs tried first
    dtype: Literal["float32", "float64"] = "float32"

    def check(self) -> None:
        for key in ("tol", "max_iter", "top_k", "trace_tol", "trace_max_probes"):
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
    sensitivity: Literal["eigenvalue", "trace"] = "trace"
    candidate_bits: tuple[int, ...] = (2, 4, 8)
    size_limit_mb: float | None = None
    compression: float | None = None  # weight compression vs float32, e.g. 13.0
    bops_limit: float | None = None  # in GBOPs
    act_bits: int = 8
    pin: dict[str, int] = field(default_factory=dict)  # module name -> bits
    tie: tuple[tuple[str, ...], ...] = ()  # groups of module names that share bits
    pareto_points: int = 0  # points of the size/Omega frontier to record (0 = skip, else >= 2)
    per_channel: bool = True  # weight scales per output channel
    percentile: float | None = None  # clip |w| at this percentile (None = max)

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

    epochs_per_stage: int = 1  # 0: quantize and calibrate only (no training)
    blocks_per_stage: int = 1
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: Literal["cosine", "constant", "step"] = "cosine"
    step_size: int = 1  # epochs per step of the "step" schedule
    gamma: float = 0.1  # lr factor per step
    freeze_quantized: bool = True
    loss: Literal["ce", "distill"] = "ce"
    temperature: float = 4.0  # distillation temperature
    alpha: float = 0.9  # weight of the distillation term
    order: Literal["omega", "reverse", "random"] = "omega"
    batch_size: int = 128
    checkpoint_every_steps: int = 0  # also save the QAT state every N steps (0: epoch ends)

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

    def to_hawq(self, *, seed: int, eval_batch_size: int) -> QATConfig:
        """The hawq ``QATConfig`` (``epochs_per_stage`` -> ``epochs``; seed: ``run.seed``)."""
        from hawq import QATConfig

        d = self.to_dict()
        d["epochs"] = max(1, d.pop("epochs_per_stage"))  # 0 runs no QAT at all
        for key in ("blocks_per_stage", "order", "checkpoint_every_steps"):
            del d[key]
        return QATConfig(**d, seed=seed, eval_batch_size=eval_batch_size)

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
        )


@dataclass(frozen=True, kw_only=True)
class BaselineSection(Section):
    """Float baseline: use the checkpoint as is (train_epochs: 0) or train from scratch."""

    train_epochs: int = 0
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128
    schedule: Literal["cosine", "constant", "step"] = "cosine"

    def check(self) -> None:
        check_positive("train_epochs", self.train_epochs, allow_zero=True)
        for key in ("lr", "batch_size"):
            check_positive(key, getattr(self, key))
        check_positive("weight_decay", self.weight_decay, allow_zero=True)
        check_number("momentum", self.momentum, low=0, high=1, high_open=True)

    def to_hawq(self, *, seed: int, eval_batch_size: int) -> QATConfig:
        """The hawq ``QATConfig`` that ``hawq.qat.train_float`` trains the float model with.

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
            step_size=max(1, self.train_epochs // 3),
            seed=seed,
            eval_batch_size=eval_batch_size,
        )


@dataclass(frozen=True, kw_only=True)
class BackendSection(Section):
    """Where the Hessian stage runs: in-process or on Ray actors (data shards x block groups)."""

    kind: Literal["local", "ray"] = "local"
    address: str | None = None  # Ray head "host:port"; None starts a private local Ray
    data_shards: int = 1
    block_groups: int = 1
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    memory_budget_mb: float | None = None

    def check(self) -> None:
        for key in ("data_shards", "block_groups", "cpus_per_actor", "memory_budget_mb"):
            check_positive(key, getattr(self, key))
        check_positive("gpus_per_actor", self.gpus_per_actor, allow_zero=True)
        if self.address is not None:
            if self.kind != "ray":
                fail("address", "only applies to backend.kind: ray")
            m = _ADDRESS.match(self.address)
            if not m or not 0 < int(m.group(1)) < 65536:
                fail("address", f"{self.address!r} must be 'host:port' (e.g. 10.0.0.1:6379)")

    def to_ray(self) -> RayBackendConfig:
        """The Ray backend's config; a private local Ray gets enough CPUs for the actor grid."""
        from pipeline.backends.ray.config import RayBackendConfig, available_cpus

        need = math.ceil(self.data_shards * self.block_groups * self.cpus_per_actor)
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
    model: ModelConfig  # required
    data: DataConfig  # required
    baseline: BaselineSection = field(default_factory=BaselineSection)
    hessian: HessianSection = field(default_factory=HessianSection)
    allocation: AllocationSection  # required: it carries the size target
    finetune: FinetuneSection = field(default_factory=FinetuneSection)
    backend: BackendSection = field(default_factory=BackendSection)

    def check(self) -> None:
        shape = self.data.shape()
        if shape is not None:
            channels, side, classes = shape
            what = f"data '{self.data.name}'"
            if self.model.in_channels != channels:
                fail("model.in_channels", f"{self.model.in_channels} but {what} has {channels}")
            if self.model.num_classes != classes:
                fail("model.num_classes", f"{self.model.num_classes} but {what} has {classes}")
            if self.model.image_size is not None and self.model.image_size != side:
                fail("model.image_size", f"{self.model.image_size} but {what} is {side}x{side}")
        if self.allocation.sensitivity == "trace" and not self.hessian.trace:
            fail("allocation.sensitivity", "'trace' needs hessian.trace: true")
        batches = -(-self.data.hessian_samples // self.data.hessian_batch_size)
        if self.backend.data_shards > batches:
            fail(
                "backend.data_shards",
                f"{self.backend.data_shards} exceeds the {batches} Hessian batches "
                "(data.hessian_samples / data.hessian_batch_size); lower it or add samples",
            )
