"""Run hawq on Slurm: submitit launchers, requeue on preemption, Ray over a job's nodes.

``submit_run(config, run_dir, overrides, SlurmLaunchConfig(...))`` submits one job that runs the
pipeline (or resumes it from the run dir); see ``docs/slurm.md``. ``slurm.ray_cluster`` (imported
only by multi-task jobs) forms the Ray cluster. Nothing in ``hawq`` or ``pipeline`` imports this.
"""

from __future__ import annotations

from typing import Any

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


def __getattr__(name: str) -> Any:
    """The names of ``slurm.launch``, imported on first use (it needs the ``slurm`` extra)."""
    if name not in __all__:
        raise AttributeError(f"module 'slurm' has no attribute {name!r}")
    from hawq.optional import require

    require("submitit", feature="hawq's Slurm launchers")
    from slurm import launch

    return getattr(launch, name)
