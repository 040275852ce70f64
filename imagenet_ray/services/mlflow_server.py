"""`mlflow server` with a sqlite backend, artifacts proxied into the stack's S3 bucket.

Clients log artifacts over HTTP to the server, which writes them to S3 with the stack's credentials,
so training workers need no S3 access for MLflow. Why each flag is set: docs/architecture.md.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from imagenet_ray.services.ports import LOCALHOST
from imagenet_ray.services.state import StackState

NAME = "mlflow"
TITLE = "MLflow"
PORTS: tuple[str, ...] = ("mlflow",)
STARTUP_TIMEOUT_S = 120.0
STOP_GRACE_S = 10.0
ARTIFACTS_BUCKET = "mlflow"


def _cli() -> list[str]:
    beside = Path(sys.executable).with_name("mlflow")
    if beside.is_file():
        return [str(beside)]
    found = shutil.which("mlflow")
    return [found] if found else [sys.executable, "-m", "mlflow"]


def data_dir(stack: StackState) -> Path:
    return stack.root_dir / "mlflow"


def prepare(stack: StackState) -> None:
    data_dir(stack).mkdir(parents=True, exist_ok=True)


def command(stack: StackState) -> list[str]:
    # --workers 1: one uvicorn worker is plenty for a handful of runs on a small machine.
    return [
        *_cli(),
        "server",
        "--backend-store-uri",
        f"sqlite:///{data_dir(stack) / 'mlflow.db'}",
        "--artifacts-destination",
        f"s3://{ARTIFACTS_BUCKET}/artifacts",
        "--host",
        LOCALHOST,
        "--port",
        str(stack.ports["mlflow"]),
        "--workers",
        "1",
    ]


def environ(stack: StackState, base: dict[str, str]) -> dict[str, str]:
    env = dict(base)
    env.pop("MLFLOW_TRACKING_URI", None)  # the server is the tracking URI; it must not point at itself
    env.update(
        {
            # MLflow 3 otherwise starts GenAI job consumers we do not use (and leaves a temp dir per start).
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "DO_NOT_TRACK": "true",
        }
    )
    return env


def cwd(stack: StackState) -> Path:
    return data_dir(stack)


def healthy(stack: StackState) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"{stack.mlflow_uri}/health", timeout=3) as resp:
            return bool(resp.status == 200)
    except Exception:
        return False


def after_start(stack: StackState) -> None:
    pass


def diagnostics(stack: StackState) -> str:
    return ""  # everything is in the service's own log


def url(stack: StackState) -> str:
    return stack.mlflow_uri


def cleanup(stack: StackState) -> None:
    pass
