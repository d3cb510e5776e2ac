"""In-process backend: ``hawq.hessian.table.analyze`` on the job's model, in this process."""

from __future__ import annotations

from collections.abc import Mapping

import pyarrow as pa
import torch

from hawq.hessian.memory import estimate_graph_memory
from hawq.hessian.table import analyze
from pipeline.backends.base import HessianJob, ProbeCallback, Probes, RowCallback
from pipeline.backends.plan import CachePlan, cache_plan, log_plan


class LocalBackend:
    """Runs a :class:`HessianJob` here, on ``device`` (CPU by default); ``plan`` is the
    caching plan of the last run (logged at its start)."""

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.plan: CachePlan | None = None

    def run(
        self,
        job: HessianJob,
        *,
        done: Mapping[str, dict] | None = None,
        on_row: RowCallback | None = None,
        probes: Probes | None = None,
        on_probe: ProbeCallback | None = None,
        progress: bool = True,
    ) -> pa.Table:
        """The sensitivity table of ``job`` (blocks in ``done`` and probes in ``probes`` are
        reused, not recomputed)."""
        model = job.instantiate(self.device)
        batches = [(x.to(self.device), y.to(self.device)) for x, y in job.batches]
        memory = None
        if batches:
            memory = estimate_graph_memory(model, job.loss_fn, batches[0], job.blocks)
            sizes = [x.shape[0] for x, _ in batches]
            self.plan = cache_plan(sizes, memory, job.config.memory_budget_bytes, 1)
            log_plan(self.plan)
        return analyze(
            model,
            job.loss_fn,
            batches,
            job.config,
            blocks=job.blocks,
            done=done,
            on_row=on_row,
            probes=probes,
            on_probe=on_probe,
            progress=progress,
            graph_memory=memory,
        )

    def close(self) -> None:
        """Nothing to release."""
