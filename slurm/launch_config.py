"""Where and how a hawq run is placed on Slurm: :class:`SlurmLaunchConfig` (sbatch options)."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from slurm.run_record import LAUNCH_DIR

log = logging.getLogger(__name__)

Cluster = Literal["slurm", "local", "debug"]
CLUSTERS = ("slurm", "local", "debug")
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


@dataclass(frozen=True, kw_only=True)
class SlurmLaunchConfig:
    """Where and how a hawq run is placed on Slurm (validated on construction: ValueError).

    ``folder`` holds submitit's pickles and logs (``%j`` becomes the job id); compute nodes must
    see it, so put it on a shared filesystem. ``cluster="local"``/``"debug"`` run the same job
    through submitit's local executors (no Slurm needed; one node; debug: one task, in-process).
    ``setup`` lines and ``extra_sbatch`` only apply to ``cluster="slurm"``.
    """

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None  # node features, e.g. "a100&ib"
    exclusive: bool = False  # whole nodes, not shared with other jobs
    nodes: int = 1
    tasks_per_node: int = 1
    cpus_per_task: int = 1
    gpus_per_node: int = 0
    mem_gb: float | None = None
    time_min: int = 60
    job_name: str = "hawq"
    folder: str | None = None  # None: RUN_DIR/slurm/%j (see ``for_run_dir``)
    signal_delay_s: int = 120
    requeue: bool = True
    max_requeues: int = 3  # requeues after a time limit (preemptions are not counted)
    setup: tuple[str, ...] = ()  # shell lines run in the sbatch script before the job
    extra_sbatch: Mapping[str, str | bool] = field(default_factory=dict)  # {"account": "x"}
    cluster: Cluster = "slurm"
    interface: str | None = None  # network interface of Ray and gloo/nccl (e.g. "ib0")

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
        for key in ("job_name", "partition", "interface", "account", "qos"):
            value = getattr(self, key)
            if value is not None and not _NAME.match(value):
                raise ValueError(f"{key}: {value!r} must be letters, digits, '_', '.' or '-'")
        if self.folder is not None and not self.folder:
            raise ValueError("folder: must name a directory on a shared filesystem")
        if self.constraint is not None and (not self.constraint or "\n" in self.constraint):
            raise ValueError(f"constraint: {self.constraint!r} must be one sbatch --constraint")
        if not isinstance(self.exclusive, bool):
            raise ValueError(f"exclusive: {self.exclusive!r} must be true or false")
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
        if (self.folder or "").startswith(("/tmp/", "/dev/shm/")) and self.cluster == "slurm":
            log.warning("folder %s is node-local on most clusters; use a shared path", self.folder)

    def for_run_dir(self, run_dir: str | os.PathLike[str]) -> SlurmLaunchConfig:
        """With ``folder`` set: the given one, else ``RUN_DIR/slurm/%j`` (logs in the run dir)."""
        if self.folder is not None:
            return self
        return replace(self, folder=str(Path(run_dir).expanduser().absolute() / LAUNCH_DIR / "%j"))

    def folder_path(self) -> Path:
        if self.folder is None:
            raise ValueError("folder: not set (call for_run_dir(RUN_DIR) first)")
        return Path(self.folder).expanduser().absolute()

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
        for key in ("partition", "account", "qos", "constraint"):
            if getattr(self, key) is not None:
                params[key] = getattr(self, key)
        if self.exclusive:
            params["exclusive"] = True
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
