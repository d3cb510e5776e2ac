"""Build the network a config names, and load its checkpoint.

Names: ``cifar_resnet20/32/56`` and ``squeezenext23`` / ``squeezenext23v5`` (``hawq.models``;
SqueezeNext takes ``model.kwargs: {width: 1.0}``), ``mlp`` and ``small_cnn`` (small models for
digits / Fashion-MNIST, defined here), ``torchvision:<name>`` (optional dependency, built with
``weights=None``) and ``package.module:factory`` (called with ``**model.kwargs``, plus
``num_classes`` / ``in_channels`` when its signature takes them).

:func:`model_factory` returns a picklable zero-argument callable (a ``functools.partial`` of a
module-level function) that a Ray worker can call; it builds the architecture only.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from pipeline.config.inputs import ModelConfig
from pipeline.config.run_config import RunConfig
from pipeline.config.strict import ConfigError
from pipeline.user_code import import_callable

__all__ = [
    "MLP",
    "LossFn",
    "SmallCNN",
    "build_model",
    "construct_model",
    "load_checkpoint",
    "loss_fn_for",
    "model_factory",
    "read_state_dict",
    "task_loss_fn",
]

logger = logging.getLogger(__name__)

TORCHVISION_HINT = "pip install torch==2.14.1 torchvision==0.29.1"
_CIFAR_DEPTHS = {"cifar_resnet20": 20, "cifar_resnet32": 32, "cifar_resnet56": 56}
_SQUEEZENEXT_VERSIONS = {"squeezenext23": "23", "squeezenext23v5": "23v5"}


class MLP(nn.Module):
    """Flatten -> (Linear -> ReLU) per hidden width -> Linear; layers are ``fc1..fcN``."""

    def __init__(
        self, in_features: int, num_classes: int, hidden: tuple[int, ...] | list[int] = (128, 64)
    ) -> None:
        super().__init__()
        widths = [in_features, *hidden, num_classes]
        self.n_layers = len(widths) - 1
        for i in range(self.n_layers):
            self.add_module(f"fc{i + 1}", nn.Linear(widths[i], widths[i + 1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for i in range(1, self.n_layers + 1):
            x = getattr(self, f"fc{i}")(x)
            if i < self.n_layers:
                x = torch.relu(x)
        return x


class SmallCNN(nn.Module):
    """conv1-BN-ReLU, conv2 (stride 2)-BN-ReLU, adaptive 4x4 pool, fc1-ReLU, fc2.

    Works on any input of at least 5x5 (8x8 digits, 28x28 Fashion-MNIST, 32x32 CIFAR).
    """

    def __init__(
        self, in_channels: int = 1, num_classes: int = 10, width: int = 16, hidden: int = 64
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.fc1 = nn.Linear(2 * width * 16, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = self.pool(x).flatten(1)
        return self.fc2(torch.relu(self.fc1(x)))


def _kwargs_error(name: str, exc: Exception) -> ConfigError:
    return ConfigError("model.kwargs", f"{name} rejected the kwargs: {exc}")


def _torchvision() -> Any:
    try:
        import torchvision
    except ImportError:
        raise ConfigError(
            "model.name",
            f"torchvision is not installed; run '{TORCHVISION_HINT}' or use a built-in model",
        ) from None
    return torchvision


def construct_model(
    name: str,
    num_classes: int,
    in_channels: int,
    image_size: int | None,
    kwargs: Mapping[str, Any],
) -> nn.Module:
    """Build the untrained architecture (module-level so ``functools.partial`` of it pickles)."""
    kwargs = dict(kwargs)
    try:
        if name in _CIFAR_DEPTHS:
            from hawq.models import cifar_resnet

            if kwargs:
                raise ConfigError("model.kwargs", f"{name} takes no kwargs, got {sorted(kwargs)}")
            return cifar_resnet(
                _CIFAR_DEPTHS[name], num_classes=num_classes, in_channels=in_channels
            )
        if name in _SQUEEZENEXT_VERSIONS:
            from hawq.models import squeezenext

            unknown = sorted(set(kwargs) - {"width"})
            if unknown:
                raise ConfigError("model.kwargs", f"{name} takes only 'width', got {unknown}")
            version = _SQUEEZENEXT_VERSIONS[name]
            try:
                return squeezenext(
                    version, num_classes=num_classes, in_channels=in_channels, **kwargs
                )
            except ValueError as exc:
                raise ConfigError("model.kwargs", f"{name}: {exc}") from None
        if name == "mlp":
            if image_size is None:
                raise ConfigError("model.image_size", "model 'mlp' needs the input size")
            return MLP(in_channels * image_size * image_size, num_classes, **kwargs)
        if name == "small_cnn":
            return SmallCNN(in_channels, num_classes, **kwargs)
        if name.startswith("torchvision:"):
            return _build_torchvision(
                name.removeprefix("torchvision:"), num_classes, in_channels, kwargs
            )
        factory = import_callable("model.name", name)
    except TypeError as exc:
        raise _kwargs_error(name, exc) from None
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # builtins without a signature get only model.kwargs
        params = {}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for key, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        if (takes_any or key in params) and key not in kwargs:
            kwargs[key] = value
    try:
        model = factory(**kwargs)
    except TypeError as exc:
        raise _kwargs_error(name, exc) from None
    if not isinstance(model, nn.Module):
        raise ConfigError("model.name", f"{name} returned {type(model).__name__}, not nn.Module")
    return model


def _build_torchvision(
    arch: str, num_classes: int, in_channels: int, kwargs: dict[str, Any]
) -> nn.Module:
    tv = _torchvision()
    available = tv.models.list_models(module=tv.models)
    if arch not in available:
        raise ConfigError(
            "model.name", f"torchvision has no model {arch!r}; choose from {', '.join(available)}"
        )
    if in_channels != 3:
        raise ConfigError(
            "model.in_channels", f"torchvision models take 3 channels, not {in_channels}"
        )
    return tv.models.get_model(arch, weights=None, num_classes=num_classes, **kwargs)


def model_factory(cfg: ModelConfig) -> Callable[[], nn.Module]:
    """A picklable zero-argument builder of the (untrained) architecture.

    Resolves optional imports now, so a missing package or bad import path fails before any work.
    """
    if cfg.name.startswith("torchvision:"):
        _torchvision()
    elif ":" in cfg.name:
        import_callable("model.name", cfg.name)
    return functools.partial(
        construct_model,
        cfg.name,
        cfg.num_classes,
        cfg.in_channels,
        cfg.image_size,
        dict(cfg.kwargs),
    )


def build_model(cfg: ModelConfig) -> nn.Module:
    """Build the model and load ``cfg.checkpoint`` when set."""
    model = model_factory(cfg)()
    if cfg.checkpoint is not None:
        load_checkpoint(model, cfg.checkpoint, ignore=cfg.checkpoint_ignore)
    n = sum(p.numel() for p in model.parameters())
    logger.info("built %s (%d parameters, checkpoint %s)", cfg.name, n, cfg.checkpoint)
    return model


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint: a state dict, ``{"state_dict": ...}`` or ``.safetensors``.

    The ``module.`` prefix of DataParallel checkpoints is stripped.
    """
    file = os.fspath(path)
    if not os.path.isfile(file):
        raise ConfigError("model.checkpoint", f"{file!r} not found; fix the path or set it to null")
    try:
        if file.endswith(".safetensors"):
            from safetensors.torch import load_file

            obj: Any = load_file(file, device="cpu")
        else:
            obj = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - corrupt files of any kind get one clear message
        raise ConfigError(
            "model.checkpoint",
            f"{file!r} could not be read ({type(exc).__name__}: {exc}); it must be a state dict "
            "saved with torch.save or a .safetensors file",
        ) from None
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj:
        raise ConfigError("model.checkpoint", f"{file!r} holds no state dict")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ConfigError(
            "model.checkpoint", f"{file!r} is not a state dict: {bad[:3]} are not tensors"
        )
    nonfinite = [k for k, v in obj.items() if v.is_floating_point() and not v.isfinite().all()]
    if nonfinite:
        raise ConfigError(
            "model.checkpoint",
            f"{file!r}: tensor {nonfinite[0]!r} holds NaN or Inf"
            f"{f' (and {len(nonfinite) - 1} more)' if len(nonfinite) > 1 else ''}; "
            "use a checkpoint with finite weights",
        )
    return {str(k).removeprefix("module."): v for k, v in obj.items()}


