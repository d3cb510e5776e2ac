"""Configuration of the Ray Hessian backend (importable without Ray)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from hawq.validation import check_int, check_number

PLACEMENTS = ("pack", "spread")
NETWORK_ENV = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "TP_SOCKET_IFNAME")
"""Network-interface variables the driver forwards to every actor (``runtime_env``)."""


def available_cpus(env: Any = None) -> int:
    """CPUs this process may use: its CPU affinity, capped by ``SLURM_CPUS_ON_NODE``."""
    env = os.environ if env is None else env
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    slurm = str(env.get("SLURM_CPUS_ON_NODE") or "")
    if slurm.isdigit() and int(slurm) > 0:
        cpus = min(cpus, int(slurm))
    return max(1, cpus)


def private_temp_dir(env: Any = None) -> str | None:
    """The session dir of a private Ray inside a Slurm job (short: Unix sockets cap at 107)."""
    env = os.environ if env is None else env
    job = env.get("SLURM_JOB_ID")
    return f"/tmp/hawq-ray-{job}-private" if job else None


@dataclass(frozen=True, kw_only=True)
class RayBackendConfig:
    """Where and how wide to run (validated on construction).

    address: ``None`` starts a local Ray instance sized by ``num_cpus``/``num_gpus`` (all
        of the machine by default) unless Ray is already initialised; ``"host:port"`` joins.
    data_shards / block_groups: the ``D x G`` actor grid; ``data_shards=None`` lets the
        backend choose ``D`` at the start of a run: the fewest shards whose per-actor caches
        hold every batch's graph, as many as the cluster can place (``pipeline.backends.plan``).
    memory_budget_mb: per-actor cap on cached first-order graphs; ``None`` uses the job's
        ``HessianConfig.memory_budget_mb``.
    torch_threads: intra-op threads per actor (default ``max(1, int(cpus_per_actor))``).
    collective_timeout_s: gloo/nccl timeout, so a group with a dead member never hangs.
    max_retries: attempts per work item beyond the first before the run fails.
    placement: each block group is one placement group of ``D`` bundles; ``"pack"`` keeps a
        group's all-reduce on one node when it fits, ``"spread"`` puts its shards on
        different nodes when it can (more memory per shard).
    num_cpus: CPUs of a private Ray (default: this process's CPU affinity, capped by the
        Slurm allocation, see :func:`available_cpus`).
    temp_dir: a private Ray's session dir (default: ``/tmp/hawq-ray-<job>-private`` inside a
        Slurm job, so jobs sharing a node never share one; Ray's default otherwise).
    """

    address: str | None = None
    data_shards: int | None = None
    block_groups: int = 1
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    memory_budget_mb: float | None = None
    max_actor_restarts: int = 3
    max_retries: int = 3
    torch_threads: int | None = None
    collective_timeout_s: float = 300.0
    start_timeout_s: float = 300.0
    placement: str = "pack"
    num_cpus: int | None = None
    num_gpus: int | None = None
    object_store_mb: float | None = None
    temp_dir: str | None = None

    def __post_init__(self) -> None:
        if self.address is not None and (not isinstance(self.address, str) or not self.address):
            raise ValueError(f"address must be None or 'host:port', got {self.address!r}")
        if self.data_shards is not None:
            check_int("data_shards", self.data_shards, low=1)
        check_int("block_groups", self.block_groups, low=1)
        check_number("cpus_per_actor", self.cpus_per_actor, low=0)
        check_number("gpus_per_actor", self.gpus_per_actor, low=0)
        if self.memory_budget_mb is not None:
            check_number("memory_budget_mb", self.memory_budget_mb, low=0)
        check_int("max_actor_restarts", self.max_actor_restarts, low=0)
        check_int("max_retries", self.max_retries, low=0)
        if self.torch_threads is not None:
            check_int("torch_threads", self.torch_threads, low=1)
        check_number("collective_timeout_s", self.collective_timeout_s, low=1)
        check_number("start_timeout_s", self.start_timeout_s, low=1)
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement must be 'pack' or 'spread', got {self.placement!r}")
        for name in ("num_cpus", "num_gpus"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), low=0)
        if self.object_store_mb is not None:
            check_number("object_store_mb", self.object_store_mb, low=1)
        if self.gpus_per_actor > 1 and self.gpus_per_actor != int(self.gpus_per_actor):
            raise ValueError(f"gpus_per_actor above 1 must be whole, got {self.gpus_per_actor}")

    @property
    def n_actors(self) -> int:
        """Actors of the grid (``data_shards`` counted as 1 until chosen)."""
        return (self.data_shards or 1) * self.block_groups

    @property
    def threads(self) -> int:
        return self.torch_threads or max(1, int(self.cpus_per_actor))
