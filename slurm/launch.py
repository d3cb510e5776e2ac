"""Submit a hawq pipeline run as a Slurm job with submitit; requeue on preemption or time limit.

The job runs :class:`HawqRunJob`, a :class:`submitit.helpers.Checkpointable`. On the preemption
signal (USR2, sent ``signal_delay_s`` before the time limit or by ``scancel --signal=USR2``)
submitit calls :meth:`HawqRunJob.checkpoint`, which re-submits the *same* callable: all progress
lives in the run directory, so the requeued job finds it there and resumes. A requeue after a
node failure reuses the original pickle for the same reason.

A job with several tasks (``nodes * tasks_per_node > 1``; normally one task per node) forms a Ray
cluster, one Ray node per task (:mod:`slurm.ray_cluster`), and rank 0 drives the pipeline with
``backend.kind=ray`` and ``backend.address`` pointing at it.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import submitit
from submitit.core.utils import DelayedSubmission
from submitit.slurm.slurm import _make_sbatch_string

log = logging.getLogger(__name__)

Cluster = Literal["slurm", "local", "debug"]
CLUSTERS = ("slurm", "local", "debug")
DEFAULT_FOLDER = "runs/slurm/%j"
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_OVERRIDE = re.compile(r"^[A-Za-z_][\w.\[\]]*=")


class LaunchError(RuntimeError):
    """Submitting or running a hawq job on Slurm failed (the message says why and the fix)."""


@dataclass(frozen=True, kw_only=True)
class SlurmLaunchConfig:
    """Where and how a hawq run is placed on Slurm (validated on construction: ValueError).

    ``folder`` holds submitit's pickles and logs (``%j`` becomes the job id); compute nodes must
    see it, so put it on a shared filesystem. ``cluster="local"``/``"debug"`` run the same job
    through submitit's local executors (no Slurm needed; one node; debug: one task, in-process).
    ``setup`` lines and ``extra_sbatch`` only apply to ``cluster="slurm"``.
    """

    partition: str | None = None
    nodes: int = 1
    tasks_per_node: int = 1
    cpus_per_task: int = 1
    gpus_per_node: int = 0
    mem_gb: float | None = None
    time_min: int = 60
    job_name: str = "hawq"
    folder: str = DEFAULT_FOLDER
    signal_delay_s: int = 120
    requeue: bool = True
    max_requeues: int = 3  # requeues after a time limit (preemptions are not counted)
    setup: tuple[str, ...] = ()  # shell lines run in the sbatch script before the job
    extra_sbatch: Mapping[str, str | bool] = field(default_factory=dict)  # {"account": "x"}
    cluster: Cluster = "slurm"

    def __post_init__(self) -> None:
        object.__setattr__(self, "setup", tuple(self.setup))
        object.__setattr__(self, "extra_sbatch", dict(self.extra_sbatch))
        if self.cluster not in CLUSTERS:
            raise ValueError(f"cluster: {self.cluster!r} must be one of {', '.join(CLUSTERS)}")
        for key in ("nodes", "tasks_per_node", "cpus_per_task", "time_min"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key}: {value!r} must be an integer >= 1")
        for key in ("gpus_per_node", "signal_delay_s", "max_requeues"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{key}: {value!r} must be an integer >= 0")
        if self.mem_gb is not None and not self.mem_gb > 0:
            raise ValueError(f"mem_gb: {self.mem_gb!r} must be > 0 (or None for the default)")
        if self.signal_delay_s >= self.time_min * 60:
            raise ValueError(
                f"signal_delay_s: {self.signal_delay_s} s must be shorter than the time limit "
                f"({self.time_min} min), or the job is signalled as soon as it starts"
            )
        for key in ("job_name", "partition"):
            value = getattr(self, key)
            if value is not None and not _NAME.match(value):
                raise ValueError(f"{key}: {value!r} must be letters, digits, '_', '.' or '-'")
        if not self.folder:
            raise ValueError("folder: must name a directory on a shared filesystem")
        if self.nodes > 1 and self.cluster != "slurm":
            raise ValueError(f"nodes: {self.nodes} needs cluster='slurm' (got {self.cluster!r})")
        if self.cluster == "debug" and self.tasks_per_node > 1:
            raise ValueError("tasks_per_node: cluster 'debug' runs one task in this process")
        for i, line in enumerate(self.setup):
            if not isinstance(line, str) or "\n" in line:
                raise ValueError(f"setup[{i}]: {line!r} must be one shell line")
        for key, value in self.extra_sbatch.items():
            if not re.match(r"^[a-z][a-z0-9_-]*$", str(key)) or "\n" in str(value):
                raise ValueError(f"extra_sbatch: {key!r}={value!r} is not an sbatch option")
        if self.folder.startswith(("/tmp/", "/dev/shm/")) and self.cluster == "slurm":
            log.warning("folder %s is node-local on most clusters; use a shared path", self.folder)

    @property
    def num_tasks(self) -> int:
        """Tasks of the job; more than one means one Ray node per task (rank 0 drives)."""
        return self.nodes * self.tasks_per_node

    def sbatch_parameters(self) -> dict[str, Any]:
        """The parameters of ``submitit.SlurmExecutor.update_parameters`` (sbatch names)."""
        params: dict[str, Any] = {
            "job_name": self.job_name,
            "time": self.time_min,
            "nodes": self.nodes,
            "ntasks_per_node": self.tasks_per_node,
            "cpus_per_task": self.cpus_per_task,
            "signal_delay_s": self.signal_delay_s,
            "additional_parameters": {
                ("requeue" if self.requeue else "no_requeue"): True,
                **self.extra_sbatch,
            },
        }
        if self.partition is not None:
            params["partition"] = self.partition
        if self.gpus_per_node:
            params["gpus_per_node"] = self.gpus_per_node
        if self.mem_gb is not None:
            gb = float(self.mem_gb)
            params["mem"] = f"{int(gb)}GB" if gb == int(gb) else f"{int(gb * 1024)}MB"
        if self.setup:
            params["setup"] = list(self.setup)
        return params

    def local_parameters(self) -> dict[str, Any]:
        """The parameters of submitit's local executor (generic names)."""
        return {
            "timeout_min": self.time_min,
            "tasks_per_node": self.tasks_per_node,
            "gpus_per_node": self.gpus_per_node,
            "signal_delay_s": self.signal_delay_s,
        }


