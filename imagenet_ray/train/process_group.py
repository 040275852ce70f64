"""torch.distributed's rendezvous store, listening on rank 0's node address instead of every interface.

Ray Train's torch backend lets rank 0 start the TCPStore server, which binds `::`. Here rank 0 serves it
from a socket bound to its node's address (`master_listen_fd`) and every rank, rank 0 too, joins as a
client (`TORCHELASTIC_USE_AGENT_STORE`, as under torchrun's agent); the rest is Ray Train's own setup.
"""

from __future__ import annotations

import datetime
import os
import socket
from typing import Any

import ray
import ray.train
from ray.train.torch import TorchConfig
from ray.train.torch.config import _set_torch_distributed_env_vars, _setup_torch_process_group, _TorchBackend

_SERVED: list[Any] = []  # rank 0's store server: alive as long as the worker process


def serve_store(world_size: int, timeout_s: float) -> tuple[str, int]:
    """On rank 0: a TCPStore server on a socket bound to this node's address; (address, port)."""
    from torch.distributed import TCPStore

    address = ray.util.get_node_ip_address()
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.bind((address, 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    # The store owns the descriptor from here on (it closes it); the libuv server cannot take one.
    fd = sock.detach()
    store = TCPStore(
        address,
        port,
        world_size,
        is_master=True,
        timeout=datetime.timedelta(seconds=timeout_s),
        wait_for_workers=False,
        multi_tenant=True,
        master_listen_fd=fd,
        use_libuv=False,
    )
    _SERVED.append(store)
    return address, port


def use_served_store(address: str, port: int) -> None:
    """On every rank: env:// rendezvous as a client of rank 0's store."""
    os.environ.update(MASTER_ADDR=address, MASTER_PORT=str(port), TORCHELASTIC_USE_AGENT_STORE="True")


class _BoundStoreBackend(_TorchBackend):
    def on_start(self, worker_group: Any, backend_config: Any) -> None:  # a TorchConfig
        backend = backend_config.backend
        if backend is None:
            backend = "nccl" if worker_group.get_resources_per_worker().get("GPU", 0) > 0 else "gloo"
        world = len(worker_group)
        address, port = worker_group.execute_single(
            0, serve_store, world_size=world, timeout_s=backend_config.timeout_s
        )
        worker_group.execute(use_served_store, address=address, port=port)
        worker_group.execute(_set_torch_distributed_env_vars)
        ray.get(
            [
                worker_group.execute_single_async(
                    rank,
                    _setup_torch_process_group,
                    backend=backend,
                    world_rank=rank,
                    world_size=world,
                    init_method="env://",
                    timeout_s=backend_config.timeout_s,
                )
                for rank in range(world)
            ]
        )


class BoundStoreTorchConfig(TorchConfig):
    """TorchTrainer's `torch_config`: the rendezvous store on rank 0's node address only."""

    @property
    def backend_cls(self) -> type[_BoundStoreBackend]:
        return _BoundStoreBackend
