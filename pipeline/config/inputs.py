"""Config sections of what a run works on: its identity, the model and the data.

Every field carries a one-line attribute docstring: ``hawq config schema`` and docs/config.md
are generated from them (see :mod:`pipeline.config.schema`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

from pipeline.config.strict import Section, check_positive, check_seed, fail

BUILTIN_MODELS = (
    "cifar_resnet20",
    "cifar_resnet32",
    "cifar_resnet56",
    "squeezenext23",
    "squeezenext23v5",
    "mlp",
    "small_cnn",
)
# name -> (channels, native image size, classes) of the datasets whose shape is fixed.
DATASET_SHAPES = {"digits": (1, 8, 10), "fashion_mnist": (1, 28, 10), "cifar10": (3, 32, 10)}
IMPORT_PATH = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*$")
_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# keys of data that only apply to built-in datasets / to data.factory
_BUILTIN_ONLY = ("path", "image_size", "resize", "channels", "num_classes")
_IMAGEFOLDER_ONLY = {"streaming": "auto", "augment": False, "bad_images": "fail"}


def check_import_path(key: str, value: str, what: str) -> None:
    """``value`` must look like ``package.module:function``."""
    if not IMPORT_PATH.match(value):
        fail(key, f"{value!r} must be 'package.module:function' ({what})")


@dataclass(frozen=True, kw_only=True)
class RunSection(Section):
    """Identity and placement: run name, seed, run directory, device, torch threads."""

    name: str = "hawq"
    """Run name (letters, digits, '_', '.', '-'); the default run dir is runs/<name>."""
    seed: int = 0
    """Seed of everything random in the run (initialisation, data order, probes)."""
    run_dir: str | None = None
    """Run directory; null = runs/<name>, relative to the working directory (--run-dir wins)."""
    device: Literal["cpu", "cuda", "auto"] = "auto"
    """Where models run; auto = cuda when available, else cpu."""
    torch_threads: int | None = None
    """torch.set_num_threads for the run; null = torch's default."""

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

    name: str
    """Built-in model, 'torchvision:<name>' or your 'package.module:function' (required)."""
    num_classes: int = 10
    """Classes (output width), passed to factories that take num_classes."""
    in_channels: int = 3
    """Input channels, passed to factories that take in_channels."""
    image_size: int | None = None
    """Input height = width; required by 'mlp'."""
    checkpoint: str | None = None
    """Float weights to start from: .th/.pt/.pth state dict or .safetensors; null = train."""
    checkpoint_ignore: tuple[str, ...] = ()
    """Regexes of checkpoint keys to drop before loading (e.g. 'AuxLogits\\..*')."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments of the model factory."""

    def check(self) -> None:
        n = self.name
        custom = not n.startswith("torchvision:") and n not in BUILTIN_MODELS
        if custom and not IMPORT_PATH.match(n):
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
    """Dataset (built-in or your factory), sizes of the Hessian / fine-tuning / evaluation sets."""

    name: Literal["digits", "fashion_mnist", "cifar10", "imagefolder", "synthetic"] | None = None
    """Built-in dataset; set this or data.factory."""
    factory: str | None = None
    """Your 'package.module:function' returning (train, eval[, hessian]) map-style Datasets."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments of data.factory."""
    num_workers: int = 0
    """DataLoader worker processes that read (and decode) data.factory datasets and streamed
    imagefolder images (0 = in the main process); batches do not depend on it."""
    path: str | None = None
    """Dataset file or directory; fashion_mnist defaults to the Debian package's files."""
    train_size: int | None = None
    """Fine-tuning samples, the first of the training pool; null = all."""
    eval_size: int | None = None
    """Evaluation samples; null = the whole test split (or a 20% holdout without one)."""
    hessian_samples: int = 512
    """Samples the Hessian is computed on (from the training pool, or data.factory's hessian)."""
    hessian_batch_size: int = 128
    """Batch size of the Hessian-vector products."""
    batch_size: int = 128
    """Evaluation batch size."""
    seed: int = 0
    """Seed of the splits (which samples go to Hessian / fine-tuning / evaluation)."""
    normalization: Literal["auto", "none", "imagenet", "dataset"] = "auto"
    """Input normalisation; auto = imagenet for cifar10/imagefolder, none for synthetic and
    data.factory, else the training set's per-channel mean and std."""
    image_size: int | None = None
    """imagefolder: crop size (default 224); synthetic: image side (default 8)."""
    resize: int | None = None
    """imagefolder: shorter side before the center crop (default image_size * 8/7)."""
    channels: int | None = None
    """synthetic: input channels (default 1)."""
    num_classes: int | None = None
    """synthetic: classes (default 10)."""
    train_split: str = "train"
    """imagefolder: sub-directory of the training images."""
    eval_split: str = "val"
    """imagefolder: sub-directory of the evaluation images."""
    streaming: bool | Literal["auto"] = "auto"
    """imagefolder: true = decode batches on demand (DataLoader workers); false = decode the
    fine-tuning and evaluation sets into RAM; auto = stream with augment or above 1 GiB."""
    augment: bool = False
    """imagefolder (streaming): training batches get RandomResizedCrop + horizontal flip,
    seeded per (run seed, epoch, sample); evaluation and Hessian images never do."""
    bad_images: Literal["fail", "skip"] = "fail"
    """imagefolder: an unreadable, empty or non-image file fails naming it, or is skipped
    (dropped from its set or batch, logged with a count)."""

    def check(self) -> None:
        for key in ("train_size", "eval_size", "image_size", "resize", "channels"):
            check_positive(key, getattr(self, key))
        for key in ("hessian_samples", "hessian_batch_size", "batch_size"):
            check_positive(key, getattr(self, key))
        check_positive("num_workers", self.num_workers, allow_zero=True)
        check_seed("seed", self.seed)
        if (self.name is None) == (self.factory is None):
            fail("name", "set either data.name (a built-in dataset) or data.factory (your own)")
        if self.factory is not None:
            self._check_factory(self.factory)
            return
        if self.kwargs:
            fail("kwargs", "only applies to data.factory")
        if self.num_workers and self.name != "imagefolder":
            fail("num_workers", "only applies to data.factory and data.name: imagefolder")
        if self.name != "imagefolder":
            for key, default in _IMAGEFOLDER_ONLY.items():
                if getattr(self, key) != default:
                    fail(key, f"only applies to data.name: imagefolder (got name {self.name!r})")
        if self.augment and self.streaming is False:
            fail("augment", "needs streaming (each epoch decodes new crops); set streaming: true")
        if self.streaming is True and self.normalization == "dataset":
            fail("normalization", "'dataset' needs every image decoded; use imagenet or none")
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

    def _check_factory(self, factory: str) -> None:
        check_import_path("factory", factory, "your dataset function")
        for key in _BUILTIN_ONLY:
            if getattr(self, key) is not None:
                fail(key, "does not apply to data.factory; pass it in data.kwargs")
        for key, default in _IMAGEFOLDER_ONLY.items():
            if getattr(self, key) != default:
                fail(key, "only applies to data.name: imagefolder")
        if self.normalization not in ("auto", "none"):
            fail("normalization", "data.factory datasets are used as returned; normalise there")

    @property
    def label(self) -> str:
        """The dataset's name for logs and manifests: ``name`` or ``factory:<path>``."""
        return self.name if self.name is not None else f"factory:{self.factory}"

    def shape(self) -> tuple[int, int, int] | None:
        """(channels, image side, classes) when known before loading, else None."""
        if self.name in DATASET_SHAPES:
            return DATASET_SHAPES[self.name]
        if self.name == "synthetic":
            return (self.channels or 1, self.image_size or 8, self.num_classes or 10)
        return None
