"""The Ray actor of the Ray Hessian backend: one data shard, one member of a block group.

A :class:`HessianWorker` holds a ``HessianOperator`` over its shard of the job's batches. The
``world`` workers of one block group form a ``torch.distributed`` process group (gloo on CPU,
nccl on whole GPUs) whose ``all_reduce`` is the operator's ``allreduce`` hook, so every worker
of a group runs the same deterministic solver in lockstep and ends with the same numbers.

Fault model: every collective call carries the group generation ``gen``; a worker whose
process group failed (a peer died, a collective timed out) or that was restarted by Ray (fresh
``__init__``, no group) refuses calls with :class:`GroupError` until the driver rebuilds the
group (``rendezvous`` + ``join`` + ``load`` with a new ``gen``). Algorithmic errors
(``HessianError``, ``ValueError``, ...) pass through unchanged: retrying cannot fix them.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from collections.abc import Iterator, Mapping, Sequence

import ray
import torch
import torch.distributed as dist

from hawq.hessian.operator import HessianError, HessianOperator
from hawq.hessian.table import EIGEN_RESULT_COLUMNS, block_eigen
from hawq.hessian.trace import probe_samples
from hawq.hessian.trace_deflated import Deflation
from pipeline.backends.base import Batch, HessianJob
from pipeline.backends.ray.config import NETWORK_ENV
from pipeline.backends.ray.process_group import join_group, open_store

logger = logging.getLogger(__name__)

FATAL_ERRORS: tuple[type[BaseException], ...] = (
    HessianError,
    ValueError,
    TypeError,
    FloatingPointError,
)
"""Errors that a rebuilt group would raise again: the driver re-raises them at once."""


class GroupError(RuntimeError):
    """The worker's process group is missing, stale or broken: the driver must rebuild it."""


