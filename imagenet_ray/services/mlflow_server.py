"""`mlflow server` with a sqlite backend and artifacts proxied into the local S3 server.

Choices, and why:
- `--artifacts-destination s3://mlflow/artifacts` (artifact serving is on by default): clients log
  artifacts over HTTP to the tracking server, which writes them to S3 with the stack's credentials
  (MLFLOW_S3_ENDPOINT_URL + AWS_* in its environment). Training workers need no S3 access for MLflow.
- `--host 127.0.0.1`, `--workers 1`: loopback only, one uvicorn worker (2-core CI; a handful of runs).
- MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false: MLflow 3 otherwise starts seven huey job consumers (GenAI
  jobs we do not use) and leaves a temp dir in /dev/shm per start.
- MLFLOW_DISABLE_TELEMETRY / DO_NOT_TRACK: no usage reporting.
It takes ~15-25 s to answer /health on 2 cores (imports); it stops within ~2 s of SIGTERM.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from imagenet_ray.services.ports import LOCALHOST

if TYPE_CHECKING:
    from imagenet_ray.services.stack import LocalStack

NAME = "mlflow"
TITLE = "MLflow"
PORTS = ("mlflow",)
STARTUP_TIMEOUT_S = 120.0
STOP_GRACE_S = 10.0
ARTIFACTS_BUCKET = "mlflow"


def _cli() -> list[str]:
    beside = Path(sys.executable).with_name("mlflow")
    if beside.is_file():
        return [str(beside)]
    found = shutil.which("mlflow")
    return [found] if found else [sys.executable, "-m", "mlflow"]


def data_dir(stack: "LocalStack") -> Path:
    return stack.root_dir / "mlflow"


def prepare(stack: "LocalStack") -> None:
    data_dir(stack).mkdir(parents=True, exist_ok=True)


def command(stack: "LocalStack") -> list[str]:
    return [
        *_cli(), "server",
        "--backend-store-uri", f"sqlite:///{data_dir(stack) / 'mlflow.db'}",
        "--artifacts-destination", f"s3://{ARTIFACTS_BUCKET}/artifacts",
        "--host", LOCALHOST, "--port", str(stack.ports["mlflow"]),
        "--workers", "1",
    ]


def environ(stack: "LocalStack", base: dict[str, str]) -> dict[str, str]:
    env = dict(base)
    env.pop("MLFLOW_TRACKING_URI", None)  # the server is the tracking URI; it must not point at itself
    env.update({
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "true",
    })
    return env


def cwd(stack: "LocalStack") -> Path:
    return data_dir(stack)


def healthy(stack: "LocalStack") -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"{stack.mlflow_uri}/health", timeout=3) as resp:
            return resp.status == 200
    except Exception:
        return False


def after_start(stack: "LocalStack") -> None:
    pass


def diagnostics(stack: "LocalStack") -> str:
    return ""  # everything is in the service's own log


def url(stack: "LocalStack") -> str:
    return stack.mlflow_uri


def cleanup(stack: "LocalStack") -> None:
    pass
