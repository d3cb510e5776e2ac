"""Where a training stage's computation runs: in this process, or on data-parallel Ray workers.

``baseline``, ``finetune`` and ``evaluate`` put their computation in a function
``fn(payload, rank) -> result`` of a picklable payload and a :class:`Rank`. With
``distributed.world_size: 1`` :func:`run_ranks` calls it here, with the stage's own training
hooks (today's single-process path). With ``world_size > 1`` it runs on every worker of
:mod:`pipeline.backends.ray.data_parallel` (one rank each; the hawq loop is data-parallel
inside an initialised ``torch.distributed`` group, see :mod:`hawq.data_parallel`) and rank 0's
result comes back; rank 0's epoch ends and saved steps reach the stage's hooks here, in the
driver, which writes the run store (other ranks write nothing). Either way the stage writes
``ranks.parquet``: the world size and where each rank ran (Ray node id, host, pid).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import torch

from hawq.qat import EpochRecord, QATState, StepHook
from pipeline.config import ConfigError, DistributedSection, RunConfig
from pipeline.data import DataBundle
from pipeline.data_factory import FactoryData
from pipeline.stages.base import StageContext

log = logging.getLogger(__name__)

EpochHook = Callable[[EpochRecord, QATState], Any]
RANKS = "ranks.parquet"
RANKS_SCHEMA = pa.schema(
    [
        ("world_size", pa.int64()),
        ("rank", pa.int64()),
        ("node", pa.string()),
        ("host", pa.string()),
        ("pid", pa.int64()),
    ]
)
"""Where each rank of a stage ran: ``node`` is the Ray node id ('' in the driver's process)."""


@dataclass(frozen=True, kw_only=True)
class Rank:
    """One rank of a stage's computation, as its function sees it.

    ``on_epoch_end`` / ``on_step`` are the training hooks to pass to the hawq loop (rank 0
    only; on a worker they forward to the driver's hooks).
    """

    rank: int
    world_size: int
    device: torch.device
    on_epoch_end: EpochHook | None = None
    on_step: StepHook | None = None


RankFn = Callable[[Any, Rank], Any]


def world_size(cfg: RunConfig) -> int:
    return cfg.distributed.world_size


def world_param(cfg: RunConfig, batchnorm: str) -> dict[str, int]:
    """The world size as a stage-key setting when it changes the result: with ``local``
    BatchNorm (each rank's statistics); otherwise the result does not depend on it."""
    return {"distributed.world_size": cfg.distributed.world_size} if batchnorm == "local" else {}


def rank_data(ctx: StageContext) -> DataBundle | FactoryData:
    """The run's data as the ranks take it: itself here, without the Hessian batches (which
    training does not use) when it travels to workers."""
    if world_size(ctx.cfg) == 1:
        return ctx.data
    return dataclasses.replace(ctx.data, hessian=[])


def check_world_size(cfg: RunConfig) -> None:
    """A world size the private local Ray cannot hold fails before any work (``ConfigError``).

    On a cluster joined by ``backend.address`` the workers check its resources when they start.
    """
    d = cfg.distributed
    if d.world_size == 1 or cfg.backend.address is not None:
        return
    cpus = cfg.backend.to_ray().num_cpus or 0  # what a private Ray of this run is given
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    raise_if_too_large(d, cpus, gpus)


def raise_if_too_large(d: DistributedSection, cpus: float, gpus: float) -> None:
    """``ConfigError`` naming ``distributed.world_size``: the workers exceed ``cpus`` / ``gpus``."""
    for what, per, have, key in (
        ("CPU", d.cpus_per_worker, cpus, "cpus_per_worker"),
        ("GPU", d.gpus_per_worker, gpus, "gpus_per_worker"),
    ):
        need = d.world_size * per
        if need > have + 1e-9:
            raise ConfigError(
                "distributed.world_size",
                f"{d.world_size} workers x {per:g} {what} (distributed.{key}) need {need:g} "
                f"{what}s; the cluster has {have:g}. Fix: lower distributed.world_size (or "
                f"distributed.{key}), or run on a larger cluster (backend.address, hawq-slurm "
                "--nodes)",
            )


def _here() -> dict[str, Any]:
    """This process as rank 0 of 1."""
    return {"rank": 0, "node": "", "host": socket.gethostname(), "pid": os.getpid()}


def run_ranks(
    ctx: StageContext,
    fn: RankFn,
    payload: Any,
    *,
    on_epoch_end: EpochHook | None = None,
    on_step: StepHook | None = None,
    every_steps: int = 0,
) -> Any:
    """``fn(payload, rank)`` on every rank; rank 0's result. ``every_steps``: on workers, the
    steps at which rank 0 sends its state to ``on_step`` (and whenever a preemption asks)."""
    n = world_size(ctx.cfg)
    if n == 1:
        rank = Rank(rank=0, world_size=1, device=ctx.device, on_epoch_end=on_epoch_end,
                    on_step=on_step)  # fmt: skip
        result, where = fn(payload, rank), [_here()]
    else:
        from pipeline.backends.ray.data_parallel import run_on_workers

        result, where = run_on_workers(
            ctx, fn, payload, on_epoch_end=on_epoch_end, on_step=on_step, every_steps=every_steps
        )
    rows = [{"world_size": n, **w} for w in sorted(where, key=lambda w: w["rank"])]
    ctx.write_table(RANKS, pa.Table.from_pylist(rows, schema=RANKS_SCHEMA))
    return result
