"""The Ray Hessian backend: ``backend`` (driver), ``grid`` (the actor grid), ``actors`` (workers),
``config``.

Importing this package does not import Ray; ``pipeline.backends.ray.backend`` does.
"""

from __future__ import annotations

import os

from pipeline.backends.ray.config import RayBackendConfig

__all__ = ["AUTH_MODE_ENV", "RayBackendConfig", "default_auth_mode"]

AUTH_MODE_ENV = "RAY_AUTH_MODE"


def default_auth_mode() -> None:
    """Turn Ray's token authentication off unless ``$RAY_AUTH_MODE`` already says otherwise.

    The clusters hawq starts are private: a local Ray of one run, or the Ray of one Slurm job
    on pinned ports. Ray reads the variable when a cluster starts or is joined, so call this
    before ``ray.init`` / ``ray start`` (it is inherited by subprocesses).
    """
    os.environ.setdefault(AUTH_MODE_ENV, "disabled")
