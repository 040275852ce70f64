"""A RayCluster manifest's shape as plain data: groups, replicas, CPUs, GPUs, labels and rayStartParams.

Pure (YAML in, frozen dataclasses out): the local multi-host cluster starts one host per pod of this
shape, and the capacity planner reads the decode group's size from it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from imagenet_ray.errors import UserError

HEAD = "head"
NODE_GROUP_LABEL = "imagenet-ray/node-group"
GPU_RESOURCE = "nvidia.com/gpu"
_QUANTITY = re.compile(r"^([0-9.]+)([a-zA-Z]*)$")
_SUFFIXES = {
    "": 1,
    "m": 1e-3,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
}


def parse_quantity(value: Any, what: str) -> float:
    """A Kubernetes quantity ("500m", "16Gi", 8) as a number."""
    match = _QUANTITY.match(str(value).strip())
    if not match or match.group(2) not in _SUFFIXES:
        raise UserError(f"{what}: {value!r} is not a Kubernetes quantity")
    return float(match.group(1)) * _SUFFIXES[match.group(2)]


@dataclass(frozen=True)
class NodeGroup:
    """One RayCluster group: the head, or a worker group with its replica range."""

    name: str
    index: int  # position in spec.workerGroupSpecs (a JSON patch's path); -1 for the head
    replicas: int
    min_replicas: int
    max_replicas: int
    cpus: float  # the Ray container's CPU limit (else request)
    cpus_from: str  # the field that gave them
    gpus: int
    memory_bytes: int
    labels: dict[str, str] = field(default_factory=dict)
    ray_start_params: dict[str, str] = field(default_factory=dict)

    @property
    def is_head(self) -> bool:
        return self.name == HEAD

    @property
    def ray_num_cpus(self) -> float:
        """What Ray advertises, as KubeRay sets it: rayStartParams `num-cpus`, else the container's
        CPUs rounded up (Quantity.Value())."""
        given = self.ray_start_params.get("num-cpus")
        return parse_quantity(given, f"group {self.name}: num-cpus") if given is not None else math.ceil(self.cpus)

    @property
    def ray_cpus_from(self) -> str:
        return "rayStartParams.num-cpus" if "num-cpus" in self.ray_start_params else self.cpus_from


@dataclass(frozen=True)
class ClusterShape:
    name: str
    ray_version: str
    head: NodeGroup
    workers: tuple[NodeGroup, ...]

    def group(self, name: str) -> NodeGroup:
        for g in (self.head, *self.workers):
            if g.name == name:
                return g
        known = ", ".join(g.name for g in (self.head, *self.workers))
        raise UserError(f"RayCluster {self.name!r} has no group {name!r} (groups: {known})")


def _ray_container(template: dict[str, Any], where: str) -> dict[str, Any]:
    containers = (template.get("spec") or {}).get("containers") or []
    if not containers:
        raise UserError(f"{where}: the pod template has no containers")
    return dict(containers[0])  # KubeRay: the Ray container is the first one


def _group(spec: dict[str, Any], name: str, index: int, where: str) -> NodeGroup:
    is_head = index < 0
    container = _ray_container(spec.get("template") or {}, where)
    resources = container.get("resources") or {}
    limits, requests = resources.get("limits") or {}, resources.get("requests") or {}

    def amount(key: str) -> float:
        value = limits.get(key, requests.get(key))
        return 0.0 if value is None else parse_quantity(value, f"{where}: resources {key}")

    cpus_from = next((f"resources.{k}.cpu" for k, v in (("limits", limits), ("requests", requests)) if "cpu" in v), "")

    params = {str(k): str(v) for k, v in (spec.get("rayStartParams") or {}).items()}
    labels = {str(k): str(v) for k, v in (spec.get("labels") or {}).items()}
    replicas = 1 if is_head else int(spec.get("replicas", spec.get("minReplicas", 0)) or 0)
    return NodeGroup(
        name=name,
        index=index,
        replicas=replicas,
        min_replicas=1 if is_head else int(spec.get("minReplicas", 0) or 0),
        max_replicas=1 if is_head else int(spec.get("maxReplicas", replicas) or replicas),
        cpus=amount("cpu"),
        cpus_from=cpus_from,
        gpus=math.floor(amount(GPU_RESOURCE)),
        memory_bytes=int(amount("memory")),
        labels=labels,
        ray_start_params=params,
    )


def cluster_spec_of(doc: dict[str, Any], where: str) -> tuple[str, dict[str, Any]]:
    """The RayCluster spec inside a RayCluster, or a RayJob's embedded `rayClusterSpec`."""
    kind = doc.get("kind")
    name = str((doc.get("metadata") or {}).get("name", "?"))
    if kind == "RayCluster":
        return name, dict(doc.get("spec") or {})
    if kind == "RayJob":
        spec = (doc.get("spec") or {}).get("rayClusterSpec") or {}
        if not spec.get("headGroupSpec"):
            raise UserError(
                f"{where}: RayJob {name!r} has no rayClusterSpec (the base fills it in with kustomize; "
                "pass the RayCluster manifest, or the output of `kubectl kustomize`)"
            )
        return name, dict(spec)
    raise UserError(f"{where}: no RayCluster or RayJob found")


def read_cluster_shape(path: Path, name: str | None = None) -> ClusterShape:
    """The first RayCluster (or RayJob with a cluster spec) in a YAML file, or the one called `name`."""
    path = Path(path)
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if isinstance(d, dict)]
    except (OSError, yaml.YAMLError) as exc:
        raise UserError(f"{path}: cannot read the manifest ({type(exc).__name__}: {exc})") from None
    candidates = [d for d in docs if d.get("kind") in ("RayCluster", "RayJob")]
    if name is not None:
        candidates = [d for d in candidates if (d.get("metadata") or {}).get("name") == name]
    if not candidates:
        raise UserError(f"{path}: no RayCluster{f' named {name!r}' if name else ''} in the manifest")
    cluster_name, spec = cluster_spec_of(candidates[0], str(path))
    head_spec = spec.get("headGroupSpec")
    if not head_spec:
        raise UserError(f"{path}: RayCluster {cluster_name!r} has no headGroupSpec")
    workers = tuple(
        _group(g, str(g.get("groupName")), i, f"{path}: group {g.get('groupName')!r}")
        for i, g in enumerate(spec.get("workerGroupSpecs") or [])
    )
    if len({w.name for w in workers}) != len(workers) or any(w.name == HEAD for w in workers):
        raise UserError(f"{path}: worker group names must be unique and not {HEAD!r}")
    return ClusterShape(
        name=cluster_name,
        ray_version=str(spec.get("rayVersion", "")),
        head=_group(head_spec, HEAD, -1, f"{path}: headGroupSpec"),
        workers=workers,
    )
