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