def load_checkpoint(
    model: nn.Module, path: str | os.PathLike, *, ignore: Sequence[str] = ()
) -> nn.Module:
    """Load a checkpoint into ``model`` strictly; a mismatch names the file and the keys.

    Checkpoint keys that fully match a regex in ``ignore`` are dropped first.
    """
    file = os.fspath(path)
    state = read_state_dict(file)
    if ignore:
        state = {k: v for k, v in state.items() if not any(re.fullmatch(p, k) for p in ignore)}
    own = model.state_dict()
    # BatchNorm fills num_batches_tracked itself for checkpoints saved before torch 0.4.1.
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k}: {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)):
            if items:
                parts.append(
                    f"{len(items)} {label} ({', '.join(items[:3])}{', ...' * (len(items) > 3)})"
                )
        raise ConfigError(
            "model.checkpoint",
            f"{file!r} does not fit {type(model).__name__}: {'; '.join(parts)}; check model.name, "
            "model.num_classes and model.in_channels",
        )
    model.load_state_dict(state)
    return model


LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def task_loss_fn(cfg: RunConfig | ModelConfig) -> LossFn | None:
    """The config's ``loss`` function, or None for cross-entropy on logits (hawq's default)."""
    path = getattr(cfg, "loss", None)  # a ModelConfig alone means classification
    return None if path is None else import_callable("loss", path)


def loss_fn_for(cfg: RunConfig | ModelConfig) -> LossFn:
    """The task loss for the Hessian: ``loss`` or cross-entropy; picklable (by reference)."""
    return task_loss_fn(cfg) or nn.CrossEntropyLoss()