@dataclass(frozen=True, kw_only=True)
class JobOutcome:
    """What rank 0 of a finished job returns (``job.results()[0]``)."""

    run_dir: str
    action: Literal["run", "resume"]
    job_id: str | None
    restarts: int  # SLURM_RESTART_COUNT: how often Slurm requeued this job
    ray_nodes: int  # Ray nodes alive when the driver started (0: no Ray-on-Slurm)
    result: Any = None  # what the pipeline's run/resume returned


class HawqRunJob(submitit.helpers.Checkpointable):
    """The job body: run the pipeline in ``run_dir``, or resume it if the directory has a run.

    Holds only paths and overrides; all progress is on disk, so :meth:`checkpoint` can resubmit
    this very object and the requeued job picks up where the run dir says.
    """

    def __init__(
        self,
        *,
        config_path: str,
        run_dir: str,
        overrides: Sequence[str] = (),
        requeue: bool = True,
    ) -> None:
        self.config_path = config_path
        self.run_dir = run_dir
        self.overrides = tuple(overrides)
        self.requeue = requeue

    def __call__(self) -> JobOutcome | None:
        if not logging.getLogger().handlers:  # the job's own process: show the pipeline's log
            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
        from pipeline.backends.ray import default_auth_mode  # deferred: imports torch

        default_auth_mode()  # before this job's Ray nodes start, as the `hawq` CLI does
        env = submitit.JobEnvironment()
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        log.info("%s: run dir %s (restart %d)", env, self.run_dir, restarts)
        if env.num_tasks > 1:
            from slurm.ray_cluster import RayOnSlurm  # imports ray: only for multi-task jobs

            bootstrap = RayOnSlurm.from_job_environment(env, Path(env.paths.folder))
            if bootstrap.rank != 0:
                bootstrap.serve_worker()
                return None
            nodes, (action, result) = bootstrap.drive(
                lambda address: run_or_resume(
                    self.config_path,
                    self.run_dir,
                    (*self.overrides, "backend.kind=ray", f"backend.address={address}"),
                )
            )
        else:
            nodes = 0
            action, result = run_or_resume(self.config_path, self.run_dir, self.overrides)
        return JobOutcome(
            run_dir=self.run_dir,
            action=action,
            job_id=env.job_id,
            restarts=restarts,
            ray_nodes=nodes,
            result=result,
        )

    def checkpoint(self) -> DelayedSubmission | None:  # type: ignore[override]
        """Requeue the same callable (state is on disk); ``None`` = do not requeue."""
        if not self.requeue:
            return None
        log.info("checkpoint: requeueing; the next start resumes %s", self.run_dir)
        return DelayedSubmission(self)


def run_or_resume(config_path: str, run_dir: str, overrides: Sequence[str]) -> tuple[str, Any]:
    """Run the pipeline in ``run_dir``; if it already holds a run, resume it.

    Resuming uses the config stored in the run dir (like ``hawq resume``), with ``overrides``
    applied again: they are the same values, except placement (``backend.address``) that a
    requeued multi-node job must update. Returns ("run" | "resume", the scheduler's outcome).
    """
    from pipeline.config import load_config  # deferred: imports torch
    from pipeline.scheduler import run
    from pipeline.store import RunStore

    store = RunStore(Path(run_dir))
    action = "resume" if store.exists() else "run"
    source = store.config_path if action == "resume" else Path(config_path)
    log.info("hawq %s: config %s, run dir %s, overrides %s", action, source, run_dir, overrides)
    cfg = load_config(source, overrides)
    return action, run(cfg, run_dir, progress=False)


