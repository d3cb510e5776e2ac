"""Ray backend: the Hessian analysis on a grid of ``data_shards x block_groups`` actors.

Layout (:mod:`.grid`). Actor ``(g, d)`` holds data shard ``d`` (batches ``i`` with
``i % D == d``) and belongs to block group ``g`` (bundle ``d`` of the group's placement group,
PACKed on one node when it fits: :mod:`.placement`); the ``D`` actors of a group form a gloo
(nccl on whole GPUs) process group and run the *same* ``hawq`` solver code in lockstep, the
operator's ``allreduce`` hook summing each HVP across shards. Sample weighting makes the
sharded operator exactly the single-process one (up to the summation order).

Scheduling. A free group takes the next unfinished block, largest ``n_params`` first (online
LPT), and computes its eigen row; each block's solver stops on its own. Hutchinson probes go to
whichever group is free, ``trace_probe_chunk`` at a time (probes below ``trace_min_probes``
may start while other groups still finish blocks); each probe is one joint HVP over all blocks
on that group's shards, each shard building a batch's graph once per chunk. The driver
feeds the per-probe samples in probe order to ``hawq.hessian.table.trace_columns`` (Hutchinson),
so traces equal the single-process ones; rows and the table come from the same
``hawq.hessian.table`` functions as ``analyze``. Only scalars cross to the driver
(``stats["bytes_to_driver"]``).

Deflated traces (``trace_method="deflated"``): rank 0 of the group that solves a block also
returns the block's Lanczos basis as a second object, which the driver owns but never fetches;
once every block is solved (blocks in ``done`` are solved again for their bases, rows unused),
each worker receives every block's basis reference (``set_deflation``, object store to actor;
``k_b x n_b`` floats per block on every worker) and probes start. A rebuilt group gets them
again after ``load``.

Faults. A failed call (actor died, collective broken or timed out) makes the driver wait for
the group's actors (Ray restarts them, ``max_actor_restarts``), rebuild the group's process
group with a new generation, reload the job (:meth:`.grid.ActorGrid.recover`) and redo the
work item: HVPs are pure functions of
(vector, shard), so results are unchanged. Resume: blocks in ``done`` are not recomputed;
``on_row`` gets each new eigen row as it finishes (in completion order).

GPUs (``gpus_per_actor > 0``): the actors run their HVPs on ``cuda`` (the first GPU Ray gave
them) in ``hessian.dtype``, without autocast or TF32 (:func:`hawq.precision.exact_float32`).
Whole GPUs (``>= 1``) all-reduce with nccl; a fraction (e.g. 0.25: four actors share one GPU,
enough for small models) with gloo on the CUDA tensors, since nccl cannot put two ranks on one
device. Tested by ``tests/test_gpu.py`` where CUDA is present (skipped elsewhere).
"""

from __future__ import annotations

import logging
import pickle
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import pyarrow as pa
import ray

from hawq.hessian.table import eigen_row, resumed_row, sensitivity_table, trace_columns
from hawq.hessian.trace import probe_chunks
from hawq.optional import progress_bar
from pipeline.atomic import pause_point
from pipeline.backends.base import HessianJob, ProbeCallback, Probes, RowCallback
from pipeline.backends.plan import CachePlan, grid_plan, log_plan
from pipeline.backends.ray.cluster import connect
from pipeline.backends.ray.config import RayBackendConfig
from pipeline.backends.ray.grid import ActorGrid, fatal_cause

logger = logging.getLogger(__name__)

EventHook = Callable[[str, dict], None]


@dataclass(kw_only=True)
class _Call:
    """One work item on one block group: ``D`` object refs, one per shard."""

    group: int
    kind: str  # "eigen" | "probe"
    key: Any  # block name | tuple of probe indices
    refs: list[ray.ObjectRef]
    attempt: int
    values: dict[int, Any] = field(default_factory=dict)
    basis: ray.ObjectRef | None = None  # rank 0's (basis, exact) when traces are deflated


