"""Integration layer: real servers on 127.0.0.1, started once per test session.

`local_stack` is an `imagenet_ray.services.LocalStack`: a SeaweedFS S3 server with credentials, an
MLflow server storing artifacts in it, and a Ray head, all on fresh free ports with data in a pytest
temp dir (so it never collides with `imagenet-ray services up` or another test run). Use
`local_stack.env()` for clients in subprocesses, `local_stack.ray_auth_headers()` for an in-process
JobSubmissionClient.
"""

from __future__ import annotations

import os
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
