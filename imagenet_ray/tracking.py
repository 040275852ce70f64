"""The one MLflow sink: `RunSink` creates, finds or reattaches a run and is the only thing that logs to one.

`MlflowClient` with an explicit tracking URI (no global fluent state), so workers, drivers and tests
each talk to their own store. Only config values and metrics are sent, never credentials (a URL's password
is masked in every param, tag, name and text sent). Every MLflow failure becomes one `UserError` line.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlparse

from imagenet_ray.errors import UserError, describe_error
from imagenet_ray.redact import redact_text, redact_url, redact_values

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

__all__ = [
    "DATASETS_EXPERIMENT",
    "RUN_NAME_TAG",
    "STORAGE_TAG",
    "MlflowUnavailable",
    "RunSink",
    "RunTracker",
    "describe_error",
    "ensure_experiment",
    "find_or_start_run",
    "find_prepare_run",
    "local_artifact_root",
    "log_prepared_dataset",
    "manifest_digest",
    "manifest_profile",
    "resolve_tracking_uri",
    "set_tag",
    "training_run_experiment",
    "val_dataset",
    "when_reachable",
]

RUN_NAME_TAG = "imagenet_ray.run_name"
STORAGE_TAG = "imagenet_ray.storage"
DATASETS_EXPERIMENT = "imagenet-ray-datasets"
# The MLflow UI opens an experiment without this tag in its GenAI view (traces, judges); this one opens
# its model-training view (runs, charts). Values: the UI's ExperimentKind enum.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_DEVELOPMENT = "custom_model_development"
_PARAMS_PER_BATCH = 100  # MLflow's cap on params in one log_batch
T = TypeVar("T")
log = logging.getLogger(__name__)


def resolve_tracking_uri(uri: str) -> str:
    """Absolute form of `uri`: `sqlite:///rel.db` and bare paths become absolute sqlite URIs."""
    parsed = urlparse(uri)
    if uri == "databricks":  # MLflow's bare form for the Databricks workspace in the environment
        return uri
    if parsed.scheme == "sqlite":
        path = uri[len("sqlite:///") :] if uri.startswith("sqlite:///") else ""
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
        return str(Path(tracking_uri[len("sqlite:///") :]).parent / "mlartifacts")
    return None


class MlflowUnavailable(UserError):
    """MLflow could not be reached or failed on its side (a refused connection, a timeout, HTTP 5xx or
    429): worth retrying. Any other MLflow error (a 4xx: bad value, no such run, no permission) is not."""


def is_transient(exc: BaseException) -> bool:
    """Whether an MLflow client error may heal: MLflow reports a refused connection as INTERNAL_ERROR (500)
    after its own retries; errors without an HTTP status (requests', sqlite's) are the store's side."""
    status = getattr(exc, "get_http_status_code", None)
    if not callable(status):
        return True
    try:
        code = int(status())
    except (TypeError, ValueError):
        return True
    return code >= 500 or code == 429


@contextlib.contextmanager
def _mlflow_errors(uri: str) -> Iterator[None]:
    """MlflowException, requests and sqlite errors become one line for the user; ours pass through."""
    try:
        yield
    except UserError:
        raise
    except Exception as exc:
        kind = MlflowUnavailable if is_transient(exc) else UserError
        raise kind(f"MLflow at {redact_url(uri)}: {describe_error(exc)}") from None


def _client(uri: str) -> MlflowClient:
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def ensure_experiment(tracking_uri: str, name: str) -> str:
    """Experiment id for `name`, creating it (with a stable artifact location) if needed; tagged as model
    development unless it already says what kind it is."""
    with _mlflow_errors(tracking_uri):
        if tracking_uri.startswith("sqlite:///"):
            Path(tracking_uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
        client = _client(tracking_uri)
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            if EXPERIMENT_KIND_TAG not in exp.tags:
                client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, MODEL_DEVELOPMENT)
            return str(exp.experiment_id)
        root = local_artifact_root(tracking_uri)
        return str(
            client.create_experiment(
                name,
                artifact_location=Path(root).as_uri() if root else None,
                tags={EXPERIMENT_KIND_TAG: MODEL_DEVELOPMENT},
            )
        )


