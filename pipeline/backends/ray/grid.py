"""The Ray backend's actor grid: ``block_groups x data_shards`` Hessian workers and their faults.

Actor ``(g, d)`` holds data shard ``d`` and belongs to block group ``g`` (bundle ``d`` of the
group's placement group: :mod:`.placement`). A group's ``D`` actors form one gloo (nccl on whole
GPUs) process group per *generation*: (re)building a group bumps ``gens[g]``, joins its actors
and loads the job's settings and their shards. Recovery after a failed call waits until Ray has
restarted the group's actors (``max_actor_restarts``), kills one stuck past the collective
timeout, and rebuilds the group; an algorithmic error inside an actor (``FATAL_ERRORS``) is
raised at once, since retrying cannot fix it. What work the groups do is the scheduler's
(:mod:`.backend`).
"""

from __future__ import annotations

import logging
import pickle
import time
from collections.abc import Callable
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, remove_placement_group

from pipeline.backends.ray.actors import FATAL_ERRORS, HessianWorker
from pipeline.backends.ray.config import RayBackendConfig
from pipeline.backends.ray.placement import actor_options, group_placements

logger = logging.getLogger(__name__)

__all__ = ["ActorGrid", "fatal_cause"]


def fatal_cause(exc: BaseException) -> BaseException | None:
    """The algorithmic error inside a failed actor call (retrying cannot fix it), if any."""
    cause = getattr(exc, "cause", None)
    if isinstance(exc, ray.exceptions.RayTaskError) and isinstance(cause, FATAL_ERRORS):
        return cause
    return None


