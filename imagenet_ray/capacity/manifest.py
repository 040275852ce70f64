"""The RayCluster manifest as the planner reads it (a worker group's Ray CPUs per pod and its replica bounds)
and writes it back: a kustomize overlay that sizes the decode group (JSON 6902 patch + the RayJobs' copy)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from imagenet_ray.cluster.manifest import read_cluster_shape
from imagenet_ray.errors import UserError

DEFAULT_MANIFEST = "infra/k8s/base/raycluster.yaml"
DEFAULT_GROUP = "decode"
OVERLAY_HEADER = "# Written by `imagenet-ray plan`"


@dataclass(frozen=True)
class WorkerGroup:
    """One RayCluster worker group: where it sits in the manifest, its pods' Ray CPUs/GPUs, its replicas."""

    manifest: str
    cluster: str
    name: str
    index: int  # position in spec.workerGroupSpecs (the JSON patch's path)
    cpus_per_pod: float
    cpus_from: str  # which field gave them
    gpus_per_pod: int
    replicas: int
    min_replicas: int
    max_replicas: int


def read_worker_group(manifest: str, name: str) -> WorkerGroup:
    """One worker group of the RayCluster in `manifest`, as the cluster reader sees it."""
    shape = read_cluster_shape(Path(manifest))
    group = shape.group(name)
    if group.is_head:
        raise UserError(f"plan --group: {name!r} is the head, not a worker group")
    return WorkerGroup(
        manifest=manifest,
        cluster=shape.name,
        name=group.name,
        index=group.index,
        cpus_per_pod=float(group.ray_num_cpus),
        cpus_from=group.ray_cpus_from,
        gpus_per_pod=group.gpus,
        replicas=group.replicas,
        min_replicas=group.min_replicas,
        max_replicas=group.max_replicas,
    )


def gpus_per_node(manifest: str, name: str = "train") -> int:
    """GPUs per pod of the train group; 0 when the manifest has no such group."""
    try:
        return read_worker_group(manifest, name).gpus_per_pod
    except UserError:
        return 0


# --- the overlay ------------------------------------------------------------------------------------------------


def overlay_text(group: WorkerGroup, replicas: int, base: str, summary: str) -> str:
    """A kustomization over `base` (the manifest's kustomize directory) that runs `replicas` decode pods."""
    path = f"/spec/workerGroupSpecs/{group.index}"
    ops = [
        f"{{op: add, path: {path}/replicas, value: {replicas}}}",
        f"{{op: add, path: {path}/minReplicas, value: {replicas}}}",
    ]
    if group.max_replicas < replicas:
        ops.append(f"{{op: add, path: {path}/maxReplicas, value: {replicas}}}")
    patch = "\n".join(f"      - {op}" for op in ops)
    return f"""{OVERLAY_HEADER}: {summary}
# The {group.name} group of {group.manifest} runs {replicas} pods of {group.cpus_per_pod:g} CPUs; the RayJobs embed
# the patched cluster (the base's copy was taken before this patch). Rerun the planner to change it.
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - {base}
patches:
  - target: {{group: ray.io, version: v1, kind: RayCluster, name: {group.cluster}}}
    patch: |-
{patch}
replacements:
  - source: {{kind: RayCluster, name: {group.cluster}, fieldPath: spec}}
    targets:
      - select: {{kind: RayJob}}
        fieldPaths: [spec.rayClusterSpec]
"""


def write_overlay(directory: str, group: WorkerGroup, replicas: int, summary: str) -> Path:
    """Write DIRECTORY/kustomization.yaml; never over a kustomization this command did not write."""
    base_dir = Path(group.manifest).resolve().parent
    base_kustomization = base_dir / "kustomization.yaml"
    if not base_kustomization.is_file():
        raise UserError(f"plan --write-overlay: {base_dir} has no kustomization.yaml to build on")
    listed = yaml.safe_load(base_kustomization.read_text()).get("resources", [])
    if Path(group.manifest).name not in listed:
        raise UserError(f"plan --write-overlay: {base_kustomization} does not list {Path(group.manifest).name}")
    out = Path(directory) / "kustomization.yaml"
    if out.exists() and not out.read_text().startswith(OVERLAY_HEADER):
        raise UserError(f"plan --write-overlay: {out} exists and was not written by imagenet-ray plan")
    out.parent.mkdir(parents=True, exist_ok=True)
    base = os.path.relpath(base_dir, out.parent.resolve())
    out.write_text(overlay_text(group, replicas, base, summary))
    return out
