"""Ray on Slurm: one Ray node per Slurm node of a job, rank 0 is the head and the driver.

Rank 0 starts ``ray start --head --block`` with every port pinned and derived from
``SLURM_JOB_ID`` (so jobs sharing a node do not collide), a short per-job temp dir (Unix socket
paths cap at 107 bytes), ``--node-ip-address`` and num_cpus / num_gpus / object store sized from
the allocation, not the machine. It publishes ``ip:port`` in a rendezvous file on the shared
submitit folder, waits until all N nodes are alive, runs the driver, then writes a sentinel file
and stops its own Ray by PID. Other ranks wait for the address, start
``ray start --address ... --block`` and stop it when the sentinel appears. ``ray stop`` is never
used: it kills every Ray on the host.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import submitit

from pipeline.atomic import atomic_write_text

log = logging.getLogger(__name__)
T = TypeVar("T")

# Pinned ports stay below Linux's ephemeral range (32768-60999), where outgoing connections
# would take them: [PORT_FLOOR, PORT_FLOOR + JOB_SLOTS * JOB_SPAN) = [10000, 32000).
PORT_FLOOR = 10000
NODE_SPAN = 100  # ports per Ray node: 10 fixed + 90 for worker processes
NODES_PER_HOST = 4  # Ray nodes of one job that may share a host (emulated clusters)
JOB_SPAN = NODE_SPAN * NODES_PER_HOST
JOB_SLOTS = 55  # job ids modulo this pick a port block
MIN_OBJECT_STORE = 80 * 1024**2  # Ray refuses less than ~75 MiB


class RayBootstrapError(RuntimeError):
    """The Ray cluster of a Slurm job did not come up or went away (message says which rank)."""


@dataclass(frozen=True, kw_only=True)
class RayPorts:
    """Every port a Ray node binds; none is left to chance (0 = "pick one").

    The Ray Client server is not started (it needs ``ray[client]``, which hawq does not use).
    """

    gcs: int
    node_manager: int
    object_manager: int
    dashboard: int
    dashboard_agent_listen: int
    dashboard_agent_grpc: int
    metrics_export: int
    runtime_env_agent: int
    min_worker: int
    max_worker: int

    def args(self, head: bool) -> list[str]:
        out = [
            f"--node-manager-port={self.node_manager}",
            f"--object-manager-port={self.object_manager}",
            f"--dashboard-agent-listen-port={self.dashboard_agent_listen}",
            f"--dashboard-agent-grpc-port={self.dashboard_agent_grpc}",
            f"--metrics-export-port={self.metrics_export}",
            f"--runtime-env-agent-port={self.runtime_env_agent}",
            f"--min-worker-port={self.min_worker}",
            f"--max-worker-port={self.max_worker}",
        ]
        if head:
            out += [
                f"--port={self.gcs}",
                f"--dashboard-port={self.dashboard}",
            ]
        return out


def ray_ports(job_id: int, node_index: int) -> RayPorts:
    """Ports for Ray node ``node_index`` of Slurm job ``job_id``.

    Jobs whose ids differ modulo ``JOB_SLOTS`` never share a port; within a job each node gets
    its own ``NODE_SPAN`` block, so nodes emulated on one host do not collide either.
    """
    if job_id < 0 or node_index < 0:
        raise ValueError(f"job_id {job_id} and node_index {node_index} must be >= 0")
    base = PORT_FLOOR + (job_id % JOB_SLOTS) * JOB_SPAN + (node_index % NODES_PER_HOST) * NODE_SPAN
    return RayPorts(
        gcs=base,
        node_manager=base + 1,
        object_manager=base + 2,
        dashboard=base + 3,
        dashboard_agent_listen=base + 4,
        dashboard_agent_grpc=base + 5,
        metrics_export=base + 6,
        runtime_env_agent=base + 7,
        min_worker=base + 10,
        max_worker=base + NODE_SPAN - 1,
    )


@dataclass(frozen=True, kw_only=True)
class NodeResources:
    """What this Ray node may use: the job's share of the node, not the whole machine."""

    num_cpus: int
    num_gpus: int
    object_store_bytes: int

    @classmethod
    def from_allocation(
        cls, env: Mapping[str, str], tasks_on_node: int = 1, object_store_fraction: float = 0.3
    ) -> NodeResources:
        """This task's share of the allocation, from the ``SLURM_*`` variables.

        CPUs: ``SLURM_CPUS_PER_TASK``, else ``SLURM_CPUS_ON_NODE / tasks_on_node``, else 1.
        GPUs: ``CUDA_VISIBLE_DEVICES``, else ``SLURM_GPUS_ON_NODE``. Object store:
        ``object_store_fraction`` of ``SLURM_MEM_PER_NODE / tasks_on_node`` (2 GiB without --mem).
        """
        tasks_on_node = max(1, tasks_on_node)
        cpus = int(env.get("SLURM_CPUS_PER_TASK") or 0)
        if not cpus:
            cpus = max(1, int(env.get("SLURM_CPUS_ON_NODE") or 1) // tasks_on_node)
        visible = [g for g in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
        gpus = len(visible)
        if not gpus and env.get("SLURM_GPUS_ON_NODE", "").isdigit():
            gpus = int(env["SLURM_GPUS_ON_NODE"]) // tasks_on_node
        mem_mb = int(env.get("SLURM_MEM_PER_NODE") or 0) // tasks_on_node
        # without --mem Slurm reports the whole node's memory: stay modest (2 GiB)
        store = int(mem_mb * 1024**2 * object_store_fraction) if mem_mb else 2 * 1024**3
        return cls(num_cpus=cpus, num_gpus=gpus, object_store_bytes=max(store, MIN_OBJECT_STORE))

    def args(self) -> list[str]:
        return [
            f"--num-cpus={self.num_cpus}",
            f"--num-gpus={self.num_gpus}",
            f"--object-store-memory={self.object_store_bytes}",
        ]


def node_ip_address() -> str:
    """This node's address as Ray reports it (the one other nodes reach it on)."""
    import ray.util  # deferred: importing ray costs ~1 s

    return ray.util.get_node_ip_address()


def _group_members(pgid: int) -> list[int]:
    """PIDs whose process group is ``pgid`` (from /proc; empty where /proc is missing)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid:
            members.append(int(stat.parent.name))
    return members


class RayNodeProcess:
    """One ``ray start ... --block`` child in its own session; stopped by its PID only."""

    def __init__(self, argv: list[str], log_path: Path, env: Mapping[str, str]) -> None:
        self.argv = argv
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as out:
            self.proc = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=dict(env),
                start_new_session=True,  # a group of our own: killpg reaches only our Ray
            )
        log.info("started Ray node (pid %d): %s", self.proc.pid, " ".join(argv))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM (``--block`` then stops the node's processes), SIGKILL the group if needed."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                log.warning("Ray node pid %d ignored SIGTERM; killing its group", self.pid)
        for pid in _group_members(self.pid):  # leftovers of our own process group, if any
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait()
        log.info("stopped Ray node (pid %d, exit %s)", self.pid, self.proc.returncode)

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def wait_for_port(host: str, port: int, timeout_s: float, alive: Callable[[], bool]) -> None:
    """Until ``host:port`` accepts TCP connections; fail early if ``alive()`` turns false."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not alive():
            raise RayBootstrapError(f"the Ray head exited before {host}:{port} opened")
        with socket.socket() as sock:
            sock.settimeout(1.0)
            if sock.connect_ex((host, port)) == 0:
                return
        time.sleep(0.2)
    raise RayBootstrapError(f"the Ray head did not open {host}:{port} in {timeout_s:.0f} s")


def wait_for_nodes(
    address: str, count: int, timeout_s: float, on_connect: Callable[[], None] = lambda: None
) -> int:
    """Connect to ``address``, call ``on_connect``, then poll until ``count`` nodes are alive."""
    import ray  # deferred

    ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    try:
        on_connect()
        deadline = time.monotonic() + timeout_s
        alive = 0
        while time.monotonic() < deadline:
            alive = sum(1 for n in ray.nodes() if n.get("Alive"))
            if alive >= count:
                return alive
            time.sleep(0.5)
        raise RayBootstrapError(f"only {alive} of {count} Ray nodes joined in {timeout_s:.0f} s")
    finally:
        ray.shutdown()


def _ray_executable() -> str:
    candidate = Path(sys.executable).with_name("ray")
    return str(candidate) if candidate.exists() else (shutil.which("ray") or "ray")


@dataclass(frozen=True, kw_only=True)
class RayOnSlurm:
    """The Ray cluster of one job incarnation, seen from one task: one Ray node per task."""

    job_id: int
    rank: int
    size: int  # tasks = Ray nodes
    rendezvous: Path  # shared: holds head_address and done
    temp_dir: Path  # node-local, short
    resources: NodeResources
    env: Mapping[str, str]
    join_timeout_s: float = 300.0

    @classmethod
    def from_job_environment(cls, job_env: submitit.JobEnvironment, folder: Path) -> RayOnSlurm:
        """For the running submitit task; ``folder`` (the job's submitit folder) is shared."""
        env = dict(os.environ)
        job_id = int(job_env.raw_job_id)
        restart = int(env.get("SLURM_RESTART_COUNT") or 0)  # a requeue must not see old files
        return cls(
            job_id=job_id,
            rank=job_env.global_rank,
            size=job_env.num_tasks,
            rendezvous=folder / f"ray-{job_id}-{restart}",
            temp_dir=Path("/tmp") / f"hawq-ray-{job_id}-{job_env.global_rank}",
            resources=NodeResources.from_allocation(
                env, tasks_on_node=job_env.num_tasks // max(1, job_env.num_nodes)
            ),
            env=env,
        )

    @property
    def address_file(self) -> Path:
        return self.rendezvous / "head_address"

    @property
    def sentinel(self) -> Path:
        return self.rendezvous / "done"

    def _start(self, head_address: str | None) -> RayNodeProcess:
        ports = ray_ports(self.job_id, self.rank)
        argv = [_ray_executable(), "start", "--block", "--disable-usage-stats"]
        argv += ["--head", "--include-dashboard=false"] if head_address is None else []
        argv += [f"--address={head_address}"] if head_address else []
        argv += [f"--node-ip-address={node_ip_address()}", f"--temp-dir={self.temp_dir}"]
        argv += ports.args(head=head_address is None) + self.resources.args()
        return RayNodeProcess(argv, self.rendezvous / f"ray-rank{self.rank}.log", self.env)

    def drive(self, driver: Callable[[str], T]) -> tuple[int, T]:
        """Rank 0: start the head, wait for every node, run ``driver(address)``, tear down.

        Returns (nodes alive when the driver started, what the driver returned).
        """
        self.rendezvous.mkdir(parents=True, exist_ok=True)
        head = self._start(None)
        try:
            ip, port = node_ip_address(), ray_ports(self.job_id, 0).gcs
            address = f"{ip}:{port}"
            wait_for_port(ip, port, self.join_timeout_s, head.alive)
            nodes = wait_for_nodes(
                address, self.size, self.join_timeout_s, lambda: self._publish(address)
            )
            log.info("Ray cluster %s: %d node(s) alive; running the driver", address, nodes)
            return nodes, driver(address)
        except RayBootstrapError as err:
            raise RayBootstrapError(f"rank 0: {err}\n{head.tail()}") from None
        finally:
            self.sentinel.touch()  # workers exit on it, whatever happened here
            head.stop()
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    def _publish(self, address: str) -> None:
        atomic_write_text(self.address_file, address)

    def serve_worker(self, poll_s: float = 0.5) -> None:
        """Rank > 0: join the head's cluster and stay until the driver writes the sentinel."""
        deadline = time.monotonic() + self.join_timeout_s
        while not self.address_file.exists():
            if self.sentinel.exists():
                log.info("rank %d: the driver finished before the cluster formed", self.rank)
                return
            if time.monotonic() > deadline:
                raise RayBootstrapError(
                    f"rank {self.rank}: no head address in {self.address_file} after "
                    f"{self.join_timeout_s:.0f} s (did rank 0 start?)"
                )
            time.sleep(poll_s)
        node = self._start(self.address_file.read_text().strip())
        try:
            while not self.sentinel.exists():
                if not node.alive():
                    if self.sentinel.exists():
                        break
                    raise RayBootstrapError(
                        f"rank {self.rank}: ray start exited ({node.proc.returncode}) before "
                        f"the driver finished\n{node.tail()}"
                    )
                time.sleep(poll_s)
            log.info("rank %d: sentinel seen; stopping Ray", self.rank)
        finally:
            node.stop()
            shutil.rmtree(self.temp_dir, ignore_errors=True)
