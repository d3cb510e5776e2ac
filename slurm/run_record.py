"""What ``hawq-slurm`` keeps in ``RUN_DIR/slurm/``: submitted configs, job ids, Slurm logs.

- ``submitted-<n>.yaml``: the resolved config of the n-th submission (overrides applied). The
  job reads this copy, so editing the YAML after submitting does not change a queued job.
- ``jobs.json``: one record per submitted job (job id, cluster, submitit folder, config).
- ``<job id>/``: submitit's folder (pickles, ``<job>_<task>_log.out|err``) unless ``--folder``
  put it elsewhere; the record says where.

``hawq-slurm status|logs|cancel RUN_DIR`` read ``jobs.json``.
"""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.atomic import atomic_write_json, atomic_write_text

LAUNCH_DIR = "slurm"  # = pipeline.store.LAUNCH_DIR (not imported: that imports torch)
JOBS = "jobs.json"


@dataclass(frozen=True, kw_only=True)
class JobRecord:
    """One submitted job of a run dir."""

    job_id: str
    cluster: str
    folder: str  # submitit folder, ``%j`` not yet replaced
    config: str  # the submitted config snapshot
    submitted: float
    tasks: int = 1

    def folder_path(self) -> Path:
        return Path(self.folder.replace("%j", self.job_id.split("_")[0]))

    def log_path(self, task: int = 0, stream: str = "out") -> Path:
        """submitit's log of ``task`` (``stream``: out | err)."""
        return self.folder_path() / f"{self.job_id}_{task}_log.{stream}"


def launch_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / LAUNCH_DIR


def snapshot_config(run_dir: str | Path, yaml_text: str) -> Path:
    """Write the next ``submitted-<n>.yaml`` (atomically) and return its path."""
    folder = launch_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    n = 1 + sum(1 for _ in folder.glob("submitted-*.yaml"))
    while (folder / f"submitted-{n}.yaml").exists():
        n += 1
    path = folder / f"submitted-{n}.yaml"
    atomic_write_text(path, yaml_text)
    return path


def recorded_jobs(run_dir: str | Path) -> list[JobRecord]:
    """The jobs submitted for ``run_dir``, oldest first (empty if none)."""
    path = launch_dir(run_dir) / JOBS
    if not path.exists():
        return []
    return [JobRecord(**rec) for rec in json.loads(path.read_text())]


def record_job(run_dir: str | Path, record: JobRecord) -> None:
    jobs = [asdict(r) for r in recorded_jobs(run_dir)] + [asdict(record)]
    atomic_write_json(launch_dir(run_dir) / JOBS, jobs)


def new_record(job_id: str, cluster: str, folder: str, config: Path, tasks: int) -> JobRecord:
    return JobRecord(
        job_id=str(job_id),
        cluster=cluster,
        folder=folder,
        config=str(config),
        submitted=time.time(),
        tasks=tasks,
    )


def slurm_states(job_ids: list[str]) -> dict[str, str]:
    """Job id -> state: ``squeue`` for queued jobs, else ``sacct``; "UNKNOWN" if neither says."""
    states: dict[str, str] = {}
    if not job_ids:
        return states
    ids = ",".join(job_ids)
    queue = _run(["squeue", "-h", "-j", ids, "-o", "%i %T"])
    for line in queue.splitlines():
        parts = line.split()
        if len(parts) == 2:
            states[parts[0]] = parts[1]
    missing = [j for j in job_ids if j not in states]
    if missing:
        acct = _run(["sacct", "-n", "-X", "-P", "-j", ",".join(missing), "-o", "JobID,State"])
        for line in acct.splitlines():
            job, _, state = line.partition("|")
            if job in missing and state:
                states[job] = state.split()[0]
    return {j: states.get(j, "UNKNOWN") for j in job_ids}


def _run(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout if out.returncode == 0 else ""
