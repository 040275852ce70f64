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
STORAGE_TAG = "imagenet_ray.storage"


def resolve_tracking_uri(uri: str) -> str:
    """Absolute form of `uri`: `sqlite:///rel.db` and bare paths become absolute sqlite URIs."""
    parsed = urlparse(uri)
    if uri == "databricks":  # MLflow's bare form for the Databricks workspace in the environment
        return uri
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

    try:
        if tracking_uri.startswith("sqlite:///"):
            Path(tracking_uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        client = MlflowClient(tracking_uri)
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        root = local_artifact_root(tracking_uri)
        return client.create_experiment(name, artifact_location=Path(root).as_uri() if root else None)
    except Exception as exc:  # MlflowException, requests errors: one line for the user
        raise UserError(f"MLflow at {tracking_uri}: {' '.join(str(exc).split())[:300]}") from None


def find_or_start_run(tracking_uri: str, experiment_id: str, run_name: str, storage_url: str,
                      params: dict[str, Any], config_yaml: str) -> tuple[str, bool]:
    """(run id, resumed). One MLflow run per training run: a run is identified by its name and its
    checkpoint storage, the same pair Ray Train uses to resume, so a resubmitted job or a restarted
    worker group continues the run that already exists."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    try:
        existing = client.search_runs(
            [experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}' and tags.`{STORAGE_TAG}` = "
                                           f"'{storage_url}'", order_by=["attributes.start_time DESC"], max_results=1)
        if existing:
            return existing[0].info.run_id, True
        tracker = RunTracker.start(tracking_uri, experiment_id, run_name, params, config_yaml,
                                   tags={STORAGE_TAG: storage_url})
        return tracker.run_id, False
    except Exception as exc:
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

    def reopen(self) -> None:
        """Mark a resumed run as running again (it may have been ended by a time box or a crash)."""
        if self.client.get_run(self.run_id).info.status != "RUNNING":
            self.client.update_run(self.run_id, status="RUNNING")

    def logged_steps(self, key: str) -> set[int]:
        return {m.step for m in self.client.get_metric_history(self.run_id, key)}

    def log_dict(self, data: dict, artifact_file: str) -> None:
        self.client.log_dict(self.run_id, data, artifact_file)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)


DATASETS_EXPERIMENT = "imagenet-ray-datasets"


def log_prepared_dataset(tracking_uri: str, report: dict[str, Any], manifest: dict[str, Any] | None) -> str:
    """Log a preparation as an MLflow run: counts as metrics, report + manifest as artifacts, and the
    prepared dataset as a run input (name = output URL, digest from the shard checksums)."""
    import hashlib

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag, Param

    uri = resolve_tracking_uri(tracking_uri)
    experiment_id = ensure_experiment(uri, DATASETS_EXPERIMENT)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    run = client.create_run(experiment_id, run_name=f"prepare {report['out']}")
    run_id = run.info.run_id
    params = {"source": report["source"], "layout": report["layout"], "out": report["out"],
              "tool_version": report["tool_version"]}
    client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])
    tracker = RunTracker(uri, run_id)
    metrics = {"classes": report["classes"], "wall_seconds": report["wall_seconds"]}
    for split, s in report["splits"].items():
        for key in ("listed", "written", "quarantined", "bytes_in", "bytes_out"):
            metrics[f"{split}/{key}"] = s[key]
    tracker.log_metrics(metrics, step=0)
    tracker.log_dict(report, "_report.json")
    if manifest is not None:
        tracker.log_dict(manifest, "_manifest.json")
        digest = hashlib.sha256("".join(s["sha256"] for sp in manifest["splits"].values()
                                        for s in sp["shards"]).encode()).hexdigest()[:16]
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "can be interpreted in multiple ways" for local paths
            try:
                source = resolve_dataset_source(report["out"])
            except Exception:  # no dataset source registered for this URL scheme (e.g. gs:// without extras)
                source = None
        if source is not None:
            dataset = MetaDataset(source, name=report["out"], digest=digest)
            client.log_inputs(run_id, datasets=[DatasetInput(dataset._to_mlflow_entity(),
                                                             tags=[InputTag("mlflow.data.context", "prepared")])])
    tracker.finish("FINISHED" if manifest is not None else "FAILED")
    return run_id


def set_tag(tracking_uri: str, run_id: str, key: str, value: str) -> None:
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri).set_tag(run_id, key, value)