class RayBackend:
    """Runs a :class:`HessianJob` on a Ray cluster (see the module docstring).

    ``on_event(kind, info)`` is an optional monitoring/test hook called on the driver for
    ``"submit"``, ``"block"``, ``"probe"`` and ``"recover"`` events. ``stats`` describes the
    last run; ``actors[g][d]`` are the live actor handles, ``placement[(g, d)]`` their node
    and process id.
    """

    def __init__(
        self, config: RayBackendConfig | None = None, *, on_event: EventHook | None = None
    ):
        self.config = RayBackendConfig() if config is None else config
        if not isinstance(self.config, RayBackendConfig):
            raise ValueError(f"config must be a RayBackendConfig, got {type(config).__name__}")
        self.on_event = on_event
        self.stats: dict[str, Any] = {}
        self.grid = ActorGrid(self.config, on_bytes=self._count_bytes)
        self._shutdown: Callable[[], None] | None = None  # set when this backend started Ray
        self._inflight: dict[int, _Call] = {}
        self._deflate = False
        self.plan: CachePlan | None = None

    @property
    def actors(self) -> list[list[ray.actor.ActorHandle]]:
        """``actors[g][d]``: the live actor handles (empty before the first run)."""
        return self.grid.actors

    @property
    def placement(self) -> dict[tuple[int, int], dict]:
        """``placement[(g, d)]``: the node and process id of actor ``(g, d)``."""
        return self.grid.placement

    def _count_bytes(self, nbytes: int) -> None:
        self.stats["bytes_to_driver"] = self.stats.get("bytes_to_driver", 0) + nbytes

    # ------------------------------------------------------------------ cluster and actors
    def _connect(self) -> None:
        stop = connect(self.config)
        if stop is not None:
            self._shutdown = stop

    def _plan(self, job: HessianJob) -> CachePlan:
        """The caching plan (logged); fixes ``data_shards`` if it was left to the backend."""
        plan = grid_plan(job, self.config, ray.available_resources())
        self.config = self.grid.config = replace(self.config, data_shards=plan.data_shards)
        log_plan(plan)
        return plan

    def _recover(self, g: int, error: BaseException) -> None:
        """Rebuild group ``g`` (:meth:`ActorGrid.recover`) and count the recovery."""
        self.grid.recover(g, error)
        self.stats["recoveries"] += 1

    # ------------------------------------------------------------------ work items
    def _submit(self, g: int, kind: str, key: Any, attempt: int = 0) -> _Call:
        basis = None
        if kind == "eigen" and self._deflate:
            pairs = [a.eigen.options(num_returns=2).remote(self.grid.gens[g], key, d == 0)
                     for d, a in enumerate(self.actors[g])]  # fmt: skip
            refs, basis = [row for row, _ in pairs], pairs[0][1]
        else:
            refs = [getattr(a, kind).remote(self.grid.gens[g], key) for a in self.actors[g]]
        call = _Call(group=g, kind=kind, key=key, refs=refs, attempt=attempt, basis=basis)
        self._inflight[g] = call
        self._emit("submit", group=g, kind=kind, key=key, attempt=attempt)
        return call

    def _emit(self, event: str, **info: Any) -> None:
        if self.on_event is not None:
            self.on_event(event, info)

    def _fill(self) -> None:
        """Give every idle group the next work item: blocks first, then probes."""
        for g in range(self.config.block_groups):
            if g in self._inflight:
                continue
            if self._blocks_todo:
                self._submit(g, "eigen", *self._blocks_todo.popleft())
            elif self._probes_todo and self._probes_todo[0][0][0] < self._probe_limit():
                self._submit(g, "probe", *self._probes_todo.popleft())

    def _probe_limit(self) -> int:
        cfg = self._job.config
        if not cfg.trace or (self._deflate and self.grid.deflation is None):
            return 0
        ahead = max(
            cfg.trace_min_probes,
            self._probe_waiting + self.config.block_groups * cfg.trace_probe_chunk,
        )
        return min(cfg.trace_max_probes, ahead)

    def _step(self) -> None:
        """Fill idle groups, wait for one result, and handle it."""
        self._fill()
        owner = {
            ref: (call, d)
            for call in self._inflight.values()
            for d, ref in enumerate(call.refs)
            if d not in call.values
        }
        if not owner:
            raise RuntimeError("no work in flight: the scheduler is stuck")
        ready, _ = ray.wait(list(owner), num_returns=1)
        call, d = owner[ready[0]]
        try:
            call.values[d] = self.grid.get(ready[0])
        except Exception as exc:  # noqa: BLE001 - classified below
            self._failed(call, exc)
            return
        if len(call.values) == len(call.refs):
            del self._inflight[call.group]
            self._finished(call)

    def _failed(self, call: _Call, exc: BaseException) -> None:
        if (cause := fatal_cause(exc)) is not None:
            raise cause from exc
        g = call.group
        del self._inflight[g]
        if call.attempt >= self.config.max_retries:
            raise RuntimeError(
                f"{call.kind} {call.key!r} failed {call.attempt + 1} times on group {g}"
            ) from exc
        logger.warning("group %d: %s %r failed", g, call.kind, call.key)
        self._recover(g, exc)
        self._emit("recover", group=g, kind=call.kind, key=call.key)
        queue = self._blocks_todo if call.kind == "eigen" else self._probes_todo
        queue.appendleft((call.key, call.attempt + 1))
        if call.kind == "probe":  # keep probes sorted so the limit check sees the lowest
            self._probes_todo = deque(sorted(self._probes_todo))

    def _finished(self, call: _Call) -> None:
        first = call.values[0]
        if any(v != first for v in call.values.values() if call.kind == "probe") or any(
            (v["eigenvalue"], v["hvps"]) != (first["eigenvalue"], first["hvps"])
            for v in call.values.values()
            if call.kind == "eigen"
        ):
            raise RuntimeError(f"shards of group {call.group} disagree on {call.kind} {call.key!r}")
        self.stats["bytes_results"] += sum(len(pickle.dumps(v)) for v in call.values.values())
        if call.kind == "probe":
            for p, samples in zip(call.key, first, strict=True):
                self._samples[p] = samples
                if self._on_probe is not None:
                    self._on_probe(p, dict(samples))
            self.stats["probes_computed"] += len(call.key)
            self._emit("probe", group=call.group, kind="probe", key=call.key)
            return
        if call.basis is not None:
            self._bases[call.key] = call.basis
        if call.key in self._rows:  # a resumed block solved again for its basis only
            self.stats["bases_rebuilt"] += 1
            return
        block = self._by_name[call.key]
        row = eigen_row(block, self._job.config, first)
        self._rows[block.name] = row
        self.stats["blocks_computed"] += 1
        self.stats["eigen_hvps"] += row["hvps"]
        self._bar.update(1)
        logger.info("group %d: block %s eigenvalue %.6g (%d HVPs, %.2fs)", call.group,
                    block.name, row["eigenvalue"], row["hvps"], row["seconds"])  # fmt: skip
        if self._on_row is not None:
            self._on_row(dict(row))
        self._emit("block", group=call.group, kind="eigen", key=block.name)

    def _sample(self, p: int) -> dict[str, float]:
        self._probe_waiting = p
        while p not in self._samples:
            self._step()
        self.stats["probes_used"] = p + 1
        self._bar.update(1)
        pause_point(f"hessian:probe:{p + 1}")  # test hook: p + 1 probes consumed
        return self._samples.pop(p)

    # ------------------------------------------------------------------ public API
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
        """The sensitivity table of ``job``; blocks in ``done`` and probes in ``probes`` are
        reused, not recomputed."""
        hcfg = job.config
        if self.config.data_shards is not None and len(job.batches) < self.config.data_shards:
            raise ValueError(
                f"data_shards={self.config.data_shards} exceeds the number of batches "
                f"{len(job.batches)}"
            )
        done = dict(done or {})
        blocks = list(job.blocks)
        self._by_name = {b.name: b for b in blocks}
        rows = {b.name: resumed_row(done[b.name], b, hcfg) for b in blocks if b.name in done}
        self._deflate = hcfg.trace and hcfg.trace_method == "deflated"
        self.grid.deflation, self._bases = None, {}
        solve = [b for b in blocks if b.name not in done or self._deflate]
        todo = sorted(solve, key=lambda b: -b.n_params)
        self.stats = dict.fromkeys(
            ("bytes_to_driver", "bytes_results", "recoveries", "blocks_computed", "eigen_hvps",
             "probes_computed", "probes_used", "bases_rebuilt"), 0)  # fmt: skip
        self.stats.update(blocks_skipped=len(rows), block_groups=self.config.block_groups)
        t0 = time.perf_counter()
        self._connect()
        self.plan = self._plan(job)
        cfg = self.config
        if not self.actors:
            self.grid.start()
        self.stats["nodes"] = len({i["node"] for i in self.placement.values()})
        self.stats["data_shards"] = cfg.data_shards
        D = cfg.data_shards
        self._job = job
        self.grid.load(
            ray.put(replace(job, batches=())), [ray.put(list(job.batches[d::D])) for d in range(D)]
        )
        try:
            self.grid.setup(list(range(cfg.block_groups)))
        except (ray.exceptions.RayError, RuntimeError) as exc:
            if (cause := fatal_cause(exc)) is not None:
                raise cause from exc
            for g in range(cfg.block_groups):
                self._recover(g, exc)
        t1 = time.perf_counter()
        self._inflight = {}
        self._blocks_todo = deque((b.name, 0) for b in todo)
        reused = {int(p): dict(v) for p, v in (probes or {}).items()}
        n_probes = hcfg.trace_max_probes if hcfg.trace else 0
        missing = [p for p in range(n_probes) if p not in reused]
        chunks = probe_chunks(missing, hcfg.trace_probe_chunk)
        self._probes_todo = deque((tuple(c), 0) for c in chunks)
        self._probe_waiting = 0
        self._samples: dict[int, dict[str, float]] = reused
        self._on_probe = on_probe
        self.stats["probes_skipped"] = len(reused)
        self._rows, self._on_row = rows, on_row
        self._bar = progress_bar(total=len(blocks), initial=len(rows), desc="block eigenvalues",
                                 unit="block", disable=not progress)  # fmt: skip
        try:
            while self._blocks_todo or any(c.kind == "eigen" for c in self._inflight.values()):
                self._step()
            if self._deflate:
                self.grid.deflation = [[b.name for b in blocks],
                                       *[self._bases[b.name] for b in blocks]]  # fmt: skip
                self.grid.send_deflation(list(range(cfg.block_groups)))
            t2 = time.perf_counter()
            traces: dict[str, dict] = {}
            if hcfg.trace:
                self._bar.close()
                self._bar = progress_bar(total=hcfg.trace_max_probes, desc="hutchinson",
                                         unit="probe", disable=not progress)  # fmt: skip
                traces = trace_columns(self._sample, [b.name for b in blocks], hcfg)
        finally:
            self._bar.close()
            self._drain()
            self.grid.deflation, self._bases = None, {}
        self.stats.update(seconds_setup=t1 - t0, seconds_eigen=t2 - t1,
                          seconds_trace=time.perf_counter() - t2)  # fmt: skip
        return sensitivity_table(blocks, rows, traces)

    def _drain(self) -> None:
        """Wait out speculative calls still running, so the actors are idle after ``run``."""
        refs = [r for c in self._inflight.values() for r in c.refs]
        if refs:
            ray.wait(refs, num_returns=len(refs), timeout=self.config.collective_timeout_s + 30)
        self._inflight = {}

    def __enter__(self) -> RayBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Kill the actors; shut Ray down if this backend started it (idempotent)."""
        self.grid.close()
        if self._shutdown is not None:
            self._shutdown()
            self._shutdown = None
