"""Optional dependencies: imported on use, or a one-line error naming the extra that provides them.

The base install (torch, numpy, pyarrow, pyyaml, pulp, safetensors) runs the library and the
local pipeline; features with heavier dependencies live in extras of ``pyproject.toml``.
``progress_bar`` draws a tqdm bar when tqdm is installed and does nothing otherwise.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType
from typing import Any

__all__ = ["EXTRAS", "MissingExtra", "available", "progress_bar", "require"]

EXTRAS: dict[str, tuple[str, str]] = {
    # import name -> (distribution, extra of hawq that installs it)
    "ray": ("ray", "ray"),
    "submitit": ("submitit", "slurm"),
    "matplotlib": ("matplotlib", "report"),
    "sklearn": ("scikit-learn", "digits"),
    "PIL": ("pillow", "images"),
    "tqdm": ("tqdm", "progress"),
    "torchvision": ("torchvision", "vision"),
    "onnx": ("onnx", "onnx"),
    "onnxruntime": ("onnxruntime", "onnx"),
}


class MissingExtra(ImportError):
    """An optional dependency is missing; the message names the ``pip install`` that adds it."""


def install_hint(module: str) -> str:
    """``pip install 'hawq[extra]'`` for an import name of :data:`EXTRAS`."""
    return f"pip install 'hawq[{EXTRAS[module.split('.')[0]][1]}]'"


def available(module: str) -> bool:
    """Whether ``module`` (an import name) can be imported, without importing it."""
    return importlib.util.find_spec(module.split(".")[0]) is not None


def require(module: str, feature: str) -> ModuleType:
    """Import ``module`` for ``feature``, or raise :class:`MissingExtra` with the fix.

    Only a missing ``module`` itself becomes :class:`MissingExtra`; a broken installation (one
    of its own dependencies missing) keeps its original error.
    """
    top = module.split(".")[0]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.split(".")[0] != top:
            raise
        dist = EXTRAS[top][0]
        raise MissingExtra(
            f"{feature} needs {dist}, which is not installed. Fix: {install_hint(top)}"
        ) from None


class _NoBar:
    """The part of tqdm's interface hawq uses, doing nothing."""

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(*, disable: bool = False, **kwargs: Any) -> Any:
    """A ``tqdm.auto.tqdm(**kwargs)`` bar, or a no-op bar when disabled or tqdm is missing."""
    if disable or not available("tqdm"):
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(**kwargs)