class RunSink:
    """The handle for one MLflow run: the only writer of that run while it is open."""

    def __init__(self, tracking_uri: str, run_id: str) -> None:
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        with _mlflow_errors(tracking_uri):
            self._client = _client(tracking_uri)

    # -- opening a run ----------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        uri: str,
        experiment_name: str,
        run_name: str,
        *,
        params: dict[str, Any] | None = None,
        tags: dict[str, str] | None = None,
        texts: dict[str, str] | None = None,
    ) -> RunSink:
        """A new run in `experiment_name` (created if needed) with its params, tags and text artifacts
        (`texts` maps artifact file → text)."""
        uri = resolve_tracking_uri(uri)
        return cls._create_in(
            uri, ensure_experiment(uri, experiment_name), run_name, params=params, tags=tags, texts=texts
        )

    @classmethod
    def create_in_experiment(
        cls,
        uri: str,
        experiment_id: str,
        run_name: str,
        *,
        params: dict[str, Any] | None = None,
        tags: dict[str, str] | None = None,
    ) -> RunSink:
        """A new run in an existing experiment (e.g. a child run beside its parent)."""
        return cls._create_in(resolve_tracking_uri(uri), experiment_id, run_name, params=params, tags=tags)

    @classmethod
    def _create_in(
        cls,
        uri: str,
        experiment_id: str,
        run_name: str,
        *,
        params: dict[str, Any] | None = None,
        tags: dict[str, str] | None = None,
        texts: dict[str, str] | None = None,
    ) -> RunSink:
        with _mlflow_errors(uri):
            run = _client(uri).create_run(
                experiment_id, run_name=redact_text(run_name), tags={k: redact_text(v) for k, v in (tags or {}).items()}
            )
        sink = cls(uri, run.info.run_id)
        sink.log_params(params or {})
        for artifact_file, text in (texts or {}).items():
            sink.log_text(text, artifact_file)
        return sink

    @classmethod
    def find_or_create(
        cls, uri: str, experiment_name: str, run_name: str, storage_url: str, params: dict[str, Any], config_yaml: str
    ) -> tuple[RunSink, bool]:
        """(sink, resumed). One MLflow run per training run: a run is identified by its name and its
        checkpoint storage, the pair Ray Train resumes by, so a resubmitted job continues its run."""
        uri = resolve_tracking_uri(uri)
        return cls._find_or_create_in(
            uri, ensure_experiment(uri, experiment_name), run_name, storage_url, params, config_yaml
        )

    @classmethod
    def find(cls, uri: str, experiment_name: str, run_name: str, storage_url: str) -> RunSink | None:
        """The training run `find_or_create` would resume, or None (creates nothing)."""
        uri = resolve_tracking_uri(uri)
        if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).exists():
            return None
        with _mlflow_errors(uri):
            exp = _client(uri).get_experiment_by_name(experiment_name)
        return None if exp is None else cls._find_in(uri, str(exp.experiment_id), run_name, storage_url)

    @classmethod
    def _find_in(cls, uri: str, experiment_id: str, run_name: str, storage_url: str) -> RunSink | None:
        with _mlflow_errors(uri):
            existing = _client(uri).search_runs(
                [experiment_id],
                # as the tags were stored: masked
                filter_string=(
                    f"tags.`{RUN_NAME_TAG}` = '{redact_text(run_name)}' "
                    f"and tags.`{STORAGE_TAG}` = '{redact_text(storage_url)}'"
                ),
                order_by=["attributes.start_time DESC"],
                max_results=1,
            )
        return cls(uri, existing[0].info.run_id) if existing else None

    @classmethod
    def _find_or_create_in(
        cls, uri: str, experiment_id: str, run_name: str, storage_url: str, params: dict[str, Any], config_yaml: str
    ) -> tuple[RunSink, bool]:
        existing = cls._find_in(uri, experiment_id, run_name, storage_url)
        if existing is not None:
            return existing, True
        sink = cls._create_in(
            uri,
            experiment_id,
            run_name,
            params=params,
            tags={RUN_NAME_TAG: run_name, STORAGE_TAG: storage_url},
            texts={"config.yaml": config_yaml},
        )
        return sink, False

    @classmethod
    def attach(cls, uri: str, run_id: str, reopen: bool = False) -> RunSink:
        """The existing run `run_id`; with `reopen`, marked RUNNING again (a time box or crash ended it)."""
        sink = cls(resolve_tracking_uri(uri), run_id)
        if reopen:
            sink.reopen()
        return sink

    # -- writing ----------------------------------------------------------------------------------
    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, redact_text(str(v))) for k, v in sorted(params.items())]
        with _mlflow_errors(self.tracking_uri):
            for i in range(0, len(items), _PARAMS_PER_BATCH):
                self._client.log_batch(self.run_id, params=items[i : i + _PARAMS_PER_BATCH])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        with _mlflow_errors(self.tracking_uri):
            self._client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def log_metric_values(self, points: list[tuple[str, float, int, int]]) -> None:
        """(key, value, timestamp ms, step) values in one batch: a resend stores nothing twice."""
        from mlflow.entities import Metric

        with _mlflow_errors(self.tracking_uri):
            self._client.log_batch(self.run_id, metrics=[Metric(k, v, ts, step) for k, v, ts, step in points])

    def log_image(self, png: bytes, artifact_file: str) -> None:
        with _mlflow_errors(self.tracking_uri):
            self._client.log_image(self.run_id, _png_image(png), artifact_file=artifact_file)

    def log_dict(self, data: dict[str, Any], artifact_file: str) -> None:
        with _mlflow_errors(self.tracking_uri):
            self._client.log_dict(self.run_id, redact_values(data), artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        with _mlflow_errors(self.tracking_uri):
            self._client.log_text(self.run_id, redact_text(text), artifact_file)

    def set_tags(self, tags: dict[str, str]) -> None:
        with _mlflow_errors(self.tracking_uri):
            for key, value in tags.items():
                self._client.set_tag(self.run_id, key, redact_text(str(value)))

    def log_dataset_input(self, url: str, digest: str, context: str, profile: dict[str, Any] | None = None) -> bool:
        """Record the dataset `url` (a URL, or URL#split) as an input of this run with `context`; False
        where MLflow knows no source for the URL's scheme. The same (name, digest, source, profile) from
        every run, so the UI shows one dataset across prepare, train and evaluate."""
        import json

        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.entities import Dataset, DatasetInput, InputTag

        url = redact_url(url)  # the dataset's name and source, as every run records them
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "can be interpreted in multiple ways" for local paths
            try:
                source = resolve_dataset_source(url.split("#", 1)[0])
            except Exception:  # no dataset source registered for this URL scheme
                return False
        entity = Dataset(
            name=url,
            digest=digest,
            source_type=source._get_source_type(),
            source=source.to_json(),
            profile=json.dumps(profile) if profile else None,
        )
        with _mlflow_errors(self.tracking_uri):
            self._client.log_inputs(
                self.run_id, datasets=[DatasetInput(entity, tags=[InputTag("mlflow.data.context", context)])]
            )
        return True

    def reopen(self) -> None:
        """Mark a resumed run as running again (it may have been ended by a time box or a crash)."""
        with _mlflow_errors(self.tracking_uri):
            if self._client.get_run(self.run_id).info.status != "RUNNING":
                self._client.update_run(self.run_id, status="RUNNING")

    def finish(self, status: str = "FINISHED") -> None:
        with _mlflow_errors(self.tracking_uri):
            self._client.set_terminated(self.run_id, status)

    # -- reading ----------------------------------------------------------------------------------
    def read(self) -> tuple[str, dict[str, float], dict[str, str]]:
        """(status, latest metrics, tags) of the run."""
        with _mlflow_errors(self.tracking_uri):
            run = self._client.get_run(self.run_id)
        return run.info.status, dict(run.data.metrics), dict(run.data.tags)

    def params(self) -> dict[str, str]:
        """The run's params as MLflow keeps them (strings)."""
        with _mlflow_errors(self.tracking_uri):
            return dict(self._client.get_run(self.run_id).data.params)

    def logged_values(self, key: str) -> set[int]:
        """Integer values logged for metric `key` (the `epoch` metric: which epochs are in the run)."""
        with _mlflow_errors(self.tracking_uri):
            return {int(m.value) for m in self._client.get_metric_history(self.run_id, key)}

    def epoch_history(self, key: str) -> list[tuple[int, float]]:
        """(epoch, value) of epoch metric `key` in logged order. Epoch metrics are logged at the global
        step with the `epoch` metric, which maps a step to its epoch."""
        with _mlflow_errors(self.tracking_uri):
            epoch_at = {m.step: int(m.value) for m in self._client.get_metric_history(self.run_id, "epoch")}
            history = self._client.get_metric_history(self.run_id, key)
        # A logged model's val metrics repeat the run's point (same step, same value): one point.
        points = dict.fromkeys((m.step, m.value) for m in sorted(history, key=lambda m: (m.step, m.timestamp)))
        return [(epoch_at.get(step, -1), value) for step, value in points]

    def logged_steps(self, key: str) -> set[int]:
        """Steps already logged for metric `key` (a restarted worker never logs an epoch twice)."""
        with _mlflow_errors(self.tracking_uri):
            return {m.step for m in self._client.get_metric_history(self.run_id, key)}


def _png_image(png: bytes) -> Any:
    import io

    from PIL import Image

    return Image.open(io.BytesIO(png))


RunTracker = RunSink  # transition alias: the old name


def find_or_start_run(
    tracking_uri: str, experiment_id: str, run_name: str, storage_url: str, params: dict[str, Any], config_yaml: str
) -> tuple[str, bool]:
    """Transition wrapper of `RunSink.find_or_create` by experiment id: (run id, resumed)."""
    sink, resumed = RunSink._find_or_create_in(tracking_uri, experiment_id, run_name, storage_url, params, config_yaml)
    return sink.run_id, resumed


def set_tag(tracking_uri: str, run_id: str, key: str, value: str) -> None:
    """Transition wrapper of `RunSink.set_tags`."""
    RunSink(tracking_uri, run_id).set_tags({key: value})


def manifest_digest(manifest: dict[str, Any], splits: tuple[str, ...] | None = None) -> str:
    """A prepared dataset's identity in MLflow, from its shards' checksums (prepare, train, evaluate
    agree); `splits` narrows it (("val",): the val set a model's val/top1 was measured on)."""
    shards = "".join(
        s["sha256"] for name, sp in manifest["splits"].items() if splits is None or name in splits for s in sp["shards"]
    )
    return hashlib.sha256(shards.encode()).hexdigest()[:16]


def manifest_profile(manifest: dict[str, Any]) -> dict[str, Any]:
    """The counts MLflow shows with the dataset."""
    return {
        "classes": len(manifest.get("classes", [])),
        **{f"{split}_images": int(s.get("num_images", 0)) for split, s in manifest["splits"].items()},
    }


def when_reachable(call: Callable[[], T], what: str, wait_s: float = 120.0, every_s: float = 5.0) -> T | None:
    """`call()`, retried while MLflow is unreachable for up to `wait_s`; None (and a warning naming
    `what`) if it stays away or refuses the write: for writes that must not fail a finished training run."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return call()
        except MlflowUnavailable as exc:
            if time.monotonic() >= deadline:
                log.warning("%s not written: %s", redact_text(what), exc)
                return None
            time.sleep(every_s)
        except UserError as exc:  # MLflow answered no (a 4xx): asking again gets the same answer
            log.warning("%s not written: %s", redact_text(what), exc)
            return None


def training_run_experiment(tracking_uri: str, run_id: str | None) -> str | None:
    """The experiment of run `run_id` when this store has that run, else None."""
    if not run_id:
        return None
    uri = resolve_tracking_uri(tracking_uri)
    try:
        return str(_client(uri).get_run(run_id).info.experiment_id)
    except Exception:  # another store's run (or none): the evaluation stands on its own
        return None


def val_dataset(url: str, manifest: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
    """(name, digest, profile) of a prepared dataset's val split as an MLflow dataset: what training
    validates on, evaluate measures and the registry compares champions by."""
    return (
        f"{url}#val",
        manifest_digest(manifest, splits=("val",)),
        {"classes": len(manifest.get("classes", [])), "val_images": int(manifest["splits"]["val"]["num_images"])},
    )


def find_prepare_run(tracking_uri: str, dataset_url: str) -> str | None:
    """The latest finished prepare run that wrote `dataset_url`, if this store has one."""
    uri = resolve_tracking_uri(tracking_uri)
    with _mlflow_errors(uri):
        client = _client(uri)
        exp = client.get_experiment_by_name(DATASETS_EXPERIMENT)
        if exp is None:
            return None
        runs = client.search_runs(
            [exp.experiment_id],
            filter_string=f"params.out = '{redact_url(dataset_url)}' and attributes.status = 'FINISHED'",  # as stored
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
    return runs[0].info.run_id if runs else None


def log_prepared_dataset(tracking_uri: str, report: dict[str, Any], manifest: dict[str, Any] | None) -> str:
    """Log a preparation as an MLflow run: counts as metrics, report + manifest as artifacts, and the
    prepared dataset as a run input (name = output URL, digest from the shard checksums)."""
    params = {
        "source": report["source"],
        "layout": report["layout"],
        "out": report["out"],
        "tool_version": report["tool_version"],
    }
    sink = RunSink.create(tracking_uri, DATASETS_EXPERIMENT, f"prepare {report['out']}", params=params)
    metrics = {"classes": report["classes"], "wall_seconds": report["wall_seconds"]}
    for split, s in report["splits"].items():
        for key in ("listed", "written", "quarantined", "bytes_in", "bytes_out"):
            metrics[f"{split}/{key}"] = s[key]
    sink.log_metrics(metrics, step=0)
    sink.log_dict(report, "_report.json")
    if manifest is not None:
        sink.log_dict(manifest, "_manifest.json")
        sink.log_dataset_input(
            report["out"], manifest_digest(manifest), context="prepared", profile=manifest_profile(manifest)
        )
    sink.finish("FINISHED" if manifest is not None else "FAILED")
    return sink.run_id