class ActorGrid:
    """The live actors (``actors[g][d]``), their node and process id (``placement[(g, d)]``)
    and process-group generations (``gens[g]``).

    ``config`` is the backend's current config (the driver fixes ``data_shards`` before
    :meth:`start`); ``on_bytes(n)`` counts the pickled bytes every :meth:`get` brings to the
    driver. :meth:`load` sets the job (settings ref, one ref per shard) that :meth:`setup`
    loads; ``deflation`` (``[names, *basis refs]`` once every block is solved) is handed to
    the workers of every group set up afterwards.
    """

    def __init__(self, config: RayBackendConfig, *, on_bytes: Callable[[int], None]) -> None:
        self.config = config
        self.on_bytes = on_bytes
        self.actors: list[list[ray.actor.ActorHandle]] = []
        self.placement: dict[tuple[int, int], dict] = {}
        self.gens = [0] * config.block_groups
        self.deflation: list | None = None
        self._placement_groups: list[PlacementGroup] = []
        self._job_ref: ray.ObjectRef | None = None
        self._shard_refs: list[ray.ObjectRef] = []

    def get(self, refs: Any, **kwargs: Any) -> Any:
        """``ray.get`` that counts the pickled bytes of everything it brings to the driver."""
        values = ray.get(refs, **kwargs)
        self.on_bytes(len(pickle.dumps(values, protocol=pickle.HIGHEST_PROTOCOL)))
        return values

    def start(self) -> None:
        """Place and start every actor; wait until all answer (``start_timeout_s``)."""
        cfg = self.config
        total = ray.cluster_resources()
        need = {"CPU": cfg.n_actors * cfg.cpus_per_actor, "GPU": cfg.n_actors * cfg.gpus_per_actor}
        for res, amount in need.items():
            if amount > total.get(res, 0.0) + 1e-9:
                raise ValueError(
                    f"{cfg.data_shards}x{cfg.block_groups} actors need {amount:g} {res}, "
                    f"the cluster has {total.get(res, 0.0):g}"
                )
        budget = None if cfg.memory_budget_mb is None else int(cfg.memory_budget_mb * 2**20)
        self._placement_groups = groups = group_placements(cfg)
        cls = ray.remote(HessianWorker)

        def actor(g: int, d: int) -> Any:
            return cls.options(**actor_options(cfg, groups[g], d))

        device = "cuda" if cfg.gpus_per_actor > 0 else "cpu"
        self.actors = [
            [
                actor(g, d).remote(
                    g,
                    d,
                    cfg.data_shards,
                    device=device,
                    collective="nccl" if cfg.gpus_per_actor >= 1 else "gloo",
                    threads=cfg.threads,
                    timeout_s=cfg.collective_timeout_s,
                    memory_budget_bytes=budget,
                    use_job_budget=cfg.memory_budget_mb is None,
                )
                for d in range(cfg.data_shards)
            ]
            for g in range(cfg.block_groups)
        ]
        try:
            info = self.get([a.ping.remote() for row in self.actors for a in row],
                            timeout=cfg.start_timeout_s)  # fmt: skip
        except ray.exceptions.GetTimeoutError as exc:
            raise RuntimeError(
                f"{cfg.n_actors} actors did not start within {cfg.start_timeout_s}s "
                f"(cluster resources: {ray.cluster_resources()})"
            ) from exc
        grid = [(g, d) for g in range(cfg.block_groups) for d in range(cfg.data_shards)]
        self.placement = dict(zip(grid, info, strict=True))
        nodes = len({i["node"] for i in info})
        logger.info("started %d actors on %d node(s)", cfg.n_actors, nodes)

    def load(self, job_ref: ray.ObjectRef, shard_refs: list[ray.ObjectRef]) -> None:
        """The job that :meth:`setup` loads: its settings and one ref per data shard."""
        self._job_ref, self._shard_refs = job_ref, shard_refs

    def wait_alive(self, g: int) -> None:
        """Block until every actor of group ``g`` answers (Ray restarts dead ones)."""
        deadline = time.monotonic() + self.config.start_timeout_s
        for d, actor in enumerate(self.actors[g]):
            while True:
                try:
                    timeout = 2 * self.config.collective_timeout_s
                    self.placement[(g, d)] = self.get(actor.ping.remote(), timeout=timeout)
                    break
                except ray.exceptions.ActorDiedError as exc:
                    raise RuntimeError(
                        f"actor g{g}/r{d} died for good (max_actor_restarts="
                        f"{self.config.max_actor_restarts} exhausted)"
                    ) from exc
                except ray.exceptions.GetTimeoutError:  # stuck past the collective timeout
                    logger.warning("actor g%d/r%d does not answer; restarting it", g, d)
                    ray.kill(actor, no_restart=False)
                except ray.exceptions.ActorUnavailableError:
                    time.sleep(0.2)
                if time.monotonic() > deadline:
                    raise RuntimeError(f"actor g{g}/r{d} did not come back in time")

    def setup(self, groups: list[int]) -> None:
        """Build fresh process groups (new generation) and load the job on ``groups``."""
        if self.config.data_shards > 1:
            hosts = self.get([self.actors[g][0].rendezvous.remote() for g in groups])
        else:  # a single shard needs no process group
            hosts = [("", 0)] * len(groups)
        joins = []
        for g, (host, port) in zip(groups, hosts, strict=True):
            self.gens[g] += 1
            joins += [a.join.remote(host, port, self.gens[g]) for a in self.actors[g]]
        self.get(joins)
        loads = [
            a.load.remote(self.gens[g], self._job_ref, self._shard_refs[d])
            for g in groups
            for d, a in enumerate(self.actors[g])
        ]
        self.get(loads)
        if self.deflation is not None:
            self.send_deflation(groups)

    def send_deflation(self, groups: list[int]) -> None:
        """Hand every block's basis reference (``deflation``) to the workers of ``groups``."""
        args = self.deflation
        counts = self.get([a.set_deflation.remote(self.gens[g], *args)
                           for g in groups for a in self.actors[g]])  # fmt: skip
        if min(counts) < len(args[0]):
            logger.warning(
                "trace_method='deflated': %d of %d blocks have no Lanczos basis (power "
                "iteration); their traces use plain Hutchinson probes", len(args[0]) - min(counts),
                len(args[0]),
            )  # fmt: skip

    def recover(self, g: int, error: BaseException) -> None:
        """Wait for group ``g``'s actors, rebuild its process group and reload the job
        (``max_retries`` attempts)."""
        for attempt in range(self.config.max_retries + 1):
            logger.warning("group %d: rebuilding after %s", g, str(error).splitlines()[0][:200])
            try:
                self.wait_alive(g)
                self.setup([g])
                return
            except (ray.exceptions.RayError, RuntimeError) as exc:
                if (cause := fatal_cause(exc)) is not None:
                    raise cause from exc
                if attempt == self.config.max_retries:
                    raise RuntimeError(f"group {g} could not be rebuilt") from exc
                error = exc

    def close(self) -> None:
        """Kill the actors and remove their placement groups (idempotent)."""
        if ray.is_initialized():
            for row in self.actors:
                for actor in row:
                    ray.kill(actor, no_restart=True)
            for pg in self._placement_groups:
                remove_placement_group(pg)
        self.actors, self.placement, self._placement_groups = [], {}, []
