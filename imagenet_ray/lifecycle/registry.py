"""Registered versions of the logged classifier: registration with the val metrics as version tags, the
`champion` alias that moves only on a better val/top1 on the same val set, and model references
(models:/NAME@ALIAS, models:/NAME/VERSION, models:/m-<id>, runs:/ID/NAME) → what they point at."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from imagenet_ray.errors import UserError, describe_error
from imagenet_ray.lifecycle.package import CHECKPOINT_URL_TAG, VAL_DIGEST_TAG, mlflow_at
from imagenet_ray.tracking import resolve_tracking_uri

if TYPE_CHECKING:
    from mlflow.entities import LoggedModel
    from mlflow.entities.model_registry import ModelVersion
    from mlflow.tracking import MlflowClient

CHAMPION_ALIAS = "champion"
# Version tags (register): the numbers the champion is chosen by, and where they come from.
VAL_TOP1_TAG = "val/top1"
VAL_TOP5_TAG = "val/top5"
TRAINING_RUN_TAG = "imagenet_ray.training_run"
_FORMS = "models:/NAME@ALIAS, models:/NAME/VERSION, models:/m-<logged model id> or runs:/RUN_ID/MODEL_NAME"


@dataclass(frozen=True)
class ModelReference:
    """What a model reference points at, pinned: `model_uri` stays on this model when an alias moves."""

    ref: str
    model_uri: str  # for mlflow.pyfunc.load_model: models:/m-<id> when MLflow knows the id
    artifact_uri: str | None  # where the model's files are (download_model), None when it has none
    model_id: str | None
    registered_name: str | None
    version: str | None
    run_id: str | None  # the training run
    checkpoint_url: str | None
    val_top1: float | None
    val_top5: float | None
    dataset_digest: str | None
    tags: Mapping[str, str] = field(default_factory=dict)  # the version's tags, else the logged model's


@dataclass(frozen=True)
class PromotionDecision:
    """Whether `alias` of registered model `name` moved to `version`, from which version, and why."""

    name: str
    alias: str
    version: str
    moved: bool
    previous_version: str | None
    reason: str

    def line(self) -> str:
        """One line for the job log."""
        if self.moved:
            return f"models:/{self.name}@{self.alias} → version {self.version} ({self.reason})"
        return f"models:/{self.name}@{self.alias} stays on version {self.previous_version}: {self.reason}"


def _client(tracking_uri: str) -> MlflowClient:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri, registry_uri=tracking_uri)


@contextlib.contextmanager
def _errors(subject: str) -> Iterator[None]:
    """MLflow failures (unknown name, alias, version, run; an unreachable store) → one line naming `subject`."""
    try:
        yield
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"{subject}: {describe_error(exc, 200)}") from None


def _float(value: Any) -> float | None:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def _is_checkpoint_location(source: str) -> bool:
    """A version registered the old way had the checkpoint directory as its source (a path or storage URL)."""
    return urlparse(source).scheme in ("", "file", "s3", "gs", "gcs")


def _logged_model_metric(model: LoggedModel, key: str) -> float | None:
    values = [m for m in (model.metrics or []) if m.key == key]
    return float(max(values, key=lambda m: (m.step, m.timestamp)).value) if values else None


def _from_logged_model(ref: str, model: LoggedModel, version: ModelVersion | None = None) -> ModelReference:
    model_tags = dict(model.tags or {})
    tags = dict(version.tags or {}) if version is not None else model_tags
    digest = tags.get(VAL_DIGEST_TAG) or model_tags.get(VAL_DIGEST_TAG)
    return ModelReference(
        ref=ref,
        model_uri=f"models:/{model.model_id}",
        artifact_uri=model.artifact_location,
        model_id=model.model_id,
        registered_name=None if version is None else version.name,
        version=None if version is None else str(version.version),
        run_id=(version.run_id if version is not None else None) or model.source_run_id,
        checkpoint_url=tags.get(CHECKPOINT_URL_TAG) or model_tags.get(CHECKPOINT_URL_TAG),
        # a version's own tags first (what the champion is chosen by), else the metrics logged on the model
        val_top1=_float(tags.get(VAL_TOP1_TAG)) or _logged_model_metric(model, VAL_TOP1_TAG),
        val_top5=_float(tags.get(VAL_TOP5_TAG)) or _logged_model_metric(model, VAL_TOP5_TAG),
        dataset_digest=digest,
        tags=tags,
    )


def _logged_model_id(source: str) -> str | None:
    """m-<id> of a models:/m-<id> version source."""
    body = source[len("models:/") :].strip("/") if source.startswith("models:/") else ""
    return body if body.startswith("m-") and "/" not in body else None


def _from_version(ref: str, client: MlflowClient, version: ModelVersion) -> ModelReference:
    # The sqlite registry keeps no model_id on a version, only its models:/m-<id> source.
    model_id = getattr(version, "model_id", None) or _logged_model_id(str(version.source))
    if model_id:
        return _from_logged_model(ref, client.get_logged_model(model_id), version)
    tags = dict(version.tags or {})
    source = str(version.source)
    checkpoint_source = _is_checkpoint_location(source) and not tags.get(CHECKPOINT_URL_TAG)
    return ModelReference(
        ref=ref,
        model_uri=f"models:/{version.name}/{version.version}",
        artifact_uri=None if checkpoint_source else source,
        model_id=None,
        registered_name=version.name,
        version=str(version.version),
        run_id=version.run_id,
        checkpoint_url=tags.get(CHECKPOINT_URL_TAG) or (source if _is_checkpoint_location(source) else None),
        val_top1=_float(tags.get(VAL_TOP1_TAG)),
        val_top5=_float(tags.get(VAL_TOP5_TAG)),
        dataset_digest=tags.get(VAL_DIGEST_TAG),
        tags=tags,
    )


def _from_run(ref: str, client: MlflowClient, run_id: str, model_name: str) -> ModelReference:
    """The model `model_name` logged by the run; logged more than once, the one at the largest step (as
    mlflow.register_model chooses), then the newest."""
    run = client.get_run(run_id)
    outputs = run.outputs.model_outputs if run.outputs is not None else []
    candidates = []
    for output in outputs or []:
        model = client.get_logged_model(output.model_id)
        if model.name == model_name:
            candidates.append((output.step, model.creation_timestamp, model))
    if not candidates:
        raise UserError(f"{ref}: run {run_id} logged no model named {model_name!r}")
    return _from_logged_model(ref, max(candidates, key=lambda c: (c[0], c[1]))[2])


def resolve_model_reference(ref: str, tracking_uri: str) -> ModelReference:
    """models:/NAME@ALIAS, models:/NAME/VERSION, models:/m-<id> or runs:/ID/NAME → the model, its training run,
    checkpoint URL and val metrics. Unknown name, alias, version, id or run → UserError naming `ref`."""
    uri = resolve_tracking_uri(tracking_uri)
    with _errors(ref):
        if ref.startswith("models:/"):
            body = ref[len("models:/") :].strip("/")
            client = _client(uri)
            if "@" in body:
                name, _, alias = body.partition("@")
                if not name or not alias or "/" in alias:
                    raise UserError(f"{ref}: expected models:/NAME@ALIAS")
                return _from_version(ref, client, client.get_model_version_by_alias(name, alias))
            if "/" in body:
                name, _, version = body.partition("/")
                if not name or not version.isdigit():
                    raise UserError(f"{ref}: expected models:/NAME/VERSION with a version number")
                return _from_version(ref, client, client.get_model_version(name, version))
            if body.startswith("m-"):
                return _from_logged_model(ref, client.get_logged_model(body))
        elif ref.startswith("runs:/"):
            run_id, _, model_name = ref[len("runs:/") :].strip("/").partition("/")
            if run_id and not model_name:
                raise UserError(f"{ref}: names a run, not a model (add the model's name: runs:/{run_id}/best)")
            if run_id:
                return _from_run(ref, _client(uri), run_id, model_name.strip("/"))
    raise UserError(f"{ref}: not a model reference (expected {_FORMS})")


def checkpoint_url_for(ref: str, tracking_uri: str) -> str:
    """The checkpoint directory a model reference's weights came from (what `imagenet-ray evaluate` reads)."""
    url = resolve_model_reference(ref, tracking_uri).checkpoint_url
    if not url:
        raise UserError(f"{ref}: the model records no checkpoint URL (not logged by imagenet-ray training)")
    return url


