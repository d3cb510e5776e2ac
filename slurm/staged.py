"""Per-stage resource shapes: the Hessian on N Ray nodes, the rest on one node, chained.

``submit_staged`` submits two jobs for one run dir and one config snapshot: the first runs
baseline and Hessian (``until="hessian"``) with ``hessian_cfg`` (e.g. 4 nodes: a Ray cluster),
the second the remaining stages (fine-tuning, evaluation, export) with ``rest_cfg`` (e.g. 1 node
x k GPUs) and ``--dependency=afterok:<first>``: it starts only when the first completed, after
any requeues. Both are recorded in ``RUN_DIR/slurm/jobs.json``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace

import submitit

from slurm.launch import (
    HawqRunJob,
    LaunchError,
    make_executor,
    make_job,
    record_submission,
)
from slurm.launch_config import SlurmLaunchConfig


def submit_staged(
    config_path: str | os.PathLike[str],
    run_dir: str | os.PathLike[str],
    overrides: Sequence[str],
    hessian_cfg: SlurmLaunchConfig,
    rest_cfg: SlurmLaunchConfig,
) -> tuple[submitit.Job, submitit.Job]:
    """Submit (baseline + Hessian on ``hessian_cfg``, the rest on ``rest_cfg`` afterok)."""
    if hessian_cfg.cluster != "slurm" or rest_cfg.cluster != "slurm":
        raise ValueError("cluster: chained stages need Slurm (afterok dependencies)")
    hcfg, rcfg = hessian_cfg.for_run_dir(run_dir), rest_cfg.for_run_dir(run_dir)
    first_fn = make_job(config_path, run_dir, overrides, hcfg, snapshot=True)
    first_fn.until = "hessian"
    second_fn = HawqRunJob(
        config_path=first_fn.config_path,
        run_dir=first_fn.run_dir,
        requeue=rcfg.requeue,
        interface=rcfg.interface,
        snapshot=True,
    )
    try:
        first = make_executor(hcfg).submit(first_fn)
        record_submission(first, first_fn, hcfg)
        chained = replace(rcfg, extra_sbatch={**rcfg.extra_sbatch,
                                              "dependency": f"afterok:{first.job_id}"})  # fmt: skip
        second = make_executor(chained).submit(second_fn)
        record_submission(second, second_fn, chained)
    except (submitit.core.utils.FailedSubmissionError, OSError) as err:
        raise LaunchError(f"submission to Slurm failed: {err}") from err
    return first, second
