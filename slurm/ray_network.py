"""The network side of Ray on Slurm: which ports a Ray node binds and which address it uses.

Ports: every port of a Ray node is pinned (0 = "let Ray pick" is never used). The preferred
block follows the job id and rank, so jobs sharing a node normally do not collide; a block with
any port in use (another job, another service) is skipped for the next one
(:func:`free_ray_ports`). Addresses: Ray's own choice, or a named interface's (``ib0``).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

# Pinned ports stay below Linux's ephemeral range (32768-60999), where outgoing connections
# would take them: [PORT_FLOOR, PORT_FLOOR + JOB_SLOTS * JOB_SPAN) = [10000, 32000).
PORT_FLOOR = 10000
NODE_SPAN = 100  # ports per Ray node: 10 fixed + 90 for worker processes
NODES_PER_HOST = 4  # Ray nodes of one job that may share a host (emulated clusters)
JOB_SPAN = NODE_SPAN * NODES_PER_HOST
JOB_SLOTS = 55  # job ids modulo this pick a port block


class PortsExhausted(RuntimeError):
    """No block of free ports is left on this host."""


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
    """The preferred ports of Ray node ``node_index`` of Slurm job ``job_id``.

    Jobs whose ids differ modulo ``JOB_SLOTS`` never share a port; within a job each node gets
    its own ``NODE_SPAN`` block, so nodes emulated on one host do not collide either.
    """
    if job_id < 0 or node_index < 0:
        raise ValueError(f"job_id {job_id} and node_index {node_index} must be >= 0")
    return _block_ports((job_id % JOB_SLOTS) * NODES_PER_HOST + node_index % NODES_PER_HOST)


def _block_ports(block: int) -> RayPorts:
    base = PORT_FLOOR + (block % (JOB_SLOTS * NODES_PER_HOST)) * NODE_SPAN
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


def port_free(port: int) -> bool:
    """Whether nothing on this host listens on (or holds) TCP ``port`` right now."""
    with socket.socket() as sock:
        try:
            sock.bind(("", port))
        except OSError:
            return False
    return True


def free_ray_ports(
    job_id: int,
    node_index: int,
    *,
    skip: int = 0,
    is_free: Callable[[int], bool] = port_free,
) -> RayPorts:
    """The first port block, from the preferred one on (``skip`` blocks past it), whose every
    port is free here: another job (or anything else) on the preferred ports moves us on, not
    into a collision. ``PortsExhausted`` if all ``JOB_SLOTS * NODES_PER_HOST`` are taken."""
    first = (job_id % JOB_SLOTS) * NODES_PER_HOST + node_index % NODES_PER_HOST
    total = JOB_SLOTS * NODES_PER_HOST
    for step in range(skip, skip + total):
        ports = _block_ports(first + step)
        fixed = [v for k, v in vars(ports).items() if k not in ("min_worker", "max_worker")]
        if all(is_free(p) for p in [*fixed, *range(ports.min_worker, ports.max_worker + 1)]):
            if step:
                log.info("preferred Ray ports of node %d are busy; using %d..", node_index,
                         ports.gcs)  # fmt: skip
            return ports
    raise PortsExhausted(f"no free block of {NODE_SPAN} ports in {PORT_FLOOR}..")


def interface_address(name: str) -> str:
    """The IPv4 address of network interface ``name`` (Linux; ValueError naming it if none)."""
    import fcntl  # Linux: SIOCGIFADDR
    import struct

    siocgifaddr = 0x8915
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            packed = fcntl.ioctl(
                sock.fileno(), siocgifaddr, struct.pack("256s", name[:15].encode())
            )
        except OSError as err:
            known = ", ".join(n for _, n in socket.if_nameindex())
            raise ValueError(
                f"interface {name!r} has no IPv4 address ({err.strerror}); interfaces: {known}"
            ) from None
    return socket.inet_ntoa(packed[20:24])


def node_ip_address() -> str:
    """This node's address as Ray reports it (the one other nodes reach it on)."""
    import ray.util  # deferred: importing ray costs ~1 s

    return ray.util.get_node_ip_address()
