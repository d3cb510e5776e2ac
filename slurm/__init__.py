"""Run hawq on Slurm: submitit launchers, requeue on preemption, Ray over a job's nodes.

``submit_run(config, run_dir, overrides, SlurmLaunchConfig(...))`` submits one job that runs the
pipeline (or resumes it from the run dir); see ``docs/slurm.md``. ``slurm.ray_cluster`` (imported
only by multi-task jobs) forms the Ray cluster. Nothing in ``hawq`` or ``pipeline`` imports this.
"""

from slurm.launch import (
    HawqRunJob,
    JobOutcome,
    LaunchError,
    SlurmLaunchConfig,
    make_executor,
    outcome,
    sbatch_script,
    submit_run,
)

__all__ = [
    "HawqRunJob",
    "JobOutcome",
    "LaunchError",
    "SlurmLaunchConfig",
    "make_executor",
    "outcome",
    "sbatch_script",
    "submit_run",
]
