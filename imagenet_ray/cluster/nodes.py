"""Which Ray nodes a manifest asks for and the `ray start` line of each: pure, no processes.

A pod becomes a node: its group's rayStartParams pass through as `ray start` flags, its group labels
become Ray node labels, its CPUs (capped to this machine) the node's CPUs, and its `nvidia.com/gpu`
count a custom resource (`stand_in_gpu`) so that scheduling still sees the GPUs a CPU machine lacks.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Self

from imagenet_ray.cluster.manifest import HEAD, ClusterShape, NodeGroup
from imagenet_ray.errors import UserError

STAND_IN_GPU = "stand_in_gpu"
GCS_PORT = 6379  # KubeRay's defaults: the head Service exposes these
DASHBOARD_PORT = 8265
# Flags the cluster sets itself (from the plan, or because they name this machine's paths/addresses).
_OWN_FLAGS = {"num-cpus", "num-gpus", "labels", "resources", "object-store-memory", "address", "node-ip-address"}
# Named ports of a node; in 127.0.0.x mode all nodes share one network, so each gets its own.
NODE_PORT_FLAGS = {
    "node_manager": "node-manager-port",
    "object_manager": "object-manager-port",
    "metrics_export": "metrics-export-port",
    "dashboard_agent_http": "dashboard-agent-listen-port",
    "dashboard_agent_grpc": "dashboard-agent-grpc-port",
    "runtime_env_agent": "runtime-env-agent-port",
}
# The last two are environment variables (AUTOSCALER_METRIC_PORT, DASHBOARD_METRIC_PORT), not flags.
HEAD_PORT_NAMES = ("gcs", "dashboard", "client_server", "autoscaler_metrics", "dashboard_metrics")


@dataclass(frozen=True)
class NodePlan:
    """One Ray node to start: the host it runs on and what it advertises."""

    host: str  # "head", "train-0", "decode-1", ...
    group: str
    num_cpus: float
    resources: dict[str, float] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    object_store_bytes: int | None = None
    start_params: dict[str, str] = field(default_factory=dict)  # the group's other rayStartParams
    cpu_limit: float | None = None  # cores of CFS quota on the host (a pod's limits.cpu); None: unlimited

    @property
    def is_head(self) -> bool:
        return self.group == HEAD

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        return cls(**data)


def _node(group: NodeGroup, host: str, cpus: float, object_store_cap: int, cpu_limit: float | None) -> NodePlan:
    wanted = group.ray_start_params.get("object-store-memory")
    object_store = min(int(wanted), object_store_cap) if wanted else object_store_cap
    return NodePlan(
        host=host,
        group=group.name,
        num_cpus=cpus,
        resources={STAND_IN_GPU: float(group.gpus)} if group.gpus else {},
        labels=dict(group.labels),
        object_store_bytes=object_store,
        start_params={k: v for k, v in group.ray_start_params.items() if k not in _OWN_FLAGS},
        cpu_limit=cpu_limit,
    )


def plan_nodes(
    shape: ClusterShape,
    replicas: dict[str, int],
    cpus: dict[str, float],
    max_cpus: float,
    object_store_cap: int,
    cpu_limits: dict[str, float] | None = None,
) -> list[NodePlan]:
    """Head first, then each worker group's replicas (`replicas` overrides the manifest's count; a
    group the manifest starts at 0 gets 1, so every group is present). CPUs: `cpus[group]`, else the
    manifest's, capped to `max_cpus` (logical CPUs beyond the machine's cores would only oversubscribe it).
    `cpu_limits[group]`: a CPU quota in cores on each of its hosts, as a pod's `limits.cpu`; without
    `cpus[group]` Ray then counts the limit rounded up, as KubeRay does."""
    cpu_limits = cpu_limits or {}
    unknown = (set(replicas) | set(cpus) | set(cpu_limits)) - {g.name for g in (shape.head, *shape.workers)}
    if unknown:
        raise UserError(
            f"no group {', '.join(sorted(unknown))} in RayCluster {shape.name!r} "
            f"(groups: {', '.join(g.name for g in (shape.head, *shape.workers))})"
        )
    if replicas.get(HEAD, 1) != 1:
        raise UserError("a Ray cluster has exactly one head")
    bad = {g: c for g, c in cpu_limits.items() if not c > 0}
    if bad:
        raise UserError(f"--cpu-limit {', '.join(f'{g}={c:g}' for g, c in bad.items())}: a limit must be > 0 cores")

    def ray_cpus(group: NodeGroup) -> float:
        if group.name in cpus:
            return cpus[group.name]
        if group.name in cpu_limits:
            return min(math.ceil(cpu_limits[group.name]), max_cpus)
        return min(group.ray_num_cpus, max_cpus)

    head = shape.head
    nodes = [_node(head, HEAD, ray_cpus(head), object_store_cap, cpu_limits.get(HEAD))]
    for group in shape.workers:
        count = replicas.get(group.name, max(group.replicas, 1))
        if not 0 <= count <= group.max_replicas:
            raise UserError(f"--replicas {group.name}={count}: the manifest allows 0..{group.max_replicas}")
        limit = cpu_limits.get(group.name)
        nodes += [_node(group, f"{group.name}-{i}", ray_cpus(group), object_store_cap, limit) for i in range(count)]
    return nodes


def _flag(name: str, value: object) -> str:
    return f"--{name}={value}"


def ray_start_command(
    ray_cli: list[str],
    node: NodePlan,
    node_address: str,
    head_address: str,
    temp_dir: str,
    ports: dict[str, int] | None = None,
) -> list[str]:
    """`ray start --block` for one node; `ports` names every port (127.0.0.x mode), else Ray's defaults."""
    cmd = [*ray_cli, "start", "--block", _flag("node-ip-address", node_address)]
    params = dict(node.start_params)
    if node.is_head:
        cmd += ["--head", _flag("port", (ports or {}).get("gcs", GCS_PORT))]
        params.setdefault("dashboard-port", str((ports or {}).get("dashboard", DASHBOARD_PORT)))
        params.setdefault("include-dashboard", "true")
        if ports is not None:  # a shared network: the dashboard must not listen on every address
            params["dashboard-host"] = node_address
            params["ray-client-server-port"] = str(ports["client_server"])
    else:
        cmd.append(_flag("address", head_address))
    if ports is not None:
        params.update({flag: str(ports[name]) for name, flag in NODE_PORT_FLAGS.items()})
    cmd += [_flag(k, v) for k, v in sorted(params.items())]
    cmd.append(_flag("num-cpus", int(node.num_cpus) if float(node.num_cpus).is_integer() else node.num_cpus))
    if node.resources:
        cmd.append(_flag("resources", json.dumps(node.resources, sort_keys=True)))
    if node.labels:
        cmd.append(_flag("labels", ",".join(f"{k}={v}" for k, v in sorted(node.labels.items()))))
    if node.object_store_bytes:
        cmd.append(_flag("object-store-memory", node.object_store_bytes))
    cmd += ["--disable-usage-stats", _flag("temp-dir", temp_dir)]
    return cmd