def download_model(model_uri: str, tracking_uri: str, dst_path: str | Path | None = None) -> Path:
    """Local directory of the model a reference names (MLmodel at its top; read_meta / weights_path find the
    contract files), downloaded into `dst_path` (default: a new temporary directory; the caller removes it)."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    uri = resolve_tracking_uri(tracking_uri)
    reference = resolve_model_reference(model_uri, uri)
    if not reference.artifact_uri:
        raise UserError(f"{model_uri}: not an MLflow model (its version points at a checkpoint directory)")
    target = Path(dst_path) if dst_path is not None else Path(tempfile.mkdtemp(prefix="imagenet-ray-model-"))
    target.mkdir(parents=True, exist_ok=True)
    # The model's artifact location, not its models:/ URI (MLflow resolves models:/ through the process-wide
    # registry URI, whatever tracking_uri says); its root ("") straight into `target`, always as a copy.
    with _errors(f"{model_uri}: cannot download the model"):
        repo = get_artifact_repository(reference.artifact_uri, tracking_uri=uri, registry_uri=uri)
        return Path(repo.download_artifacts("", dst_path=str(target)))


def register(
    model_uri: str,
    name: str,
    *,
    tracking_uri: str,
    run_id: str,
    val_top1: float,
    val_top5: float,
    dataset_digest: str | None,
) -> str:
    """A new version of registered model `name` (created if needed) for the logged model `model_uri`, tagged
    with val/top1, val/top5, the training run, the val set's digest and the checkpoint URL; returns the version."""
    uri = resolve_tracking_uri(tracking_uri)
    reference = resolve_model_reference(model_uri, uri)
    tags = {VAL_TOP1_TAG: str(float(val_top1)), VAL_TOP5_TAG: str(float(val_top5)), TRAINING_RUN_TAG: run_id}
    if dataset_digest:
        tags[VAL_DIGEST_TAG] = dataset_digest
    if reference.checkpoint_url:
        tags[CHECKPOINT_URL_TAG] = reference.checkpoint_url
    from mlflow.exceptions import MlflowException

    # mlflow_at: the store resolves a models:/m-<id> source through the process-wide tracking URI.
    with _errors(f"registered model {name!r} at {uri}"), mlflow_at(uri):
        client = _client(uri)
        try:
            client.create_registered_model(name)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        version = client.create_model_version(
            name, source=reference.model_uri, run_id=run_id, tags=tags, model_id=reference.model_id
        )
    return str(version.version)


