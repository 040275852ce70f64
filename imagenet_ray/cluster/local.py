"""A multi-host Ray cluster of a RayCluster manifest's shape on this machine: start, inspect, break, stop.

One host per Ray pod plus a services host (S3, PostgreSQL, MLflow); this machine's namespace reaches
them only through the gateway. Nodes see what pods see: services by name (`http://mlflow:5000`),
credentials in their environment, the head as `<cluster>-head-svc:6379`. State: <root>/cluster.json.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from imagenet_ray.cluster import cpu_limits
from imagenet_ray.cluster import hosts as hostlib
from imagenet_ray.cluster.cpu_limits import CpuCgroup
from imagenet_ray.cluster.hosts import Host
from imagenet_ray.cluster.manifest import HEAD, read_cluster_shape
from imagenet_ray.cluster.nodes import (
    DASHBOARD_PORT,
    GCS_PORT,
    HEAD_PORT_NAMES,
    NODE_PORT_FLAGS,
    NodePlan,
    plan_nodes,
    ray_start_command,
)
from imagenet_ray.errors import UserError
from imagenet_ray.services import process, ray_head
from imagenet_ray.services.commands import export_lines
from imagenet_ray.services.ports import LOCALHOST, free_ports
from imagenet_ray.services.process import ProcessRef
from imagenet_ray.services.stack import LocalStack
from imagenet_ray.services.state import write_private

log = logging.getLogger(__name__)

STATE_FILE = "cluster.json"
STACK_STATE_FILE = "state.json"  # the services' own (services/state.json)
ENV_FILE = "env.sh"
STATE_VERSION = 2
# Where the services listen on the services host: the ports of the Kubernetes Services they stand for.
SERVICE_PORTS = {"s3": 8333, "mlflow": 5000, "postgres": 5432}
SERVICE_ALIASES = ["s3", "mlflow", "postgres"]
NODE_START_TIMEOUT_S = 120.0
DEFAULT_OBJECT_STORE_BYTES = 512 * 2**20


@dataclass
class ClusterState:
    """A local cluster as data: its hosts, nodes, processes and the client-side (127.0.0.1) ports."""

    root_dir: Path
    cluster_id: str
    name: str
    manifest: str
    hosts: list[Host]
    nodes: list[NodePlan]
    ray_auth_token: str = field(repr=False)
    client_ports: dict[str, int] = field(default_factory=dict)  # dashboard (+ the stack's own) on 127.0.0.1
    node_ports: dict[str, dict[str, int]] = field(default_factory=dict)  # 127.0.0.x mode only
    node_processes: dict[str, ProcessRef] = field(default_factory=dict)
    gateway: ProcessRef | None = None
    cpu_cgroups: dict[str, CpuCgroup] = field(default_factory=dict)  # per node host, where cgroups work

    # -- where things are -----------------------------------------------------------------------
    @property
    def namespaced(self) -> bool:
        return self.hosts[0].netns is not None

    def host(self, name: str) -> Host:
        for h in self.hosts:
            if h.name == name:
                return h
        raise UserError(
            f"no host {name!r} in cluster {self.cluster_id} (hosts: {', '.join(h.name for h in self.hosts)})"
        )

    def node(self, host: str) -> NodePlan:
        for n in self.nodes:
            if n.host == host:
                return n
        raise UserError(f"no Ray node on {host!r} (nodes: {', '.join(n.host for n in self.nodes)})")

    @property
    def head_service(self) -> str:
        """The head's name in the cluster, as KubeRay names its head Service."""
        return f"{self.name}-head-svc" if self.namespaced else self.host(HEAD).address

    @property
    def gcs_address(self) -> str:
        return f"{self.head_service}:{self.node_ports.get(HEAD, {}).get('gcs', GCS_PORT)}"

    @property
    def dashboard_url(self) -> str:
        """The job API from this machine's own namespace (through the gateway when namespaced)."""
        host = LOCALHOST if self.namespaced else self.host(HEAD).address
        return f"http://{host}:{self.client_ports['dashboard']}"

    @property
    def services_dir(self) -> Path:
        return self.root_dir / "services"

    @property
    def logs_dir(self) -> Path:
        return self.root_dir / "logs"

    def temp_dir(self, host: str) -> Path:
        """Short: Ray's unix sockets live below it (path limit 107 bytes)."""
        return Path("/tmp") / f"irc-{self.cluster_id}" / host

    def stack(self) -> LocalStack:
        return LocalStack.load(self.services_dir / STACK_STATE_FILE)

    # -- environments -----------------------------------------------------------------------------
    def ray_auth_env(self) -> dict[str, str]:
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.ray_auth_token}

    def node_env(self, stack: LocalStack) -> dict[str, str]:
        """A pod's environment: the Secrets' variables, services by their in-cluster names, nothing of ours."""
        base = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "RAY_"))}
        bin_dir = str(Path(sys.executable).parent)
        s3_host = "s3" if self.namespaced else LOCALHOST
        mlflow_host = "mlflow" if self.namespaced else LOCALHOST
        env = {
            **base,
            "PATH": os.pathsep.join([bin_dir, *(d for d in base.get("PATH", "").split(os.pathsep) if d != bin_dir)]),
            "AWS_ENDPOINT_URL": f"http://{s3_host}:{stack.bind_port('s3')}",
            "AWS_ACCESS_KEY_ID": stack.access_key,
            "AWS_SECRET_ACCESS_KEY": stack.secret_key,
            "AWS_REGION": stack.region,
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "MLFLOW_TRACKING_URI": f"http://{mlflow_host}:{stack.bind_port('mlflow')}",
            "MLFLOW_TRACKING_USERNAME": stack.mlflow_username,
            "MLFLOW_TRACKING_PASSWORD": stack.mlflow_password,
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "DO_NOT_TRACK": "true",
            "RAY_USAGE_STATS_ENABLED": "0",
            # As KubeRay sets it: a bare `ray.init()` (Train's placement-group cleaner) would otherwise
            # scan this machine's processes, which all hosts share, and find every node's GCS address.
            "RAY_ADDRESS": self.gcs_address,
            **self.ray_auth_env(),
        }
        head_ports = self.node_ports.get(HEAD)
        if head_ports:
            env["AUTOSCALER_METRIC_PORT"] = str(head_ports["autoscaler_metrics"])
            env["DASHBOARD_METRIC_PORT"] = str(head_ports["dashboard_metrics"])
        return env

    def client_env(self, stack: LocalStack) -> dict[str, str]:
        """For clients in this machine's namespace (`ray job submit`, tests): everything via 127.0.0.1."""
        return {**stack.env(), "RAY_ADDRESS": self.dashboard_url, **self.ray_auth_env()}

    # -- persistence ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "root_dir": str(self.root_dir),
            "cluster_id": self.cluster_id,
            "name": self.name,
            "manifest": self.manifest,
            "hosts": [{"name": h.name, "netns": h.netns, "address": h.address} for h in self.hosts],
            "nodes": [n.to_dict() for n in self.nodes],
            "ray_auth_token": self.ray_auth_token,
            "client_ports": self.client_ports,
            "node_ports": self.node_ports,
            "node_processes": {k: v.to_dict() for k, v in self.node_processes.items()},
            "gateway": self.gateway.to_dict() if self.gateway else None,
            "cpu_cgroups": {k: v.to_dict() for k, v in self.cpu_cgroups.items()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        if data.get("version") != STATE_VERSION:
            raise UserError(f"unsupported cluster state version {data.get('version')!r}")
        return cls(
            root_dir=Path(data["root_dir"]),
            cluster_id=data["cluster_id"],
            name=data["name"],
            manifest=data["manifest"],
            hosts=[Host(h["name"], h["netns"], h["address"]) for h in data["hosts"]],
            nodes=[NodePlan.from_dict(n) for n in data["nodes"]],
            ray_auth_token=data["ray_auth_token"],
            client_ports=dict(data["client_ports"]),
            node_ports={k: dict(v) for k, v in data["node_ports"].items()},
            node_processes={k: ProcessRef.from_dict(v) for k, v in data["node_processes"].items()},
            gateway=ProcessRef.from_dict(data["gateway"]) if data.get("gateway") else None,
            cpu_cgroups={k: CpuCgroup(v["path"], int(v["version"])) for k, v in data["cpu_cgroups"].items()},
        )

    def save(self) -> None:
        write_private(self.root_dir / STATE_FILE, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, root_dir: Path) -> Self:
        path = Path(root_dir) / STATE_FILE
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except FileNotFoundError:
            raise UserError(
                f"no local cluster in {root_dir} (no {STATE_FILE}); start one with `imagenet-ray cluster up`"
            ) from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UserError(f"{path}: unreadable cluster state ({type(exc).__name__}: {exc})") from None


def _ray_cli() -> list[str]:
    beside = Path(sys.executable).with_name("ray")
    return [str(beside)] if beside.is_file() else [sys.executable, "-m", "ray.scripts.scripts"]


# -- the gateway ----------------------------------------------------------------------------------
def _start_gateway(state: ClusterState, targets: dict[str, tuple[str, int]]) -> None:
    """Bind one 127.0.0.1 port per target here, then hand them to the gateway process (no races).

    The gateway runs in this namespace's process tree but opens its connections in the services host's."""
    listeners = {}
    for name in targets:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind((LOCALHOST, 0))
        sock.listen(128)
        sock.set_inheritable(True)
        listeners[name] = sock
    try:
        cmd = [sys.executable, "-m", "imagenet_ray.cluster.gateway", "--netns", str(state.hosts[0].netns)]
        # Target port 0: the same number as the client side's.
        cmd += [
            f"--forward={listeners[n].fileno()}={h}:{p or listeners[n].getsockname()[1]}"
            for n, (h, p) in targets.items()
        ]
        popen, state.gateway = process.spawn(
            cmd,
            env=dict(os.environ),
            cwd=state.root_dir,
            log_path=state.logs_dir / "gateway.log",
            pass_fds=tuple(s.fileno() for s in listeners.values()),
        )
        state.client_ports.update({n: s.getsockname()[1] for n, s in listeners.items()})
    finally:
        for sock in listeners.values():
            sock.close()
    deadline = time.monotonic() + 20
    while "gateway ready" not in (state.logs_dir / "gateway.log").read_text(errors="replace"):
        if popen.poll() is not None or time.monotonic() > deadline:
            raise UserError(f"the cluster gateway did not start; see {state.logs_dir / 'gateway.log'}")
        time.sleep(0.05)


# -- Ray nodes ------------------------------------------------------------------------------------
def ray_nodes(state: ClusterState) -> list[dict[str, Any]]:
    """Ray's view of its nodes (state API through the dashboard), [] while it does not answer."""
    req = urllib.request.Request(
        f"{state.dashboard_url}/api/v0/nodes?detail=1&limit=1000",
        headers={"Authorization": f"Bearer {state.ray_auth_token}"},
    )
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return list(json.loads(resp.read())["data"]["result"]["result"])
    except Exception:
        return []


def _node_ids_at(state: ClusterState, address: str, alive_only: bool = True) -> set[str]:
    return {
        str(n.get("node_id"))
        for n in ray_nodes(state)
        if n.get("node_ip") == address and (n.get("state") == "ALIVE" or not alive_only)
    }


def start_node(state: ClusterState, stack: LocalStack, host_name: str) -> None:
    """Start (or restart, like a pod) the Ray node of one host and wait until the head sees it alive."""
    node, host = state.node(host_name), state.host(host_name)
    # A killed node stays ALIVE in the GCS until its heartbeats time out: wait for a new registration.
    earlier = _node_ids_at(state, host.address, alive_only=False)
    temp = state.temp_dir(host_name)
    temp.mkdir(parents=True, exist_ok=True)
    ports = state.node_ports.get(host_name) if not state.namespaced else None
    cmd = ray_start_command(_ray_cli(), node, host.address, state.gcs_address, str(temp), ports)
    cgroup = state.cpu_cgroups.get(host_name)
    popen, state.node_processes[host_name] = process.spawn(
        [*(cgroup.join_prefix() if cgroup else []), *host.exec_prefix(), *cmd],
        env=state.node_env(stack),
        cwd=state.root_dir,
        log_path=state.logs_dir / f"ray-{host_name}.log",
    )
    deadline = time.monotonic() + NODE_START_TIMEOUT_S
    while not _node_ids_at(state, host.address) - earlier:
        if popen.poll() is not None:
            raise UserError(
                f"Ray node {host_name} exited with code {popen.returncode}; "
                f"see {state.logs_dir / f'ray-{host_name}.log'}"
            )
        if time.monotonic() > deadline:
            raise UserError(f"Ray node {host_name} did not join within {NODE_START_TIMEOUT_S:.0f} s")
        time.sleep(0.5)


def set_cpu_limit(state: ClusterState, host_name: str, cores: float | None) -> None:
    """Change a running host's CPU quota (`cores`, None: unlimited), like an in-place pod resize."""
    state.node(host_name)  # a one-line error for an unknown host
    cgroup = state.cpu_cgroups.get(host_name)
    if cgroup is None:
        why = cpu_limits.cgroups_unavailable() or "the cluster was started without them"
        raise UserError(f"host {host_name} has no CPU cgroup: {why}")
    cgroup.set_limit(cores)


def cpu_limit(state: ClusterState, host_name: str) -> float | None:
    cgroup = state.cpu_cgroups.get(host_name)
    return cgroup.limit() if cgroup and Path(cgroup.path).exists() else None


def stop_node(state: ClusterState, host_name: str, grace_s: float = 0.0) -> list[int]:
    """Kill one node like a lost pod: every process on its host (SIGKILL unless `grace_s`)."""
    host = state.host(host_name)
    ref = state.node_processes.pop(host_name, None)
    left = process.stop_trees([(ref, grace_s)]) if ref else []
    if host.netns:
        left = hostlib.kill_host_processes(host, grace_s=grace_s)
    return left


def drain_node(state: ClusterState, host_name: str, deadline_s: int, message: str = "spot instance reclaimed") -> str:
    """Tell the GCS that one host's node is preempted and will be taken in `deadline_s`, as KubeRay's
    autoscaler does on a cloud's spot notice (`ray drain-node`); the caller takes it (`stop_node`).
    Returns the drained node's id."""
    host = state.host(host_name)
    ids = _node_ids_at(state, host.address)
    if len(ids) != 1:
        raise UserError(f"host {host_name}: expected one ALIVE Ray node at {host.address}, found {len(ids)}")
    (node_id,) = ids
    cmd = [*state.host(HEAD).exec_prefix(), *_ray_cli(), "drain-node", "--address", state.gcs_address]
    cmd += ["--node-id", node_id, "--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", message]
    cmd += ["--deadline-remaining-seconds", str(int(deadline_s))]
    env = {**os.environ, **state.ray_auth_env()}
    done = subprocess.run(cmd, env=env, cwd=state.root_dir, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        why = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"ray drain-node {host_name} ({node_id[:12]}) failed: {why}")
    return node_id


# -- up / down --------------------------------------------------------------------------------------
STACK_SERVICES = ("s3", "postgres", "mlflow")


def _stack_port_names() -> list[str]:
    from imagenet_ray.services import mlflow_server, postgres, s3

    return [*s3.PORTS, *postgres.PORTS, *mlflow_server.PORTS]


def _start_services(state: ClusterState) -> LocalStack:
    """S3, PostgreSQL and MLflow (basic auth) on the services host, as infra/k8s/base/mlflow.yaml runs them."""
    from imagenet_ray.services.stack import StackOptions, start_stack

    services = state.hosts[0]
    names = _stack_port_names()
    options = StackOptions(
        # Namespaced: servers listen on the Services' ports there; clients use the gateway's ports here.
        ports={n: state.client_ports[n] for n in names} if services.netns else None,
        bind_host=services.address,
        bind_ports={n: SERVICE_PORTS.get(n, state.client_ports[n]) for n in names} if services.netns else {},
        netns=services.netns,
        mlflow_backend="postgres",
        mlflow_auth=True,
    )
    return start_stack(state.services_dir, only=STACK_SERVICES, options=options)


def up(
    root_dir: Path,
    manifest: Path,
    replicas: dict[str, int] | None = None,
    cpus: dict[str, float] | None = None,
    object_store_bytes: int = DEFAULT_OBJECT_STORE_BYTES,
    use_namespaces: bool = True,
    cpu_limits_by_group: dict[str, float] | None = None,
) -> ClusterState:
    """Start the services host and one host per Ray node of the manifest; all nodes alive on return.

    Each node host gets a CPU cgroup where cgroups work (limits can then change live); a group in
    `cpu_limits_by_group` starts with that quota, and needs them."""
    root_dir = Path(root_dir).resolve()
    if (root_dir / STATE_FILE).exists():
        raise UserError(
            f"a cluster is already recorded in {root_dir / STATE_FILE}; "
            f"`imagenet-ray cluster down --root {root_dir}` first"
        )
    shape = read_cluster_shape(manifest)
    nodes = plan_nodes(
        shape, replicas or {}, cpus or {}, float(os.cpu_count() or 1), object_store_bytes, cpu_limits_by_group
    )
    no_cgroups = cpu_limits.cgroups_unavailable()
    if no_cgroups and cpu_limits_by_group:
        raise UserError(f"--cpu-limit needs a cgroup cpu controller: {no_cgroups}")
    cluster_id = secrets.token_hex(3)
    why_not = hostlib.namespaces_unavailable() if use_namespaces else "asked for 127.0.0.x hosts"
    if why_not:
        log.warning(
            "network namespaces unavailable (%s): hosts are 127.0.0.x addresses sharing this machine's network", why_not
        )
        host_list = hostlib.loopback_hosts([n.host for n in nodes])
    else:
        aliases = {hostlib.SERVICES_HOST: SERVICE_ALIASES, HEAD: [f"{shape.name}-head-svc"]}
        host_list = hostlib.create_hosts(cluster_id, [n.host for n in nodes], aliases)
    root_dir.mkdir(parents=True, exist_ok=True)
    # Search but no listing for others: PostgreSQL runs as its own user below services/ (files are 0600).
    root_dir.chmod(0o711)
    state = ClusterState(
        root_dir=root_dir,
        cluster_id=cluster_id,
        name=shape.name,
        manifest=str(manifest),
        hosts=host_list,
        nodes=nodes,
        ray_auth_token=secrets.token_hex(32),
    )
    state.logs_dir.mkdir(parents=True, exist_ok=True)
    try:
        if no_cgroups:
            log.info("hosts without CPU limits (%s)", no_cgroups)
        else:
            for node in nodes:
                state.cpu_cgroups[node.host] = cgroup = cpu_limits.create(cluster_id, node.host)
                cgroup.set_limit(node.cpu_limit)
        _bring_up(state)
    except BaseException:
        with contextlib.suppress(UserError):
            down(state)
        raise
    return state


def _bring_up(state: ClusterState) -> None:
    head = state.host(HEAD)
    if state.namespaced:
        # Every port of the stack is forwarded (health checks use some besides the Services' ports);
        # a port without a Service port listens on the same number there as here.
        targets = {n: (state.hosts[0].address, SERVICE_PORTS.get(n, 0)) for n in _stack_port_names()}
        targets["dashboard"] = (head.address, DASHBOARD_PORT)
        _start_gateway(state, targets)
    else:
        names = [*HEAD_PORT_NAMES, *NODE_PORT_FLAGS]
        state.node_ports[HEAD] = dict(zip(names, free_ports(len(names)), strict=True))
        for node in state.nodes[1:]:
            state.node_ports[node.host] = dict(zip(NODE_PORT_FLAGS, free_ports(len(NODE_PORT_FLAGS)), strict=True))
        state.client_ports["dashboard"] = state.node_ports[HEAD]["dashboard"]
    state.save()
    stack = _start_services(state)  # first: every node has its credentials in its environment
    stack.save(state.services_dir / STACK_STATE_FILE)
    start_node(state, stack, HEAD)
    with ThreadPoolExecutor(max(1, len(state.nodes) - 1), thread_name_prefix="cluster-nodes") as pool:
        for fut in [pool.submit(start_node, state, stack, n.host) for n in state.nodes[1:]]:
            fut.result()
    state.save()
    write_private(state.root_dir / ENV_FILE, export_lines(state.client_env(stack), "imagenet-ray local cluster"))


def _keep_ray_logs(state: ClusterState) -> None:
    for node in state.nodes:
        ray_head.keep_session_logs(state.temp_dir(node.host), state.logs_dir / f"ray-session-{node.host}")


def down(state: ClusterState) -> None:
    """Stop every node, the services and the gateway; delete the hosts; raise if anything is left."""
    left: list[str] = []
    for node in reversed(state.nodes):
        left += [f"{node.host}: pid {p}" for p in stop_node(state, node.host, grace_s=3.0)]
    if (state.services_dir / STACK_STATE_FILE).exists():
        try:
            state.stack().stop()
        except UserError as exc:
            left.append(str(exc))
    if state.gateway:
        left += [f"gateway: pid {p}" for p in process.stop_trees([(state.gateway, 2.0)])]
    _keep_ray_logs(state)
    left += hostlib.delete_hosts(state.hosts)
    left += [e for e in (cpu_limits.delete(g) for g in state.cpu_cgroups.values()) if e]
    shutil.rmtree(Path("/tmp") / f"irc-{state.cluster_id}", ignore_errors=True)
    (state.root_dir / STATE_FILE).unlink(missing_ok=True)
    (state.root_dir / ENV_FILE).unlink(missing_ok=True)
    if left:
        raise UserError(f"cluster {state.cluster_id} did not stop cleanly: {'; '.join(left)}")


def status(state: ClusterState) -> list[dict[str, Any]]:
    """Per node: host, group, address, whether its processes run, and Ray's state, labels and resources."""
    # The newest ALIVE registration per address (a killed node may not be marked dead yet).
    alive = sorted((n for n in ray_nodes(state) if n.get("state") == "ALIVE"), key=lambda n: n.get("start_time_ms", 0))
    by_ip = {n.get("node_ip"): n for n in alive}
    rows = []
    for node in state.nodes:
        host = state.host(node.host)
        ref = state.node_processes.get(node.host)
        ray_node = by_ip.get(host.address, {})
        rows.append(
            {
                "host": node.host,
                "group": node.group,
                "address": host.address,
                "netns": host.netns,
                "running": bool(ref and process.is_alive(ref)),
                "ray": ray_node.get("state", "DEAD"),
                "node_id": ray_node.get("node_id"),
                "labels": ray_node.get("labels", {}),
                "resources": ray_node.get("resources_total", {}),
                "cpu_limit": cpu_limit(state, node.host),
            }
        )
    return rows
