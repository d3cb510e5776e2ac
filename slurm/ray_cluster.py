"""Ray on Slurm: one Ray node per Slurm node of a job, rank 0 is the head and the driver.

Rank 0 starts ``ray start --head --block`` with every port pinned: the first free block from
one derived from ``SLURM_JOB_ID`` and the rank (:mod:`slurm.ray_network`; a port taken between
the check and the bind moves the node to the next block), a short per-job temp dir (Unix socket
paths cap at 107 bytes), ``--node-ip-address`` (Ray's choice, or the address of the job's
``interface``, whose name also goes to ``GLOO_SOCKET_IFNAME`` / ``NCCL_SOCKET_IFNAME``), and
num_cpus / num_gpus / object store sized from the allocation and the task's CPU affinity, not
the machine. It publishes ``ip:port`` in a rendezvous file on the shared submitit folder, waits
until all N nodes are alive, runs the driver, then writes a sentinel file and stops its own Ray
by PID. Other ranks wait for the address, start ``ray start --address ... --block`` and stop it
when the sentinel appears. ``ray stop`` is never used: it kills every Ray on the host."""

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
from pipeline.backends.ray.config import NETWORK_ENV
from slurm.ray_network import (
    PortsExhausted,
    RayPorts,
    free_ray_ports,
    interface_address,
    node_ip_address,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

MIN_OBJECT_STORE = 80 * 1024**2  # Ray refuses less than ~75 MiB
EARLY_EXIT_S = 30.0  # a worker's `ray start` that exits this soon is retried on other ports


class RayBootstrapError(RuntimeError):
    """The Ray cluster of a Slurm job did not come up or went away (message says which rank)."""


@dataclass(frozen=True, kw_only=True)
class NodeResources:
    """What this Ray node may use: the job's share of the node, not the whole machine."""

    num_cpus: int
    num_gpus: int
    object_store_bytes: int

    @classmethod
    def from_allocation(
        cls,
        env: Mapping[str, str],
        tasks_on_node: int = 1,
        object_store_fraction: float = 0.3,
        affinity: int | None = None,
    ) -> NodeResources:
        """This task's share of the allocation, from the ``SLURM_*`` variables.

        CPUs: ``SLURM_CPUS_PER_TASK``, else ``SLURM_CPUS_ON_NODE / tasks_on_node``, else 1;
        at most ``affinity`` (the CPUs the task may run on: ``os.sched_getaffinity``).
        GPUs: ``CUDA_VISIBLE_DEVICES``, else ``SLURM_GPUS_ON_NODE``. Object store:
        ``object_store_fraction`` of ``SLURM_MEM_PER_NODE / tasks_on_node`` (2 GiB without --mem).
        """
        tasks_on_node = max(1, tasks_on_node)
        cpus = int(env.get("SLURM_CPUS_PER_TASK") or 0)
        if not cpus:
            cpus = max(1, int(env.get("SLURM_CPUS_ON_NODE") or 1) // tasks_on_node)
        if affinity:
            cpus = min(cpus, affinity)
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
    node_ip: str  # the address other nodes reach this one on
    join_timeout_s: float = 300.0
    start_attempts: int = 3  # port blocks tried when ``ray start`` cannot bind

    @classmethod
    def from_job_environment(
        cls, job_env: submitit.JobEnvironment, folder: Path, interface: str | None = None
    ) -> RayOnSlurm:
        """For the running submitit task; ``folder`` (the job's submitit folder) is shared.

        ``interface`` (e.g. ``ib0``): Ray binds that interface's address, and gloo / nccl use it
        (``GLOO_SOCKET_IFNAME`` / ``NCCL_SOCKET_IFNAME``, inherited by every Ray worker).
        """
        if interface:
            for var in NETWORK_ENV:
                os.environ[var] = interface
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
                env,
                tasks_on_node=job_env.num_tasks // max(1, job_env.num_nodes),
                affinity=len(os.sched_getaffinity(0)),
            ),
            env=env,
            node_ip=interface_address(interface) if interface else node_ip_address(),
        )

    @property
    def address_file(self) -> Path:
        return self.rendezvous / "head_address"

    @property
    def sentinel(self) -> Path:
        return self.rendezvous / "done"

    def _start(self, head_address: str | None, attempt: int) -> tuple[RayNodeProcess, RayPorts]:
        try:
            ports = free_ray_ports(self.job_id, self.rank, skip=attempt)
        except PortsExhausted as err:
            raise RayBootstrapError(f"rank {self.rank}: {err}") from None
        argv = [_ray_executable(), "start", "--block", "--disable-usage-stats"]
        argv += ["--head", "--include-dashboard=false"] if head_address is None else []
        argv += [f"--address={head_address}"] if head_address else []
        argv += [f"--node-ip-address={self.node_ip}", f"--temp-dir={self.temp_dir}"]
        argv += ports.args(head=head_address is None) + self.resources.args()
        log_path = self.rendezvous / f"ray-rank{self.rank}.log"
        return RayNodeProcess(argv, log_path, self.env), ports

    def _start_head(self) -> tuple[RayNodeProcess, str]:
        """Start the head on free ports; a port taken meanwhile moves on to the next block."""
        for attempt in range(self.start_attempts):
            head, ports = self._start(None, attempt)
            try:
                wait_for_port(self.node_ip, ports.gcs, self.join_timeout_s, head.alive)
                return head, f"{self.node_ip}:{ports.gcs}"
            except RayBootstrapError as err:
                head.stop()
                if attempt + 1 == self.start_attempts:
                    raise RayBootstrapError(f"{err}\n{head.tail()}") from None
                log.warning("Ray head on port %d failed (%s); trying other ports", ports.gcs, err)
        raise AssertionError("unreachable")

    def drive(self, driver: Callable[[str], T]) -> tuple[int, T]:
        """Rank 0: start the head, wait for every node, run ``driver(address)``, tear down.

        Returns (nodes alive when the driver started, what the driver returned).
        """
        self.rendezvous.mkdir(parents=True, exist_ok=True)
        head = None
        try:
            head, address = self._start_head()
            nodes = wait_for_nodes(
                address, self.size, self.join_timeout_s, lambda: self._publish(address)
            )
            log.info("Ray cluster %s: %d node(s) alive; running the driver", address, nodes)
            return nodes, driver(address)
        except RayBootstrapError as err:
            tail = head.tail() if head is not None else ""
            raise RayBootstrapError(f"rank 0: {err}\n{tail}") from None
        finally:
            self.sentinel.touch()  # workers exit on it, whatever happened here
            if head is not None:
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
        address = self.address_file.read_text().strip()
        attempt, node, started = 0, self._start(address, 0)[0], time.monotonic()
        try:
            while not self.sentinel.exists():
                if not node.alive():
                    if self.sentinel.exists():
                        break
                    early = time.monotonic() - started < EARLY_EXIT_S
                    if early and attempt + 1 < self.start_attempts:  # e.g. a port taken
                        attempt += 1
                        log.warning("rank %d: ray start exited early; other ports", self.rank)
                        node, started = self._start(address, attempt)[0], time.monotonic()
                        continue
                    raise RayBootstrapError(
                        f"rank {self.rank}: ray start exited ({node.proc.returncode}) before "
                        f"the driver finished\n{node.tail()}"
                    )
                time.sleep(poll_s)
            log.info("rank %d: sentinel seen; stopping Ray", self.rank)
        finally:
            node.stop()
            shutil.rmtree(self.temp_dir, ignore_errors=True)