def promote_if_better(name: str, version: str, *, tracking_uri: str, alias: str = CHAMPION_ALIAS) -> PromotionDecision:
    """Move `alias` to `version` when there is no champion yet, or when the version's val/top1 beats the
    champion's on the same val set (equal val-digest tags). Read from the version tags `register` wrote."""
    uri = resolve_tracking_uri(tracking_uri)
    with _errors(f"models:/{name}/{version}"):
        client = _client(uri)
        candidate = client.get_model_version(name, version)
        current = client.get_registered_model(name).aliases.get(alias)
    new_top1 = _float(candidate.tags.get(VAL_TOP1_TAG))
    new_digest = candidate.tags.get(VAL_DIGEST_TAG)

    def decision(moved: bool, reason: str) -> PromotionDecision:
        if moved:
            with _errors(f"models:/{name}@{alias}"):
                client.set_registered_model_alias(name, alias, version)
        return PromotionDecision(name, alias, str(version), moved, None if current is None else str(current), reason)

    if current is None:
        return decision(True, f"no {alias} yet")
    if str(current) == str(version):
        return decision(False, f"version {version} is already the {alias}")
    if new_top1 is None:
        return decision(False, f"version {version} has no {VAL_TOP1_TAG} tag")
    with _errors(f"models:/{name}@{alias}"):
        champion = client.get_model_version(name, str(current))
    old_top1, old_digest = _float(champion.tags.get(VAL_TOP1_TAG)), champion.tags.get(VAL_DIGEST_TAG)
    if not new_digest or new_digest != old_digest:
        return decision(
            False,
            f"val/top1 not comparable: version {version} was measured on val set {new_digest or 'unknown'},"
            f" the {alias} (version {current}) on {old_digest or 'unknown'}",
        )
    if old_top1 is None:
        return decision(False, f"the {alias} (version {current}) has no {VAL_TOP1_TAG} tag")
    if new_top1 > old_top1:
        return decision(True, f"val/top1 {new_top1:.4f} > {old_top1:.4f} of version {current}")
    return decision(False, f"val/top1 {new_top1:.4f} does not beat {old_top1:.4f} of version {current}")
