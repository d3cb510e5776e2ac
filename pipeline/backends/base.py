"""The contract between the hessian stage and the backends that run it.

A backend receives a self-contained, picklable :class:`HessianJob` and returns the per-block
sensitivity table (``hawq.hessian.table.SENSITIVITY_SCHEMA``). Same job, same rows: the local and
Ray backends must agree to floating-point round-off.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import pyarrow as pa
import torch
from torch import nn

from hawq.blocks import Block
from hawq.hessian.table import HessianConfig

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True, kw_only=True)
class HessianJob:
    """Everything a worker needs to rebuild the analysis on its own.

    ``build_model`` must be picklable (a module-level function or ``functools.partial``); the
    worker calls it, loads ``state_dict`` and casts to ``dtype``.
    """

    build_model: Callable[[], nn.Module]
    state_dict: Mapping[str, torch.Tensor]
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    batches: Sequence[Batch]
    blocks: Sequence[Block]
    config: HessianConfig
    dtype: torch.dtype = torch.float32
    metadata: Mapping[str, str] = field(default_factory=dict)

    def instantiate(self, device: str | torch.device = "cpu") -> nn.Module:
        """Build the model, load the weights, cast, move to ``device``."""
        model = self.build_model()
        model.load_state_dict(self.state_dict)
        return model.to(device=device, dtype=self.dtype)


RowCallback = Callable[[dict], None]
ProbeCallback = Callable[[int, dict[str, float]], None]
Probes = Mapping[int, Mapping[str, float]]


class HessianBackend(Protocol):
    """Runs a :class:`HessianJob`; skips blocks in ``done`` and Hutchinson probes in ``probes``;
    calls ``on_row`` per finished block and ``on_probe(p, {block: sample})`` per new probe."""

    def run(
        self,
        job: HessianJob,
        *,
        done: Mapping[str, dict] | None = None,
        on_row: RowCallback | None = None,
        probes: Probes | None = None,
        on_probe: ProbeCallback | None = None,
        progress: bool = True,
    ) -> pa.Table: ...

    def close(self) -> None: ...
