"""The ``distributed`` section: data-parallel workers of baseline, fine-tuning and evaluation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipeline.config.strict import Section, check_positive, fail


@dataclass(frozen=True, kw_only=True)
class DistributedSection(Section):
    """Data-parallel training and evaluation on the backend's Ray cluster (world_size > 1).

    Rank r of ``world_size`` takes the contiguous slice r of every global batch (``batch_size``
    stays the global batch); gradients, activation ranges and metrics are all-reduced, so the
    result does not depend on the world size (with ``batchnorm: sync`` or ``frozen``).
    """

    world_size: int = 1
    """Data-parallel workers of baseline, finetune and evaluate; 1 = in this process; > 1 = Ray
    workers on backend.address's cluster, or a private local Ray (needs hawq[ray])."""
    cpus_per_worker: float = 1.0
    """CPUs reserved per worker (also its torch threads, unless run.torch_threads is set)."""
    gpus_per_worker: float = 0.0
    """GPUs reserved per worker; > 0 trains on CUDA (nccl for whole GPUs, else gloo)."""
    placement: Literal["spread", "pack"] = "spread"
    """spread: workers on as many nodes as possible; pack: on as few as possible."""
    timeout_s: float = 600.0
    """Seconds to wait for the workers to be placed, and for any collective (a hung peer)."""

    def check(self) -> None:
        check_positive("world_size", self.world_size)
        check_positive("cpus_per_worker", self.cpus_per_worker)
        check_positive("gpus_per_worker", self.gpus_per_worker, allow_zero=True)
        check_positive("timeout_s", self.timeout_s)
        if self.gpus_per_worker > 1 and self.gpus_per_worker != int(self.gpus_per_worker):
            fail("gpus_per_worker", f"{self.gpus_per_worker} above 1 must be a whole number")