class HessianWorker:
    """Rank ``rank`` of block group ``group`` (``world`` data shards); see the module doc."""

    def __init__(
        self,
        group: int,
        rank: int,
        world: int,
        *,
        device: str,
        collective: str,
        threads: int,
        timeout_s: float,
        memory_budget_bytes: int | None,
        use_job_budget: bool,
    ) -> None:
        torch.set_num_threads(threads)
        self.group, self.rank, self.world = group, rank, world
        self.device = torch.device(device)
        self.collective = collective
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.memory_budget_bytes = memory_budget_bytes
        self.use_job_budget = use_job_budget
        self._gen: int | None = None
        self._broken = False
        self._store: dist.TCPStore | None = None
        self._op: HessianOperator | None = None
        self._job: HessianJob | None = None
        self._blocks: dict = {}
        self._dims: dict[str, int] = {}
        self._shard_size = 0
        self._deflation: Deflation | None = None

    # ------------------------------------------------------------------ group management
    def ping(self) -> dict:
        """Where this worker runs (node id, pid) and its group generation."""
        return {
            "node": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid(),
            "gen": self._gen,
            "env": {k: os.environ[k] for k in NETWORK_ENV if k in os.environ},
        }

    def rendezvous(self) -> tuple[str, int]:
        """Rank 0 only: start a TCP store on a free port of this node; return its address."""
        if self.rank != 0:
            raise RuntimeError("rendezvous runs on rank 0")
        self._leave()
        self._store, host, port = open_store(self.world, self.timeout)
        return host, port

    def join(self, host: str, port: int, gen: int) -> int:
        """(Re)build the process group of generation ``gen`` (a no-op group when world is 1)."""
        self._leave()
        if self.world > 1:
            store = self._store if self.rank == 0 else None
            join_group(self.collective, self.rank, self.world, self.timeout, host=host,
                       port=port, store=store, prefix=f"gen{gen}/")  # fmt: skip
        self._gen, self._broken = gen, False
        return gen

    def _leave(self) -> None:
        if self._op is not None:
            self._op.close()
            self._op = None
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception as exc:  # noqa: BLE001 - a broken group may fail to tear down
                logger.warning("destroying a broken process group failed: %s", exc)
        self._gen = None

    def _allreduce(self, t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t)
        return t

    @contextlib.contextmanager
    def _guard(self, gen: int) -> Iterator[None]:
        """Check the group generation; turn non-algorithmic failures into :class:`GroupError`."""
        if self._broken or gen != self._gen:
            raise GroupError(
                f"worker g{self.group}/r{self.rank}: group generation {self._gen} "
                f"(broken={self._broken}) cannot serve a call for generation {gen}"
            )
        try:
            yield
        except FATAL_ERRORS:
            raise
        except Exception as exc:
            self._broken = True
            raise GroupError(
                f"worker g{self.group}/r{self.rank}: {type(exc).__name__}: {exc}"
            ) from exc

    # ------------------------------------------------------------------ work
    def load(self, gen: int, job: HessianJob, shard: Sequence[Batch]) -> dict:
        """Build the model and the operator over this worker's shard (one all-reduce)."""
        with self._guard(gen):
            return self._load(job, shard)

    def _load(self, job: HessianJob, shard: Sequence[Batch]) -> dict:
        if self._op is not None:
            self._op.close()
            self._op = None
        model = job.instantiate(self.device)
        batches = [(x.to(self.device), y.to(self.device)) for x, y in shard]
        budget = job.config.memory_budget_bytes if self.use_job_budget else self.memory_budget_bytes
        self._op = HessianOperator(
            model,
            job.loss_fn,
            batches,
            job.blocks,
            memory_budget_bytes=budget,
            allreduce=self._allreduce if self.world > 1 else None,
        )
        self._job, self._deflation = job, None
        self._blocks = {b.name: b for b in job.blocks}
        self._dims = {b.name: self._op.dim(b.name) for b in job.blocks}
        self._shard_size = sum(x.shape[0] for x, _ in batches)
        return {"n_samples": self._op.n_samples, "local_samples": self._shard_size}

    def shard_size(self) -> int:
        """Samples of the data shard this worker holds (0 before ``load``)."""
        return self._shard_size

    def eigen(self, gen: int, block: str, keep_basis: bool | None = None) -> dict | tuple:
        """The computed eigen columns of ``block`` (``EIGEN_RESULT_COLUMNS``): scalars only.

        With ``keep_basis`` not ``None`` (a call with ``num_returns=2``): the pair (columns,
        ``(basis, tr(Q H Q^T))`` of the top pair's Lanczos run if ``keep_basis`` and there is
        one, else ``None``), for the deflated traces; the driver leaves the basis in the object
        store and hands the reference to every worker.
        """
        with self._guard(gen):
            assert self._op is not None and self._job is not None
            row, top = block_eigen(self._op, self._blocks[block], self._job.config)
        out = {k: row[k] for k in EIGEN_RESULT_COLUMNS}
        if keep_basis is None:
            return out
        if not keep_basis or top.basis is None:
            return out, None
        return out, (top.basis.cpu().clone(), top.basis_trace)

    def set_deflation(self, gen: int, names: Sequence[str], *parts: tuple | None) -> int:
        """Deflate later probes with ``parts[i] = (basis, exact)`` of block ``names[i]``.

        ``None`` parts (no Lanczos basis) leave that block's probes plain. Returns how many
        blocks are deflated.
        """
        with self._guard(gen):
            assert self._op is not None
            op = self._op
            kept = {n: p for n, p in zip(names, parts, strict=True) if p is not None}
            self._deflation = Deflation(
                bases={n: q.to(dtype=op.dtype, device=op.device) for n, (q, _) in kept.items()},
                exact={n: e for n, (_, e) in kept.items()},
            )
        return len(kept)

    def probe(self, gen: int, probes: Sequence[int]) -> list[dict[str, float]]:
        """Hutchinson probes ``probes``: every block's sample from one joint HVP over all
        blocks per probe, each batch's graph built once for all of them (one all-reduce).

        Plain ``v_b^T (H v)_b``, or deflated after :meth:`set_deflation`.
        """
        with self._guard(gen):
            assert self._op is not None and self._job is not None
            seed = self._job.config.seed
            return probe_samples(self._op, self._dims, seed, probes, self._deflation)

    def counters(self) -> Mapping[str, int]:
        """HVPs applied and first-order graphs cached by this worker's current operator."""
        if self._op is None:
            return {"hvps": 0, "cached_batches": 0, "graph_bytes": 0}
        return {
            "hvps": self._op.hvp_count,
            "cached_batches": self._op.cached_batches,
            "graph_bytes": self._op.graph_bytes,
        }
