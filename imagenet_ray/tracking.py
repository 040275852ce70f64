"""MLflow: one run per training run, created once by rank 0, resumed by id after a restart.

Uses `MlflowClient` with an explicit tracking URI (no global fluent state), so workers, drivers and
tests can each talk to their own store. Only config values and metrics are sent; credentials live in
the environment and never appear in the config.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from imagenet_ray.errors import UserError

RUN_NAME_TAG = "imagenet_ray.run_name"


def resolve_tracking_uri(uri: str) -> str:
    """Absolute form of `uri`: `sqlite:///rel.db` and bare paths become absolute sqlite URIs."""
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite":
        path = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else ""
        if not path:
            raise UserError(f"mlflow.tracking_uri: {uri!r} must look like sqlite:///path/to.db")
        if path.startswith("/"):
            return uri
        return f"sqlite:///{os.path.abspath(path)}"
    if parsed.scheme in ("http", "https", "databricks"):
        return uri
    if parsed.scheme in ("", "file"):
        path = os.path.abspath(parsed.path if parsed.scheme else uri)
        return f"sqlite:///{path if path.endswith('.db') else os.path.join(path, 'mlflow.db')}"
    raise UserError(f"mlflow.tracking_uri: unsupported scheme {parsed.scheme!r} (use sqlite:///…, http(s)://…)")


def local_artifact_root(tracking_uri: str) -> str | None:
    """For a sqlite store, keep artifacts beside the database (not in the worker's cwd)."""
    if tracking_uri.startswith("sqlite:///"):
        return str(Path(tracking_uri[len("sqlite:///"):]).parent / "mlartifacts")
    return None


def ensure_experiment(tracking_uri: str, name: str) -> str:
    """Experiment id for `name`, creating it (with a stable artifact location) if needed."""
    from mlflow.tracking import MlflowClient

    if tracking_uri.startswith("sqlite:///"):
        Path(tracking_uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(tracking_uri)
    try:
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        root = local_artifact_root(tracking_uri)
        return client.create_experiment(name, artifact_location=Path(root).as_uri() if root else None)
    except Exception as exc:  # MlflowException, requests errors: one line for the user
        raise UserError(f"MLflow at {tracking_uri}: {' '.join(str(exc).split())[:300]}") from None


class RunTracker:
    """Logging handle for one MLflow run (used on rank 0 only)."""

    def __init__(self, tracking_uri: str, run_id: str):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri)
        self.run_id = run_id

    @classmethod
    def start(cls, tracking_uri: str, experiment_id: str, run_name: str, params: dict[str, Any],
              config_yaml: str, tags: dict[str, str] | None = None) -> "RunTracker":
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri)
        run = client.create_run(experiment_id, run_name=run_name, tags={RUN_NAME_TAG: run_name, **(tags or {})})
        tracker = cls(tracking_uri, run.info.run_id)
        items = [Param(k, str(v)) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            client.log_batch(run.info.run_id, params=items[i:i + 100])
        client.log_text(run.info.run_id, config_yaml, "config.yaml")
        return tracker

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def log_dict(self, data: dict, artifact_file: str) -> None:
        self.client.log_dict(self.run_id, data, artifact_file)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)
