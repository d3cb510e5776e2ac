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
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import submitit
from submitit.core.utils import DelayedSubmission
from submitit.slurm.slurm import _make_sbatch_string

if TYPE_CHECKING:
    from pipeline.config import RunConfig

from slurm.launch_config import SlurmLaunchConfig
from slurm.run_record import LAUNCH_DIR, new_record, record_job, snapshot_config

log = logging.getLogger(__name__)

_OVERRIDE = re.compile(r"^[A-Za-z_][\w.\[\]]*=")


class LaunchError(RuntimeError):
    """Submitting or running a hawq job on Slurm failed (the message says why and the fix)."""


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

    # defaults for jobs pickled by an older hawq and requeued after an upgrade
    interface: str | None = None
    snapshot: bool = False
    stage_cache: str | None = None
    until: str | None = None

    def __init__(
        self,
        *,
        config_path: str,
        run_dir: str,
        overrides: Sequence[str] = (),
        requeue: bool = True,
        interface: str | None = None,
        snapshot: bool = False,
        stage_cache: str | None = None,
        until: str | None = None,
    ) -> None:
        self.until = until  # stop after this stage (a staged submission's first job)
        self.snapshot = snapshot  # config_path is the resolved config submitted: always use it
        self.stage_cache = stage_cache  # a sweep's shared stage cache (pipeline.stage_cache)
        self.config_path = config_path
        self.run_dir = run_dir
        self.overrides = tuple(overrides)
        self.requeue = requeue
        self.interface = interface

    def __call__(self) -> JobOutcome | None:
        if not logging.getLogger().handlers:  # the job's own process: show the pipeline's log
            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
        from pipeline.backends.ray import default_auth_mode  # deferred: imports torch

        default_auth_mode()  # before this job's Ray nodes start, as the `hawq` CLI does
        _defer_preemption_in_training()
        env = submitit.JobEnvironment()
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        log.info("%s: run dir %s (restart %d)", env, self.run_dir, restarts)
        if env.num_tasks > 1:
            from slurm.ray_cluster import RayOnSlurm  # imports ray: only for multi-task jobs

            folder = Path(env.paths.folder)
            bootstrap = RayOnSlurm.from_job_environment(env, folder, self.interface)
            if bootstrap.rank != 0:
                bootstrap.serve_worker()
                return None
            nodes, (action, result) = bootstrap.drive(
                lambda address: run_or_resume(
                    self.config_path,
                    self.run_dir,
                    (*self.overrides, "backend.kind=ray", f"backend.address={address}"),
                    use_run_config=not self.snapshot,
                    stage_cache=self.stage_cache,
                    until=self.until,
                )
            )
        else:
            if self.interface:  # a private Ray's workers inherit these
                from pipeline.backends.ray.config import NETWORK_ENV

                os.environ.update(dict.fromkeys(NETWORK_ENV, self.interface))
            nodes = 0
            action, result = run_or_resume(
                self.config_path,
                self.run_dir,
                self.overrides,
                use_run_config=not self.snapshot,
                stage_cache=self.stage_cache,
                until=self.until,
            )
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


def _defer_preemption_in_training() -> None:
    """Route submitit's USR2 handler (checkpoint, requeue, exit) through
    :func:`pipeline.preempt.defer_or_run`: during training the state is saved at the next step
    first, so the requeued job resumes at that step instead of the last epoch end."""
    from pipeline import preempt

    original = signal.getsignal(signal.SIGUSR2)
    if not callable(original):
        return

    def handler(signum: int, frame: Any) -> None:
        preempt.defer_or_run(lambda: original(signum, frame))

    signal.signal(signal.SIGUSR2, handler)


def run_or_resume(
    config_path: str,
    run_dir: str,
    overrides: Sequence[str],
    *,
    use_run_config: bool = True,
    stage_cache: str | None = None,
    until: str | None = None,
) -> tuple[str, Any]:
    """Run the pipeline in ``run_dir``; if it already holds a run, resume it.

    Resuming uses the config stored in the run dir (like ``hawq resume``) unless
    ``use_run_config`` is false (``config_path`` is the submitted snapshot), with ``overrides``
    applied again: they are the same values, except placement (``backend.address``) that a
    requeued multi-node job must update. Returns ("run" | "resume", the scheduler's outcome).
    """
    from pipeline.config import load_config  # deferred: imports torch
    from pipeline.scheduler import run
    from pipeline.store import RunStore

    store = RunStore(Path(run_dir))
    action = "resume" if store.exists() else "run"
    source = store.config_path if action == "resume" and use_run_config else Path(config_path)
    log.info("hawq %s: config %s, run dir %s, overrides %s", action, source, run_dir, overrides)
    cfg = load_config(source, overrides)
    from pipeline.stage_cache import StageCache

    cache = None if stage_cache is None else StageCache(stage_cache)
    return action, run(cfg, run_dir, progress=False, stage_cache=cache, until=until)


def make_executor(cfg: SlurmLaunchConfig) -> submitit.Executor:
    """The submitit executor for ``cfg.cluster``, with ``cfg``'s parameters applied."""
    folder = cfg.folder_path()
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
    folder = cfg.folder_path()
    python = shlex.quote(sys.executable) if python is None else python
    command = " ".join([python, "-u -m submitit.core._submit", shlex.quote(str(folder))])
    return _make_sbatch_string(command=command, folder=folder, **cfg.sbatch_parameters())