def make_executor(cfg: SlurmLaunchConfig) -> submitit.Executor:
    """The submitit executor for ``cfg.cluster``, with ``cfg``'s parameters applied."""
    folder = Path(cfg.folder).expanduser().absolute()
    executor: submitit.Executor
    if cfg.cluster == "slurm":
        try:
            executor = submitit.SlurmExecutor(folder, max_num_timeout=cfg.max_requeues)
        except RuntimeError as err:
            raise LaunchError(
                f"{err} Fix: run on a Slurm login node, or use cluster='local'."
            ) from None
        executor.update_parameters(**cfg.sbatch_parameters())
    elif cfg.cluster == "local":
        executor = submitit.LocalExecutor(folder, max_num_timeout=cfg.max_requeues)
        executor.update_parameters(**cfg.local_parameters())
    else:
        executor = submitit.DebugExecutor(folder)
    return executor


def sbatch_script(cfg: SlurmLaunchConfig, python: str | None = None) -> str:
    """The sbatch script ``submit_run`` would submit for ``cfg`` (no Slurm needed)."""
    folder = Path(cfg.folder).expanduser().absolute()
    python = shlex.quote(sys.executable) if python is None else python
    command = " ".join([python, "-u -m submitit.core._submit", shlex.quote(str(folder))])
    return _make_sbatch_string(command=command, folder=folder, **cfg.sbatch_parameters())


def make_job(
    config_path: str | os.PathLike[str],
    run_dir: str | os.PathLike[str],
    overrides: Sequence[str] = (),
    launch_cfg: SlurmLaunchConfig | None = None,
) -> HawqRunJob:
    """The job callable for a run, with absolute paths (the job may start elsewhere)."""
    cfg = launch_cfg or SlurmLaunchConfig()
    for item in overrides:
        if not _OVERRIDE.match(item):
            raise ValueError(f"override {item!r} must look like key.path=value")
        if item.startswith(("backend.address=", "backend.kind=")) and cfg.num_tasks > 1:
            raise ValueError(f"override {item!r}: a multi-task job sets the Ray backend itself")
    run = Path(run_dir).expanduser().absolute()
    config = Path(config_path).expanduser().absolute()
    if not config.is_file() and not run.is_dir():
        raise LaunchError(f"config {config} does not exist (and there is no run dir {run})")
    check_run_inputs(config, run, overrides)
    return HawqRunJob(
        config_path=str(config),
        run_dir=str(run),
        overrides=overrides,
        requeue=cfg.requeue,
    )


def check_run_inputs(config_path: Path, run_dir: Path, overrides: Sequence[str]) -> None:
    """The checks ``hawq run`` makes first (keys, values, run dir, checkpoint and data paths).

    Raises ``ConfigError``/``StoreError`` (both ``ValueError``), so a bad config fails here,
    before anything reaches sbatch. The config is the run dir's own when it holds a run.
    """
    from pipeline.config import check_paths, load_config  # deferred: imports torch
    from pipeline.store import RunStore
    from pipeline.validate import check_run_dir

    store = RunStore(run_dir)
    cfg = load_config(store.config_path if store.exists() else config_path, overrides)
    check_run_dir(run_dir)
    check_paths(cfg)


def submit_run(
    config_path: str | os.PathLike[str],
    run_dir: str | os.PathLike[str],
    overrides: Sequence[str] = (),
    launch_cfg: SlurmLaunchConfig | None = None,
) -> submitit.Job:
    """Submit ``hawq run CONFIG --run-dir RUN_DIR --set OVERRIDES`` (or resume) as one job.

    Returns the submitit job; ``job.results()[0]`` is rank 0's :class:`JobOutcome`.
    """
    cfg = launch_cfg or SlurmLaunchConfig()
    job_fn = make_job(config_path, run_dir, overrides, cfg)
    executor = make_executor(cfg)
    try:
        job = executor.submit(job_fn)
    except (submitit.core.utils.FailedSubmissionError, OSError) as err:
        raise LaunchError(f"submission to {cfg.cluster} failed: {err}") from err
    log.info("submitted job %s (%s) for run dir %s", job.job_id, cfg.cluster, job_fn.run_dir)
    return job


def outcome(job: submitit.Job) -> JobOutcome:
    """Wait for ``job`` and return rank 0's :class:`JobOutcome` (raises the job's error).

    A Slurm job still in ``squeue`` (e.g. requeued and pending again) is waited for first:
    accounting (``sacct``, which submitit polls) can report the interrupted attempt as FAILED
    before the requeued attempt starts.
    """
    if isinstance(job, submitit.SlurmJob):
        while _in_queue(job.job_id):
            time.sleep(1.0)
    results = job.results()
    first = results[0]
    if not isinstance(first, JobOutcome):
        raise LaunchError(f"job {job.job_id} returned {first!r}, not a JobOutcome")
    return first


def _in_queue(job_id: str) -> bool:
    """Whether Slurm still lists the job (pending, running, completing)."""
    try:
        out = subprocess.run(
            ["squeue", "-h", "-j", str(job_id), "-o", "%T"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and bool(out.stdout.strip())
