"""Where the Ray backend's actors go: one placement group per block group.

Block group ``g`` is a placement group of ``D`` bundles (``cpus_per_actor`` CPUs,
``gpus_per_actor`` GPUs each); actor ``(g, d)`` takes bundle ``d``. With ``placement="pack"``
(the default) Ray puts a group's bundles on one node whenever one node fits them, so the group's
per-HVP all-reduce stays on that node; ``"spread"`` puts them on different nodes when it can.
Network-interface variables of the driver (``GLOO_SOCKET_IFNAME``, ...) reach every actor
through its ``runtime_env``.
"""

from __future__ import annotations

import os
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from pipeline.backends.ray.config import NETWORK_ENV, RayBackendConfig


def group_placements(cfg: RayBackendConfig) -> list[PlacementGroup]:
    """One ready placement group per block group (RuntimeError if not placed in time)."""
    bundle: dict[str, float] = {"CPU": cfg.cpus_per_actor}
    if cfg.gpus_per_actor:
        bundle["GPU"] = cfg.gpus_per_actor
    strategy = "PACK" if cfg.placement == "pack" else "SPREAD"
    groups = [
        placement_group([dict(bundle) for _ in range(cfg.data_shards)], strategy=strategy)
        for _ in range(cfg.block_groups)
    ]
    ready, _ = ray.wait(
        [pg.ready() for pg in groups], num_returns=len(groups), timeout=cfg.start_timeout_s
    )
    if len(ready) < len(groups):
        for pg in groups:
            ray.util.remove_placement_group(pg)
        raise RuntimeError(
            f"{len(groups) - len(ready)} of {len(groups)} placement groups ({cfg.data_shards} "
            f"x {bundle}) were not placed in {cfg.start_timeout_s:g}s "
            f"(cluster resources: {ray.cluster_resources()})"
        )
    return groups


def forwarded_env() -> dict[str, str]:
    """The driver's network-interface variables, for every actor."""
    return {k: os.environ[k] for k in NETWORK_ENV if k in os.environ}


def actor_options(cfg: RayBackendConfig, group: PlacementGroup, bundle: int) -> dict[str, Any]:
    """``ActorClass.options`` of the actor in ``bundle`` of ``group``."""
    env = forwarded_env()
    return {
        "num_cpus": cfg.cpus_per_actor,
        "num_gpus": cfg.gpus_per_actor,
        "max_restarts": cfg.max_actor_restarts,
        "runtime_env": {"env_vars": env} if env else None,
        "scheduling_strategy": PlacementGroupSchedulingStrategy(
            placement_group=group, placement_group_bundle_index=bundle
        ),
    }
