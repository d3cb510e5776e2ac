"""Data-parallel workers of the training stages on the job's Ray cluster (``world_size > 1``).

Layout. One placement group of ``world_size`` bundles (``cpus_per_worker`` CPUs,
``gpus_per_worker`` GPUs; spread over the nodes by default); worker ``r`` takes bundle ``r`` and
is rank ``r`` of a ``torch.distributed`` group (gloo; nccl on whole GPUs) whose store lives on
rank 0's node. Every worker runs the stage's function on the same payload (one object in the
object store); the hawq loop inside is data-parallel (:mod:`hawq.data_parallel`). The cluster
is the Hessian stage's (:mod:`.cluster`): ``backend.address``'s, the Ray-on-Slurm cluster, or a
private local Ray started here and kept for the run.

Events. Rank 0's training hooks queue ``("epoch", record, state)`` after every epoch and
``("step", epoch, steps, state)`` every ``every_steps`` steps, or at the next step after the
driver asks for it (:meth:`DataParallelWorker.request_state`, on a preemption). The driver
drains the queue (``events``, served by a second actor thread) and hands each event to the
stage's hooks in order: the driver alone writes the run store, passes the test pause points and
runs a deferred preemption, as in a single-process run.

Failures. A worker's error (algorithmic ones re-raised as they are), death, or a collective
stuck past ``distributed.timeout_s`` stops every worker and fails the stage; ``hawq resume``
continues from the last saved state. The workers' resources are checked against the cluster's
before any starts (``ConfigError`` naming ``distributed.world_size``).
"""

from __future__ import annotations

import datetime
import logging
import os
import queue
import socket
import threading
from collections.abc import Callable
from typing import Any

import ray
import torch
import torch.distributed as dist
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from hawq.qat import EpochRecord, QATState, StepHook
from pipeline import preempt
from pipeline.backends.ray.actors import FATAL_ERRORS
from pipeline.backends.ray.cluster import connect
from pipeline.backends.ray.placement import forwarded_env
from pipeline.backends.ray.process_group import join_group, open_store
from pipeline.config import DistributedSection
from pipeline.stages.base import StageContext
from pipeline.stages.parallel import EpochHook, Rank, RankFn, raise_if_too_large

logger = logging.getLogger(__name__)

POLL_S = 0.5  # how long one ``events`` call waits for rank 0's next event


def _cpu(obj: Any) -> Any:
    """``obj`` with its tensors (in dicts, lists, tuples) on the CPU, for the driver."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_cpu(v) for v in obj)
    return obj


class DataParallelWorker:
    """Rank ``rank`` of ``world`` data-parallel workers (a threaded Ray actor: ``run`` in one
    thread, ``events`` / ``request_state`` in another)."""

    def __init__(
        self, rank: int, world: int, *, device: str, collective: str, threads: int,
        timeout_s: float,
    ) -> None:  # fmt: skip
        torch.set_num_threads(threads)
        self.rank, self.world = rank, world
        self.device = torch.device(device)
        self.collective = collective
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self._store: dist.TCPStore | None = None
        self._events: queue.Queue = queue.Queue()
        self._capture = threading.Event()

    def ping(self) -> dict[str, Any]:
        """Where this rank runs: Ray node id, host name, process id."""
        node = ray.get_runtime_context().get_node_id()
        return {"rank": self.rank, "node": node, "host": socket.gethostname(), "pid": os.getpid()}

    def rendezvous(self) -> tuple[str, int]:
        """Rank 0: open the group's store on this node; its ``(host, port)``."""
        self._store, host, port = open_store(self.world, self.timeout)
        return host, port

    def join(self, host: str, port: int) -> None:
        join_group(self.collective, self.rank, self.world, self.timeout, host=host, port=port,
                   store=self._store)  # fmt: skip

    def run(self, fn: RankFn, payload: Any, every_steps: int) -> Any:
        """``fn(payload, rank)``; rank 0's result (tensors on the CPU), ``None`` elsewhere."""
        hooks: dict[str, Any] = {}
        if self.rank == 0:
            hooks = {"on_epoch_end": self._epoch_end, "on_step": self._step_hook(every_steps)}
        rank = Rank(rank=self.rank, world_size=self.world, device=self.device, **hooks)
        result = fn(payload, rank)
        dist.barrier()  # every rank done before the group goes
        dist.destroy_process_group()
        return _cpu(result) if self.rank == 0 else None

    def _epoch_end(self, record: EpochRecord, state: QATState) -> None:
        self._events.put(("epoch", record, state))

    def _step_hook(self, every_steps: int) -> StepHook:
        def on_step(global_epoch: int, steps: int, capture: Callable[[], QATState]) -> None:
            if (every_steps and steps % every_steps == 0) or self._capture.is_set():
                self._capture.clear()
                self._events.put(("step", global_epoch, steps, capture()))

        return on_step

    def events(self, timeout_s: float) -> list[tuple]:
        """Rank 0's queued events, in order (waits up to ``timeout_s`` for the first)."""
        try:
            out = [self._events.get(timeout=timeout_s)]
        except queue.Empty:
            return []
        while True:
            try:
                out.append(self._events.get_nowait())
            except queue.Empty:
                return out

    def request_state(self) -> None:
        """Send the training state at the next optimizer step (a preemption is pending)."""
        self._capture.set()


