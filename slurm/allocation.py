"""Does a run's Ray actor grid fit the Slurm allocation it is submitted with? (checked at submit)

A job with several tasks runs one Ray node per task, sized from the allocation
(:class:`slurm.ray_cluster.NodeResources`); a one-task job with ``backend.kind: ray`` runs a
private Ray on the task's CPUs. The grid needs ``D x G x cpus_per_actor`` CPUs (each actor within
one task's share) and ``D x G x gpus_per_actor`` GPUs, the data-parallel training workers
``distributed.world_size x cpus_per_worker`` CPUs (and as many times ``gpus_per_worker`` GPUs);
each node's object store holds the job (float weights) and the Hessian batches the driver puts
there. A shortfall is a
:class:`ValueError` naming the ``hawq-slurm`` flag to change (or the config key), raised before
anything is submitted.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from slurm.ray_cluster import NodeResources

if TYPE_CHECKING:
    from pipeline.config import RunConfig
    from slurm.launch import SlurmLaunchConfig

DEFAULT_IMAGE_SIDE = 32  # inputs whose side the config does not say (CIFAR-sized)
STORE_HEADROOM = 2.0  # the object store must hold twice the job: puts and their copies


def uses_ray(run: RunConfig, launch: SlurmLaunchConfig) -> bool:
    return launch.num_tasks > 1 or run.backend.kind == "ray"


def task_resources(launch: SlurmLaunchConfig) -> NodeResources:
    """What one task's Ray node gets, as ``NodeResources.from_allocation`` will compute it."""
    env = {"SLURM_CPUS_PER_TASK": str(launch.cpus_per_task)}
    if launch.gpus_per_node:
        env["SLURM_GPUS_ON_NODE"] = str(launch.gpus_per_node)
    if launch.mem_gb is not None:
        env["SLURM_MEM_PER_NODE"] = str(int(launch.mem_gb * 1024))
    return NodeResources.from_allocation(env, tasks_on_node=launch.tasks_per_node)


def hessian_job_bytes(run: RunConfig) -> int:
    """An estimate of what the driver puts into the object store: weights and Hessian batches."""
    from pipeline.models import model_factory  # deferred: imports torch

    weights = sum(p.numel() for p in model_factory(run.model)().parameters()) * 4
    side = run.model.image_size or run.data.image_size or DEFAULT_IMAGE_SIDE
    itemsize = 8 if run.hessian.dtype == "float64" else 4
    batches = run.data.hessian_samples * run.model.in_channels * side * side * itemsize
    return weights + batches


def check_data_parallel(run: RunConfig, launch: SlurmLaunchConfig) -> None:
    """Raise ``ValueError`` if ``distributed.world_size`` workers do not fit the job's CPUs
    (each within one task's share) or GPUs."""
    d = run.distributed
    if d.world_size == 1:
        return
    if d.cpus_per_worker > launch.cpus_per_task:
        raise ValueError(
            f"distributed.cpus_per_worker={d.cpus_per_worker:g} exceeds the "
            f"{launch.cpus_per_task} CPU(s) of one task. Fix: --cpus-per-task "
            f"{math.ceil(d.cpus_per_worker)} (or lower distributed.cpus_per_worker)"
        )
    for what, per, have, flag in (
        ("CPUs", d.cpus_per_worker, launch.num_tasks * launch.cpus_per_task, "--cpus-per-task"),
        ("GPUs", d.gpus_per_worker, launch.nodes * launch.gpus_per_node, "--gpus-per-node"),
    ):
        need = d.world_size * per
        if need > have + 1e-9:
            raise ValueError(
                f"distributed.world_size={d.world_size} workers need {need:g} {what}; the job "
                f"has {have}. Fix: more --nodes or {flag}, or lower distributed.world_size"
            )


def check_allocation(run: RunConfig, launch: SlurmLaunchConfig) -> None:
    """Raise ``ValueError`` if the actor grid, the data-parallel workers or the object store do
    not fit (see module doc)."""
    check_data_parallel(run, launch)
    if not uses_ray(run, launch):
        return
    b = run.backend
    actors = (b.data_shards or 1) * b.block_groups  # an unset D is chosen within the CPUs
    grid = f"backend.data_shards={b.data_shards or 1} x backend.block_groups={b.block_groups}"
    per_task = launch.cpus_per_task
    tasks = launch.num_tasks
    if b.cpus_per_actor > per_task:
        raise ValueError(
            f"backend.cpus_per_actor={b.cpus_per_actor:g} exceeds the {per_task} CPU(s) of one "
            f"task. Fix: --cpus-per-task {math.ceil(b.cpus_per_actor)} (or lower "
            "backend.cpus_per_actor)"
        )
    need = actors * b.cpus_per_actor
    have = tasks * per_task
    if need > have + 1e-9:
        fit = math.ceil(need / tasks)
        raise ValueError(
            f"the actor grid {grid} needs {need:g} CPUs (backend.cpus_per_actor="
            f"{b.cpus_per_actor:g}); the job has {have} ({tasks} task(s) x --cpus-per-task "
            f"{per_task}). Fix: --cpus-per-task {fit}, more --nodes, or a smaller grid"
        )
    gpus = actors * b.gpus_per_actor
    have_gpus = launch.nodes * launch.gpus_per_node
    if gpus > have_gpus + 1e-9:
        fit = math.ceil(gpus / launch.nodes)
        raise ValueError(
            f"the actor grid {grid} needs {gpus:g} GPUs (backend.gpus_per_actor="
            f"{b.gpus_per_actor:g}); the job has {have_gpus}. Fix: --gpus-per-node {fit}"
        )
    if launch.num_tasks > 1:  # a private Ray sizes its own store; Ray-on-Slurm uses --mem-gb
        store = task_resources(launch).object_store_bytes
        need_store = int(STORE_HEADROOM * hessian_job_bytes(run))
        if need_store > store:
            mem_gb = math.ceil(need_store / 0.3 * launch.tasks_per_node / 1024**3)
            raise ValueError(
                f"the Ray object store of each node ({store / 2**20:.0f} MiB: 30% of --mem-gb "
                f"per task) is below the ~{need_store / 2**20:.0f} MiB the Hessian job needs "
                f"(weights and data.hessian_samples={run.data.hessian_samples}). Fix: --mem-gb "
                f"{mem_gb} (or fewer data.hessian_samples)"
            )
