"""A local Ray (the CLI's ensure_ray and this layer's fixture both use runtime.start_local_ray) listens on
loopback only: nobody who reaches this machine can reach its GCS, raylet, agents, driver or workers."""

import ipaddress
import os
import time

import psutil


def _listeners_of_this_tree() -> list[tuple[str, int, str]]:
    pids = {p.pid for p in psutil.Process().children(recursive=True)} | {os.getpid()}
    found = []
    for c in psutil.net_connections(kind="inet"):
        if c.status == psutil.CONN_LISTEN and c.pid in pids:
            try:
                name = psutil.Process(c.pid).name()
            except psutil.NoSuchProcess:
                continue
            found.append((c.laddr.ip, c.laddr.port, name))
    return found


def _is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def test_local_ray_listens_on_loopback_only(local_ray):
    ray = local_ray

    @ray.remote
    def square(x):
        return x * x

    @ray.remote
    class Counter:
        def ping(self):
            return os.getpid()

    assert ray.get([square.remote(i) for i in range(4)]) == [0, 1, 4, 9]
    counter = Counter.remote()
    ray.get(counter.ping.remote())
    time.sleep(1)  # the workers' gRPC servers are up once they have run something
    listeners = _listeners_of_this_tree()
    names = {name for _, _, name in listeners}
    # The listeners of a real node: the GCS, the raylet, the agents and the workers (not just the driver).
    assert {"gcs_server", "raylet"} <= names, listeners
    assert any(name.startswith("ray::") for name in names), listeners
    exposed = [entry for entry in listeners if not _is_loopback(entry[0])]
    assert exposed == [], f"listening beyond loopback: {exposed}"
    assert {n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]} == {"127.0.0.1"}
    ray.kill(counter)


def test_the_torch_rendezvous_store_listens_on_the_node_address_only(local_ray, tmp_path):
    """Rank 0's TCPStore binds `::` under Ray Train's own torch backend; the project's binds the node's."""
    import json

    import ray.train
    from ray.train.torch import TorchTrainer

    from imagenet_ray.train.process_group import BoundStoreTorchConfig

    def record_listeners(config):
        """A Ray Train worker: after the process group is up, its own listening sockets, and an all-reduce."""
        import json
        from pathlib import Path

        import psutil
        import ray.train
        import torch
        import torch.distributed as dist

        total = torch.ones(1)
        dist.all_reduce(total)
        me = psutil.Process()
        own = [(c.laddr.ip, c.laddr.port) for c in me.net_connections("inet") if c.status == psutil.CONN_LISTEN]
        rank = ray.train.get_context().get_world_rank()
        Path(config["out"], f"rank{rank}.json").write_text(json.dumps({"listeners": own, "sum": total.item()}))

    TorchTrainer(
        record_listeners,  # defined here: pickled by value (the workers cannot import this test module)
        train_loop_config={"out": str(tmp_path)},
        torch_config=BoundStoreTorchConfig(),
        scaling_config=ray.train.ScalingConfig(num_workers=2, use_gpu=False),
        run_config=ray.train.RunConfig(storage_path=str(tmp_path / "runs"), name="listeners"),
    ).fit()
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["sum"] for r in ranks] == [2.0, 2.0]  # the process group works
    listeners = [tuple(entry) for r in ranks for entry in r["listeners"]]
    assert listeners, "rank 0 serves the store: it listens somewhere"
    exposed = [entry for entry in listeners if not _is_loopback(entry[0])]
    assert exposed == [], f"listening beyond the node address: {exposed}"
