"""The job's Ray cluster: join ``address`` or start a private local Ray, once per process.

The Hessian backend and the data-parallel workers of the training stages share it: whoever
connects first owns the connection (and a private Ray's processes and session dir) and gets
the function that ends them; a later caller finds Ray initialised and owns nothing.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable

import ray

from pipeline.backends.ray import default_auth_mode
from pipeline.backends.ray.config import RayBackendConfig, available_cpus, private_temp_dir

logger = logging.getLogger(__name__)


def connect(cfg: RayBackendConfig) -> Callable[[], None] | None:
    """Connect to ``cfg.address``, or start a private local Ray sized by ``cfg``; return the
    shutdown of what this call started (``None``: Ray was already initialised)."""
    if ray.is_initialized():
        if cfg.address is not None:
            logger.info("Ray is already initialised: ignoring address %r", cfg.address)
        return None
    temp_dir = None
    if cfg.address is None:
        default_auth_mode()
        temp_dir = cfg.temp_dir or private_temp_dir()
        ray.init(
            address="local",
            num_cpus=available_cpus() if cfg.num_cpus is None else cfg.num_cpus,
            num_gpus=cfg.num_gpus,
            object_store_memory=None
            if cfg.object_store_mb is None
            else int(cfg.object_store_mb * 2**20),
            include_dashboard=False,
            _temp_dir=temp_dir,
        )
    else:
        ray.init(address=cfg.address)

    def shutdown() -> None:
        if ray.is_initialized():
            ray.shutdown()
        if temp_dir is not None:  # this job's own session dir
            shutil.rmtree(temp_dir, ignore_errors=True)

    return shutdown
