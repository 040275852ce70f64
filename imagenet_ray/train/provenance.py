"""What a run was made with, as MLflow tags: the project's version and commit, the library versions, the
cluster's shape. The resolved config is the run's config.yaml artifact (tracking.RunSink.find_or_create)."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

from imagenet_ray import __version__
from imagenet_ray.config import ExperimentConfig

GIT_COMMIT_ENV = "IMAGENET_RAY_GIT_COMMIT"  # set by the image build (infra/docker/Dockerfile)
_LIBRARIES = ("torch", "torchvision", "ray", "mlflow", "pyarrow", "numpy", "timm")


def git_commit() -> str | None:
    """The commit of the source this runs from: the environment's (an image records its build's), else
    the checkout's, with `-dirty` when it has uncommitted changes; None outside both."""
    if os.environ.get(GIT_COMMIT_ENV, "unknown") != "unknown":  # an image built without --build-arg says unknown
        return os.environ[GIT_COMMIT_ENV]
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}-dirty" if dirty else head or None


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def reproducibility_tags(cfg: ExperimentConfig, use_gpu: bool) -> dict[str, str]:
    """Tags of a training run: versions, commit (MLflow's own tag, which its UI shows) and cluster shape."""
    import ray

    resources = ray.cluster_resources()
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    # Nodes with a GPU host the training workers (on a CPU-only cluster every node may); the others decode.
    gpu_nodes = sum(1 for n in nodes if n.get("Resources", {}).get("GPU", 0) > 0)
    tags = {
        "imagenet_ray.version": __version__,
        "imagenet_ray.python": platform.python_version(),
        **{f"imagenet_ray.versions.{lib}": _version(lib) for lib in _LIBRARIES},
        "imagenet_ray.cluster.nodes": str(len(nodes)),
        "imagenet_ray.cluster.cpus": f"{resources.get('CPU', 0):g}",
        "imagenet_ray.cluster.gpus": f"{resources.get('GPU', 0):g}",
        "imagenet_ray.cluster.gpu_nodes": str(gpu_nodes),
        "imagenet_ray.cluster.cpu_only_nodes": str(len(nodes) - gpu_nodes),
        "imagenet_ray.train.workers": str(cfg.train.num_workers),
        "imagenet_ray.train.gpus_per_worker": "1" if use_gpu else "0",
        "imagenet_ray.train.cpus_per_worker": f"{cfg.train.cpus_per_worker:g}",
    }
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags
