"""Integration layer: real servers on 127.0.0.1 (and a multi-host cluster), started once per test session.

`local_stack` is an `imagenet_ray.services.LocalStack`: a SeaweedFS S3 server with credentials, an
MLflow server storing artifacts in it, and a Ray head, all on fresh free ports with data in a pytest
temp dir (so it never collides with `imagenet-ray services up` or another test run). Use
`local_stack.env()` for clients in subprocesses, `local_stack.ray_auth_headers()` for an in-process
JobSubmissionClient.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

import pytest

# No usage reporting from MLflow clients in the test process.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")


@pytest.fixture(scope="session")
def local_stack(tmp_path_factory):
    from imagenet_ray.services import start_stack

    t0 = time.monotonic()
    stack = start_stack(tmp_path_factory.mktemp("services"))
    print(f"\nlocal_stack: started in {time.monotonic() - t0:.1f} s (logs in {stack.logs_dir})")
    try:
        yield stack
    finally:
        t0 = time.monotonic()
        stack.stop()
        print(f"\nlocal_stack: stopped in {time.monotonic() - t0:.1f} s")


@pytest.fixture(scope="session")
def local_cluster(tmp_path_factory):
    """The base RayCluster's shape on this machine: head, one train and one decode host, services host."""
    from pathlib import Path

    from imagenet_ray.cluster import local
    from imagenet_ray.cluster.cpu_limits import our_cgroups
    from imagenet_ray.cluster.hosts import our_namespaces

    manifest = Path(__file__).resolve().parents[2] / "infra/k8s/base/raycluster.yaml"
    t0 = time.monotonic()
    # Not below pytest's 0700 temp root: PostgreSQL (its own user) must reach the services' data.
    root = Path(tempfile.mkdtemp(prefix="irray-cluster-"))
    cluster = local.up(root, manifest)
    print(
        f"\nlocal_cluster: {len(cluster.nodes)} nodes up in {time.monotonic() - t0:.1f} s (logs in {cluster.logs_dir})"
    )
    try:
        yield cluster
    finally:
        t0 = time.monotonic()
        try:
            local.down(cluster)  # raises if any process, namespace or link is left
            assert our_namespaces(cluster.cluster_id) == [] and our_cgroups(cluster.cluster_id) == []
            print(f"\nlocal_cluster: stopped in {time.monotonic() - t0:.1f} s")
        finally:
            shutil.rmtree(root, ignore_errors=True)
