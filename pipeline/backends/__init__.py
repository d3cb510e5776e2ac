"""Hessian backends: ``local`` (in-process) and ``ray`` (actors; imported only when asked for)."""

from __future__ import annotations

import math
import os

from hawq.optional import require
from pipeline.backends.base import HessianBackend, HessianJob
from pipeline.backends.local import LocalBackend
from pipeline.config import BackendSection

__all__ = ["HessianBackend", "HessianJob", "LocalBackend", "make_backend"]


def make_backend(section: BackendSection, *, device: str = "cpu") -> HessianBackend:
    """The backend ``section.kind`` names (Ray is imported lazily: it is heavy)."""
    if section.kind == "local":
        return LocalBackend(device)
    if section.kind == "ray":
        require("ray", feature="backend.kind: ray")
        from pipeline.backends.ray import RayBackend
        from pipeline.backends.ray_config import RayBackendConfig

        need = math.ceil(section.data_shards * section.block_groups * section.cpus_per_actor)
        return RayBackend(
            RayBackendConfig(
                address=section.address,
                data_shards=section.data_shards,
                block_groups=section.block_groups,
                cpus_per_actor=section.cpus_per_actor,
                gpus_per_actor=section.gpus_per_actor,
                memory_budget_mb=section.memory_budget_mb,
                # a private local Ray gets enough logical CPUs for the actor grid
                num_cpus=None if section.address else max(need, os.cpu_count() or 1),
            )
        )
    raise ValueError(f"backend.kind must be 'local' or 'ray', got {section.kind!r}")