class WorkerGroup:
    """The placement group and the ``world_size`` workers of one stage (Ray initialised);
    ``where`` lists each rank's node, host and pid. ``threads``: torch threads per worker."""

    def __init__(self, cfg: DistributedSection, threads: int) -> None:
        self.cfg = cfg
        self.actors: list[Any] = []
        self.where: list[dict[str, Any]] = []
        total = ray.cluster_resources()
        raise_if_too_large(cfg, total.get("CPU", 0.0), total.get("GPU", 0.0))
        bundle = {"CPU": cfg.cpus_per_worker}
        if cfg.gpus_per_worker:
            bundle["GPU"] = cfg.gpus_per_worker
        strategy = "SPREAD" if cfg.placement == "spread" else "PACK"
        self.group = placement_group([dict(bundle)] * cfg.world_size, strategy=strategy)
        try:
            self._start(bundle, threads)
        except BaseException:
            self.close()
            raise
        nodes = len({w["node"] for w in self.where})
        logger.info("data parallel: %d workers on %d node(s)", cfg.world_size, nodes)

    def _start(self, bundle: dict[str, float], threads: int) -> None:
        """Place the workers, note where they run, and form their process group."""
        d = self.cfg
        ready, _ = ray.wait([self.group.ready()], timeout=d.timeout_s)
        if not ready:
            raise RuntimeError(
                f"{d.world_size} data-parallel workers ({bundle} each) were not placed in "
                f"{d.timeout_s:g}s (distributed.timeout_s; cluster: {ray.cluster_resources()})"
            )
        gpu = d.gpus_per_worker > 0
        env = forwarded_env()
        cls = ray.remote(DataParallelWorker)
        self.actors = [
            cls.options(
                num_cpus=d.cpus_per_worker,
                num_gpus=d.gpus_per_worker,
                max_concurrency=2,
                max_restarts=0,
                runtime_env={"env_vars": env} if env else None,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=self.group, placement_group_bundle_index=r
                ),
            ).remote(
                r,
                d.world_size,
                device="cuda" if gpu else "cpu",
                collective="nccl" if d.gpus_per_worker >= 1 else "gloo",
                threads=threads,
                timeout_s=d.timeout_s,
            )  # fmt: skip
            for r in range(d.world_size)
        ]
        self.where = ray.get([a.ping.remote() for a in self.actors], timeout=d.timeout_s)
        host, port = ray.get(self.actors[0].rendezvous.remote(), timeout=d.timeout_s)
        ray.get([a.join.remote(host, port) for a in self.actors], timeout=d.timeout_s)

    def run(
        self, fn: RankFn, payload: Any, on_epoch_end: EpochHook | None, on_step: StepHook | None,
        every_steps: int,
    ) -> Any:  # fmt: skip
        """Run ``fn`` on every worker, feeding rank 0's events to the hooks; rank 0's result."""
        ref = ray.put(payload)
        runs = [a.run.remote(fn, ref, every_steps) for a in self.actors]
        rank0 = self.actors[0]
        polling = rank0.events.remote(POLL_S)
        asked = False
        pending = list(runs)
        while pending:
            done, _ = ray.wait([polling, *pending], num_returns=1, timeout=POLL_S)
            if polling in done:
                self._dispatch(ray.get(polling), on_epoch_end, on_step)
                polling = rank0.events.remote(POLL_S)
            finished, pending = ray.wait(pending, num_returns=len(pending), timeout=0)
            for r in finished:
                self._get(r, runs.index(r))
            if preempt.requested() and not asked:  # rank 0: state at the next step
                rank0.request_state.remote()
                asked = True
        self._dispatch(ray.get(polling), on_epoch_end, on_step)
        while batch := ray.get(rank0.events.remote(0)):
            self._dispatch(batch, on_epoch_end, on_step)
        return self._get(runs[0], 0)

    @staticmethod
    def _dispatch(events: list[tuple], on_epoch_end: EpochHook | None, on_step: StepHook | None):
        for kind, *args in events:
            if kind == "epoch" and on_epoch_end is not None:
                on_epoch_end(*args)
            elif kind == "step" and on_step is not None:
                global_epoch, steps, state = args
                on_step(global_epoch, steps, lambda state=state: state)

    def _get(self, ref: ray.ObjectRef, rank: int) -> Any:
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as exc:
            if isinstance(exc.cause, FATAL_ERRORS):
                raise exc.cause from None
            raise RuntimeError(
                f"data-parallel rank {rank} failed ({str(exc).splitlines()[0][:300]}); "
                "`hawq resume` continues from the last saved state"
            ) from exc
        except ray.exceptions.RayError as exc:
            raise RuntimeError(
                f"data-parallel rank {rank} died ({type(exc).__name__}); `hawq resume` "
                "continues from the last saved state"
            ) from exc

    def close(self) -> None:
        for a in self.actors:
            ray.kill(a, no_restart=True)
        self.actors = []
        remove_placement_group(self.group)


def run_on_workers(
    ctx: StageContext,
    fn: RankFn,
    payload: Any,
    *,
    on_epoch_end: EpochHook | None,
    on_step: StepHook | None,
    every_steps: int,
) -> tuple[Any, list[dict[str, Any]]]:
    """``fn(payload, rank)`` on ``distributed.world_size`` workers: (rank 0's result, where
    each rank ran). The cluster stays up for the run (``ctx.resources``) when this started it."""
    stop = connect(ctx.cfg.backend.to_ray())
    if stop is not None and ctx.resources is not None:
        ctx.resources.callback(stop)
        stop = None
    try:
        threads = ctx.cfg.run.torch_threads or max(1, int(ctx.cfg.distributed.cpus_per_worker))
        workers = WorkerGroup(ctx.cfg.distributed, threads)
        try:
            result = workers.run(fn, payload, on_epoch_end, on_step, every_steps)
        finally:
            workers.close()
        return result, workers.where
    finally:
        if stop is not None:
            stop()
