"""How Ray actors form a ``torch.distributed`` process group: a TCP store on rank 0's node.

Rank 0 opens the store on a free port of its node (:func:`open_store`) and the driver hands
its address to every member, which joins with :func:`join_group` (gloo on CPU and on shared
GPUs, nccl on whole GPUs: each member is bound to the first GPU Ray gave it, ``cuda:0`` under its
``CUDA_VISIBLE_DEVICES``). Used by the Hessian workers and the data-parallel training workers.
"""

from __future__ import annotations

import datetime

import ray
import torch
import torch.distributed as dist


def open_store(world: int, timeout: datetime.timedelta) -> tuple[dist.TCPStore, str, int]:
    """Rank 0: a TCP store on a free port of this node, and its ``(host, port)``."""
    host = ray.util.get_node_ip_address()
    store = dist.TCPStore(host, 0, world, is_master=True, timeout=timeout, wait_for_workers=False)
    return store, host, store.port


def join_group(
    collective: str,
    rank: int,
    world: int,
    timeout: datetime.timedelta,
    *,
    host: str,
    port: int,
    store: dist.TCPStore | None = None,
    prefix: str = "",
) -> None:
    """Join the default process group through rank 0's store (``store`` on rank 0 itself);
    an nccl member first binds this process to its GPU."""
    if store is None:
        store = dist.TCPStore(host, port, world, is_master=False, timeout=timeout)
    bound = {}
    if collective == "nccl":  # one GPU per member: nccl needs the device before any collective
        device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
        bound["device_id"] = device
    dist.init_process_group(
        collective,
        store=dist.PrefixStore(prefix, store) if prefix else store,
        rank=rank,
        world_size=world,
        timeout=timeout,
        **bound,
    )
