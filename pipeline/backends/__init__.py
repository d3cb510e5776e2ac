"""Hessian backends: ``local`` (in-process) and ``ray`` (actors; imported only when asked for)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from hawq.optional import require
from pipeline.backends.base import HessianBackend, HessianJob
from pipeline.backends.local import LocalBackend

if TYPE_CHECKING:
    from pipeline.config import BackendSection

__all__ = ["HessianBackend", "HessianJob", "LocalBackend", "make_backend"]


def make_backend(section: BackendSection, *, device: str = "cpu") -> HessianBackend:
    """The backend ``section.kind`` names (Ray is imported lazily: it is heavy)."""
    if section.kind == "local":
        return LocalBackend(device)
    if section.kind == "ray":
        require("ray", feature="backend.kind: ray")
        from pipeline.backends.ray.backend import RayBackend

        return RayBackend(section.to_ray())
    raise ValueError(f"backend.kind must be 'local' or 'ray', got {section.kind!r}")