def make_job(
    config_path: str | os.PathLike[str],
    run_dir: str | os.PathLike[str],
    overrides: Sequence[str] = (),
    launch_cfg: SlurmLaunchConfig | None = None,
    *,
    snapshot: bool = False,
) -> HawqRunJob:
    """The job callable for a run, with absolute paths (the job may start elsewhere).

    Validates first (:func:`check_run_inputs`). ``snapshot``: write the resolved config to
    ``RUN_DIR/slurm/submitted-<n>.yaml`` and let the job read that copy (overrides baked in).
    """
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
    resolved = check_run_inputs(config, run, overrides, cfg)
    if snapshot:
        from pipeline.config import config_to_yaml  # deferred: imports torch

        config, overrides = snapshot_config(run, config_to_yaml(resolved)), ()
    return HawqRunJob(
        config_path=str(config),
        run_dir=str(run),
        overrides=overrides,
        requeue=cfg.requeue,
        interface=cfg.interface,
        snapshot=snapshot,
    )


def hawq_command(job: HawqRunJob) -> str:
    """The ``hawq`` command line the job amounts to (for ``--dry-run`` and the log)."""
    from pipeline.store import RunStore  # deferred: imports torch

    sets = " ".join(f"--set {shlex.quote(o)}" for o in job.overrides)
    if RunStore(Path(job.run_dir)).exists() and not job.snapshot:
        return f"hawq resume {shlex.quote(job.run_dir)} {sets}".strip()
    run = f"hawq run {shlex.quote(job.config_path)} --run-dir {shlex.quote(job.run_dir)}"
    return f"{run} {sets}".strip()


def describe_submission(
    config_path: str | os.PathLike[str],
    run_dir: str | os.PathLike[str],
    overrides: Sequence[str] = (),
    launch_cfg: SlurmLaunchConfig | None = None,
) -> str:
    """What ``submit_run`` would submit: the hawq command, run dir, resolved config, sbatch
    script. Validates like a submission and writes nothing."""
    from pipeline.config import config_to_yaml  # deferred: imports torch

    cfg = (launch_cfg or SlurmLaunchConfig()).for_run_dir(run_dir)
    job = make_job(config_path, run_dir, overrides, cfg)
    resolved = check_run_inputs(Path(job.config_path), Path(job.run_dir), job.overrides, cfg)
    ray = " (rank 0; one Ray node per task, backend.kind=ray)" if cfg.num_tasks > 1 else ""
    return (
        f"# hawq command{ray}:\n{hawq_command(job)}\n"
        f"# run dir: {job.run_dir}\n"
        f"# config snapshot: {Path(job.run_dir) / LAUNCH_DIR}/submitted-<n>.yaml\n"
        f"# Slurm logs: {cfg.folder_path()}\n"
        f"# resolved config:\n{config_to_yaml(resolved)}"
        f"# sbatch script:\n{sbatch_script(cfg)}"
    )


def check_run_inputs(
    config_path: Path,
    run_dir: Path,
    overrides: Sequence[str],
    launch_cfg: SlurmLaunchConfig | None = None,
) -> RunConfig:
    """The checks ``hawq run`` makes first (keys, values, run dir, checkpoint and data paths),
    and that the Ray actor grid fits the allocation (:mod:`slurm.allocation`).

    Raises ``ConfigError``/``StoreError``/``ValueError``, so a bad config fails here, before
    anything reaches sbatch. The config is the run dir's own when it holds a run.
    """
    from pipeline.config import check_paths, load_config  # deferred: imports torch
    from pipeline.store import RunStore
    from pipeline.validate import check_run_dir
    from slurm.allocation import check_allocation

    store = RunStore(run_dir)
    cfg = load_config(store.config_path if store.exists() else config_path, overrides)
    check_run_dir(run_dir)
    check_paths(cfg)
    check_allocation(cfg, launch_cfg or SlurmLaunchConfig())
    return cfg


def submit_run(
    config_path: str | os.PathLike[str],
    run_dir: str | os.PathLike[str],
    overrides: Sequence[str] = (),
    launch_cfg: SlurmLaunchConfig | None = None,
) -> submitit.Job:
    """Submit ``hawq run CONFIG --run-dir RUN_DIR --set OVERRIDES`` (or resume) as one job.

    Returns the submitit job; ``job.results()[0]`` is rank 0's :class:`JobOutcome`.
    """
    cfg = (launch_cfg or SlurmLaunchConfig()).for_run_dir(run_dir)
    job_fn = make_job(config_path, run_dir, overrides, cfg, snapshot=True)
    executor = make_executor(cfg)
    try:
        job = executor.submit(job_fn)
    except (submitit.core.utils.FailedSubmissionError, OSError) as err:
        Path(job_fn.config_path).unlink(missing_ok=True)
        raise LaunchError(f"submission to {cfg.cluster} failed: {err}") from err
    record_submission(job, job_fn, cfg)
    return job


def record_submission(job: submitit.Job, job_fn: HawqRunJob, cfg: SlurmLaunchConfig) -> None:
    """Append ``job`` to ``RUN_DIR/slurm/jobs.json`` (``hawq-slurm status/logs/cancel``)."""
    record = new_record(job.job_id, cfg.cluster, str(cfg.folder), job_fn.config_path, cfg.num_tasks)
    record_job(job_fn.run_dir, record)
    log.info("submitted job %s (%s) for run dir %s", job.job_id, cfg.cluster, job_fn.run_dir)


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
    from pipeline.lock import squeue_states

    return bool(squeue_states(job_id))
